"""One error shape for every failure: `{"error": {"code", "message", "params"?, "details"?}}`.

LunaError subclasses carry their own status and code; FastAPI's validation errors become 422 with the
offending fields listed; Starlette's 404/405 keep their status. The catch-all logs the traceback and
answers a generic 500 without it — the last resort, which the tests show is never reached.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import JSON_FAULTS, LISTED_PROBLEMS, LunaError, UsageError, json_fault, said, some
from .security import openai_error_body, under_prefix

log = logging.getLogger("lunatrain.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, code: str, message: str, details: object | None = None, headers=None, params: dict | None = None
) -> JSONResponse:
    body: dict = {"code": code, "message": message}
    if params:
        body["params"] = params
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def _luna(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LunaError)
    params = _jsonable(exc.params) if exc.params else None
    return error_response(
        exc.http_status,
        exc.code,
        exc.message,
        _jsonable(exc.details),
        params=params if isinstance(params, dict) else None,
    )


def not_json(request: Request) -> str | None:
    """The sentence for a request whose body is not declared JSON, else None. FastAPI reads such a body as
    bytes and refuses it as "not a valid dictionary", which hides the cause: `curl -d` sends form encoding
    unless told `-H 'Content-Type: application/json'`."""
    headers = request.headers
    if headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
        return None  # no body: the route's own errors say what is missing
    declared = headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    return (
        "Send the body as JSON with Content-Type: application/json "
        f"(the request's Content-Type: {repr(declared) if declared else 'none'})."
    )


async def no_body(request: Request) -> None:
    """A dependency for a route that takes no body: one with content is refused, not ignored, since a client
    that thinks it sends options (`{"status": "rejected"}` to approve) would get a success it did not mean.
    Nothing, an empty object and `null` are no content (the dashboard sends `{}` with every POST)."""
    if request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers:
        return
    body = (await request.body()).strip()
    if not body:
        return
    try:
        empty = json.loads(body) in ({}, None)
    except JSON_FAULTS:
        empty = False
    if not empty:
        raise UsageError("This request takes no body; send none (what it acts on is in its path).")


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if (problem := not_json(request)) is not None:
        return error_response(415, "unsupported_media_type", problem)
    # Only loc/msg/type, as the message says them: the raw input may be bytes or huge, and echoing it back
    # helps nobody; pydantic's steps inside a field (`list[constrained-str]`) are no field of the request.
    errors = said(exc.errors())
    details = [
        {"loc": path.split(".") if path else [], "msg": words, "type": kind}
        for path, words, kind in errors[:LISTED_PROBLEMS]
    ]
    # The field without its place (body, path, query), as the request spells it; a body that is no JSON at all
    # has no field.
    parts = [(path.split(".", 1)[1] if "." in path else "", words) for path, words, _ in errors]
    summary = some([f"{field}: {words}" if field else words for field, words in parts])
    return error_response(422, "invalid_request", f"Invalid request: {summary}.", details)


def undecodable_body(exc: StarletteHTTPException) -> RequestValidationError | None:
    """The validation error for a JSON body FastAPI could not even decode, else None. FastAPI says malformed
    JSON as `json_invalid` with the parser's reason, but a body that is not UTF-8 or is nested deeper than the
    parser recurses only as a bare 400 "There was an error parsing the body" (the cause chained, unsaid): the
    same fault as malformed JSON, so it is said the same way, with its reason."""
    cause = exc.__cause__
    if exc.status_code != 400 or not isinstance(cause, JSON_FAULTS):
        return None
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "ctx": {"error": json_fault(cause)}}]
    )


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if (invalid := undecodable_body(exc)) is not None:
        return await _validation(request, invalid)
    response = _http_error(request, exc)
    if _under_openai_prefix(request):
        # No route matched under the OpenAI-compatible prefix: answer in OpenAI's error shape, as its routes do.
        import json

        err = json.loads(response.body)["error"]
        body = openai_error_body(response.status_code, err["message"], err["code"])
        headers = {k: v for k, v in response.headers.items() if k.lower() == "allow"}
        return JSONResponse({"error": body}, status_code=response.status_code, headers=headers or None)
    return response


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else "Request failed."
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 404 and message == "Not Found":
        message = "No such endpoint."
        # The guide's §5 names `POST /training/lora/start` without the prefix its §9 and the routes have.
        if request.method in _methods(request, "/assistant" + request.url.path):
            message = f"No such endpoint; the training API is under /assistant: {request.method} /assistant{request.url.path}."
    if exc.status_code == 405:
        # Starlette names only the first route on the path; list every method the path accepts.
        # No route of ours matches a path inside a static mount (the dashboard's files, the docs' files): those
        # answer GET and HEAD.
        allowed = _methods(request) or ["GET", "HEAD"]
        headers["Allow"] = ", ".join(allowed)
        choices = " or ".join(allowed) if len(allowed) < 3 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        message = f"Method {request.method} not allowed here; use {choices}."
    return error_response(exc.status_code, code, message, headers=headers or None)


def _methods(request: Request, path: str | None = None) -> list[str]:
    # Ask the router itself which methods fully match this path (or `path`; routes may sit in included routers).
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = dict(request.scope, method=method, **({"path": path} if path is not None else {}))
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    if "GET" in allowed and "HEAD" not in allowed:  # HeadAsGet answers HEAD wherever GET is answered
        allowed.insert(allowed.index("GET") + 1, "HEAD")
    return allowed


def storage_fault(exc: Exception) -> LunaError | None:
    """The storage's problem an exception of the operating system stands for (503): a file of the data root this
    server's user may not read, or one this process cannot open for want of file descriptors; else None."""
    from ..fsio import OUT_OF_FILES, no_access, out_of_files

    if isinstance(exc, PermissionError):
        return no_access(exc)
    if isinstance(exc, OSError) and exc.errno in OUT_OF_FILES:
        return out_of_files(exc.filename or "a file")
    return None


