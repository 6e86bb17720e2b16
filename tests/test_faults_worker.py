"""kill -9 of a job's worker (not the trainer) at seeded points of a job; the invariants and the hook are
those of test_faults_trainer.py. Run: `.venv/bin/python -m pytest tests/test_faults_worker.py -m slow -q`."""

from __future__ import annotations

import pytest
from test_faults_trainer import WORKER_SEEDS, check_kind, plans

pytestmark = pytest.mark.slow


def test_kill_9_of_the_worker_at_seeded_points(tmp_path_factory):
    check_kind(tmp_path_factory, "w", plans("w", WORKER_SEEDS), "Worker kill -9")
