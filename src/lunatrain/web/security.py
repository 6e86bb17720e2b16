"""Request guards for both HTTP services (assistant API and trainer), as one pure ASGI middleware (R9).

Order of checks, cheapest first: Host allowlist (400, DNS rebinding), cross-origin `Origin` (403, CSRF from a
browser tab), bearer token when one is configured (401), then the body cap (413) which counts bytes while
the handler reads them, so a chunked body without Content-Length is stopped too.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: the latter buffers and cannot see the body stream.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import UsageError
from ..fsio import identity
from ..settings import Settings

log = logging.getLogger("lunatrain.api")

# GETs that serve no data (the dashboard shell and the schema) stay reachable without a token, so a browser
# can load the page that then asks for the token; everything else needs it.
_PUBLIC_PREFIXES = ("/static/", "/docs-assets/")
_PUBLIC_PATHS = frozenset({"/", "/index.html", "/docs", "/openapi.json", "/favicon.ico"})
# The realm of a 401's WWW-Authenticate names the service that wants the token, so a client can tell a
# lunatrain trainer that wants another token from another service holding the trainer's address.
API_REALM = "lunatrain-api"
TRAINER_REALM = "lunatrain-trainer"


def bearer_realm(header: str | None) -> str | None:
    """The realm of a `WWW-Authenticate: Bearer realm="..."` header, else None."""
    # The Bearer challenge's own parameters: up to the next challenge's scheme (a token followed by a space).
    match = re.search(r"\bBearer\s+((?:[^,]*?(?:,\s*|$))*?)(?:[A-Za-z][\w-]*\s+[\w-]+=|$)", header or "", re.I)
    params = match.group(1) if match else ""
    realm = re.search(r'(?:^|,)\s*realm\s*=\s*(?:"([^"]*)"|([^\s,]+))', params, re.I)
    return (realm.group(1) if realm.group(1) is not None else realm.group(2)) if realm else None


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token: the API can start training and delete data."""
    if not is_loopback(host) and not token:
        raise UsageError(f"Refusing to listen on {host} without ASSISTANT_API_TOKEN; set a token or bind to 127.0.0.1.")


def allowed_hostnames(settings: Settings, bound_host: str | None = None) -> frozenset[str]:
    # An entry written as a Host header is (`localhost:5050`, `[::1]:5050`) names its host: the allowlist is of
    # names, any port, and kept as typed such an entry matched nothing, without a word.
    names = {_strip_brackets(host_name(h) or h.strip().lower()) for h in settings.allowed_hosts.split(",") if h.strip()}
    bound = (bound_host or settings.api_host).lower()
    # 0.0.0.0/:: is not a name a client uses; such a bind needs its public name in ASSISTANT_ALLOWED_HOSTS.
    if bound not in ("0.0.0.0", "::", "[::]"):
        names.add(_strip_brackets(bound))
    names.discard("*")  # no wildcard, even if configured
    return frozenset(names)


def host_name(header: str) -> str | None:
    """The host part of a Host header value (`name`, `name:port`, `[v6]:port`), lowercased; None if malformed."""
    header = header.strip().lower()
    if not header or any(c in header for c in "/@ \\"):
        return None
    if header.startswith("["):
        end = header.find("]")
        if end < 0 or (header[end + 1 :] and not _is_port(header[end + 1 :])):
            return None
        return header[1:end]
    if header.count(":") == 1:
        name, port = header.split(":")
        return name if _is_port(":" + port) else None
    return header if ":" not in header else None


def _is_port(suffix: str) -> bool:
    return suffix.startswith(":") and suffix[1:].isdigit() and len(suffix) <= 6


def _strip_brackets(name: str) -> str:
    return name[1:-1] if name.startswith("[") and name.endswith("]") else name


def _origin_host(origin: str) -> str | None:
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return None
    return host_name(rest)


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


# Seconds a request's body may stop arriving (between its parts): a body sent never (a Content-Length and then
# nothing) or stalled held the request, its worker thread and its connection for good. And the least rate a
# body must keep on the whole (bytes/s, over the timeout): one byte every 20 s was never cut, while a steady
# upload of 10 MiB at this rate still takes its 160 s.
BODY_TIMEOUT = 30.0
BODY_MIN_RATE = 64 * 1024


# The first bytes of JSON text in UTF-16 or UTF-32, with or without a byte-order mark: what Python's json.loads
# detects in bytes and decodes (RFC 4627's rule). JSON between systems is UTF-8 (RFC 8259 §8.1), and the
# app's refusal of a Latin-1 body says so; `_capped` has such a body refused the same way.
_WIDE_JSON = re.compile(rb"\A(?:\xff\xfe|\xfe\xff|.?\x00)", re.S)
# Bytes that begin no UTF-8 character and make json.loads read the body as UTF-8.
_NOT_UTF8 = b"\x80\x80"


