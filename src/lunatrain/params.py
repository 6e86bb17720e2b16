"""The LoRA job parameters: one pydantic model shared by the CLI, the assistant API, the trainer service
and the training loop, so bounds and defaults live in exactly one place.

Field names are snake_case in Python and camelCase on the wire (the guide's spellings: `learningRate`,
`batchSize`, `adapterName`, …); both are accepted on input. Unknown keys are refused, so a request can
never smuggle in `trust_remote_code`, a file path or a pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .errors import LISTED_PROBLEMS, UsageError, pattern, said, some
from .settings import NAME_MAX, NAME_PATTERN
from .templates import NAME_PATTERN as TEMPLATE_NAME_PATTERN

MAX_RANK = 1024  # the largest LoRA rank a run may ask for (an adapter config beyond it is no run's: registry.py)

Tier = Literal["curated", "memory", "merged"]
Strategy = Literal["versioned", "overwrite"]
Device = Literal["auto", "cpu", "cuda"]
Switch = Literal["auto", "true", "false"]
Quantize = Literal["none", "4bit", "8bit"]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=NAME_MAX)]  # settings.check_name's rule
# Base model: a hub id (`org/name`), `luna-tiny`, or a local directory. Checked again when loading.
ONE_LINE = pattern(r"^[^\x00\n\r]+$", "should be one line, without NUL characters")
BaseModelRef = Annotated[str, Field(min_length=1, max_length=512, pattern=ONE_LINE)]
MODULE_NAME = pattern(r"^[A-Za-z0-9_.]{1,64}$", "should be module names of 1-64 letters, digits, '_' or '.'")


# The most keys one object of a request may have: well above any model's fields in both spellings. Beyond it
# the object is refused as a whole, where pydantic would name each unknown key: a 10 MiB body of them took
# seconds of CPU to refuse and answered with an error many times its own size.
MAX_KEYS = 200


class FewKeys(BaseModel):
    """A request object of more than MAX_KEYS keys is one error (inherit to get the check); so is a field
    given in both spellings (`min_golden_pass_rate` and `minGoldenPassRate` in one [gate] table), which would
    otherwise be refused as "minGoldenPassRate: unknown", the documented spelling."""

    @model_validator(mode="before")
    @classmethod
    def _few_keys(cls, data: object) -> object:
        if isinstance(data, dict) and len(data) > MAX_KEYS:
            raise ValueError(f"an object of {len(data)} keys; at most {MAX_KEYS} are read")
        if isinstance(data, dict) and (twice := given_twice(cls, data)):  # a request body (`refuse_twice`)
            raise ValueError(twice)
        return data


class CamelModel(FewKeys):
    # allow_inf_nan=False: NaN is "a finite number expected", not "should be less than 1" (NaN fails every bound)
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    def wire(self) -> dict:
        """The camelCase JSON form (what the API and the trainer service exchange)."""
        return self.model_dump(by_alias=True, mode="json")


class LoraParams(CamelModel):
    """Everything a LoRA run needs. Defaults here are the library defaults; profiles override them."""

    adapter_name: Name = "luna-adapter"
    adapter_strategy: Strategy = "versioned"
    dataset_tier: Tier = "curated"
    base_model: BaseModelRef | None = Field(
        default=None, description="hub id, local folder or luna-tiny; unset: ASSISTANT_BASE_MODEL, else luna-tiny"
    )
    epochs: int = Field(default=3, ge=1, le=100)
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=4, ge=1, le=1024)
    gradient_accumulation: int = Field(default=1, ge=1, le=1024)
    rank: int = Field(default=16, ge=1, le=MAX_RANK)
    alpha: float | None = Field(default=None, gt=0.0, le=4096.0, description="LoRA scale numerator; unset: 2 x rank")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # At most 64 names: a model has a handful of distinct layer names, and a list of a million took seconds of
    # the API's event loop to refuse.
    target_modules: (
        Annotated[list[Annotated[str, Field(pattern=MODULE_NAME)]], Field(max_length=64)] | Literal["all-linear"]
    ) = "all-linear"
    max_seq_length: int = Field(default=1024, ge=16, le=131072)
    warmup_ratio: float = Field(default=0.05, ge=0.0, le=0.5)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1000.0)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000, description="cap on optimizer steps; unset: no cap")
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    device: Device = "auto"
    packing: bool = True
    gradient_checkpointing: Switch = Field(
        default="auto",
        description="recompute activations in backward (less memory, ~30% slower); auto: only "
        "when the memory plan needs it",
    )
    quantize: Quantize = Field(default="none", description="load the frozen base in 4 or 8 bits (QLoRA, bitsandbytes)")
    resume: bool = Field(
        default=False,
        description="continue from the newest epoch checkpoint of the same run: the same parameters, trained "
        "tier, base model, tokenizer and chat template (another run's checkpoint is named, not used)",
    )
    # A name, never a path: the CLI stores a .jinja file under the data root and passes its name.
    chat_template: str | None = Field(
        default=None,
        pattern=TEMPLATE_NAME_PATTERN,
        description="chat template for base models without one: a bundled name (chatml) or a .jinja file (CLI); unset: the model's own",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _switch_from_bool(cls, v: object) -> object:
        # booleans were this field's type before `auto` existed; requests and profiles may still send them
        return str(v).lower() if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _alpha_default(self) -> LoraParams:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))
        return self


def steps_per_epoch(n_samples: int, params: LoraParams, world_size: int = 1) -> int:
    """Optimizer steps per epoch as the training loop counts them: batchSize samples per micro-batch (packing
    changes the layout, never the count), gradientAccumulation micro-batches per rank, `world_size` ranks."""
    return math.ceil(n_samples / (params.batch_size * params.gradient_accumulation * world_size))


def total_steps(n_samples: int, params: LoraParams, world_size: int = 1) -> int:
    """Optimizer steps of the whole run: every epoch's, capped by maxSteps."""
    steps = steps_per_epoch(n_samples, params, world_size) * params.epochs
    return min(steps, params.max_steps) if params.max_steps else steps


