"""The whole Luna flow as a new user runs it: an empty data root, `lunatrain examples seed`, `lunatrain luna`
through a trainer service that the CLI starts on demand, then `lunatrain luna` again.

Run: `.venv/bin/python -m pytest tests/test_luna_flow.py -m slow`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer_helpers import ON_DEMAND_ENV, trainer_processes

GUIDE_DATASET_FILES = [
    "assistant-sft-curated.jsonl",
    "assistant-sft-curated-train.jsonl",
    "assistant-sft-curated-val.jsonl",
    "assistant-sft-curated-test.jsonl",
    "assistant-sft-memory.jsonl",
    "assistant-sft.jsonl",
]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path / "fresh"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
    env |= {
        "ASSISTANT_HOME": str(home),
        # Any free port: the trainer the CLI starts binds one itself and records it under the data root.
        "ASSISTANT_LORA_TRAINER_URL": "http://127.0.0.1:0",
        "HF_HUB_OFFLINE": "1",
    } | ON_DEMAND_ENV
    yield home, env
    pid_file = home / "reports" / "training" / "trainer.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def lunatrain(home: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lunatrain.cli", *argv], cwd=home, env=env, capture_output=True, text=True, timeout=900
    )


def _valid_jsonl(path: Path) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        record = json.loads(line)
        assert record["messages"][-1]["role"] == "assistant" and record["split"] in ("train", "val", "test")
    return len(lines)


@pytest.mark.slow
def test_luna_from_an_empty_data_root_twice(fresh: tuple[Path, dict[str, str]]) -> None:
    home, env = fresh
    assert lunatrain(home, env, "examples", "seed").returncode == 0
    first = lunatrain(home, env, "luna", "--epochs=1")
    assert first.returncode == 0, first.stdout + first.stderr
    for step in ("eval-gate", "export", "prepare", "lora"):
        assert f"==> {step}" in first.stdout
    assert "luna-adapter@v1" in first.stdout
    # The trainer admitted the job on the plan prepare had made of the model (data/cache/shapes): it never
    # loads torch itself, which only its jobs' workers need, and stays as small as a web service.
    (trainer,) = trainer_processes(home)
    assert not [m.path for m in trainer.memory_maps() if "libtorch" in m.path]

    # every artifact the guide lists, and each one valid
    training = home / "data" / "training"
    summary = json.loads((training / "assistant-sft-summary.json").read_text())
    for name in GUIDE_DATASET_FILES:
        assert _valid_jsonl(training / name) == summary["files"][name]["records"]
        assert hashlib.sha256((training / name).read_bytes()).hexdigest() == summary["files"][name]["sha256"]
    assert summary["counts"]["curated"]["total"] >= 30
    reports = home / "reports"
    latest = json.loads((reports / "training" / "lora-latest.json").read_text())
    assert latest["status"] == "succeeded" and latest["version"] == "v1"
    assert latest["metrics"]["valLoss"] < latest["metrics"]["baseValLoss"]
    registry = json.loads((reports / "training" / "lora-adapters.json").read_text())
    luna = registry["adapters"]["luna-adapter"]
    assert [v["version"] for v in luna["versions"]] == ["v1"]
    assert luna["aliases"]["active"] == "v1"  # passed the gate against the base model
    assert json.loads((reports / "training" / "prepare-latest.json").read_text())["status"] in ("ok", "warn")
    assert json.loads((reports / "eval" / "eval-gate-latest.json").read_text())["passed"] is True
    adapter = home / "data" / "adapters" / "luna-adapter" / "v1"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "luna-tiny"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 1000
    assert (
        json.loads((adapter / "training-report.json").read_text())["dataset"]["fingerprint"] == summary["fingerprint"]
    )
    assert (adapter / "loss-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The second run exports the same files; with nothing changed it trains nothing and names v1 (--retrain
    # would train it again).
    second = lunatrain(home, env, "luna", "--epochs=1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "luna-adapter@v1 was trained on this data with these parameters; not trained again" in second.stdout
    registry = json.loads((reports / "training" / "lora-adapters.json").read_text())
    versions = registry["adapters"]["luna-adapter"]["versions"]
    assert [v["version"] for v in versions] == ["v1"] and versions[0]["datasetFingerprint"] == summary["fingerprint"]
    assert json.loads((training / "assistant-sft-summary.json").read_text())["fingerprint"] == summary["fingerprint"]


@pytest.mark.slow
def test_flow_stops_at_the_first_failing_step(fresh: tuple[Path, dict[str, str]]) -> None:
    home, env = fresh
    assert lunatrain(home, env, "examples", "seed").returncode == 0
    done = lunatrain(home, env, "luna", "--minCurated=100000")
    assert done.returncode == 1
    assert "Step prepare failed" in done.stderr and "minCurated" in done.stderr
    assert "==> lora" not in done.stdout
    assert not (home / "reports" / "training" / "lora-adapters.json").exists()
    assert not (home / "reports" / "training" / "trainer.pid").exists()  # nothing was submitted