def _absolute_form(scope: Scope, headers: dict[str, str]) -> tuple[Scope, dict[str, str]]:
    """A request whose target is a whole URL (`GET http://host:port/path`), as a server must take it (RFC 9112
    §3.2.2): its path is the URL's, and its authority is the request's host (checked like a Host header)."""
    path = scope.get("path", "")
    scheme, sep, rest = path.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return scope, headers
    authority, slash, tail = rest.partition("/")
    raw = scope.get("raw_path") or path.encode()
    raw_tail = raw.split(b"://", 1)[-1].partition(b"/")[2]
    host = authority.encode("latin-1", "replace")
    scope = dict(scope, path=slash + tail or "/", raw_path=b"/" + raw_tail)
    scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"host"] + [(b"host", host)]
    return scope, headers | {"host": authority}


# OpenAI's error `type` for a status: the OpenAI-compatible routes answer in its shape (routes/chat.py), and so
# does the guard for a request under their prefix, since OpenAI's clients read `type` and `param`.
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def openai_error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, object]:
    """An error in OpenAI's shape (the value of the body's `error`): its four fields, `type` by the status."""
    return {"message": message, "type": OPENAI_TYPES.get(status, "api_error"), "param": param, "code": code}


def under_prefix(path: str, prefix: str | None) -> bool:
    """`path` is `prefix` or below it (never `/v1x` for `/v1`)."""
    return bool(prefix) and (path == prefix or path.startswith(f"{prefix}/"))


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: Iterable[str],
        token: str | None,
        max_body_bytes: int,
        realm: str,
        openai_prefix: str | None = None,
    ) -> None:
        self.app = app
        self.challenge = f'Bearer realm="{realm}"'.encode()
        self.hosts = frozenset(hosts)
        self.token = token.encode() if token else None
        self.max_body = max_body_bytes
        self.openai_prefix = openai_prefix  # its refusals in OpenAI's shape (OPENAI_TYPES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _never_framed(send)
        scope, headers = _absolute_form(scope, _headers(scope))
        reply = self._reply_for(scope)
        host = host_name(headers.get("host", ""))
        if host is None or host not in self.hosts:
            await reply(send, 400, "bad_host", "Host header not allowed; add the name to ASSISTANT_ALLOWED_HOSTS.")
            return
        origin = headers.get("origin")
        if origin is not None and origin != "null" and _origin_host(origin) not in self.hosts:
            await reply(send, 403, "forbidden_origin", "Cross-origin requests are not allowed.")
            return
        if origin == "null":  # sandboxed iframes and file:// pages send the literal "null"
            await reply(send, 403, "forbidden_origin", "Cross-origin requests are not allowed.")
            return
        # What a browser says of who sent it: an image's or a link's GET carries no Origin, and a page on another
        # port of this host ("same-site": a dev server, a notebook) passes the Origin rule, which names hosts.
        # Only the dashboard page itself may be opened from elsewhere (a link, a bookmark).
        if headers.get("sec-fetch-site") in ("cross-site", "same-site") and not _public(scope):
            await reply(send, 403, "forbidden_origin", "Requests from another site are not allowed.")
            return
        if self.token is not None and not _public(scope) and not self._authorized(headers):
            await reply(
                send,
                401,
                "unauthorized",
                "Missing or wrong bearer token.",
                extra=[(b"www-authenticate", self.challenge)],
            )
            return
        declared = headers.get("content-length")
        # ASCII digits only, and few enough for int() (h11 refuses others first; other servers may not)
        number = declared is not None and re.fullmatch(r"[0-9]{1,30}", declared) is not None
        if declared is not None and (not number or int(declared) > self.max_body):
            status, code = (413, "payload_too_large") if number else (400, "bad_request")
            await reply(send, status, code, f"Request body over {self.max_body} bytes or malformed length.", close=True)
            return
        coding = headers.get("content-encoding", "").strip()
        if coding.lower() not in ("", "identity"):
            await reply(
                send,
                415,
                "unsupported_media_type",
                f"Request bodies are read as sent, and Content-Encoding {coding!r} is not supported; send the body "
                "uncompressed, without that header.",
                close=True,
            )
            return
        # A body to wait for: a length over 0, or chunks (without either the request has none, and what the app
        # reads later, a disconnect while an answer streams, takes its time). Chunks may come up to the cap.
        length = int(declared) if number and declared else 0
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        await self._capped(
            scope,
            receive,
            send,
            json_body=_declares_json(headers.get("content-type")),
            body=self.max_body if chunked else length,
        )

    def _reply_for(self, scope: Scope) -> Callable[..., Awaitable[None]]:
        """`_reply`, in OpenAI's shape for a path under the OpenAI-compatible prefix."""
        return functools.partial(_reply, openai=under_prefix(scope.get("path", ""), self.openai_prefix))

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        # compare_digest takes constant time over the token, so timing reveals nothing about it.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token or b"")

    async def _capped(self, scope: Scope, receive: Receive, send: Send, *, json_body: bool, body: int) -> None:
        """`body`: the bytes the request's body may have (0: it has none)."""
        reply = self._reply_for(scope)
        seen = 0
        head = b""  # a JSON body's first bytes
        too_large = too_slow = False
        started = False
        arrived = not body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUT + body / BODY_MIN_RATE

        async def counting_receive() -> Message:
            nonlocal seen, head, too_large, too_slow, arrived
            if arrived:  # the body is in: what follows (a disconnect while an answer streams) takes its time
                return await receive()
            try:  # each part within the timeout, and the whole at the least rate
                message = await asyncio.wait_for(receive(), max(min(BODY_TIMEOUT, deadline - loop.time()), 0.0))
            except TimeoutError:
                too_slow = True
                raise BodyTooSlow from None
            arrived = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                seen += len(chunk)
                if seen > self.max_body:
                    too_large = True
                    raise BodyTooLarge
                if json_body and len(head) < 4 and chunk:
                    head += chunk[: 4 - len(head)]
                    if _WIDE_JSON.match(head):
                        # Read as UTF-8 it is no text: the app refuses it as a Latin-1 body, in the words and
                        # the error shape of its route (the OpenAI-compatible ones have their own).
                        head = b"done"
                        message = dict(message, body=_NOT_UTF8 + chunk)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Once the cap is hit, whatever the app answers (FastAPI turns the error into a 400) is dropped.
            if too_large or too_slow:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except (BodyTooLarge, BodyTooSlow):
            pass
        if too_large and not started:
            await reply(send, 413, "payload_too_large", f"Request body over {self.max_body} bytes.", close=True)
        elif too_slow and not started:
            await reply(
                send,
                408,
                "request_timeout",
                f"The request body stopped arriving for {BODY_TIMEOUT:g} s, or came slower than "
                f"{BODY_MIN_RATE // 1024} KiB/s; send it whole.",
                close=True,
            )


