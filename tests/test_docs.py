"""The docs cannot drift from the code: every shell command in README.md and both guides is extracted and
the lunatrain ones are run against a real data root (seeded, exported, two small adapters trained).
They run in this process through the CLI's own entry (typer's runner: the same command functions, options
and exit codes as the `lunatrain` script), so a documented command costs its own work, not a fresh
interpreter importing torch; the console script itself is run as a process by test_cli_help.py.

Rules: commands that start a training run (`lora`, `auto`, `luna`) run with `--dry-run` (their parameters
are resolved and validated, nothing trains); the long-running servers (`serve`, `trainer`) answer `--help`
(they are started for real by the API and trainer tests). Every other command runs for real and must exit
0 (`health` may exit 1 while the trainer is offline, and must say so). curl lines must name a path of the
API's OpenAPI schema; every inline `lunatrain SUBCOMMAND` names a real subcommand.

Run: `.venv/bin/python -m pytest tests/test_docs.py -m slow`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from trainer_helpers import ON_DEMAND_ENV

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "training-guide.de.md", ROOT / "docs" / "training-guide.md"]
TRAINING = {"lora", "auto", "luna"}
SERVERS = {"serve", "trainer"}
FENCE = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def shell_lines(path: Path) -> list[str]:
    lines = []
    for block in FENCE.findall(path.read_text(encoding="utf-8")):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return lines


def split_env(line: str) -> tuple[dict[str, str], list[str]]:
    """Leading VAR=value words, and the command; `torchrun [options] -m lunatrain ARGS` counts as
    `lunatrain ARGS` (the launcher's options are torch's, the arguments are ours)."""
    words = shlex.split(line)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[:1] == ["torchrun"] and "-m" in words:
        at = words.index("-m")
        if words[at + 1 : at + 2] == ["lunatrain"]:
            words = ["lunatrain", *words[at + 2 :]]
    return env, words


ALL_LINES = [(path.name, line) for path in DOCS for line in shell_lines(path)]
# Each distinct command once (both guides quote the same lines), named by the first doc that has it.
LUNATRAIN_LINES = list(
    {line: (doc, line) for doc, line in reversed(ALL_LINES) if split_env(line)[1][:1] == ["lunatrain"]}.values()
)[::-1]


def test_the_docs_have_commands_to_check() -> None:
    assert len(LUNATRAIN_LINES) >= 15, LUNATRAIN_LINES
    for path in DOCS:
        assert any(doc == path.name for doc, ln in ALL_LINES if split_env(ln)[1][:1] == ["lunatrain"]), path


@dataclass
class Ran:
    returncode: int
    output: str


def _run(argv: list[str], env: dict[str, str | None], cwd: Path) -> Ran:
    """`lunatrain ARGV` in this process, in `cwd`, with `env` set for the call only (None unsets)."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    with contextlib.chdir(cwd):
        result = CliRunner().invoke(app, argv, env=env)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the script would print as a traceback: a crash, never a documented outcome.
        output += f"\nTraceback: {result.exception!r}"
    return Ran(result.exit_code, output)


@pytest.fixture(scope="module")
def doc_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str | None]]]:
    home = tmp_path_factory.mktemp("docs-home")
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ASSISTANT_")}
    env |= {
        "ASSISTANT_HOME": str(home),
        # Port 0: `health --ensureTrainer` starts a trainer on a port the OS picks (the trainer records it).
        "ASSISTANT_LORA_TRAINER_URL": "http://127.0.0.1:0",
        "HF_HUB_OFFLINE": "1",
    } | ON_DEMAND_ENV
    quick = ["--local", "--epochs=1", "--maxSteps=2", "--no-gate"]
    for argv in (["examples", "seed"], ["export"], ["lora", *quick], ["lora", *quick]):
        done = _run(argv, env, home)
        assert done.returncode == 0, (argv, done.output)
    yield home, env
    pid_file = home / "reports" / "training" / "trainer.pid"
    if pid_file.exists():  # `lunatrain health --ensureTrainer` started one
        try:
            os.killpg(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


@pytest.mark.slow
@pytest.mark.parametrize(("doc", "line"), LUNATRAIN_LINES, ids=[f"{d}:{ln}" for d, ln in LUNATRAIN_LINES])
def test_documented_command_runs(doc: str, line: str, doc_home: tuple[Path, dict[str, str | None]]) -> None:
    home, base_env = doc_home
    env_over, words = split_env(line)
    argv = words[1:]
    if argv[0] in TRAINING:
        argv = argv + ([] if "--dry-run" in argv else ["--dry-run"])
    elif argv[0] in SERVERS:
        argv = [argv[0], "--help"]
    done = _run(argv, base_env | env_over, home)
    output = done.output
    assert "Traceback" not in output, output
    if argv[0] == "health" and done.returncode == 1:
        assert "Offline" in output
    else:
        assert done.returncode == 0, f"{doc}: `{line}` exited {done.returncode}:\n{output}"


def test_curl_lines_name_real_endpoints(settings) -> None:
    from lunatrain.api.main import create_app

    paths = set(create_app(settings).openapi()["paths"])
    curls = [ln for _, ln in ALL_LINES if ln.startswith("curl ")]
    assert curls
    for line in curls:
        url = next(w for w in shlex.split(line) if w.startswith("http"))
        assert urlsplit(url).path in paths, line


def test_inline_lunatrain_commands_exist() -> None:
    from typer.main import get_command

    from lunatrain.cli import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    mentioned = set()
    for path in DOCS:
        mentioned |= set(re.findall(r"`lunatrain ([a-z][a-z-]+)", path.read_text(encoding="utf-8")))
    assert mentioned
    assert mentioned <= commands, mentioned - commands


def test_readme_lists_every_setting() -> None:
    from lunatrain.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`ASSISTANT_{name.upper()}`" in readme, name


def test_readme_code_map_names_every_module() -> None:
    """The README's code map stays true: every module of the package is named in it, by its file name in the
    row of its subpackage (a package's `__init__.py` only where it does more than hold the package)."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Development", 1)[1]
    rows = {}
    for line in section.split("Benchmarks:", 1)[0].splitlines():
        cells = line.split("|")
        if len(cells) >= 3:
            rows[cells[1].strip()] = cells[2]
    table = " ".join(k + v for k, v in rows.items())
    package = ROOT / "src" / "lunatrain"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if path.name == "__init__.py" and len(path.read_text(encoding="utf-8").splitlines()) < 20:
            continue
        if rel.parts[:2] == ("migrations", "versions"):
            continue  # one per schema version, mapped as `versions/`
        if len(rel.parts) == 1:  # a top-level module: in its own row or named in a stage's row
            named = f"`{path.name}`" in table
        else:  # a subpackage's module: in that subpackage's row, or a row of its own by path
            row = " ".join(k + v for k, v in rows.items() if f"`{rel.parts[0]}/`" in k)
            named = f"`{path.name}`" in row or f"`{rel.as_posix()}`" in table
        if not named:
            missing.append(str(rel))
    assert missing == [], f"modules missing from the README's code map: {missing}"


def test_the_readmes_python_example_runs_as_written(tmp_path: Path) -> None:
    """The README's "Using lunatrain from Python" block, run as a notebook would (its data root swapped for a
    fresh one): every name it imports and calls exists and does what the comments say."""
    import io

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Using lunatrain from Python.*?```python\n(.*?)```", text, re.S).group(1)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        exec(compile(code.replace('"/path/to/root"', repr(str(tmp_path))), "README.md", "exec"), {})
    assert said.getvalue().split() == ["ok", "True"], said.getvalue()
