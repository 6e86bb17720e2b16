"""Profiles are data: the bundled luna profile resolves the guide's defaults; bad profiles name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lunatrain.errors import NotFound, UsageError
from lunatrain.profiles import list_profiles, load_profile
from lunatrain.settings import Settings


def test_luna_profile_sets_the_guide_defaults(settings: Settings) -> None:
    params = load_profile(settings, "luna").params()
    assert params.adapter_name == "luna-adapter"
    assert params.adapter_strategy == "versioned"
    assert params.dataset_tier == "curated"


def test_flags_override_profile_and_alpha_follows_rank(settings: Settings) -> None:
    params = load_profile(settings, "luna").params({"rank": 32, "datasetTier": "merged", "batch_size": 2})
    assert (params.rank, params.alpha, params.dataset_tier, params.batch_size) == (32, 64.0, "merged", 2)


def test_quick_start_table_applies_only_when_asked(settings: Settings) -> None:
    profile = load_profile(settings, "luna")
    assert profile.params().max_steps is None
    assert profile.params(quick=True).max_steps == profile.quick_start["maxSteps"]


def test_user_profile_overrides_and_is_listed(settings: Settings, home: Path) -> None:
    (home / "profiles").mkdir()
    (home / "profiles" / "mine.toml").write_text('[lora]\nadapterName = "mine"\nepochs = 7\n')
    assert "mine" in list_profiles(settings) and "luna" in list_profiles(settings)
    params = load_profile(settings, "mine").params()
    assert (params.adapter_name, params.epochs) == ("mine", 7)
    # A directory named like a profile is none: not listed as one to use, and not found.
    (home / "profiles" / "dir.toml").mkdir()
    assert "dir" not in list_profiles(settings)
    with pytest.raises(NotFound, match="Profile 'dir' not found") as missing:
        load_profile(settings, "dir")
    assert "dir," not in missing.value.message and "mine" in missing.value.message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[lora]\nepochz = 3\n", "epochz"),
        ("[lora]\nepochs = -1\n", "epochs"),
        ('colour = "red"\n', "colour"),
        ('params = 1\ncolour = "red"\n', "unknown keys 'colour', 'params' (allowed: "),  # all of them, not one
        ("[lora\n", "not valid TOML"),
        ("lora = 3\n", "[lora] must be a table"),
        ("[quickStart]\nmaxSteps = 0\n", "maxSteps"),
        # TOML has types: these were converted (epochs 1, 4, learningRate 0.1, minCurated 1), as a flag's text is
        ("[lora]\nepochs = true\n", "[lora]: Invalid parameters: epochs: Input should be a valid integer"),
        ('[lora]\nepochs = "4"\n', "[lora]: Invalid parameters: epochs: Input should be a valid integer"),
        ('[lora]\nlearningRate = "0.1"\n', "learningRate: Input should be a valid number"),
        ("[lora]\nminCurated = true\n", "minCurated: Input should be a valid integer"),
        # named against the table it is in, not against [lora] resolved on that base
        ('[bases."luna-tiny"]\nrank = "x"\n', "[bases.'luna-tiny']: Invalid parameters: rank"),
        # explore repro: both spellings in one table said "minGoldenPassRate: unknown threshold", the documented
        # spelling; in [lora] one of the two values was taken without a word
        (
            "[gate]\nmin_golden_pass_rate = 0.9\nminGoldenPassRate = 0.1\n",
            "[gate]: minGoldenPassRate is given twice, as min_golden_pass_rate and as minGoldenPassRate; keep one.",
        ),
        ("[lora]\nmax_steps = 3\nmaxSteps = 4\n", "[lora]: Invalid parameters: maxSteps is given twice, as max_steps"),
        # explore repros: a base's table that names another base switched the run to it, with this table's
        # values and without the other's; a description of any type was taken; an adapter named as its base was
        # refused without naming the file the name came from
        (
            '[bases."luna-tiny"]\nbaseModel = "org/other"\nlearningRate = 0.5\n',
            "[bases.'luna-tiny']: baseModel cannot be set here: the table is for the base model its name says",
        ),
        ("description = 5\n[lora]\n", "description must be a text"),
        ('[lora]\nadapterName = "luna-tiny"\n', "[lora]: adapterName 'luna-tiny' is the name of the base model"),
    ],
)
def test_bad_profile_is_a_usage_error_naming_the_key(settings: Settings, home: Path, text: str, needle: str) -> None:
    (home / "profiles").mkdir()
    (home / "profiles" / "bad.toml").write_text(text)
    with pytest.raises(UsageError) as err:
        load_profile(settings, "bad")
    assert needle in err.value.message and "bad.toml" in err.value.message
    assert "[quickStart]" not in err.value.message or "[quickStart]" in text  # review: no table it lacks


def test_every_bad_table_of_a_profile_is_named_at_once(settings: Settings, home: Path) -> None:
    """Repro: a profile with mistakes in [gate], [lora] and [bases.…] named only the [gate] one; fixing it
    met the next, one run at a time. All are named in one sentence, each against its table."""
    (home / "profiles").mkdir()
    (home / "profiles" / "many.toml").write_text(
        '[lora]\nepochs = "drei"\n[gate]\nmaxValLossRatioVsBase = -1\n[bases."org/big"]\nrank = 0\n'
        "[quickStart]\nmaxSteps = 0\n"
    )
    with pytest.raises(UsageError) as err:
        load_profile(settings, "many")
    message = err.value.message
    assert message.startswith(f"Profile {home / 'profiles' / 'many.toml'} [gate]: Invalid gate thresholds: "), message
    for table, key in (("[lora]", "epochs"), ("[quickStart]", "maxSteps"), ("[bases.'org/big']", "rank")):
        assert f"; {table}: Invalid parameters: {key}" in message, message
    assert message.count("many.toml") == 1


def test_a_profile_saved_with_a_byte_order_mark_loads(settings: Settings, home: Path) -> None:
    """Explore repro: a profile saved by an editor that writes a BOM ("UTF-8 with BOM") was "not valid TOML:
    Invalid statement (at line 1, column 1)"; an import file with one is read."""
    (home / "profiles").mkdir()
    (home / "profiles" / "w.toml").write_bytes(b"\xef\xbb\xbf[lora]\nepochs = 2\n")
    assert load_profile(settings, "w").params().epochs == 2


