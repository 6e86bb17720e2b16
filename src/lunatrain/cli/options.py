"""Every LoraParams field as a command-line option, generated from the model so flags never drift from it.

`@lora_options` adds one option per field, in both spellings (`--learning-rate` and the guide's
`--learningRate`; single words once: `--epochs`), to a command whose function takes `lora_flags: dict`.
That dict holds only the flags actually given, keyed by their camelCase wire names, ready to be laid over
a profile with `Profile.params(flags)` or validated with `parse_params(flags)`: the values are not
validated here, so the error names the parameter the same way everywhere.

Help shows the values a run would use: for a command run with a profile (`luna`; `prepare`, whose default
profile is luna; `auto --profile NAME`), `ProfileHelpCommand` rewrites each option's "default …" with the
profile's value for the base model in use (`--baseModel` or ASSISTANT_BASE_MODEL) when `--help` is asked.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer
from pydantic.alias_generators import to_camel
from typer.core import TyperCommand

from ..errors import LunaError
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
        decls = [f"--{kebab}/--no-{kebab}"] + (
            [f"--{camel}/--no-{camel[0].upper()}{camel[1:]}"] if camel != kebab else []
        )
    else:
        decls = [f"--{kebab}"] + ([f"--{camel}"] if camel != kebab else [])
    annotation = Annotated[
        kind | None, typer.Option(*decls, help=_help(name, field.default), rich_help_panel="LoRA parameters")
    ]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None)


def _help(name: str, default: Any) -> str:
    field = _FIELDS[name]
    description, unset, fallback = (field.description or "").partition("; unset: ")
    if default is None and unset:  # no value of its own: say what the run takes instead
        shown: Any = fallback
    else:
        shown = ",".join(default) if isinstance(default, list) else "none" if default is None else default
        description += f" (unset: {fallback})" if unset else ""
    text = (description + "; " if description else "") + f"default {shown}"
    return "comma-separated module names, or all-linear; " + text if name == "target_modules" else text


# The run's parameters, then the flow's options (minCurated, gate): one flag set, split again by parse_run.
_FIELDS = LoraParams.model_fields | FlowOptions.model_fields
_LORA_OPTIONS = [_option(name, field) for name, field in _FIELDS.items()]


def _template_flag(value: str) -> str:
    from ..settings import load_settings
    from ..templates import cli_template
    from .app import fail

    try:
        return cli_template(value, load_settings())
    except LunaError as err:
        raise fail(err) from None


def _flag(args: list[str], *names: str) -> str | None:
    """The value given for an option in raw arguments (`--x v` or `--x=v`), before click parses them."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


class ProfileHelpCommand(TyperCommand):
    """A command whose `--help` shows the profile's values as the defaults. The profile: `--profile` when
    given, else `fixed_profile` (set for `luna`), else the default of the command's `profile` option."""

    fixed_profile: str | None = None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--help" in args:  # eager: shown while parsing, so the texts must be right before that
            self._profile_help(args)
        return super().parse_args(ctx, args)

    def _profile_help(self, args: list[str]) -> None:
        from ..profiles import load_profile
        from ..settings import load_settings

        given = {p.name: p.default for p in self.params}
        profile = _flag(args, "--profile") or self.fixed_profile or given.get("profile")
        if not profile:
            return
        base = _flag(args, "--base-model", "--baseModel")
        try:
            settings = load_settings()
            params, options = load_profile(settings, profile).resolve({"baseModel": base} if base else {})
        except LunaError:  # a bad profile or setting is reported when the command runs, not in its help
            return
        for param in self.params:
            if param.name in _FIELDS:
                source = options if param.name in FlowOptions.model_fields else params
                param.help = _help(param.name, getattr(source, param.name))
        base_id = params.base_model or settings.base_model
        self.epilog = f"Defaults shown: the {profile} profile's values on base model {base_id}."


def profile_help(app: typer.Typer, fixed: dict[str, str]) -> None:
    """Give every registered command that has the LoRA options a profile-aware `--help`; `fixed` maps a
    command name to the profile it always runs (luna -> luna)."""
    for info in app.registered_commands:
        if getattr(info.callback, "lora_options", False):
            name = info.name or getattr(info.callback, "__name__", "")
            info.cls = type("ProfileHelpCommand", (ProfileHelpCommand,), {"fixed_profile": fixed.get(name)})


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
    command.lora_options = True  # type: ignore[attr-defined]  # found by profile_help
    # typer must read the new signature, not the wrapped function's (nor its string annotations)
    del command.__wrapped__
    command.__annotations__ = {}
    return command
