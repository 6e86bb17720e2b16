"""How values cross process and file boundaries: one timestamp format and one rule for non-finite numbers.

Every report, export summary, registry entry, job and event uses `now_iso()` (UTC, milliseconds, `Z`), so
timestamps from different stages sort and compare as text; `utc_now()` is the same clock as a value (database
columns, ages, file-name stamps); `parse_iso()` reads such a stamp back (older ones with `+00:00` too) and
`seconds_between()` is the time from one to another; `finite()` makes any value JSON-safe (NaN and ±inf
become null: `json.dumps` would write `NaN`, which no JSON parser accepts); `camel()` gives a stage's
snake_case dict the camelCase names every API answer and report uses; `INT_MAX` bounds every id, offset or
count a caller may name.
"""

from __future__ import annotations

import logging
import math
import re
from datetime import UTC, datetime
from typing import Any

from pydantic.alias_generators import to_camel

from .errors import UsageError

# The largest id, offset or count a caller may name: within SQLite's and PostgreSQL's 64-bit integers, with
# room to add to it (the API's and the trainer's bounds are the same).
INT_MAX = 2**62


def check_page(limit: int, offset: int, *, flags: bool = False) -> None:
    """A page's `limit` (1 or more) and `offset` (0 or more), each at most INT_MAX; UsageError naming the one
    out of bounds (said as 2^62, not its 19 digits), as a command line's option with `flags` (`--offset`)."""
    dashes = "--" if flags else ""
    for name, value, least in ((f"{dashes}limit", limit, 1), (f"{dashes}offset", offset, 0)):
        if value < least:
            raise UsageError(f"{name} must be {least} or more (got {value}).")
        if value > INT_MAX:
            raise UsageError(f"{name} must be at most 2^62 (got {value}).")


def utc_now() -> datetime:
    return datetime.now(UTC)


def now_iso() -> str:
    return iso(utc_now())


STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"


def compact_stamp() -> str:
    """Now for a file or folder name: UTC, to the microsecond, sortable as text (`20261205T213012123456Z`)."""
    return utc_now().strftime(STAMP_FORMAT)


def iso(value: datetime) -> str:
    """A time in the one format (UTC, milliseconds, `Z`): database columns on the wire say it as now_iso does."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UtcLogFormatter(logging.Formatter):
    """`<now_iso() stamp> LEVEL logger: message`: log lines stamped as every record is (UTC, `Z`), never in
    the local time of whichever shell started the process."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # logging's name
        return iso(datetime.fromtimestamp(record.created, UTC))


class AcceptFailures(logging.Filter):
    """asyncio's "socket.accept() out of system resource" (out of file descriptors, EMFILE) at most once per
    `every` seconds, without its traceback, with how many were left out: under many connections at once it
    came a dozen times a second with a traceback each, tens of MB of log in seconds (a full disk next)."""

    PREFIX = "socket.accept() out of system resource"

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every, self.last, self.left_out = every, float("-inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "asyncio" or not record.getMessage().startswith(self.PREFIX):
            return True
        if record.created - self.last < self.every:
            self.left_out += 1
            return False
        cause = record.exc_info[1] if record.exc_info else None
        more = f" ({self.left_out} more left out)" if self.left_out else ""
        record.msg, record.args = f"{self.PREFIX}: {cause or 'unknown cause'}{more}", ()
        record.exc_info, record.exc_text = None, None
        self.last, self.left_out = record.created, 0
        return True


def parse_iso(stamp: str) -> datetime:
    """A timestamp as `now_iso()` writes it (or with `+00:00`); one without a zone is taken as UTC. Raises
    ValueError for anything else."""
    value = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from `start` to `end` (two timestamps), to the millisecond; None when either is missing or
    unreadable."""
    if not start or not end:
        return None
    try:
        return round((parse_iso(end) - parse_iso(start)).total_seconds(), 3)
    except ValueError:
        return None


def finite(value: Any) -> Any:
    """JSON-safe copy of `value`: non-finite floats become None, recursively through dicts, lists and tuples.
    Keys JSON writes itself (text, numbers, booleans) stay as they are, so it spells them (`true`) and sorts
    them (9 before 10); others become their text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            k if isinstance(k, str | int | float | bool) or k is None else str(k): finite(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)+$")


def camel(obj: Any) -> Any:
    """camelCase the snake_case keys of a stage's report, recursively; other keys (file names, tier names,
    `adapter@v1`) stay as they are."""
    if isinstance(obj, dict):
        return {(to_camel(k) if isinstance(k, str) and _SNAKE.match(k) else k): camel(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [camel(v) for v in obj]
    return obj
