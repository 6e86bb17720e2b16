"""How values cross process and file boundaries: one timestamp format and one rule for non-finite numbers.

Every report, registry entry, job and event uses `now_iso()` (UTC, milliseconds, `Z`), so timestamps from
different stages sort and compare as text; `finite()` makes any value JSON-safe (NaN and ±inf become null:
`json.dumps` would write `NaN`, which no JSON parser accepts).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def finite(value: Any) -> Any:
    """JSON-safe copy of `value`: non-finite floats become None, recursively through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
