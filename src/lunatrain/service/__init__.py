"""The trainer subsystem: a service that owns the job queue and runs each LoRA job in a child process.

- `jobs.py`     the wire models (job, progress, event, health) and their SQLite persistence — defined once,
                imported by the trainer, the client, the assistant API and the CLI
- `app.py`      the trainer's HTTP app and `serve()` (started by `lunatrain trainer`)
- `runner.py`   the queue runner: one child process per job, events → job state
- `recovery.py` settling jobs a stopped trainer left unfinished, from recorded facts
- `device.py`   the device facts for /health
- `lock.py`     one trainer per data root; the pid file
- `worker.py`   the child process (calls `flow.train_and_gate`)
- `warm.py`     the warm worker: imports the training stack once, then forks each single-process job
- `ensure.py`   start the trainer on demand
- `client.py`   the typed client the CLI and the assistant API use
- `spawn.py`    the one way to start our own processes
"""
