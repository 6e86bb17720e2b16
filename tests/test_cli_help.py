"""`--help` shows what a run would use, in full at 80 columns; standalone `prepare` resolves like `luna`.

Run: `pytest tests/test_cli_help.py -q`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer.main as typer_main
from typer.testing import CliRunner

from lunatrain.cli import app
from lunatrain.messages import CODES

from helpers import make_records, write_export


def _help(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANT_") or k == "ASSISTANT_HOME"}
    out = subprocess.run(
        [sys.executable, "-m", "lunatrain", *args, "--help"],
        env=env | {"COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _default(help_text: str, option: str) -> str:
    """The "default X" shown for `option` (its help may start on the next line)."""
    lines = help_text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    text = " ".join(line.strip() for line in lines[at : at + 2])
    return text.split("default ", 1)[1].split()[0]


@pytest.mark.slow
def test_luna_help_shows_the_luna_profile_values_and_both_spellings_at_80_columns(home):
    """Repro: `luna --help` listed the generic defaults (lr 0.0002, rank 16, maxSeqLength 1024, minCurated 0)
    and rich cut the camelCase spellings at 80 columns (`--ad…`)."""
    text = _help("luna")
    assert "…" not in text  # option names are never cut; help texts wrap at 80 columns
    for both in (
        "--adapter-name, --adapterName",
        "--learning-rate, --learningRate",
        "--min-curated, --minCurated",
        "--max-seq-length, --maxSeqLength",
        "--ensure-trainer, --ensureTrainer",
    ):
        assert both in text, both
    # the luna profile on the built-in base model (its [bases."luna-tiny"] table)
    assert [_default(text, o) for o in ("--learning-rate", "--rank", "--max-seq-length", "--min-curated")] == [
        "0.01",
        "8",
        "512",
        "30",
    ]
    assert "the luna profile's values on base model luna-tiny" in text
    # auto: the library defaults, unless a profile is named; then that profile's for the named base
    generic = _help("auto")
    assert [_default(generic, o) for o in ("--learning-rate", "--max-seq-length", "--min-curated")] == [
        "0.0002",
        "1024",
        "0",
    ]
    named = _help("auto", "--profile", "luna", "--baseModel", "org/other")
    assert [_default(named, o) for o in ("--learning-rate", "--max-seq-length")] == ["0.0002", "512"]
    assert "on base model org/other" in named


def test_standalone_prepare_checks_at_the_luna_profile_values(settings):
    """Repro: `prepare` checked at maxSeqLength 1024 and minCurated 0 while `luna` trains at 512 with 30."""
    write_export(settings, make_records(40))
    result = CliRunner().invoke(app, ["prepare", "--json"])
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    assert report["maxSeqLength"] == 512
    assert all(c["code"] in CODES for c in report["checks"])  # each check says itself in a translatable form
    volume = next(c for c in report["checks"] if c["id"] == "volume")
    assert "minCurated 30" in volume["message"] or "30 required" in volume["message"]
    # flags still win, and --profile picks another profile
    flagged = CliRunner().invoke(app, ["prepare", "--json", "--maxSeqLength=256", "--minCurated=0"])
    assert json.loads(flagged.output[: flagged.output.rindex("}") + 1])["maxSeqLength"] == 256
    assert CliRunner().invoke(app, ["prepare", "--profile", "nope"]).exit_code == 1


def test_an_option_without_a_value_says_what_it_falls_back_to():
    """Repro: `lora --help` showed `--baseModel` as "None: ASSISTANT_BASE_MODEL; default none"."""
    text = CliRunner().invoke(app, ["lora", "--help"], env={"COLUMNS": "200"}).output
    flat = " ".join(text.split())  # help texts wrap; the words stay in order
    assert "None:" not in flat
    assert "hub id, local folder or luna-tiny; default ASSISTANT_BASE_MODEL, else luna-tiny" in flat
    assert "LoRA scale numerator (unset: 2 x rank); default 16.0" in flat  # the luna profile sets it
    generic = " ".join(CliRunner().invoke(app, ["auto", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "LoRA scale numerator; default 2 x rank" in generic
    assert "cap on optimizer steps; default no cap" in flat
    assert "(QLoRA, bitsandbytes); default none" in flat  # a value of its own: no quantization


def test_every_option_of_every_command_says_what_it_does():
    """Repro: `eval-gate --help` listed its four thresholds with no word on what they bound or their defaults;
    `examples list --limit`, `memory add --topic` and others were bare names too."""
    import typer

    def commands(group, path=()):
        for name, sub in group.commands.items():
            yield from commands(sub, (*path, name)) if hasattr(sub, "commands") else [((*path, name), sub)]

    found = list(commands(typer.main.get_command(app)))
    assert len(found) > 30  # the walk reaches the subcommands
    bare = [
        f"{' '.join(path)} {param.opts[0]}"
        for path, command in found
        for param in command.params
        if param.param_type_name == "option" and param.name != "help" and not param.help
    ]
    assert bare == [], bare
    text = " ".join(CliRunner().invoke(app, ["eval-gate", "--help"], env={"COLUMNS": "200"}).output.split())
    # a fraction, said so: a profile's `maxLossRegression = 5` meant as 5 % allowed a rise of 500 % unseen
    assert (
        "largest relative rise of val or test loss against the baseline, a fraction (0.02: 2%); default 0.02, "
        "or --profile's [gate]" in text
    )


def test_every_option_that_takes_a_value_comes_in_both_spellings():
    """Repro: README says "Flags that take a value come in both spellings" (`--min-curated` and the guide's
    `--minCurated`), but `lunatrain trainer --log-file` had no `--logFile`. Every option of every command
    with a hyphenated name that takes a value also answers to its camelCase spelling."""
    import typer
    from pydantic.alias_generators import to_camel

    def commands(group, path=()):
        for name, sub in group.commands.items():
            yield from commands(sub, (*path, name)) if hasattr(sub, "commands") else [((*path, name), sub)]

    missing = [
        f"{' '.join(path)} {opt}"
        for path, command in commands(typer.main.get_command(app))
        for param in command.params
        if param.param_type_name == "option" and not param.is_flag
        for opt in param.opts
        if opt.startswith("--") and "-" in opt[2:] and "--" + to_camel(opt[2:].replace("-", "_")) not in param.opts
    ]
    assert missing == [], missing


def test_the_commands_are_listed_in_the_order_the_data_goes():
    """CLI-text repro: `lunatrain --help` listed the commands in the order their modules registered them:
    `gc` before `lora`, `prepare` after `merge`. Now curate, export, check, train, judge, the flows, then the
    commands that look after what was made; every command is listed once."""
    from lunatrain.cli.app import COMMAND_ORDER

    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    listed = [ln.split()[0] for ln in text.split("Commands:", 1)[1].splitlines() if ln.startswith("  ")]
    assert listed == list(COMMAND_ORDER), listed


def test_dry_run_promises_the_steps_only_where_a_flow_has_steps(home):
    """Explore nit: `lora --dry-run` was said to print "the resolved parameters and steps", and prints no steps
    (a flow's steps are what `luna --dry-run` lists)."""
    said = {
        command: next(o for o in typer_main.get_command(app).commands[command].params if o.name == "dry_run").help
        for command in ("lora", "luna", "auto")
    }
    assert said["lora"] == "print the resolved parameters; run nothing", said
    assert said["luna"] == said["auto"] == "print the resolved parameters and steps; run nothing", said
    listed = json.loads(CliRunner().invoke(app, ["luna", "--dry-run"]).output)
    assert listed["steps"] == ["eval-gate", "export", "prepare", "lora"] and "steps" not in json.loads(
        CliRunner().invoke(app, ["lora", "--dry-run"]).output
    )
