"""LoraParams is the one place LoRA parameters are validated: both spellings in, camelCase out, every bad
field named in one error, unknown keys (trust_remote_code, paths) refused."""

from __future__ import annotations

import pytest

from lunatrain.errors import UsageError
from lunatrain.params import LoraParams, parse_params


def test_both_spellings_and_wire_form() -> None:
    params = parse_params({"learningRate": 1e-4, "batch_size": 8, "adapterName": "x1"})
    assert (params.learning_rate, params.batch_size, params.adapter_name) == (1e-4, 8, "x1")
    wire = params.wire()
    assert wire["learningRate"] == 1e-4 and wire["alpha"] == 32.0 and "learning_rate" not in wire


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(UsageError) as err:
        parse_params({"rank": 0, "epochs": -1, "datasetTier": "gold", "adapterName": "../x"})
    for field in ("rank", "epochs", "datasetTier", "adapterName"):
        assert field in err.value.message


@pytest.mark.parametrize("key", ["trustRemoteCode", "trust_remote_code", "outputDir", "pickle"])
def test_unknown_keys_are_refused(key: str) -> None:
    with pytest.raises(UsageError, match="unknown parameter"):
        parse_params({key: True})


def test_target_modules_list_or_all_linear() -> None:
    assert parse_params({"targetModules": ["q_proj", "v_proj"]}).target_modules == ["q_proj", "v_proj"]
    assert LoraParams().target_modules == "all-linear"
    with pytest.raises(UsageError):
        parse_params({"targetModules": []})
    with pytest.raises(UsageError):
        parse_params({"targetModules": ["../evil"]})


def test_explicit_alpha_is_kept_over_base() -> None:
    base = parse_params({"rank": 8, "alpha": 4})
    assert parse_params({"rank": 32}, base=base).alpha == 4


@pytest.mark.parametrize(("given", "stored"), [(True, "true"), (False, "false"), ("auto", "auto"), ("false", "false")])
def test_gradient_checkpointing_takes_auto_and_still_booleans(given: object, stored: str) -> None:
    assert LoraParams().gradient_checkpointing == "auto"
    params = parse_params({"gradientCheckpointing": given})
    assert params.gradient_checkpointing == stored and params.wire()["gradientCheckpointing"] == stored


def test_quantize_names_its_choices() -> None:
    assert LoraParams().quantize == "none" and parse_params({"quantize": "4bit"}).quantize == "4bit"
    with pytest.raises(UsageError, match="quantize: Input should be 'none', '4bit' or '8bit'"):
        parse_params({"quantize": "2bit"})
    with pytest.raises(UsageError, match="gradientCheckpointing"):
        parse_params({"gradientCheckpointing": "sometimes"})


# "luna\n": Python's `$` matches before a final newline
@pytest.mark.parametrize("name", ["a..b", "x..", "..", ".a", "a/b", "a" * 65, "", "luna\n"])
def test_adapter_names_follow_the_one_name_rule(name: str) -> None:
    """LoraParams, the API path parameters and settings.check_name refuse the same names (`..` included)."""
    from lunatrain.settings import check_name

    with pytest.raises(UsageError, match="adapterName"):
        parse_params({"adapterName": name})
    with pytest.raises(UsageError):
        check_name(name)


@pytest.mark.parametrize("name", ["a", "luna-adapter", "a.b.c", "Qwen2.5-0.5B", "v3", "a" * 64])
def test_good_names_pass_everywhere(name: str) -> None:
    from lunatrain.settings import check_name

    assert parse_params({"adapterName": name}).adapter_name == name == check_name(name)
