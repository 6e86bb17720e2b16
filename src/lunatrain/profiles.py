"""Profiles: named parameter sets stored as TOML data files (`luna` ships with the package).

Lookup order: `<data root>/profiles/<name>.toml` (the user's own, overriding), then the bundled
`lunatrain/resources/profiles/<name>.toml`. A profile has a `[lora]` table (LoraParams in the guide's
camelCase spelling), an optional `[quickStart]` table applied on top for quick-start runs, and an optional
`[gate]` table of eval-gate thresholds. Every unknown key is an error that names the key and the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import NotFound, UsageError
from .params import LoraParams, parse_params
from .settings import Settings, check_name

_TOP_LEVEL = {"description", "lora", "quickStart", "gate"}


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    description: str = ""
    lora: dict = field(default_factory=dict)
    quick_start: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)

    def params(self, overrides: dict | None = None, *, quick: bool = False) -> LoraParams:
        """Profile values, then the quick-start table, then explicit overrides (flags or a request body)."""
        merged = dict(self.lora) | (dict(self.quick_start) if quick else {}) | dict(overrides or {})
        return parse_params(merged)


def _bundled(name: str) -> Path | None:
    ref = resources.files("lunatrain") / "resources" / "profiles" / f"{name}.toml"
    return Path(str(ref)) if ref.is_file() else None


def profile_path(settings: Settings, name: str) -> Path:
    check_name(name, "profile name")
    user = settings.home / "profiles" / f"{name}.toml"
    if user.is_file():
        return user
    bundled = _bundled(name)
    if bundled is None:
        raise NotFound(f"Profile {name!r} not found: create {user} or use one of: {', '.join(list_profiles(settings))}.")
    return bundled


def list_profiles(settings: Settings) -> list[str]:
    names = {p.stem for p in (settings.home / "profiles").glob("*.toml")}
    bundled_dir = resources.files("lunatrain") / "resources" / "profiles"
    names |= {Path(str(p)).stem for p in bundled_dir.iterdir() if str(p).endswith(".toml")}
    return sorted(names)


def load_profile(settings: Settings, name: str) -> Profile:
    path = profile_path(settings, name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"Profile {path} is not valid TOML: {exc}.") from exc
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise UsageError(f"Profile {path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_LEVEL))}).")
    for table in ("lora", "quickStart", "gate"):
        if not isinstance(data.get(table, {}), dict):
            raise UsageError(f"Profile {path}: [{table}] must be a table.")
    profile = Profile(
        name=name,
        path=str(path),
        description=str(data.get("description", "")),
        lora=data.get("lora", {}),
        quick_start=data.get("quickStart", {}),
        gate=data.get("gate", {}),
    )
    # Validate now, so a bad key is reported against the profile file, not against a later flag.
    from .evalgate import parse_thresholds

    try:
        parse_thresholds(profile.gate)
    except UsageError as exc:
        raise UsageError(f"Profile {path} [gate]: {exc.message}") from exc
    for quick in (False, True):
        try:
            profile.params(quick=quick)
        except UsageError as exc:
            table = "[lora]" if not quick else "[quickStart]"
            raise UsageError(f"Profile {path} {table}: {exc.message}") from exc
    return profile
