"""Data-parallel training under torchrun (gloo on CPU): two ranks with batchSize b train exactly like one
process with batchSize 2b, only rank 0 writes, and the flows that must run in one process say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lunatrain import distributed, registry
from lunatrain.cli import app
from lunatrain.params import parse_params
from lunatrain.train import Status, run_lora

from helpers import make_records, write_export

PARAMS = {"epochs": 2, "rank": 4, "learningRate": 5e-3, "maxSeqLength": 128, "seed": 7, "dropout": 0.0}


def test_world_from_environment(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.from_env() == distributed.SINGLE and distributed.SINGLE.main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = distributed.from_env()
    assert (world.rank, world.size, world.local_rank, world.main, world.active) == (3, 4, 1, False, True)


def test_full_flow_refuses_to_run_under_torchrun(home, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(app, ["luna", "--local"])
    assert result.exit_code == 2
    # review repro: it said `lunatrain lora --local`, which torchrun itself refuses (an ambiguous --local-… option)
    assert "under torchrun run `lunatrain lora` (it trains in each process there)" in result.output
    assert not (home / "data").exists() or not any((home / "data").rglob("*.jsonl"))  # nothing exported


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_combined_batch(settings, home):
    data = write_export(settings, make_records(26, val_every=6))
    assert len(data.train) % 4 in (1, 2)  # the last step has one micro-batch: rank 1 sits it out
    single = run_lora(parse_params(PARAMS | {"batchSize": 4, "adapterName": "single"}), settings)
    assert single.status is Status.SUCCEEDED, single.error

    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")}
    env |= {"ASSISTANT_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        # torchrun's agent binds a free loopback port itself (as the trainer's workers are started)
        "--standalone",
        "--log-dir",  # else a torchelastic_* folder in /tmp that torchrun never removes
        str(home.parent / "torchrun-logs"),
        "-m",
        "lunatrain",
        "lora",
        "--json",
        "--adapterName",
        "dp",
        "--batchSize",
        "2",
        "--epochs",
        "2",
        "--rank",
        "4",
        "--learningRate",
        "5e-3",
        "--maxSeqLength",
        "128",
        "--seed",
        "7",
        "--dropout",
        "0",
        "--minCurated",  # a small export: fewer curated examples than the luna profile asks for
        "0",
        "--no-gate",
    ]
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    outcome = json.loads(proc.stdout[proc.stdout.index("{") :])  # rank 0's report; rank 1 prints nothing
    assert outcome["status"] == "succeeded" and outcome["adapter"] == {
        "name": "dp",
        "version": "v1",
        "path": "data/adapters/dp/v1",
    }

    dp_dir = Path(home) / registry.get_version(settings, "dp", "v1")["path"]
    from safetensors.torch import load_file

    a = load_file(str(single.path / "adapter_model.safetensors"))
    b = load_file(str(dp_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    report = json.loads((dp_dir / "training-report.json").read_text())
    assert report["dataParallel"] == {"ranks": 2, "backend": "gloo"}
    assert report["metrics"]["steps"] == single.report["metrics"]["steps"]
    assert report["metrics"]["tokensTrained"] == single.report["metrics"]["tokensTrained"]
    assert abs(report["metrics"]["valLoss"] - single.report["metrics"]["valLoss"]) < 1e-5
    assert abs(report["metrics"]["baseValLoss"] - single.report["metrics"]["baseValLoss"]) < 1e-6
    assert [v["version"] for v in registry.list_adapters(settings)["dp"]["versions"]] == ["v1"]  # rank 0 alone wrote


def test_only_a_lost_peer_is_called_one():
    """Review repro: every exception from a collective became PeerLost, so this rank's own out-of-memory in
    its all-reduce said "another of the 2 training processes failed", and the job lost the real error."""
    import torch

    with pytest.raises(distributed.PeerLost):
        with distributed._collective():
            raise RuntimeError(
                "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4242: Connection reset by peer"
            )
    with pytest.raises(torch.OutOfMemoryError):
        with distributed._collective():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    own = distributed.RankFailed({"code": "out_of_memory", "message": "m"}, torch.OutOfMemoryError("x"))
    assert not own.lost_peer
    lost = distributed.RankFailed({"code": "rank_peer_lost", "message": "m"}, distributed.PeerLost("x"))
    assert lost.lost_peer