# The most approved curated examples a run may ask for: beyond any real dataset, and a number JSON readers
# keep exact (the API, the flows and `status` share it).
MIN_CURATED_MAX = 10_000_000


class FlowOptions(CamelModel):
    """What a flow does around one LoRA run: not part of the run itself (nor of its resume identity)."""

    min_curated: int = Field(default=0, ge=0, le=MIN_CURATED_MAX)
    gate: bool = Field(default=True, description="run the eval gate after training and promote on pass")


def parse_params(data: dict, *, base: LoraParams | None = None, strict: bool = False) -> LoraParams:
    """Validate `data` (either spelling) on top of `base`; every problem is named in one UsageError.
    `strict`: values must have their field's type already (a profile's TOML), none is converted."""
    merged = (base.model_dump() if base else {}) | _snake_keys(LoraParams, data)
    if base is not None and "rank" in data and "alpha" not in data and base.alpha == 2 * base.rank:
        merged["alpha"] = None  # alpha followed the old rank; let it follow the new one
    try:
        return LoraParams.model_validate(merged, strict=strict)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc), details=exc.errors(include_url=False)[:LISTED_PROBLEMS]) from exc


def parse_run(data: dict, *, strict: bool = False) -> tuple[LoraParams, FlowOptions]:
    """Split flags or a request body (either spelling) into the run's parameters and the flow's options;
    problems of both are named in one UsageError."""
    option_keys = set(FlowOptions.model_fields) | {to_camel(k) for k in FlowOptions.model_fields}
    lora = {k: v for k, v in data.items() if k not in option_keys}
    errors: list[str] = []
    params = options = None
    try:
        params = parse_params(lora, strict=strict)
    except UsageError as err:
        errors.append(err.message.removeprefix("Invalid parameters: ").rstrip("."))
    try:
        options = FlowOptions.model_validate(
            _snake_keys(FlowOptions, {k: v for k, v in data.items() if k in option_keys}), strict=strict
        )
    except ValidationError as exc:
        errors.append(format_validation_error(exc).removeprefix("Invalid parameters: ").rstrip("."))
    except UsageError as err:  # a key given in both spellings
        errors.append(err.message.rstrip("."))
    if errors:
        raise UsageError("Invalid parameters: " + "; ".join(errors) + ".")
    assert params is not None and options is not None
    return params, options


