"""Errors that every entry point (CLI, HTTP, trainer) turns into one clear sentence.

`UsageError` is the caller's mistake (CLI exit 2, HTTP 4xx); `CheckFailed` is a gate or data check that
did not pass (CLI exit 1); `NotFound` and `Conflict` map to 404 and 409 over HTTP. `said` turns the
validation errors of pydantic or FastAPI into (field, words, type) triples: a pattern as the rule registered
for it, the field as the request spells it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# What json.loads raises for a text it cannot read: its JSONDecodeError, UnicodeDecodeError for bytes that are
# no UTF-8 (both ValueErrors), a plain ValueError for a number of more digits than Python converts, and
# RecursionError for nesting deeper than it recurses. Catch all of them wherever the text is not our own.
JSON_FAULTS = (ValueError, RecursionError)


def json_fault(exc: BaseException) -> str:
    """Why json.loads gave up, in words; for a JSONDecodeError the parser's own message (the caller says
    where: a line, a column)."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if "integer string conversion" in str(exc):  # int()'s own words for the limit
        return f"a number of over {sys.get_int_max_str_digits()} digits"
    return str(exc)


# A refusal's sentence names the first SHOWN_PROBLEMS problems and its details list at most LISTED_PROBLEMS:
# a body of a million unknown keys gets a short answer, not one many times its own size.
SHOWN_PROBLEMS = 5
LISTED_PROBLEMS = 100


def some(problems: Sequence[str], sep: str = "; ") -> str:
    """The first SHOWN_PROBLEMS of `problems` joined by `sep`, then how many more there are."""
    more = len(problems) - SHOWN_PROBLEMS
    return sep.join(problems[:SHOWN_PROBLEMS]) + (f" (and {more} more)" if more > 0 else "")


# What each pattern a field or parameter must match means, in words (registered with `pattern()` where the
# pattern is defined): a refusal names the rule, never the regular expression.
PATTERN_RULES: dict[str, str] = {}


def pattern(regex: str, rule: str) -> str:
    """Register `rule` as the words for `regex`; returns `regex`, for pydantic's and FastAPI's `pattern=`."""
    PATTERN_RULES[regex] = rule
    return regex


def field_message(error: Mapping[str, Any]) -> str:
    """pydantic's message for one validation error, with a pattern said as its rule."""
    if error.get("type") == "string_pattern_mismatch":
        rule = PATTERN_RULES.get(str((error.get("ctx") or {}).get("pattern")))
        if rule:
            return rule
    if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
        return "the body is missing; send a JSON object"  # was "Field required", naming no field
    if error.get("type") == "extra_forbidden":  # pydantic says "Extra inputs are not permitted"
        return "unknown field"
    if error.get("type") == "json_invalid":  # FastAPI's: loc ends in a character offset, not a field
        why = str((error.get("ctx") or {}).get("error", "cannot be parsed"))
        loc = tuple(error.get("loc", ()))
        # The parser's words end in " at" where its message went on with the place ("Unterminated string
        # starting at"): the place is said, or the dangling word dropped.
        at = f" at offset {loc[-1]}" if len(loc) > 1 and isinstance(loc[-1], int) else ""
        return f"the body is not valid JSON ({why.removesuffix(' at')}{at})"
    return str(error.get("msg", "")).removeprefix("Value error, ")  # pydantic's prefix for our validators' words


# The steps pydantic names inside a field on the way to an error: a union's members (`constrained-str`,
# `list[TextPart]`, `literal['all-linear']`) and validators (`function-after[_unicode(), str]`). No field or
# parameter of ours looks like one.
_STEP = re.compile(
    r"[\[(]|^(constrained-\w+|function-\w+|json-or-python|lax-or-strict|str|int|float|bool|list|dict|none)$"
)


