"""What may answer at the trainer's address instead of this data root's trainer, played by an httpx transport
(no server, no subprocess): another project's trainer, a web page's 404, JSON of another shape, a
service that wants a token of its own.

`PEERS[name]` is (handler, words the client's sentence names it by); `playing(handler)` is the httpx client
to put in place of the trainer client's shared one (`lunatrain.service.client._shared`).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

OTHER_ROOT = "/srv/other-project"


def other_root_trainer(request: httpx.Request) -> httpx.Response:
    """Another project's trainer: healthy, naming its own data root; refuses job requests for ours (409)."""
    root = {"id": "f" * 16, "path": OTHER_ROOT}
    if request.url.path == "/health":
        return httpx.Response(200, json={"status": "ok", "version": "1", "dataRoot": root})
    message = f"This trainer serves {OTHER_ROOT}, not the data root the request was made for."
    return httpx.Response(409, json={"error": {"code": "conflict", "message": message, "details": {"dataRoot": root}}})


def html_service(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404, text="<html><body><h1>Not Found</h1></body></html>")


def json_service(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"hello": "world"})


def token_service(request: httpx.Request) -> httpx.Response:
    """A service of some other kind that wants a bearer token for everything (a 401 carrying no realm of ours)."""
    body = {"error": {"message": "Missing or wrong bearer token."}}
    return httpx.Response(401, json=body, headers={"WWW-Authenticate": 'Bearer realm="grafana"'})


PEERS: dict[str, tuple[Callable[[httpx.Request], httpx.Response], str]] = {
    "other-root-trainer": (other_root_trainer, OTHER_ROOT),
    "html-service": (html_service, "not a lunatrain trainer"),
    "json-service": (json_service, "not a lunatrain trainer"),
    "token-service": (token_service, "not a lunatrain trainer"),
}


def playing(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))