def run_keys(data: dict) -> dict:
    """`data` (flags, a request body, a profile's table) with every key of the run's parameters and the flow's
    options in snake_case, so that layers spelled differently merge key by key; a key given in both spellings
    in `data` itself is refused (`refuse_twice`)."""
    return _snake_keys(FlowOptions, _snake_keys(LoraParams, data))


def _snake_keys(model: type[BaseModel], data: dict) -> dict:
    refuse_twice(model, data)
    by_alias = {info.alias or name: name for name, info in model.model_fields.items()}
    return {by_alias.get(k, k): v for k, v in data.items()}


def given_twice(model: type[BaseModel], data: dict) -> str | None:
    """What is wrong when `data` gives a field of `model` in both spellings, else None."""
    for name, field in model.model_fields.items():
        if field.alias and field.alias != name and name in data and field.alias in data:
            return f"{field.alias} is given twice, as {name} and as {field.alias}; keep one"
    return None


def refuse_twice(model: type[BaseModel], data: dict) -> None:
    """UsageError for a field given in both spellings (`max_steps` and `maxSteps` in one profile table): one
    of the two values would be taken without a word."""
    if twice := given_twice(model, data):
        raise UsageError(f"{twice}.")


def check_adapter_name(params: LoraParams, base_ref: str) -> None:
    """An adapter is not named like the base model it is trained on: `/v1` answers a request for that name with
    the base model itself, so the adapter could never be reached by its name."""
    if params.adapter_name == base_ref:
        raise UsageError(
            f"adapterName {params.adapter_name!r} is the name of the base model it would be trained on; a chat "
            "request naming it would reach the base model. Choose another name."
        )


def format_validation_error(exc: ValidationError, what: str = "parameters", unknown: str = "unknown parameter") -> str:
    """One sentence naming each bad field as the flags and the API spell it (camelCase)."""
    parts = []
    for loc, msg, kind in said(exc.errors(include_url=False)):
        loc = loc or "body"
        loc = to_camel(loc) if "_" in loc else loc
        parts.append(f"{loc}: {unknown if kind == 'extra_forbidden' else msg}")
    return f"Invalid {what}: " + some(parts) + "."


def run_identity_of(
    params: LoraParams, *, data: str | None, base: str, tokenizer: str | None, template: str | None
) -> dict[str, Any]:
    """What makes two runs one (`train.run_identity` says why each part counts): the parameters but `resume` and
    the base's name, the sha256 of the trained tier's file, the base weights' fingerprint, and the tokenizer's and
    chat template's hashes. A resume finds its checkpoints by it, and a daily run the version it would repeat
    (`flow.unchanged_version`), where a part a report does not hold is None: a key no recorded run has."""
    return {
        "params": params.model_dump(mode="json", exclude={"resume", "base_model"}),
        "data": data,
        "base": base,
        "tokenizer": tokenizer,
        "template": template,
    }


def run_key(identity: dict[str, Any]) -> str:
    """The run's name among its adapter's work dirs, and in the registry: a hash of its identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def trained_key(identity: dict[str, Any], trained_sha256: str | None) -> str:
    """The identity's key with the trained tier's file replaced by what a run reads of it
    (`export.TierData.trained_sha256`): two runs with this key train the same weights, whatever ids, tags or
    ratings the files hold (`flow.unchanged_version`)."""
    return run_key(identity | {"data": None, "trained": trained_sha256})
