"""kill -9 of the trainer at seeded points of jobs submitted with `resume: true` (the restarted trainer runs
them again from their checkpoint); the points, invariants and hook are those of test_faults_trainer.py, whose
resume-off half runs beside this one under pytest-xdist. Run: `pytest tests/test_faults_trainer_resume.py -q`."""

from __future__ import annotations

import pytest
from test_faults_trainer import check_kind, trainer_plans

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_kill_9_of_the_trainer_with_resume_at_seeded_points(tmp_path_factory):
    check_kind(tmp_path_factory, "t", trainer_plans(resume=True), "Trainer kill -9")
