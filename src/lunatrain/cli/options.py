"""Every LoraParams field as a command-line option, generated from the model so flags never drift from it.

`@lora_options` adds one option per field, in both spellings (`--learning-rate` and the guide's
`--learningRate`; single words once: `--epochs`), to a command whose function takes `lora_flags: dict`.
That dict holds only the flags actually given, keyed by their camelCase wire names, ready to be laid over
a profile with `Profile.params(flags)` or validated with `parse_params(flags)`: the values are not
validated here, so the error names the parameter the same way everywhere.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic.alias_generators import to_camel

from ..params import FlowOptions, LoraParams


def _cli_type(annotation: Any) -> type:
    """The scalar type click parses a field as; lists and unions of literals come in as text."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _cli_type(args[0])
        return str  # e.g. target_modules: a list or "all-linear"
    if origin is typing.Annotated:
        return _cli_type(args[0])
    if annotation in (bool, int, float):
        return annotation
    return str


def _option(name: str, field: Any) -> inspect.Parameter:
    kind = _cli_type(field.annotation)
    kebab, camel = name.replace("_", "-"), to_camel(name)
    if kind is bool:
        decls = [f"--{kebab}/--no-{kebab}"] + ([f"--{camel}/--no-{camel[0].upper()}{camel[1:]}"] if camel != kebab else [])
    else:
        decls = [f"--{kebab}"] + ([f"--{camel}"] if camel != kebab else [])
    default = field.default if field.default is not None else "none"
    help_text = (field.description + "; " if field.description else "") + f"default {default}"
    if name == "target_modules":
        help_text = "comma-separated module names, or all-linear; " + help_text
    annotation = Annotated[kind | None, typer.Option(*decls, help=help_text, rich_help_panel="LoRA parameters")]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None)


# The run's parameters, then the flow's options (minCurated, gate): one flag set, split again by parse_run.
_FIELDS = LoraParams.model_fields | FlowOptions.model_fields
_LORA_OPTIONS = [_option(name, field) for name, field in _FIELDS.items()]


def _template_flag(value: str) -> str:
    from ..errors import LunaError
    from ..settings import load_settings
    from ..templates import cli_template
    from .app import fail

    try:
        return cli_template(value, load_settings())
    except LunaError as err:
        raise fail(err) from None


def lora_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: add the LoRA options to a Typer command that takes `lora_flags: dict`."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "lora_flags"]
    names = {p.name for p in _LORA_OPTIONS}

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        flags = {to_camel(k): kwargs.pop(k) for k in list(kwargs) if k in names}
        flags = {k: v for k, v in flags.items() if v is not None}
        if isinstance(flags.get("targetModules"), str) and flags["targetModules"] != "all-linear":
            flags["targetModules"] = [m.strip() for m in flags["targetModules"].split(",") if m.strip()]
        if flags.get("chatTemplate"):  # a .jinja file travels as the name it is stored under, never as a path
            flags["chatTemplate"] = _template_flag(flags["chatTemplate"])
        return fn(lora_flags=flags, **kwargs)

    command.__signature__ = inspect.Signature(own + _LORA_OPTIONS)  # type: ignore[attr-defined]
    # typer must read the new signature, not the wrapped function's (nor its string annotations)
    del command.__wrapped__
    command.__annotations__ = {}
    return command
