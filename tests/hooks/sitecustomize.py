"""Loaded by every Python process that has this folder on PYTHONPATH: installs the test fault hooks when
LUNATRAIN_FAULT is set (see faulthooks.py)."""

import os

if os.environ.get("LUNATRAIN_FAULT"):
    import faulthooks

    faulthooks.install()
