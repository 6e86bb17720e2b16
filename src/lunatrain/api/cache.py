"""Read coalescing for the polled endpoints (`lora/status`, `training/status`).

Fifty open dashboards polling every second would otherwise mean fifty trainer round trips and fifty sets of
database queries per second, on the same CPU cores the training job uses. Identical reads that arrive within
`ttl` seconds share one upstream call (also while it is still running); errors are never kept. Every
mutating request through the API clears the cache before and after it runs, so a client never reads its own
change stale; changes made elsewhere (the trainer finishing a step) show up within `ttl`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool


class Coalescer:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[Hashable, tuple[float, asyncio.Future[Any]]] = {}

    async def get(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        now = time.monotonic()
        entry = self._entries.get(key)
        # A future belongs to one event loop; a test client may drive the app from several in turn.
        stale = entry is not None and (entry[1].get_loop() is not asyncio.get_running_loop())
        if entry is None or stale or (entry[1].done() and now >= entry[0]):
            if len(self._entries) > 1024:  # keys are job ids and thresholds; keep the table small anyway
                self._entries = {k: e for k, e in self._entries.items() if not e[1].done() or now < e[0]}
            entry = (now + self.ttl, asyncio.ensure_future(run_in_threadpool(fn)))
            self._entries[key] = entry
            entry[1].add_done_callback(lambda fut, k=key: self._forget_failure(k, fut))
        # shield: one client disconnecting must not cancel the call the others are waiting for
        return await asyncio.shield(entry[1])

    def _forget_failure(self, key: Hashable, fut: asyncio.Future[Any]) -> None:
        if (fut.cancelled() or fut.exception() is not None) and self._entries.get(key, (0, None))[1] is fut:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


async def fresh_reads(request: Request) -> AsyncIterator[None]:
    """Router dependency: a mutating request empties the read cache before and after it runs."""
    mutating = request.method not in ("GET", "HEAD", "OPTIONS")
    if mutating:
        request.app.state.reads.clear()
    yield
    if mutating:
        request.app.state.reads.clear()


def rendered(model: BaseModel) -> bytes:
    """The JSON a route with this response model would send; cached as bytes, so a cache hit costs no
    validation and no serialization."""
    return model.model_dump_json(by_alias=True).encode()


def json_response(body: bytes) -> Response:
    return Response(content=body, media_type="application/json")