async def _os_error(request: Request, exc: Exception) -> JSONResponse:
    fault = storage_fault(exc)
    return await (_luna(request, fault) if fault is not None else _unexpected(request, exc))


INTERNAL = "Internal error; the server log has the details."


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal", INTERNAL)


def service_app(title: str, version: str, lifespan: Any, *, openai_prefix: str | None = None) -> FastAPI:
    """A FastAPI app as both services make it: the handlers below, /docs from the package's own files
    (web/docs.py), and no redirect_slashes: a trailing slash names no route (a 404), so that an id of `/`
    (`/lora/jobs/%2F`) is no redirect to the list."""
    from . import docs

    app = FastAPI(
        title=title, version=version, lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False
    )
    install(app, openai_prefix=openai_prefix)
    docs.install(app)
    return app


def install(app: FastAPI, *, openai_prefix: str | None = None) -> None:
    """The handlers; under `openai_prefix` (the chat routes' `/v1`) a path or method no route takes is
    answered in OpenAI's error shape. HEAD is answered as GET without the body."""
    app.state.openai_prefix = openai_prefix
    app.router.dependencies.append(Depends(known_query))  # every route added after this one
    app.add_middleware(HeadAsGet)
    app.add_middleware(ClientFraming)  # outside the others, inside the server's error handler
    app.add_exception_handler(LunaError, _luna)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(OSError, _os_error)  # PermissionError too
    app.add_exception_handler(Exception, _unexpected)


async def known_query(request: Request) -> None:
    """A query parameter the route does not take is refused (422), as an unknown key of a body is: FastAPI
    ignores it, so a typo (`?stauts=pending`) listed everything, where the command line refuses the same typo.
    Only the documented routes: the dashboard's page reads its own (`?lang=`), and the OpenAI-compatible ones
    keep OpenAI's conventions."""
    route = request.scope.get("route")
    if not request.query_params or not isinstance(route, APIRoute) or not route.include_in_schema:
        return
    if _under_openai_prefix(request):
        return
    takes = sorted(_query_names(route.dependant), key=str.lower)
    unknown = sorted(set(request.query_params.keys()) - set(takes))
    if unknown:
        msg = f"unknown query parameter (this route takes {', '.join(takes) or 'none'})"
        raise RequestValidationError(
            [{"type": "query_unknown", "loc": ("query", name), "msg": msg} for name in unknown]
        )


def _under_openai_prefix(request: Request) -> bool:
    """The request's path is one of the OpenAI-compatible routes' (`install`'s `openai_prefix`)."""
    return under_prefix(request.url.path, getattr(request.app.state, "openai_prefix", None))


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes: its own and its dependencies'."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _jsonable(details: object) -> object:
    if details is None or isinstance(details, (str, int, float, bool)):
        return details
    from fastapi.encoders import jsonable_encoder

    try:
        return jsonable_encoder(details)
    except Exception:  # details are a courtesy; never let them turn a 4xx into a 500
        return str(details)


class ClientFraming:
    """A request whose HTTP framing the client broke (an invalid chunk size, a body cut off): the server has
    answered 400 itself and closed the connection, and what the app then sends, or reads, fails (h11's
    LocalProtocolError, Starlette's ClientDisconnect). That is the client's fault, said in one warning line,
    not an "unexpected error" with a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            await send(message)
            started = started or message["type"] == "http.response.start"

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if scope["type"] != "http" or not _broken_by_client(exc, started):
                raise
            log.warning("the client broke off %s %s (%s)", scope["method"], scope["path"], type(exc).__name__)


def _broken_by_client(exc: BaseException, started: bool) -> bool:
    """Starlette's ClientDisconnect; h11's LocalProtocolError only where our answer could not even start (the
    server had answered and closed): once it started, the protocol error is our response's own (a body longer
    than its Content-Length), a server error like any other."""
    from starlette.requests import ClientDisconnect

    if isinstance(exc, ClientDisconnect):
        return True
    try:
        from h11 import LocalProtocolError
    except ImportError:  # another HTTP implementation under the server: only Starlette's own disconnect
        return False
    return isinstance(exc, LocalProtocolError) and not started


class HeadAsGet:
    """HEAD on a GET route: FastAPI's routes take only the methods they declare, so HEAD was a 405 everywhere,
    though HTTP asks a server that answers GET to answer HEAD. The route runs as GET; its status and headers
    go out, its body does not (the server would drop it too; this keeps in-process clients right)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)
