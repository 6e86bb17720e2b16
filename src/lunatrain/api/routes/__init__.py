"""One router per resource; `ROUTERS` is what `create_app` includes."""

from __future__ import annotations

from . import dashboard, examples, lora, pipeline

ROUTERS = [lora.router, examples.router, pipeline.router, dashboard.router]
