"""Conditional GETs (and HEADs) for JSON answers: an `ETag` (a digest of the body) and `Cache-Control: no-cache` on each, and
304 without a body to a request whose `If-None-Match` names it.

The dashboard asks for the registry, the status and the job lists every few seconds; a year of daily versions
makes the registry's answer 1.5 MB, sent again each time while nothing changed. A browser keeps the answer and
asks with `If-None-Match` by itself (`no-cache`: it always asks, so nothing it shows is stale); the page's code
sees the kept answer as a 200. The body is still made for each request: the digest is of what it would send.

Pure ASGI (as web/security.py): only a 200 of `application/json` is held until it is whole; everything else,
event streams and files included, passes as it comes.
"""

from __future__ import annotations

import hashlib

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ConditionalGetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        # A HEAD runs as its GET here (handlers.HeadAsGet inside would blank the body before its digest), so its
        # ETag is the GET's; its body is dropped on the way out.
        head = scope["method"] == "HEAD"
        # weak comparison (RFC 9110 13.1.2): a compressing proxy hands our tag back as W/"…"
        asked = {
            tag.strip().removeprefix("W/")
            for tag in Headers(scope=scope).get("if-none-match", "").split(",")
            if tag.strip()
        }
        start: Message | None = None
        held: list[bytes] = []

        async def send_conditionally(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = Headers(raw=message["headers"])
                json_answer = headers.get("content-type", "").startswith("application/json")
                if message["status"] == 200 and json_answer and "etag" not in headers:
                    start = message  # held until the body is whole
                    return
            elif message["type"] == "http.response.body" and start is not None:
                held.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _answer(send, start, b"".join(held), asked, head)
                return
            if head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"} if head else scope, receive, send_conditionally)


async def _answer(send: Send, start: Message, body: bytes, asked: set[str], head: bool) -> None:
    tag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = MutableHeaders(raw=start["headers"])
    headers["etag"] = tag
    headers["cache-control"] = "no-cache"
    if tag in asked or "*" in asked:
        del headers["content-length"]  # a 304 has no body (RFC 9110 15.4.5); the client keeps its own
        await send(start | {"status": 304})
        await send({"type": "http.response.body", "body": b""})
        return
    await send(start)
    await send({"type": "http.response.body", "body": b"" if head else body})
