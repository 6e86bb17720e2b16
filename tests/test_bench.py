"""The benchmarks keep working: the GPU training benchmark's tiny preset runs on CPU end to end (the same
contenders and table code as bench/train_cpu.py), on a 4-bit base and in full precision, and reports a rate
for every contender, and the chat serving benchmark reports tokens and a rate for the endpoint and for
generate()."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The scripts run as __main__ with their own command lines, one after the other in one process: each
# would otherwise spend seconds of CPU importing torch, transformers and PEFT for itself. A script that fails
# does not keep the next one from running; each one's stdout and stderr end with a line of its own (MARK). The 4-bit
# run goes first: PEFT must load with bitsandbytes for it, and a full-precision run does not mind (so here
# the full-precision run has bitsandbytes loaded, which a run of its own would spare itself).
MARK = "=== bench script ended: "
_RUN_ALL = """
import runpy, sys, traceback
sys.path.insert(0, sys.argv[1])  # the bench folder, as running a script there puts it first
failed = 0
for argv in ({gpu4!r}, {gpu!r}, {infer!r}):
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        failed += exc.code not in (0, None)
    except BaseException:
        traceback.print_exc()
        failed += 1
    print({mark!r} + argv[0], flush=True)
    print({mark!r} + argv[0], file=sys.stderr, flush=True)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_training_and_inference_benchmark_smoke_on_cpu(tmp_path: Path, subtests) -> None:
    gpu_out, gpu4_out, infer_out = tmp_path / "train_gpu.md", tmp_path / "train_gpu_4bit.md", tmp_path / "infer.md"
    gpu = [
        str(ROOT / "bench" / "train_gpu.py"),
        "--presets",
        "tiny",
        "--device",
        "cpu",
        # the least that still times a step of every contender: one warm-up step and one timed, four short
        # samples of different lengths a step (so pad-to-longest still pads)
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--min-len",
        "16",
        "--max-len",
        "64",
        "--rounds",
        "1",
        "--threads",  # tiny matmuls lose more CPU to thread sync than they gain, the more so under load
        "1",
        "--out",
        str(gpu_out),
    ]
    gpu4 = [*gpu[:-1], str(gpu4_out), "--quantize", "4bit"]
    infer = [
        str(ROOT / "bench" / "infer.py"),
        "--prompts",
        "2",
        "--max-tokens",
        "4",
        "--concurrency",
        "2",
        "--out",
        str(infer_out),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_ALL.format(gpu4=gpu4, gpu=gpu, infer=infer, mark=MARK), str(ROOT / "bench")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    # Each script's stderr, for its own subtest's message.
    err = dict(zip(("4bit", "none", infer[0]), done.stderr.split(MARK), strict=False))
    said = dict(zip(("4bit", "none", infer[0]), done.stdout.split(MARK), strict=False))

    for quantize, out in (("4bit", gpu4_out), ("none", gpu_out)):
        with subtests.test(f"bench/train_gpu.py --quantize {quantize}"):
            assert out.is_file(), err.get(quantize, done.stderr)[-3000:]
            table = out.read_text()
            rows = [ln for ln in table.splitlines() if ln.startswith("| tiny / ")]
            assert [ln.split("|")[1].strip() for ln in rows] == [
                "tiny / trainer-pad",
                "tiny / trainer-flatten",
                "tiny / lunatrain",
            ]
            for ln in rows:
                rate = ln.split("|")[2].strip()
                assert re.fullmatch(r"[\d,]+", rate) and int(rate.replace(",", "")) > 0, ln
            assert "Attention in lunatrain's loop: varlen-sdpa" in table
            # Every contender times the same batches: the same real tokens after the warm-up step (the
            # Trainer's default sampler shuffled them, so the timed work differed in composition).
            counted = re.findall(r"round 1 (\S+): (\d+) tokens", said.get(quantize, ""))
            assert len(counted) == 3 and len({n for _, n in counted}) == 1, counted
            assert ("4-bit NF4 base" in table.splitlines()[0]) == (quantize == "4bit"), table.splitlines()[0]

    with subtests.test("bench/infer.py"):
        assert infer_out.is_file(), err.get(infer[0], done.stderr)[-3000:]
        rows = [
            ln.split("|")[1:-1]
            for ln in infer_out.read_text().splitlines()
            if ln.startswith(("| endpoint", "| generate"))
        ]
        assert [r[0].strip() for r in rows] == [
            "endpoint, 1 stream",
            "endpoint, 2 concurrent streams",
            "generate(), 1 at a time",
            "generate(), batch of 2",
        ]
        for row in rows:
            assert int(row[1].strip().replace(",", "")) > 0 and float(row[3].strip().replace(",", "")) > 0, row

    assert done.returncode == 0, done.stderr[-3000:]


def _bench(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_")} | env
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env=environ,
        cwd=ROOT,
    )


NO_OUT = {"growth.py", "shapes.py"}


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["prepare.py", "--n", "0"], "argument --n: 0 is too small; give 1 or more"),
        (["prepare.py", "--baseline-n", "0"], "argument --baseline-n: 0 is too small"),
        (["export.py", "--sizes", "0"], "argument --sizes: 0 is too small"),
        (["startup.py", "--rounds", "0"], "argument --rounds: 0 is too small"),
        (["job_start.py", "--jobs", "0"], "argument --jobs: 0 is too small"),
        (["infer.py", "--concurrency", "0"], "argument --concurrency: 0 is too small"),
        (["infer.py", "--prompts", "two"], "argument --prompts: 'two' is not a whole number"),
        # the first step is the untimed warm-up: one step would time nothing and print 0 tokens/s
        (["train_cpu.py", "--steps", "1"], "argument --steps: 1 is too small; give 2 or more"),
        # library tracebacks after building the model (set_num_threads, math domain, PEFT, ZeroDivisionError)
        (["train_cpu.py", "--threads", "0"], "argument --threads: 0 is too small; give 1 or more"),
        (["train_cpu.py", "--max-len", "0"], "argument --max-len: 0 is too small"),
        (["train_cpu.py", "--layers", "0"], "argument --layers: 0 is too small"),
        (["train_cpu.py", "--hidden", "0"], "argument --hidden: 0 is too small"),
        (["train_cpu.py", "--heads", "0"], "argument --heads: 0 is too small"),
        (["train_cpu.py", "--hidden", "65", "--heads", "2"], "--hidden 65 is not a multiple of twice --heads 2"),
        (["train_cpu.py", "--hidden", "6", "--heads", "2"], "--hidden 6 is not a multiple of twice --heads 2"),
        (["train_cpu.py", "--min-len", "200", "--max-len", "64"], "--min-len 200 is above --max-len 64"),
        (["train_cpu.py", "--vocab", "1024"], "argument --vocab: 1024 is too small; give 3072 or more"),
        (["train_gpu.py", "--device", "cpu", "--threads", "0"], "argument --threads: 0 is too small"),
        (["train_gpu.py", "--device", "cpu", "--min-len", "0"], "argument --min-len: 0 is too small"),
        (["train_gpu.py", "--device", "cpu", "--min-len", "5000"], "--min-len 5000 is above --max-len 4096"),
        (["train_gpu.py", "--device", "cpu", "--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
        (["api_load.py", "--clients", "0"], "argument --clients: 0 is too small"),
        # a window of no polling measured nothing and exited 0 with a table of nan
        (["api_load.py", "--duration", "0"], "argument --duration: 0 is too small; give more than 0"),
        (["api_load.py", "--duration", "-1"], "argument --duration: -1 is too small"),
        (["api_load.py", "--duration", "nan"], "argument --duration: 'nan' is not a finite number"),
        (["api_load.py", "--interval", "-1"], "argument --interval: -1 is too small; give 0 or more"),
        # no slowdown is greater than nan: every run passed
        (["api_load.py", "--limit", "nan"], "argument --limit: 'nan' is not a finite number"),
        # FileExistsError after the run had begun
        (["export.py", "--workdir", "TMP/afile"], "argument --workdir: TMP/afile is a file; name a new or empty"),
        (["prepare.py", "--workdir", "TMP/afile"], "argument --workdir: TMP/afile is a file"),
        # ZeroDivisionError after minutes of seeding and exporting; -1: a table of negative sizes, exit 0
        (["growth.py", "--jobs", "0"], "argument --jobs: 0 is too small; give 1 or more"),
        (["growth.py", "--jobs", "-1"], "argument --jobs: -1 is too small"),
        (["growth.py", "--home", "TMP/afile"], "argument --home: TMP/afile is a file; name a new or empty folder"),
        (["growth.py", "--home", "TMP"], "TMP holds files no benchmark wrote; name a new or empty folder"),
        # the table was lost to a FileNotFoundError after the whole run
        (["startup.py", "--out", "TMP"], "argument --out: TMP is a folder; name a file"),
        (["memory.py", "--out", "TMP"], "argument --out: TMP is a folder; name a file"),
        (["train_cpu.py", "--out", "TMP/afile/t.md"], "argument --out: cannot make the folder TMP/afile"),
        # a helper run directly: IndexError
        (["shapes.py"], "usage: python bench/shapes.py PRESET OUT cpu|cuda"),
        (["memory.py", "--only", "foo"], "argument --only: no model named 'foo' (luna-tiny, 20M)"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_bad_argument_is_one_sentence_before_any_work(tmp_path: Path, argv: list[str], said: str) -> None:
    """Repro: these ran for minutes and ended in a traceback (ZeroDivisionError, StatisticsError, …), or wrote
    a table of nothing and exited 0 (memory.py --only foo replaced bench/results/memory.md with an empty one)."""
    (tmp_path / "afile").write_text("keep")
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    said = said.replace("TMP", str(tmp_path))
    out = tmp_path / "table.md"
    # --out as well where a script has it: a refusal that went missing must not write into bench/results/
    done = _bench(*argv, *(["--out", str(out)] if argv[0] not in NO_OUT and "--out" not in argv else []))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].endswith(said) or said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


SCRIPTS = [
    "api_load.py", "export.py", "growth.py", "infer.py", "job_start.py", "memory.py", "prepare.py", "startup.py",
    "train_cpu.py", "train_gpu.py",
]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_whole_sentences_and_every_option(script: str) -> None:
    """Repro: --help cut its description mid-sentence (the docstring's first line of a wrapped sentence), and
    many options had no help at all."""
    done = _bench(script, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    about, _, options = done.stdout.partition("\noptions:\n")
    assert about.rstrip().endswith((".", ")", "`")), about
    # argparse puts an option's help two spaces after its name, or on the next, further indented line.
    lines = options.splitlines() + [""]
    bare = [
        ln
        for ln, after in zip(lines, lines[1:], strict=False)
        if ln.startswith("  -") and "  " not in ln.strip() and not after.startswith("   ")
    ]
    assert bare == [], bare


@pytest.mark.slow
def test_memory_without_cuda_says_so_in_one_sentence(tmp_path: Path) -> None:
    done = _bench("memory.py", "--device", "cuda", "--out", str(tmp_path / "m.md"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "no CUDA device here" in done.stderr and not (tmp_path / "m.md").exists()


def test_prepare_bench_refuses_a_work_folder_it_did_not_make(tmp_path: Path) -> None:
    """Repro: `--workdir` was deleted whole before the run, whatever it held (`--workdir ~` would have wiped
    the home folder)."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    done = _bench(
        "prepare.py", "--n", "10", "--baseline-n", "2", "--workdir", str(precious), "--out", str(tmp_path / "p.md")
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{precious} holds files no benchmark wrote" in done.stderr
    assert (precious / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_memory_bench_trains_through_the_loops_own_pieces(tmp_path: Path) -> None:
    """Repro: every measurement of bench/memory.py failed (`train.Run` had gained a required field), so
    `make bench` stopped there. One child at a small size: the same code path as every row of the table."""
    from lunatrain.models import build_tiny_model

    model = build_tiny_model(tmp_path / "luna-tiny")
    done = _bench(
        "memory.py", "--child", str(model), "256", "0", "chunked", "none", "cpu",
        ASSISTANT_HOME=str(tmp_path), OMP_NUM_THREADS="2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["loss"] == "chunked" and got["supervised"] == 256 - int(256 * 0.4)
    assert got["peak"] >= got["runtime"] > 0


@pytest.mark.slow
def test_api_load_bench_runs_against_todays_api_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Repro: bench/api_load.py read wire fields the API no longer has (`state`, `events`, `nextCursor`,
    `progress.total`) and a port its server helper never set; it failed at the first status it read; it
    seeded the database ASSISTANT_DB_URL named. The smallest run: two clients polling for a second while a
    short job trains."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "api_load.md"
    done = _bench(
        "api_load.py", "--clients", "2", "--duration", "1", "--interval", "0.2", "--epochs", "2",
        "--limit", "100", "--out", str(out),
        TMPDIR=str(scratch), ASSISTANT_DB_URL=f"sqlite:///{tmp_path / 'users.db'}",
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    table = out.read_text()
    for endpoint in ("GET lora/status", "GET training/status"):
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| {endpoint} |"))
        assert int(row.split("|")[2]) > 0, row
    assert "| errors | 0 |" in table
    assert re.search(r"\| training steps compared \| \d+–\d+ \(of \d+\) \|", table), table
    # Its data root is gone with it (torch may leave its own caches there, e.g. torchinductor_<user>), and the
    # database the user's settings name was never touched (it got the bundled seed).
    assert list(scratch.glob("lunatrain-apiload-*")) == []
    assert not (tmp_path / "users.db").exists()


@pytest.fixture
def benchargs(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/benchargs.py, imported as the scripts import it (their folder first on the path)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import benchargs

    return benchargs


def _refusal(ap: argparse.ArgumentParser, call, capsys: pytest.CaptureFixture[str]) -> str:
    """The one line an argparse refusal ends with; it must exit 2."""
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("bounds", "text", "said"),
    [
        ({"above": 0}, "0", "0 is too small; give more than 0"),
        ({"above": 0}, "-1", "-1 is too small; give more than 0"),
        ({"least": 0}, "-0.5", "-0.5 is too small; give 0 or more"),
        ({"least": 0}, "nan", "'nan' is not a finite number"),
        ({"above": 0}, "inf", "'inf' is not a finite number"),
        ({"least": 0}, "ten", "'ten' is not a number"),
    ],
)
def test_number_refuses_in_one_sentence(benchargs, capsys, bounds: dict, text: str, said: str) -> None:
    """Repro: api_load.py --duration 0 / -1 / nan measured nothing and exited 0; --limit nan passed every run."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--x", type=benchargs.number(**bounds))
    assert _refusal(ap, lambda: ap.parse_args(["--x", text]), capsys).endswith(f"argument --x: {said}")


def test_number_takes_its_bounds(benchargs) -> None:
    assert benchargs.number(least=0)("0") == 0.0
    assert benchargs.number(above=0)("0.25") == 0.25


def test_description_is_the_whole_first_paragraph(benchargs) -> None:
    """Repro: --help showed the docstring's first line, cut mid-sentence."""
    assert benchargs.description("One sentence\nwrapped here.\n\nMore.") == "One sentence\nwrapped here."


def test_out_file_makes_its_folder_first_and_refuses_a_folder(benchargs, capsys, tmp_path: Path) -> None:
    """Repro: startup.py and memory.py --out in a missing folder ended in a traceback after the whole run."""
    ap = argparse.ArgumentParser()
    out = benchargs.out_file(ap, tmp_path / "new" / "deeper" / "t.md")
    assert out.parent.is_dir() and not out.exists()
    said = _refusal(ap, lambda: benchargs.out_file(ap, tmp_path), capsys)
    assert said.endswith(f"argument --out: {tmp_path} is a folder; name a file")
    (tmp_path / "afile").write_text("")
    said = _refusal(ap, lambda: benchargs.out_file(ap, tmp_path / "afile" / "t.md"), capsys)
    assert f"cannot make the folder {tmp_path / 'afile'}" in said


def test_confine_settings_leaves_only_what_the_benchmark_sets(benchargs, monkeypatch) -> None:
    """Repro: ASSISTANT_DB_URL reached the benchmarks' in-process settings, and they seeded that database."""
    monkeypatch.setattr(os, "environ", dict(os.environ) | {"ASSISTANT_DB_URL": "sqlite:////x.db", "KEEP": "1"})
    benchargs.confine_settings(ASSISTANT_HOME="/scratch")
    assert {k: v for k, v in os.environ.items() if k.startswith("ASSISTANT_")} == {"ASSISTANT_HOME": "/scratch"}
    assert os.environ["KEEP"] == "1"
    os.environ["ASSISTANT_DB_URL"] = "sqlite:////x.db"
    assert benchargs.confined_env(ASSISTANT_HOME="/s")["ASSISTANT_HOME"] == "/s"
    assert "ASSISTANT_DB_URL" not in benchargs.confined_env()


def test_a_work_folder_the_user_made_stays(benchargs, tmp_path: Path) -> None:
    """Repro: export.py/prepare.py --workdir naming an empty folder of the user's deleted the folder itself."""
    ap = argparse.ArgumentParser()
    mine = tmp_path / "mine"
    mine.mkdir()
    with benchargs.work_dir(ap, mine, keep=True):
        (mine / "db").write_text("made by the run")
    with benchargs.work_dir(ap, mine):  # the kept run's files are emptied; the folder is still the user's
        assert [p.name for p in mine.iterdir()] == [benchargs.MARK]
        (mine / "db").write_text("made by the run")
    assert mine.is_dir() and list(mine.iterdir()) == []

    made = tmp_path / "made"
    with benchargs.work_dir(ap, made, keep=True):
        pass
    with benchargs.work_dir(ap, made):  # a folder a benchmark made goes, also after a kept run
        (made / "db").write_text("made by the run")
    assert not made.exists()


def test_a_work_folder_that_is_a_file_or_foreign_is_refused(benchargs, capsys, tmp_path: Path) -> None:
    """Repro: --workdir naming a file ended in a FileExistsError traceback."""
    ap = argparse.ArgumentParser()
    afile = tmp_path / "afile"
    afile.write_text("keep")
    said = _refusal(ap, lambda: benchargs.fresh_work_dir(ap, afile), capsys)
    assert said.endswith(f"argument --workdir: {afile} is a file; name a new or empty folder")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    said = _refusal(ap, lambda: benchargs.fresh_work_dir(ap, precious), capsys)
    assert said.endswith(f"{precious} holds files no benchmark wrote; name a new or empty folder")
    assert afile.read_text() == "keep" and (precious / "notes.txt").read_text() == "keep"


def test_versions_name_python_and_the_training_stack(benchargs) -> None:
    said = benchargs.versions()
    assert said.startswith("Python 3.") and all(f"{lib} " in said for lib in ("torch", "transformers", "PEFT"))


def test_ctrl_c_is_one_line_and_exit_130(benchargs, capsys) -> None:
    """Repro: Ctrl-C printed a KeyboardInterrupt traceback."""

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        benchargs.run(interrupted)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().endswith(": interrupted")
