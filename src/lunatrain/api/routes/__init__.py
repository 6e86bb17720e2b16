"""One router per resource; `ROUTERS` is what `create_app` includes."""

from __future__ import annotations

from . import adapter_files, dashboard, examples, lora, pipeline

ROUTERS = [lora.router, examples.router, pipeline.router, adapter_files.router, dashboard.router]
