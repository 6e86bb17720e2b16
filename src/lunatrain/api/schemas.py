"""Request and response models of the assistant API: camelCase on the wire, limits declared on the fields.

Request models forbid unknown keys, so no request can smuggle in a path, `trust_remote_code` or a pickle.
Response models of records owned by other stages (jobs, reports, registry entries) declare the fields the
dashboard relies on and allow the rest through unchanged, so a stage can add a field without breaking the
API's schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from ..errors import pattern
from ..formats import (
    MAX_CONVERSATION_ID_LEN,
    MAX_TAG_LEN,
    MAX_TAGS,
    MAX_TEXT_LEN,
    MAX_TURNS,
    RATING_MAX,
    RATING_MIN,
    is_unicode,
    normalize_text,
)
from ..params import MIN_CURATED_MAX, FewKeys, FlowOptions, LoraParams, Name, Tier
from ..service.jobs import Job, RequestId
from ..settings import NAME_MAX, NAME_PATTERN

if TYPE_CHECKING:
    from .. import store

Source = Literal["curated", "memory", "conversation"]
Status = Literal["approved", "pending", "rejected"]
VERSION_PATTERN = NAME_PATTERN
# NAME or NAME@VERSION, as `eval-gate --adapter` takes it (registry.parse_ref checks the names themselves).
ADAPTER_REF = pattern(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$",
    "should be an adapter name, optionally with @VERSION (e.g. luna-adapter@v3)",
)
# The limit of MAX_TEXT_LEN characters is the stored text's (trimmed, line endings as \n), as the import and
# the command line count it: `formats.make_draft` says it, naming the field.
Text = Annotated[str, Field(min_length=1, description=f"up to {MAX_TEXT_LEN:,} characters as stored")]


def _stored_at_most(limit: int) -> AfterValidator:
    """The length limit of a short field, counted on the text as stored (NFC, trimmed), as the import and the
    command line count it: a tag typed with decomposed umlauts is half as long once stored."""

    def check(value: str) -> str:
        if is_unicode(value) and len(normalize_text(value)) > limit:  # a lone surrogate: refused when stored
            raise ValueError(f"at most {limit} characters as stored")
        return value

    return AfterValidator(check)


ShortText = Annotated[
    str,
    Field(description=f"up to {MAX_CONVERSATION_ID_LEN} characters as stored"),
    _stored_at_most(MAX_CONVERSATION_ID_LEN),
]


def _not_blank(tag: str) -> str:
    # a tag of blanks is trimmed to nothing when stored: refused as "" is, not dropped unseen
    if not tag.strip():
        raise ValueError("a tag must not be blank")
    return tag


Tag = Annotated[
    str,
    Field(min_length=1, description=f"up to {MAX_TAG_LEN} characters as stored"),
    AfterValidator(_not_blank),
    _stored_at_most(MAX_TAG_LEN),
]


class In(FewKeys):
    # strict: `false` is not a ratio and "3" is not a count; JSON has the right types, so use them.
    # allow_inf_nan=False: NaN is "a finite number expected", not "less than 1" (NaN fails every bound).
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True, allow_inf_nan=False
    )


class Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    def wire(self) -> dict[str, Any]:
        """The JSON the API answers with this model (what the CLI's `--json` prints for the same read)."""
        return self.model_dump(by_alias=True, mode="json")


class ErrorBody(BaseModel):
    code: str
    message: str
    params: dict[str, Any] | None = Field(default=None, description="the values the message names (see messages.py)")
    details: Any | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- jobs -----------------------------------------------------------------------------------------


class StartRequest(LoraParams, FlowOptions):
    """The LoRA parameters (params.py, bounds included), the flow options (minCurated, gate), an optional
    profile whose values the given fields override, and an optional idempotency key."""

    model_config = ConfigDict(strict=True)
    profile: Name | None = Field(
        default=None,
        description="take this profile's values (its [lora], its table for the base model, its [gate]) for "
        "every field not given, as `lunatrain lora --profile NAME` does; null: the library defaults",
    )
    request_id: RequestId | None = None


class QuickStartRequest(In):
    adapter_name: Name | None = None
    dataset_tier: Tier | None = None
    base_model: str | None = Field(default=None, min_length=1, max_length=512)
    profile: Name = "luna"
    request_id: RequestId | None = None


class ExampleAdapterRequest(In):
    adapter_name: Name = "example-adapter"
    request_id: RequestId | None = None


class JobAccepted(Out):
    """202 of the start endpoints: the guide's `jobId` and the job itself (the trainer's job model)."""

    job_id: str
    job: Job
    joined: bool = Field(
        False,
        description="true: a job queued or running already trained these parameters on the data exported now; "
        "this is that job, and no other was queued",
    )
    seeded: dict[str, Any] | None = None
    export: dict[str, Any] | None = None


# --- examples and memory --------------------------------------------------------------------------


class Turn(In):
    role: Literal["user", "assistant"]
    content: Text
    # strict: JSON true/false or 0.0 are no weight (a file import refuses them too)
    weight: int = Field(
        default=1,
        ge=0,
        le=1,
        strict=True,
        description="0: an assistant turn kept as context only, not trained on (OpenAI's `weight`)",
    )


class ExampleIn(In):
    prompt: Text
    response: Text
    system: Annotated[str, Field(description=f"up to {MAX_TEXT_LEN:,} characters as stored")] | None = None
    turns: list[Turn] = Field(default_factory=list, max_length=MAX_TURNS)
    source: Source = "curated"
    status: Status | None = None
    rating: int | None = Field(default=None, ge=RATING_MIN, le=RATING_MAX)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    conversation_id: ShortText | None = None


class ImportRequest(In):
    records: list[Any] = Field(min_length=1, max_length=10_000)  # each one checked as a file's line is
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt-response"] = "auto"
    source: Source | None = Field(
        default=None, description="for every record; null: a record's own source when it is one of these, else curated"
    )
    status: Status | None = None


class ExampleOut(Out):
    id: int
    hash: str
    prompt: str
    response: str
    system: str | None = None
    turns: list[dict[str, str | int]] = Field(
        default_factory=list, description="{role, content}, and `weight: 0` on an assistant turn kept as context only"
    )
    source: str
    status: str
    rating: int | None = None
    tags: list[str] = Field(default_factory=list)
    conversation_id: str | None = None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, example: store.Example) -> ExampleOut:
        return cls.model_validate(example.to_dict())


