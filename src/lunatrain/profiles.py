"""Profiles: named parameter sets stored as TOML data files (`luna` ships with the package).

Lookup order: `<data root>/profiles/<name>.toml` (the user's own, overriding), then the bundled
`lunatrain/resources/profiles/<name>.toml`. A profile has a `[lora]` table (LoraParams in the guide's
camelCase spelling), optional `[bases."<base model>"]` tables applied on top when training on that base
model (a model change usually needs its own learning rate or length), an optional `[quickStart]` table
applied on top for quick-start runs (without one, quick-start is QUICK_DEFAULT), and an optional `[gate]`
table of eval-gate thresholds. Flags win over all of them. Every unknown key is an error that names the key
and the file.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import NotFound, UsageError
from .params import FlowOptions, LoraParams, check_adapter_name, parse_run, run_keys
from .settings import Settings, check_name

log = logging.getLogger(__name__)

_TOP_LEVEL = {"description", "lora", "bases", "quickStart", "gate"}
# quick-start of a profile without a [quickStart] table: a short schedule all the same (the bundled luna's),
# never the profile's whole one; a lower step cap of its own stays.
QUICK_DEFAULT = {"epochs": 1, "maxSteps": 20}


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    description: str = ""
    lora: dict = field(default_factory=dict)
    bases: dict = field(default_factory=dict)
    quick_start: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    default_base: str = "luna-tiny"  # ASSISTANT_BASE_MODEL when the profile was loaded
    home: Path | None = None  # the data root: a relative directory name is found there too
    settings: Settings | None = field(default=None, repr=False, compare=False)  # where a base is read (load_profile)

    def resolve(
        self, overrides: dict | None = None, *, quick: bool = False, for_run: bool = False
    ) -> tuple[LoraParams, FlowOptions]:
        """[lora], then the table for the base model in use, then [quickStart], then explicit overrides
        (flags or a request body); split into the run's parameters and the flow's options (minCurated, gate).
        `for_run`: for a run started, planned or offered in a form (`fit_dropout`, which may build the model on
        the meta device; a status or a listing does without)."""
        given, lora = run_keys(overrides or {}), run_keys(self.lora)  # a flag's `batch_size`, the table's `batchSize`
        quick_table = run_keys(self.quick_start) if quick else {}
        base = given.get("base_model") or quick_table.get("base_model") or lora.get("base_model") or self.default_base
        merged = lora | run_keys(self.base_table(str(base)))
        if quick and not self.quick_start:
            default = run_keys(QUICK_DEFAULT)
            capped = merged.get("max_steps")
            if isinstance(capped, int) and 0 < capped < default["max_steps"]:
                default["max_steps"] = capped
            quick_table = default
        params, options = parse_run(merged | quick_table | given)
        if for_run and self.settings is not None:
            params = fit_dropout(self.settings, params, chosen=run_keys(self.base_table(str(base))) | given)
        return params, options

    def base_table(self, base: str) -> dict:
        """The `[bases."…"]` table of `base`: the one its key spells, else, for a local model directory, the
        one whose key names the same directory however written (`/m/qwen2/`, `./qwen2`, a name relative to
        the data root): the run names its base by the absolute path, and the table must not be left out then."""
        from .models import local_dir

        where = local_dir(base, self.home)
        if where is None:
            return self.bases.get(base, {})
        keys = [key for key in self.bases if key == base or local_dir(str(key), self.home) == where]
        if len(keys) > 1:  # one would be applied and the other's values would vanish without a word
            tables = " and ".join(f'[bases."{key}"]' for key in keys)
            raise UsageError(
                f"Profile {self.path}: {tables} name the same model directory {where}; keep one table for it."
            )
        return self.bases[keys[0]] if keys else {}

    def params(self, overrides: dict | None = None, *, quick: bool = False) -> LoraParams:
        return self.resolve(overrides, quick=quick)[0]

    @property
    def base_model(self) -> str:
        """The base model the profile's runs train on: its [lora] `baseModel`, else ASSISTANT_BASE_MODEL's. What
        `eval-gate` judges on, as the flow's first step does."""
        return str(run_keys(self.lora).get("base_model") or self.default_base)


def _bundled(name: str) -> Path | None:
    ref = resources.files("lunatrain") / "resources" / "profiles" / f"{name}.toml"
    return Path(str(ref)) if ref.is_file() else None


def profile_path(settings: Settings, name: str, *, bundled_only: bool = False) -> Path:
    """The user's `<data root>/profiles/NAME.toml`, else the bundled one (only that with `bundled_only`)."""
    check_name(name, "profile name")
    user = settings.home / "profiles" / f"{name}.toml"
    if user.is_file() and not bundled_only:
        return user
    bundled = _bundled(name)
    if bundled is None:
        raise NotFound(
            f"Profile {name!r} not found: create {user} or use one of: {', '.join(list_profiles(settings))}."
        )
    return bundled


