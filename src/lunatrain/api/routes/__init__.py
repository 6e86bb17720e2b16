"""One router per resource; `ROUTERS` is what `create_app` includes."""

from __future__ import annotations

from . import adapter_files, adapters, chat, dashboard, examples, lora, pipeline, status

ROUTERS = [
    lora.router,
    status.router,
    examples.router,
    pipeline.router,
    adapters.router,
    adapter_files.router,
    dashboard.router,
    chat.router,
    chat.examples_router,
]
