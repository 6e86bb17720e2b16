"""The assistant API app: `create_app()` wires settings, guards, error handlers and one router per resource.

Run with `lunatrain serve`; the OpenAPI schema is at /docs. Heavy things (the store's engine) are opened in
the lifespan, never at import.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import store
from ..errors import StorageError
from ..service.spawn import code_signature
from ..settings import Settings, load_settings
from ..web import handlers
from ..web.conditional import ConditionalGetMiddleware
from ..web.security import API_REALM, DataRootMiddleware, GuardMiddleware, allowed_hostnames
from . import routes
from .cache import Coalescer


def create_app(settings: Settings | None = None, *, bound_host: str | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            store.open_store(settings)  # create/migrate the database before the first request, not during it
        except StorageError as err:  # damaged: serve anyway, each request that needs it answers 503 with why
            logging.getLogger("lunatrain.api").error("%s", err.message)
        yield
        store.dispose_stores()

    app = handlers.service_app("lunatrain assistant API", "1", lifespan, openai_prefix="/v1")
    app.state.settings = settings
    app.state.code = code_signature()  # the lunatrain it runs: status says when an update replaced it on disk
    app.state.reads = Coalescer(ttl=0.5)
    for router in routes.ROUTERS:
        app.include_router(router)
    _without_fastapi_422_on_chat(app)
    hosts = allowed_hostnames(settings, bound_host)
    app.add_middleware(ConditionalGetMiddleware)  # innermost: the guards refuse before any body is made
    app.add_middleware(
        DataRootMiddleware, home=settings.home, openai_prefix="/v1"
    )  # inside the guard: strangers learn nothing
    app.add_middleware(
        GuardMiddleware,
        hosts=hosts,
        token=settings.api_token,
        max_body_bytes=settings.max_body_bytes,
        realm=API_REALM,
        openai_prefix="/v1",
    )
    return app


def _without_fastapi_422_on_chat(app: FastAPI) -> None:
    """FastAPI declares 422 on every route with a body; the chat routes answer every invalid request with
    400 in OpenAI's shape (routes/chat.py), so their schema must not promise a 422 that never comes."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()  # cached by FastAPI after the first call; removing again is a no-op
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
