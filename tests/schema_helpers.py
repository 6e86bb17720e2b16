"""Schema-driven requests for every operation of an OpenAPI schema, as plain pytest parameters.

Each operation is its own test id (so pytest-xdist distributes and reports them like any other test), and
each is driven with schemathesis' generated cases — schema-valid ones and schema-violating ones — under
derandomized hypothesis settings, so the same requests run every time and CI cannot turn red on a lucky draw.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

# A request's answer is what is checked, not its speed: schemathesis' default read timeout (10 s) is a
# wall-clock limit that a loaded machine trips (`POST /prepare` loads the tokenizer and reads the export; it
# took over 10 s with other test suites beside it). Every answer here ends on its own, streams included (a
# chat stream ends at max_tokens), so a generous bound only matters when something hangs.
REQUEST_TIMEOUT_S = 300.0


def call(case: Any, app: Any) -> Any:
    """Send one generated case to the ASGI `app` and return the response."""
    return case.call(app=app, base_url="http://testserver", timeout=REQUEST_TIMEOUT_S)


def operations(spec: dict[str, Any], path_regex: str | None = None) -> list[tuple[str, str]]:
    """(path, METHOD) of every operation in `spec`, optionally only paths matching `path_regex`."""
    return [
        (path, method.upper())
        for path, item in spec["paths"].items()
        for method in item
        if path_regex is None or re.search(path_regex, path)
    ]


def drive(spec: dict[str, Any], path: str, method: str, check: Callable[[Any], None], max_examples: int) -> int:
    """Run `check(case)` on up to `max_examples` generated cases of one operation in each generation mode;
    returns how many cases ran. An operation without inputs has no schema-violating case to generate."""
    operation = schemathesis.openapi.from_dict(spec)[path][method]
    ran = 0
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @settings(
            max_examples=max_examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            nonlocal ran
            ran += 1
            check(case)

        try:
            run()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise
    return ran