def test_a_profile_that_is_no_toml_is_coded_for_the_dashboard(settings: Settings, home: Path) -> None:
    """German-page explore repro: a broken profile came to the dashboard as "Ungültige Anfrage: Profile … is
    not valid TOML: …", English in every panel; it carries its code and values now."""
    (home / "profiles").mkdir()
    (home / "profiles" / "luna.toml").write_text("this is = not [toml\n")
    with pytest.raises(UsageError) as err:
        load_profile(settings, "luna")
    assert err.value.code == "profile.invalid_toml", err.value
    assert err.value.params["path"] == str(home / "profiles" / "luna.toml") and "line 1" in err.value.params["reason"]


def test_files_that_are_no_profile_name_are_not_offered(settings: Settings, home: Path) -> None:
    """Explore repro: "Profile 'zz' not found … use one of: luna, my prof" offered a name the next command
    refused ("Invalid profile name 'my prof'")."""
    (home / "profiles").mkdir()
    (home / "profiles" / "my prof.toml").write_text("[lora]\n")
    (home / "profiles" / "mine.toml").write_text("[lora]\n")
    assert list_profiles(settings) == ["luna", "mine"]
    with pytest.raises(NotFound) as missing:
        load_profile(settings, "zz")
    assert "my prof" not in missing.value.message and "luna, mine" in missing.value.message


