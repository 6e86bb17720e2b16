"""/docs (Swagger UI) for both HTTP services, from files installed with the package.

FastAPI's own pages load Swagger UI and ReDoc from a CDN: offline (where these services often run) the page
stays blank, and online it runs third-party script on a service whose defence against browsers is that only
its own pages talk to it. The `fastapi-offline` distribution ships Swagger UI as static files; only those are
used here, served under ASSETS by the app itself. No /redoc: ReDoc's bundle fetches its logo from its CDN
whatever it is told.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from .files import WholeFiles

ASSETS = "/docs-assets"
_FILES = Path(fastapi_offline.__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Serve the schema's page at /docs; `app` must be made with `docs_url=None, redoc_url=None`."""
    assert app.docs_url is None and app.redoc_url is None, "FastAPI's own pages load their scripts from a CDN"
    openapi_url = app.openapi_url or "/openapi.json"
    app.mount(ASSETS, WholeFiles(directory=_FILES), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} — docs",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
            # Swagger UI's own default sends the schema to validator.swagger.io for a badge (it skips that only
            # for a schema on localhost, not on another host this service may be reached by).
            swagger_ui_parameters={"validatorUrl": None},
        )