def field_path(loc: Iterable[Any]) -> str:
    """An error's location as the request spells it, without pydantic's steps: `stop`, `messages.0.content`."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or not _STEP.search(str(p)))


def _wrong_member(err: Mapping[str, Any]) -> bool:
    """A union member refusing the value as a whole (a string offered to the list member, a list to the
    'all-linear' literal): pydantic's location then ends in the member's step."""
    loc = tuple(err.get("loc", ()))
    kind = str(err.get("type", ""))
    return (
        (kind.endswith("_type") or kind == "literal_error")
        and bool(loc)
        and not isinstance(loc[-1], int)
        and bool(_STEP.search(str(loc[-1])))
    )


def said(errors: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(field, words, pydantic's error type) for each validation error worth saying. A value that fits none of
    a union's members gets one error per member. Where another error names what is wrong with it (a list of
    5 where at most 4 are allowed, an item of the list that is no string), the members that refused the value
    as a whole are left out; where none does (5 for a string or a list), their wishes are said as one: "a
    valid string or a valid list"."""
    errors = list(errors)
    out: list[tuple[str, str, str]] = []
    members: dict[str, list[Mapping[str, Any]]] = {}  # by field: the members that refused the whole value
    for err in errors:
        if err.get("type") == "json_invalid":
            out.append(("", field_message(err), "json_invalid"))
        elif _wrong_member(err):
            members.setdefault(field_path(err.get("loc", ())), []).append(err)
        else:
            out.append((field_path(err.get("loc", ())), field_message(err), str(err.get("type", ""))))
    for path, errs in members.items():
        if any(f"{said}.".startswith(f"{path}.") for said, _, _ in out):
            continue
        wishes = list(dict.fromkeys(field_message(e).removeprefix("Input should be ") for e in errs))
        out.append((path, "Input should be " + " or ".join(wishes), str(errs[0].get("type", ""))))
    return out


class LunaError(Exception):
    """Base class: `str(err)` is the one sentence shown to the user.

    `code` says what happened in a machine-readable way and `params` holds the values the sentence names,
    so the dashboard can say the same in the reader's language (`error.code`, `error.params` over HTTP;
    every code has its strings in api/static/i18n.js, see `messages.py`)."""

    exit_code = 1
    http_status = 400
    code = "error"

    def __init__(
        self,
        message: str,
        *,
        details: object | None = None,
        code: str | None = None,
        params: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code
        self.params = params


class UsageError(LunaError):
    exit_code = 2
    http_status = 422
    code = "invalid_request"


class CheckFailed(LunaError):
    exit_code = 1
    http_status = 409
    code = "check_failed"


class NotFound(LunaError):
    exit_code = 1
    http_status = 404
    code = "not_found"


class Conflict(LunaError):
    exit_code = 1
    http_status = 409
    code = "conflict"


class ServiceUnavailable(LunaError):
    exit_code = 1
    http_status = 503
    code = "service_unavailable"


class StorageError(LunaError):
    """A file or database the project keeps cannot be read or written (damaged, I/O error, read-only).
    The services stay up and answer 503: the request was fine, the storage under it is not."""

    exit_code = 1
    http_status = 503
    code = "storage_error"


class DiskFull(StorageError):
    code = "disk_full"


# The kinds of storage failure where the data is fine but cannot be reached now: each has a code of its own,
# so that a client (the dashboard) does not call them damage.
class StorageBusy(StorageError):
    """Another process holds the database past the busy timeout."""

    code = "storage_busy"


class StorageUnreachable(StorageError):
    """The database server does not answer or refuses the connection."""

    code = "storage_unreachable"


class StorageDenied(StorageError):
    """The database refuses this user something lunatrain needs (a privilege, a schema to use)."""

    code = "storage_denied"


class StorageIncompatible(StorageError):
    """A database lunatrain cannot use as it is: made by a newer lunatrain, or not in UTF8."""

    code = "storage_incompatible"


class DamagedFile(StorageError, ValueError):
    """A JSON file that exists but cannot be used (not JSON, cut short, wrong shape). A ValueError too, so
    readers that treat an unreadable optional report as missing keep doing so. `why` is the reason alone
    (without the path), for a caller that words its own sentence around it."""

    why = "damaged"


class RegistryUnreadable(DamagedFile):
    code = "registry_unreadable"


# How a device says it ran out of memory, at the start of an exception's message: torch's caching allocator
# (CUDA, MPS) and a cudaMalloc outside it; and anywhere in it, cuBLAS's workspace and the CPU allocator.
_OOM_STARTS = ("CUDA out of memory", "CUDA error: out of memory", "MPS backend out of memory")
_OOM_MARKS = ("CUBLAS_STATUS_ALLOC_FAILED", "DefaultCPUAllocator: can't allocate memory")


def is_out_of_memory(kind: str, message: str) -> bool:
    """Whether an exception of type name `kind` with `message` says the device ran out of memory: by its kind
    (torch.OutOfMemoryError, MemoryError, ENOMEM) or the allocator's own words, never by any text that merely
    mentions memory. The training loop and the trainer's job errors decide alike."""
    if kind in ("OutOfMemoryError", "MemoryError") or message.startswith("[Errno 12]"):
        return True
    return message.startswith(_OOM_STARTS) or any(mark in message for mark in _OOM_MARKS)