def test_a_profile_without_a_quick_start_table_is_quick_all_the_same(settings: Settings, home: Path) -> None:
    """Explore repro: quick-start with a profile of the user's that has no [quickStart] table ran its whole
    schedule (10 epochs, no step cap) where the docs promise a short one. Without the table it is one epoch
    of at most 20 steps (fewer when [lora] caps lower); a table of its own is the user's schedule."""
    (home / "profiles").mkdir()
    (home / "profiles" / "long.toml").write_text('[lora]\nadapterName = "mine"\nepochs = 10\n')
    quick = load_profile(settings, "long").params(quick=True)
    assert (quick.epochs, quick.max_steps) == (1, 20)
    assert load_profile(settings, "long").params().epochs == 10  # the normal schedule is its own
    assert load_profile(settings, "long").params({"maxSteps": 50}, quick=True).max_steps == 50  # flags win
    (home / "profiles" / "capped.toml").write_text("[lora]\nepochs = 10\nmaxSteps = 5\n")
    assert load_profile(settings, "capped").params(quick=True).max_steps == 5
    (home / "profiles" / "own.toml").write_text("[lora]\nepochs = 10\n[quickStart]\nepochs = 2\n")
    own = load_profile(settings, "own").params(quick=True)
    assert (own.epochs, own.max_steps) == (2, None)


def test_unknown_and_unsafe_profile_names(settings: Settings) -> None:
    with pytest.raises(NotFound, match="luna"):
        load_profile(settings, "nope")
    with pytest.raises(UsageError):
        load_profile(settings, "../etc/passwd")


def test_gate_table_is_validated(settings: Settings, home: Path) -> None:
    assert load_profile(settings, "luna").gate["maxValLossRatioVsBase"] == 1.0
    (home / "profiles").mkdir()
    (home / "profiles" / "g.toml").write_text("[gate]\nminGoldenPassRatio = 0.5\n")
    with pytest.raises(UsageError, match="minGoldenPassRatio"):
        load_profile(settings, "g")
    # Repro: a value of the wrong type was converted as a flag's text is: `true` became 1.0, the strictest
    # gate (every adapter refused), `false` 0.0 and "0.5" 0.5; [lora] refuses the same mistake.
    for value in ("true", "false", '"0.5"'):
        (home / "profiles" / "g.toml").write_text(f"[gate]\nminGoldenPassRate = {value}\n")
        with pytest.raises(UsageError, match=r"\[gate\]: .*minGoldenPassRate: Input should be a valid number"):
            load_profile(settings, "g")
    (home / "profiles" / "g.toml").write_text("[gate]\nminGoldenPassRate = 1\nmaxLossRegression = 0.5\n")
    assert load_profile(settings, "g").gate == {
        "minGoldenPassRate": 1,
        "maxLossRegression": 0.5,
    }  # a whole number is one


