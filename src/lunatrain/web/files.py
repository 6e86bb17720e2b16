"""Files both services answer: the dashboard's, a version's report and loss curve, the schema page's assets.
They are small and change with an update or a new version, so they are served whole and revalidated:
`Cache-Control: no-cache` with an ETag, and a 304 when the browser's copy is current.

Whole: a Range header is ignored, as RFC 9110 §14.2 lets a server. Starlette's FileResponse answers a range
unit it does not know, or a malformed range, with a plain-text 400 (outside the JSON error shape) where
HTTP says such a header is to be ignored, and nothing here needs a part of a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import NotModifiedResponse, StaticFiles
from starlette.types import Receive, Scope, Send


class WholeFile(FileResponse):
    """A FileResponse that never answers a range."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.headers["accept-ranges"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"range", b"if-range")]
        # Opened once before the status line goes out: FileResponse opens the file only after sending its 200,
        # so a file this process cannot open (out of file descriptors) left the page a 200 without a body,
        # waiting; raised here, it is an error answer (web/handlers.py: 503 for EMFILE).
        handle = await anyio.open_file(self.path, mode="rb")
        await handle.aclose()
        await super().__call__({**scope, "headers": headers}, receive, send)


class WholeFiles(StaticFiles):
    """StaticFiles whose files are WholeFile (its revalidation stays)."""

    def file_response(
        self, full_path: Any, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = WholeFile(full_path, status_code=status_code, stat_result=stat_result)
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response


_REVALIDATION = WholeFiles(check_dir=False)  # its If-None-Match / If-Modified-Since rule, for `served`


def served(request: Request, path: Path, media_type: str | None = None) -> Response:
    """`path` whole, or a 304 when the request's validators say the browser's copy is current."""
    response = WholeFile(path, media_type=media_type, stat_result=path.stat(), headers={"Cache-Control": "no-cache"})
    if _REVALIDATION.is_not_modified(response.headers, request.headers):
        return NotModifiedResponse(response.headers)
    return response
