"""Every command line the user's training guide quotes works with `lunatrain` in place of `npm run …`, and
resolves to the parameters the guide means (checked through `--dry-run`, which prints them as JSON)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lunatrain.cli import app

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT.parent / "shared" / "seed" / "training-guide.de.md"  # the user's original, beside the checkout

# The guide's lines, verbatim, with what each must resolve to.
GUIDE_LINES = {
    "npm run train:luna": {},
    "npm run train:luna -- --ensureTrainer": {},
    "npm run train:luna -- --minCurated=30 --epochs=4 --learningRate=0.0001": {
        "minCurated": 30,
        "epochs": 4,
        "learningRate": 0.0001,
    },
    "npm run train:luna -- --datasetTier=merged --batchSize=4 --rank=32": {
        "datasetTier": "merged",
        "batchSize": 4,
        "rank": 32,
        "alpha": 64.0,
    },
    "npm run train:auto": {},
    "npm run train:lora": {},
}
LUNA_DEFAULTS = {"adapterName": "luna-adapter", "adapterStrategy": "versioned", "datasetTier": "curated"}
PACKAGE_SCRIPTS = {
    "eval:gate": "eval-gate",
    "train:export": "export",
    "train:prepare": "prepare",
    "train:lora": "lora",
    "train:auto": "auto",
    "train:luna": "luna",
}


def translate(line: str) -> list[str]:
    """`npm run train:luna -- --x` → `lunatrain luna --x`, through package.json's own mapping."""
    scripts = json.loads((ROOT / "package.json").read_text())["scripts"]
    words = shlex.split(line)
    assert words[:2] == ["npm", "run"]
    command = shlex.split(scripts[words[2]])
    assert command[:2] == ["sh", "scripts/lunatrain"], command  # the checkout's .venv, else PATH's lunatrain
    command = command[1:]
    rest = words[3:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return command[1:] + rest


@pytest.mark.parametrize("line", list(GUIDE_LINES))
def test_guide_line_resolves(line: str, home: Path) -> None:
    argv = translate(line) + ["--dry-run"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    expected = dict(GUIDE_LINES[line])
    if argv[0] == "luna":
        expected = LUNA_DEFAULTS | expected
        assert out["profile"] == "luna"
    resolved = out["params"] | out["options"]
    assert {k: resolved[k] for k in expected} == expected
    if "ensureTrainer" in out:  # lora's dry run has no flow steps to ensure before
        assert out["ensureTrainer"] == ("--ensureTrainer" in line)


def test_flags_in_both_spellings_and_forms_agree(home: Path) -> None:
    forms = [
        ["luna", "--minCurated=30", "--learningRate=0.0001", "--batchSize", "2"],
        ["luna", "--min-curated", "30", "--learning-rate", "0.0001", "--batch-size=2"],
    ]
    outs = []
    for argv in forms:
        result = CliRunner().invoke(app, argv + ["--dry-run"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        outs.append(out["params"] | out["options"])
    assert outs[0] == outs[1]
    assert (outs[0]["minCurated"], outs[0]["learningRate"], outs[0]["batchSize"]) == (30, 0.0001, 2)


def test_package_json_maps_every_guide_script() -> None:
    scripts = json.loads((ROOT / "package.json").read_text())["scripts"]
    assert {name: shlex.split(cmd)[2] for name, cmd in scripts.items()} == PACKAGE_SCRIPTS
    for command in PACKAGE_SCRIPTS.values():
        assert CliRunner().invoke(app, [command, "--help"]).exit_code == 0, command


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["luna", "--rank=0"], "rank"),
        (["luna", "--datasetTier=gold"], "datasetTier"),
        (["luna", "--adapterName=../x"], "adapterName"),
        (["auto", "--profile", "nope"], "nope"),
        (["luna", "--learningRate=-1"], "learningRate"),
    ],
)
def test_bad_flags_exit_2_with_one_sentence(argv: list[str], needle: str, home: Path) -> None:
    result = CliRunner().invoke(app, argv + ["--dry-run"])
    assert result.exit_code in (1, 2) and needle in result.output
    assert result.exit_code == (1 if needle == "nope" else 2)
    assert "Traceback" not in result.output


@pytest.mark.skipif(not GUIDE.is_file(), reason="the user's original guide is not beside this checkout")
def test_every_npm_line_of_the_original_guide_is_covered() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    found = {re.sub(r"\s+", " ", m.strip()) for m in re.findall(r"^(npm run [^\n`]+)$", text, re.M)}
    found |= {f"npm run {m}" for m in re.findall(r"`npm run ([a-z:]+)`", text)}
    assert found, "no npm lines found in the guide"
    covered = set(GUIDE_LINES) | {f"npm run {s}" for s in PACKAGE_SCRIPTS}
    assert found <= covered, found - covered


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_npm_runs_the_guide_scripts_without_the_venv_activated(home: Path) -> None:
    """Repro: `npm run train:luna -- --epochs=4` said "sh: 1: lunatrain: not found" unless the .venv that
    `make luna` made was activated first, though the README says the npm names work verbatim."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASSISTANT_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    if shutil.which("lunatrain", path=env["PATH"]) or not (ROOT / ".venv" / "bin" / "lunatrain").exists():
        pytest.skip("needs lunatrain in this checkout's .venv and nowhere else on PATH")
    done = subprocess.run(
        ["npm", "run", "--silent", "train:luna", "--", "--epochs=4", "--dry-run"],
        cwd=ROOT,
        env=env | {"ASSISTANT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["params"]["epochs"] == 4
