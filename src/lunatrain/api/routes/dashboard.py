"""The web dashboard: static files from `api/static/` at `/` (index.html) and `/static/…`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...errors import NotFound, UsageError
from ...web.files import served

STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

router = APIRouter(include_in_schema=False)


# HEAD too: the request guard lets GET and HEAD of these paths through without a token (web/security.py).
@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    return _file(request, "index.html")


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"])
async def static(request: Request, path: str) -> Response:
    return _file(request, path)


def _file(request: Request, rel: str) -> Response:
    root = STATIC.resolve()
    if not rel or rel.startswith("/") or rel.endswith("/") or "//" in rel:
        # no file's name: resolve() would drop the slash (serving app.js at app.js/, whose relative imports
        # then break) or take an empty part for the root
        raise NotFound(f"No dashboard file {rel[:200]!r}.")
    try:
        target = (root / rel).resolve()
        # The joined path must stay inside static/: `..` or a symlink out of it is refused, not followed.
        if root not in target.parents:
            raise UsageError("Invalid static file path.")
        found = target.is_file()
    except (ValueError, OSError):  # a NUL in the path; a name longer than the file system allows
        found = False
    if not found:
        raise NotFound(f"No dashboard file {rel[:200]!r}.")
    return served(request, target, _TYPES.get(target.suffix))