class DataRootMiddleware:
    """503 for every request but the dashboard's own files once the data root this app serves is moved,
    deleted or replaced (`mv ~/luna ~/luna2` while `lunatrain serve` runs). The open database connection
    would follow the moved file while every path names the old place: reads would find an empty data root,
    and writes would split between the moved database and a re-created old path. (The trainer, which has no
    requests to answer, shuts down instead: service/runner.py.)"""

    def __init__(self, app: ASGIApp, *, home: Path, service: str = "API", openai_prefix: str | None = None) -> None:
        self.app, self.home = app, home
        self.openai_prefix = openai_prefix  # its 503 in OpenAI's shape there, as the guard's refusals
        self.service = service  # "API" or "trainer": what the 503 names and how it is started again
        self.opened = identity(home)  # None until the folder exists (created by the first write)
        self.gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _public(scope) and self._gone():
            await _reply(
                send,
                503,
                "data_root_gone",
                f"The data root {self.home} was moved or deleted while this {self.service} ran; nothing was "
                f"changed. Start `lunatrain {'serve' if self.service == 'API' else 'trainer'}` again with "
                "ASSISTANT_HOME set to where it is now.",
                openai=under_prefix(scope.get("path", ""), self.openai_prefix),
            )
            return
        await self.app(scope, receive, send)

    def _gone(self) -> bool:
        if not self.gone:
            now = identity(self.home)
            if self.opened is None:
                self.opened = now
            elif now != self.opened:
                self.gone = True  # for good: moving it back would not undo what a restart must redo
                log.error("data root %s was moved or deleted; every request now answers 503", self.home)
        return self.gone


# Every answer: no page of another site may frame the dashboard (or an answer of the API) and take the clicks
# on its buttons; its requests would be same-origin, so the Origin rule would pass them.
_SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
]


def _never_framed(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


def _public(scope: Scope) -> bool:
    path = scope.get("path", "")
    return scope.get("method") in ("GET", "HEAD") and (path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES))


def _declares_json(declared: str | None) -> bool:
    media = (declared or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _headers(scope: Scope) -> dict[str, str]:
    # Duplicate security headers are suspicious; the first one wins, as in Starlette's Headers.get.
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


async def _reply(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    close: bool = False,
    extra: list | None = None,
    openai: bool = False,
) -> None:
    error = openai_error_body(status, message, code) if openai else {"code": code, "message": message}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the unread rest of the body would otherwise be parsed as the next request
        headers.append((b"connection", b"close"))
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
