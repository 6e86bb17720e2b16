"""Errors that every entry point (CLI, HTTP, trainer) turns into one clear sentence.

`UsageError` is the caller's mistake (CLI exit 2, HTTP 4xx); `CheckFailed` is a gate or data check that
did not pass (CLI exit 1); `NotFound` and `Conflict` map to 404 and 409 over HTTP. `field_message` says a
validation error of pydantic or FastAPI in words, a pattern as the rule registered for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    return str(error.get("msg", ""))


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


class DamagedFile(StorageError, ValueError):
    """A JSON file that exists but cannot be used (not JSON, cut short, wrong shape). A ValueError too, so
    readers that treat an unreadable optional report as missing keep doing so."""


class RegistryUnreadable(DamagedFile):
    code = "registry_unreadable"
