"""Stateful test: no state reachable through the CLI and the library leaves the flows without a way out.

Hypothesis walks random sequences of what a user can do — train adapters under custom names on two tiny base
models (real `run_lora` runs, one optimizer step each), gate them (a pass promotes on the adapter's own base,
as `gate_candidate` does; a failure records it), `adapters activate|deactivate|rollback` through the CLI
(activate with or without `--force`), and switch the configured base model — and after every step checks:

- the flows (`auto`/`luna`, which gate the adapter they train) always find their candidate;
- `eval-gate` without `--adapter` either finds its candidate or fails with a sentence naming `lunatrain`
  commands, and each named command would get it going from this very state;
- every CLI refusal is one sentence naming a command to run; every version that is not active says why.

Bounded (a few examples of a few steps) to stay well under a minute on 2 CPU cores.
Run: `pytest tests/test_flow_states.py -q`
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from typer.testing import CliRunner

from lunatrain import evalgate, models, registry
from lunatrain.cli import app
from lunatrain.errors import LunaError
from lunatrain.settings import load_settings

from helpers import make_records, write_export

NAMES = ("luna-adapter", "mein-adapter", "test-adapter")
BASES = ("luna-tiny", "other")  # the built-in model and a second tiny model with other weights
COMMAND = re.compile(r"`(lunatrain [^`]+)`")
_MODELS: dict[str, Path] = {}


def _models() -> Path:
    """Both base models, built once per test session and copied into each example's data root. The second
    is luna-tiny with one more config key: another fingerprint (what tells bases apart) without a second
    build."""
    if "dir" not in _MODELS:
        root = Path(tempfile.mkdtemp(prefix="flow-states-models-"))
        tiny = models.ensure_tiny(load_settings(home=root))
        other = root / "data" / "models" / "other"
        shutil.copytree(tiny, other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps(config | {"flow_states_variant": 2}))
        _MODELS["dir"] = root / "data" / "models"
    return _MODELS["dir"]


@pytest.fixture(scope="module", autouse=True)
def _remove_models():
    """The session's base models live outside pytest's tmp_path (a state machine takes no fixtures)."""
    yield
    if "dir" in _MODELS:
        shutil.rmtree(_MODELS.pop("dir").parents[1], ignore_errors=True)


class FlowStates(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.home = Path(tempfile.mkdtemp(prefix="flow-states-"))
        shutil.copytree(_models(), self.home / "data" / "models")
        self.base = BASES[0]
        write_export(self.settings(), make_records(24))
        self.runner = CliRunner()

    def teardown(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def ref(self, base: str) -> str:
        return base if base == "luna-tiny" else str(self.home / "data" / "models" / base)

    def settings(self):
        return load_settings(home=self.home, base_model=self.ref(self.base))

    def cli(self, *args: str):
        result = self.runner.invoke(
            app, list(args), env={"ASSISTANT_HOME": str(self.home), "ASSISTANT_BASE_MODEL": self.ref(self.base)}
        )
        assert result.exit_code in (0, 1, 2), result.output
        if result.exit_code:  # a refusal is one sentence that names what to run instead
            assert result.output.startswith("error: ") and COMMAND.search(result.output), result.output
        return result

    # --- what a user can do -------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), base=st.sampled_from(BASES), passes=st.booleans())
    def train_and_gate(self, name: str, base: str, passes: bool) -> None:
        from lunatrain.train import run_lora

        s = self.settings()
        result = run_lora(
            {
                "adapterName": name,
                "baseModel": self.ref(base),
                "maxSteps": 1,
                "batchSize": 4,
                "rank": 2,
                "maxSeqLength": 64,
            },
            s,
        )
        assert result.ok, result.error
        if passes:  # what gate_candidate does on a pass: active on the base it was trained on
            registry.activate(s, name, result.version, reason="eval gate passed", own_base=True)
            registry.record_gate(s, name, result.version, {"status": "passed", "passed": True, "reasons": []})
        else:
            registry.record_gate(
                s, name, result.version, {"status": "failed", "passed": False, "reasons": ["val loss regresses"]}
            )

    @rule(name=st.sampled_from(NAMES), which=st.sampled_from(("latest", "v1")), force=st.booleans())
    def activate(self, name: str, which: str, force: bool) -> None:
        self.cli("adapters", "activate", f"{name}@{which}", *(["--force"] if force else []))

    @rule(name=st.sampled_from(NAMES), versioned=st.booleans())
    def deactivate(self, name: str, versioned: bool) -> None:
        self.cli("adapters", "deactivate", f"{name}@v1" if versioned else name)

    @rule(name=st.sampled_from(NAMES))
    def rollback(self, name: str) -> None:
        self.cli("adapters", "rollback", name)

    @rule(base=st.sampled_from(BASES))
    def switch_base(self, base: str) -> None:
        self.base = base

    # --- the flows always have a way out --------------------------------------------------------

    @invariant()
    def flows_find_their_candidate(self) -> None:
        s = self.settings()
        configured = registry.configured_base(s).fingerprint
        for name in NAMES:  # auto/luna gate the adapter they train: its active version here, else the base model
            entry = evalgate.select_candidate(s, prefer=name)
            assert entry is None or registry.active_version(s, name, configured) == entry

    @invariant()
    def eval_gate_runs_or_names_what_gets_it_going(self) -> None:
        s = self.settings()
        try:
            evalgate.select_candidate(s)
            return
        except LunaError as err:
            commands = COMMAND.findall(err.message)
        assert commands, "the refusal names no command"
        configured = registry.configured_base(s).fingerprint
        active_here = {a["name"] for a in registry.list_active(s, configured)}
        for command in commands:
            words = command.split()
            if words[1:3] == ["eval-gate", "--adapter"]:  # naming one makes the gate run
                assert evalgate.select_candidate(s, adapter=words[3])["name"] == words[3]
            elif words[1:3] == ["adapters", "deactivate"]:  # it is active here, so deactivating it works
                assert words[3] in active_here
            else:
                raise AssertionError(f"unexpected way out: {command}")

    @invariant()
    def every_inactive_version_says_why(self) -> None:
        s = self.settings()
        configured = registry.configured_base(s).fingerprint
        for adapter in registry.list_adapters(s).values():
            for entry in adapter["versions"]:
                state = registry.activation_state(s, entry, configured)
                assert state["active"] or state["reason"], entry


FlowStates.TestCase.settings = settings(
    max_examples=3,
    stateful_step_count=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestFlowStates = FlowStates.TestCase
