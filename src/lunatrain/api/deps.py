"""Dependencies as `Annotated` aliases, path-parameter rules, and the declared error responses.

Routes take `settings: SettingsDep` and typed path aliases (`AdapterName`, `JobId`, …) whose patterns reject
traversal (`..`, `%2e%2e`, separators) before any handler runs.
"""

from __future__ import annotations

import re
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from pydantic import BeforeValidator

from .. import formats
from ..errors import UsageError
from ..models import refuse_adapter_dir
from ..service.jobs import JOB_ID_PATTERN
from ..settings import NAME_MAX, NAME_PATTERN, Settings, inside
from ..web.handlers import no_body
from ..wire import INT_MAX
from .cache import Coalescer, fresh_reads
from .schemas import VERSION_PATTERN, ErrorResponse


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


NoBody = Depends(no_body)


def get_reads(request: Request) -> Coalescer:
    return request.app.state.reads


ReadsDep = Annotated[Coalescer, Depends(get_reads)]
Fresh = Depends(fresh_reads)
AdapterName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX, description="adapter name")]
Version = Annotated[str, Path(pattern=VERSION_PATTERN, max_length=NAME_MAX, description="version, e.g. v3")]
# The docs' names for the path segments (`{jobId}`, `{id}`), which errors name too; routes spell them so.
JobId = Annotated[str, Path(alias="jobId", pattern=JOB_ID_PATTERN, max_length=64, description="job id, e.g. ftjob-…")]


def _unprefixed(prefix: str) -> BeforeValidator:
    """An id is its digits, or as the export's records, prepare's report and the command line write it (`ex-12`,
    `mem-3`); anything else (`1.0`, `+1`, ` 1`, which an int would take) is refused, naming `id`, as the
    command line refuses it."""

    def number(value: object) -> object:
        if not isinstance(value, str):
            return value
        if (n := formats.record_number(value, prefix)) is None:
            of_other = ""  # the other kind's id: its number alone would name a record of this kind
            if (other := formats.other_kind(value, prefix)) is not None:
                what, group = formats.ID_KINDS[other]
                of_other = f" ({value} is {what}'s id: the /{group} routes take it)"
            raise ValueError(f"should be a number such as 12 or {prefix}-12{of_other}")
        return n

    return BeforeValidator(number)


_ID = {"alias": "id", "ge": 1, "le": INT_MAX}
ExampleId = Annotated[int, _unprefixed("ex"), Path(**_ID, description="numeric id (12), or as exported (ex-12)")]
MemoryId = Annotated[int, _unprefixed("mem"), Path(**_ID, description="numeric id (3), or as exported (mem-3)")]

_DESCRIPTIONS = {
    400: "Malformed request or Host header not allowed",
    401: "Bearer token missing or wrong (when ASSISTANT_API_TOKEN is set)",
    403: "Cross-origin request refused",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "Invalid request (names the field)",
    503: "Trainer service not reachable, or storage unusable (codes registry_unreadable, storage_error, disk_full, storage_busy, storage_out_of_files, storage_unreachable, storage_denied, storage_incompatible)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: the guard's codes on every route plus the route's own."""
    wanted = sorted({400, 401, 403, 413, 422, *codes})
    return {c: {"model": ErrorResponse, "description": _DESCRIPTIONS[c]} for c in wanted}


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_base_model(ref: str | None, settings: Settings) -> str | None:
    """A base model may be `luna-tiny`, a hub id (`org/name`) or a model directory under the data root —
    never a path elsewhere on the machine nor the data root itself, so a request cannot make the trainer
    read arbitrary files."""
    try:
        return _base_model(ref, settings)
    except OSError:  # a name too long for the file system, say: not a directory we could use
        raise UsageError(
            f"baseModel {ref[:80]!r} is neither luna-tiny, a hub id nor a model directory.",
            code="base_model.not_a_model",
            params={"baseModel": ref[:80]},
        ) from None


def _same_dir(a: FsPath, b: FsPath) -> bool:
    try:
        return b.is_absolute() and a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a name too long, a symlink loop: not the configured base
        return False


def _base_model(ref: str | None, settings: Settings) -> str | None:
    # A relative name is a directory under the data root when one is there (not under this process's working
    # directory: the trainer works in the data root), else a hub id.
    if (
        ref is None
        or ref == "luna-tiny"
        or (_HUB_ID.fullmatch(ref) and ".." not in ref and not (settings.home / ref).exists())
    ):
        return ref
    if "\x00" in ref:
        raise UsageError("baseModel must be luna-tiny, a hub id (org/name) or a directory under the data root.")
    candidate = FsPath(ref)
    if settings.base_model and candidate.is_absolute() and _same_dir(candidate, FsPath(settings.base_model)):
        # The server's own base, named as its status shows it (the operator chose that path). Its configured
        # path goes on, not the request's spelling: a link that pointed at it when checked could point elsewhere
        # when the trainer loads it.
        return settings.base_model
    rel = (
        candidate.relative_to(settings.home)
        if candidate.is_absolute() and candidate.is_relative_to(settings.home)
        else candidate
    )
    if candidate.is_absolute() and rel is candidate:
        raise UsageError(
            f"baseModel {ref!r} is outside the data root; put the model under {settings.home}.",
            code="base_model.outside_root",
            params={"baseModel": ref, "home": str(settings.home)},
        )
    try:
        path = inside(settings.home, str(rel))  # raises when `..` or a symlink leaves the data root
    except UsageError:  # said about the field, so a form can show it next to it
        raise UsageError(
            f"baseModel {ref!r} leaves the data root; put the model under {settings.home}.",
            code="base_model.outside_root",
            params={"baseModel": ref, "home": str(settings.home)},
        ) from None
    refuse_adapter_dir(path, ref)  # an adapter directory gets its own reason: adapter on adapter
    # A model directory, never a root: `.`, `org/..` or the data root itself would hand the trainer every
    # file under it. Hugging Face model directories carry config.json.
    if path == settings.home.resolve() or not (path / "config.json").is_file():
        raise UsageError(
            f"baseModel {ref!r} is neither luna-tiny, a hub id (org/name) nor a model directory (with config.json) "
            "under the data root.",
            code="base_model.not_a_model",
            params={"baseModel": ref},
        )
    return str(path)
