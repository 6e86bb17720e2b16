"""HTTP plumbing shared by both services (the assistant API and the trainer): the request guard and the one
error shape. Neither service imports the other; both import this."""
