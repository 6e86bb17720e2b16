"""How values cross process and file boundaries: one timestamp format and one rule for non-finite numbers.

Every report, export summary, registry entry, job and event uses `now_iso()` (UTC, milliseconds, `Z`), so
timestamps from different stages sort and compare as text; `utc_now()` is the same clock as a value (database
columns, ages, file-name stamps); `finite()` makes any value JSON-safe (NaN and ±inf become null:
`json.dumps` would write `NaN`, which no JSON parser accepts).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def utc_now() -> datetime:
    return datetime.now(UTC)


def now_iso() -> str:
    return utc_now().isoformat(timespec="milliseconds").replace("+00:00", "Z")


def finite(value: Any) -> Any:
    """JSON-safe copy of `value`: non-finite floats become None, recursively through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