def test_an_empty_profile_name_is_refused_as_every_invalid_one(settings: Settings) -> None:
    """Repro: `--profile ""` dropped the profile without a word: `lora`, `prepare` and `eval-gate` ran with the
    library defaults (learning rate 0.0002, minCurated 0) while the API refused the same name with a 422."""
    from typer.testing import CliRunner

    from lunatrain.cli import app

    for args in (["lora", "--profile", "", "--dry-run"], ["eval-gate", "--profile", ""]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and r.output.startswith("error: Invalid profile name ''"), (args, r.output)


def test_base_model_table_applies_under_flags(settings: Settings, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "profiles").mkdir()
    (home / "profiles" / "b.toml").write_text(
        '[lora]\nlearningRate = 0.0002\nrank = 16\n[bases."org/big"]\nlearningRate = 0.00005\n'
    )
    profile = load_profile(settings, "b")
    assert profile.params().learning_rate == 0.0002  # default base luna-tiny has no table here
    # review repro: the base named in [lora] as `base_model` (either spelling is taken) picked no table
    (home / "profiles" / "s.toml").write_text('[lora]\nbase_model = "org/big"\n[bases."org/big"]\nrank = 32\n')
    assert load_profile(settings, "s").params().rank == 32
    assert profile.params({"baseModel": "org/big"}).learning_rate == 0.00005
    assert profile.params({"baseModel": "org/big", "learningRate": 0.001}).learning_rate == 0.001
    monkeypatch.setenv("ASSISTANT_BASE_MODEL", "org/big")
    from lunatrain.settings import load_settings

    assert load_profile(load_settings(), "b").params().learning_rate == 0.00005


def test_bad_base_model_table_names_it(settings: Settings, home: Path) -> None:
    (home / "profiles").mkdir()
    (home / "profiles" / "c.toml").write_text('[bases."org/big"]\nrank = 0\n')
    with pytest.raises(UsageError, match="org/big.*rank"):
        load_profile(settings, "c")


def test_profile_gate_goes_with_a_job_to_the_trainer(
    settings: Settings, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lunatrain lora --profile P` through the trainer service sends P's [gate] thresholds with the job,
    so the gate after the run is the one `--local` would apply."""
    from typer.testing import CliRunner

    from lunatrain.cli import app
    from lunatrain.service import client as trainer_client
    from lunatrain.service import ensure

    (home / "profiles").mkdir()
    (home / "profiles" / "strict.toml").write_text("[gate]\nmaxValLossRatioVsBase = 0.5\n")
    sent = {}

    class Sent(Exception):
        pass

    def fake_submit(_settings, params, options=None, request_id=None, gate_thresholds=None):
        sent.update(params=params, gate=gate_thresholds)
        raise Sent

    monkeypatch.setattr(ensure, "ensure_trainer", lambda *_a, **_k: None)
    monkeypatch.setattr(trainer_client, "submit", fake_submit)
    result = CliRunner().invoke(app, ["lora", "--profile", "strict", "--epochs", "2"])
    assert isinstance(result.exception, Sent), result.output
    assert sent["gate"] == {"maxValLossRatioVsBase": 0.5} and sent["params"].epochs == 2


def test_standalone_lora_trains_what_standalone_prepare_checks(settings: Settings) -> None:
    """Repro: `prepare` resolved the luna profile (maxSeqLength 512, minCurated 30, its luna-tiny table) while
    a plain `lora` trained on the built-in defaults (1024, 0, another learning rate): the standard order
    export → prepare → lora checked one run and trained another, and missed prepare's token cache."""
    import json

    from typer.testing import CliRunner

    from lunatrain.cli import app

    params, options = load_profile(settings, "luna").resolve()
    result = CliRunner().invoke(app, ["lora", "--dry-run"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["params"] == params.wire() | {"baseModel": "luna-tiny"} and shown["options"] == options.wire()
    assert (shown["params"]["maxSeqLength"], shown["options"]["minCurated"]) == (512, 30)
    other = json.loads(CliRunner().invoke(app, ["lora", "--dry-run", "--profile", "luna", "--rank", "4"]).output)
    assert other["params"]["rank"] == 4
    # explore repro: `auto --dry-run` showed the [gate] thresholds a run meets, `lora --dry-run` did not
    assert shown["gate"] == load_profile(settings, "luna").gate and shown["profile"] == "luna", shown


def test_a_base_model_table_for_a_directory_applies_however_the_directory_is_spelled(
    settings: Settings, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Explore repro: `[bases."/root/qwen2"]` applied only when the base was spelled byte for byte as the key:
    with `/root/qwen2/`, `qwen2` (relative to the data root, as the API takes it) or `./qwen2`, the run's
    base was shown as /root/qwen2 and trained silently with the [lora] learning rate."""
    model = home / "qwen2"
    model.mkdir()
    (home / "profiles").mkdir()
    (home / "profiles" / "d.toml").write_text(
        f'[lora]\nlearningRate = 0.0002\n[bases."{model}"]\nlearningRate = 0.0777\n'
    )
    profile = load_profile(settings, "d")
    monkeypatch.chdir(home)
    for spelled in (str(model), f"{model}/", "qwen2", "./qwen2", f"{home}/./qwen2"):
        assert profile.params({"baseModel": spelled}).learning_rate == 0.0777, spelled
    monkeypatch.chdir(home.parent)  # relative to the data root, as the trainer and the API take it
    assert profile.params({"baseModel": "qwen2"}).learning_rate == 0.0777
    (home / "profiles" / "e.toml").write_text('[bases."qwen2"]\nlearningRate = 0.0555\n')  # a relative key too
    assert load_profile(settings, "e").params({"baseModel": str(model)}).learning_rate == 0.0555
    assert profile.params({"baseModel": "org/qwen2"}).learning_rate == 0.0002  # a hub id is not the directory


def test_two_base_model_tables_for_one_directory_are_refused_naming_both(
    settings: Settings, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Odd-paths repro: `[bases."models/my base"]` (learningRate) beside `[bases."<root>/models/my base/"]`
    (rank) applied the first alone; the other's rank vanished without a word."""
    model = home / "models" / "my base"
    model.mkdir(parents=True)
    (home / "profiles").mkdir()
    (home / "profiles" / "twice.toml").write_text(
        f'[bases."models/my base"]\nlearningRate = 0.0777\n[bases."{model}/"]\nrank = 8\n'
    )
    monkeypatch.chdir(home)
    with pytest.raises(UsageError) as refused:
        load_profile(settings, "twice").params({"baseModel": str(model)})
    message = refused.value.message
    assert "twice.toml" in message and "models/my base" in message and f"{model}/" in message, message
    assert "name the same model directory" in message, message


def test_the_profiles_dropout_is_left_out_on_a_mixture_whose_experts_the_run_trains(
    settings: Settings, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repro: Quick start (and `luna`, `lora` without --dropout) on a Qwen3-MoE base took the Luna profile's
    dropout 0.05, which LoRA on fused experts cannot take: refused, and Quick start's form has no dropout field to
    change. A dropout no one chose for this base (the profile's [lora] or [quickStart] table, the default) is 0
    for a run there; one the base's table, a flag or a request names stays, and prepare refuses it naming both
    ways out. Review repros: a status or a listing (which load the profile) built the model to know it, and read a
    config nested past the parser's depth into a traceback."""
    from lunatrain import models
    from lunatrain.cli import flow as cli_flow

    from family_templates import build_arch_model, save_vocab

    base = str(build_arch_model(tmp_path / "tiny-qwen3-moe", save_vocab(tmp_path / "vocab"), "qwen3_moe"))
    luna = load_profile(settings, "luna")

    def run(profile, given: dict, quick: bool = False) -> float:
        return profile.resolve(given, quick=quick, for_run=True)[0].dropout

    assert run(luna, {}) == 0.05  # the dense configured base keeps the profile's
    assert run(luna, {"baseModel": base}) == 0.0
    assert run(luna, {"baseModel": base}, quick=True) == 0.0
    assert luna.params({"baseModel": base}).dropout == 0.05  # not for a run: the profile's values as written
    assert run(luna, {"baseModel": base, "dropout": 0.05}) == 0.05  # named: prepare says why not
    assert run(luna, {"baseModel": base, "targetModules": ["q_proj", "v_proj"]}) == 0.05  # the experts do not train
    (home / "profiles").mkdir()
    (home / "profiles" / "m.toml").write_text(
        f'[lora]\ndropout = 0.1\n[quickStart]\ndropout = 0.2\n[bases."{base}"]\nrank = 4\n'
    )
    assert run(load_profile(settings, "m"), {"baseModel": base}) == 0.0
    assert run(load_profile(settings, "m"), {"baseModel": base}, quick=True) == 0.0
    (home / "profiles" / "n.toml").write_text(f'[lora]\ndropout = 0.1\n[bases."{base}"]\ndropout = 0.2\n')
    assert run(load_profile(settings, "n"), {"baseModel": base}) == 0.2
    # the base configured for the whole root (`lunatrain luna` with no flag), and a run without a profile
    from lunatrain.settings import load_settings

    on_moe = load_settings(home=home, base_model=base)
    assert run(load_profile(on_moe, "luna"), {}) == 0.0
    assert cli_flow.resolve(on_moe, None, {}).params.dropout == 0.0
    assert cli_flow.resolve(on_moe, None, {"dropout": 0.1}).params.dropout == 0.1

    def built(*_args):
        raise AssertionError("a look at the profile built the model")

    monkeypatch.setattr(models, "_lora_layout", built)
    assert load_profile(on_moe, "luna").params().dropout == 0.05  # what status and listings read
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    monkeypatch.undo()
    assert run(luna, {"baseModel": str(deep)}) == 0.05  # unreadable: the run says why