def _usable_name(name: str) -> bool:
    try:
        check_name(name, "profile name")
    except UsageError:
        return False
    return True


def list_profiles(settings: Settings) -> list[str]:
    """The names `load_profile` takes: a file whose name is no profile name is not offered."""
    found = (p.stem for p in (settings.home / "profiles").glob("*.toml") if p.is_file())  # as profile_path reads
    names = {n for n in found if _usable_name(n)}
    bundled_dir = resources.files("lunatrain") / "resources" / "profiles"
    names |= {Path(str(p)).stem for p in bundled_dir.iterdir() if str(p).endswith(".toml")}
    return sorted(names)


def fit_dropout(settings: Settings, params: LoraParams, chosen: dict) -> LoraParams:
    """`params` with dropout 0 where its targets put LoRA on a mixture's fused experts, which takes none, and no
    one chose a dropout for this base (`chosen`: the base's own table, the flags or the request): the profile's
    [lora] or [quickStart] value, or the default, is meant for dense bases, and Quick start's form has no field
    to change it. A dropout chosen for this base is refused by prepare and the run, naming both ways out."""
    if "dropout" in chosen or params.dropout <= 0:
        return params
    from .models import trains_experts

    base = params.base_model or settings.base_model
    if not trains_experts(base, params.target_modules, settings):
        return params
    log.info("Dropout 0 on %s: LoRA on its experts takes none (the profile's is %s).", base, params.dropout)
    return params.model_copy(update={"dropout": 0.0})


def load_profile(settings: Settings, name: str, *, bundled_only: bool = False) -> Profile:
    path = profile_path(settings, name, bundled_only=bundled_only)
    try:
        # utf-8-sig: an editor's byte-order mark ("UTF-8 with BOM") is no TOML, and no mistake of the user's
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"Profile {path} is not valid TOML: {exc}.",
            code="profile.invalid_toml",
            params={"path": str(path), "reason": str(exc)},
        ) from exc
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        raise UsageError(
            f"Profile {path}: unknown key{'s' if len(unknown) > 1 else ''} {keys} "
            f"(allowed: {', '.join(sorted(_TOP_LEVEL))})."
        )
    for table in ("lora", "bases", "quickStart", "gate"):
        if not isinstance(data.get(table, {}), dict):
            raise UsageError(f"Profile {path}: [{table}] must be a table.")
    for base, table in data.get("bases", {}).items():
        if not isinstance(table, dict):
            raise UsageError(f"Profile {path}: [bases.{base!r}] must be a table.")
    if not isinstance(data.get("description", ""), str):
        raise UsageError(f"Profile {path}: description must be a text (in quotes).")
    profile = Profile(
        name=name,
        path=str(path),
        description=data.get("description", ""),
        lora=data.get("lora", {}),
        bases=data.get("bases", {}),
        default_base=settings.base_model,
        home=settings.home,
        settings=settings,
        quick_start=data.get("quickStart", {}),
        gate=data.get("gate", {}),
    )
    # Validate now, so a bad key is reported against the profile file, not against a later flag; every table
    # at once, so that fixing one mistake does not just uncover the next.
    from .evalgate import parse_thresholds

    problems: list[str] = []
    try:
        parse_thresholds(profile.gate, strict=True)
    except UsageError as exc:
        problems.append(f"[gate]: {exc.message}")
    # Each table on its own, its values as TOML typed them: "4" or true where a number belongs is a mistake
    # here (a flag's text is converted; a profile's is not), and it is named against the table it is in.
    tables = [("[lora]", profile.lora, {}, False), ("[quickStart]", profile.quick_start, {}, True)]
    tables += [(f"[bases.{base!r}]", values, {"baseModel": base}, False) for base, values in profile.bases.items()]
    for table, values, given, _quick in tables:
        try:
            if given and "base_model" in run_keys(dict(values)):
                # A base's table that named another base switched the run to it, with this table's values.
                problems.append(f"{table}: baseModel cannot be set here: the table is for the base model its name says")
                continue
            parse_run(dict(values), strict=True)
        except UsageError as exc:
            problems.append(f"{table}: {exc.message}")
    if not problems:  # the tables resolved together (a base's table over [lora]), once each is valid alone
        # (a [quickStart] the file does not have adds nothing of its own to name)
        for table, _values, given, quick in [t for t in tables if not t[3] or profile.quick_start]:
            try:
                params = profile.resolve(given, quick=quick)[0]
                check_adapter_name(params, params.base_model or settings.base_model)
            except UsageError as exc:
                problems.append(f"{table}: {exc.message}")
    if problems:
        raise UsageError(f"Profile {path} {'; '.join(p.rstrip('.') for p in problems)}.")
    return profile
