"""Loaded by every Python process that has this folder on PYTHONPATH: installs the test fault hooks when
LUNATRAIN_FAULT is set (see faulthooks.py)."""

import os

if os.environ.get("LUNATRAIN_FAULT"):
    import faulthooks

    faulthooks.install()

if os.environ.get("LUNA_KILL"):  # kill -9 at exact points of a job (killpoints.py)
    import killpoints

    killpoints.install()