class ExampleList(Out):
    examples: list[ExampleOut]
    count: int = Field(description="examples in this page")


class KeptBeside(Out):
    edited: str = Field(description="the example a record of lunatrain's export was written from (ex-N)")
    added_as: str = Field(description="the record's edited content, added as this example (ex-M)")


class ImportResult(Out):
    records: int
    added: int
    duplicates: int
    formats: dict[str, int]
    kept_beside: list[KeptBeside] = Field(
        default_factory=list,
        description="records of lunatrain's export edited since: each old example stays approved beside its edit",
    )

    @staticmethod
    def kept(pairs: tuple[tuple[int, int], ...]) -> list[KeptBeside]:
        return [KeptBeside(edited=f"ex-{old}", added_as=f"ex-{new}") for old, new in pairs]


class Deleted(Out):
    deleted: int
    stale_adapters: list[str] = Field(default_factory=list, description="versions trained on it: retrain needed")
    still_held_as: list[str] = Field(
        default_factory=list,
        description="the other kind's ids (mem-3, ex-12) holding the same content approved: still exported",
    )


class MemoryIn(In):
    question: Text
    answer: Text
    topic: ShortText | None = None
    status: Status = "approved"
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


class MemoryOut(Out):
    id: int
    hash: str
    topic: str | None = None
    question: str
    answer: str
    status: str
    tags: list[str] = Field(default_factory=list)
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, item: store.MemoryItem) -> MemoryOut:
        return cls.model_validate(item.to_dict())


class MemoryList(Out):
    items: list[MemoryOut]
    count: int


# --- pipeline steps -------------------------------------------------------------------------------


class ExportRequest(In):
    val_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    test_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)


def _profile_defaults(schema: dict[str, Any]) -> None:
    """A field left out takes the profile's value, not the library default the model class carries: the
    schema names no default then."""
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)


class PrepareRequest(LoraParams):
    """The run to check: every LoRA parameter /lora/start takes (params.py, bounds included), each over the
    value of `profile` (default luna) that it replaces (null clears it), as `lunatrain prepare --profile NAME`
    resolves them; and `minCurated`, the volume rule's threshold."""

    model_config = ConfigDict(strict=True, json_schema_extra=_profile_defaults)
    profile: Name | None = Field(default=None, description="whose values the fields not given take; null: luna")
    min_curated: int | None = Field(default=None, ge=0, le=MIN_CURATED_MAX)


class EvalGateRequest(In):
    adapter: Annotated[str, Field(pattern=ADAPTER_REF)] | None = None
    profile: Name | None = None  # whose [gate] thresholds judge (default: luna, as after training)


class Report(Out):
    """A stage's report as that stage writes it (export summary, prepare report, eval report, status)."""


# --- adapters -------------------------------------------------------------------------------------


Version = Annotated[str, Field(pattern=VERSION_PATTERN, max_length=NAME_MAX)]


class ActivateRequest(In):
    version: Version | None = None
    force: bool = False


class DeactivateRequest(In):
    version: Version | None = None
    configured_base_only: bool = Field(
        default=False,
        description="with `version`: that version stops on the configured base model only (422 when it is not "
        "active there); without, on every base it is active on",
    )


class RollbackRequest(In):
    version: Version | None = Field(
        default=None, description="the version the caller sees active; 409 when another is active by now"
    )
    to: Version | None = Field(
        default=None, description="the version the caller was shown it returns to; 409 when it would go elsewhere"
    )


class Aliases(Out):
    latest: str | None = Field(default=None, description="the newest version")
    active: str | None = Field(default=None, description="the version active on the base in view; null: none")


class AdapterOut(Out):
    name: str
    aliases: Aliases = Field(default_factory=Aliases)
    versions: list[dict[str, Any]] = Field(default_factory=list)


class AdapterGroups(Out):
    bases: list[dict[str, Any]]


class Defaults(Out):
    profile: str
    params: dict[str, Any]
    quick_start: dict[str, Any]
