"""HTTP as RFC 9110/9112 and docs/api.md say it, where a framework default said otherwise: request bodies
are JSON in UTF-8 and never content-coded, files are revalidated and served whole, a URL names a route or is
a 404 (no redirect that drops an id), and an absolute-form request target is taken. The requests go through
the whole app (its guard middleware included), raw over a socket where a client library would normalize them.
Run: `pytest tests/test_http_conformance.py -q`."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api_security import Server

from lunatrain import store
from lunatrain.api.main import create_app
from lunatrain.settings import Settings

T = "/assistant/training"
EXAMPLE = {"prompt": "Wie heißt du?", "response": "Luna."}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        yield c
    store.dispose_stores()


def _examples(client: TestClient) -> int:
    return client.get(f"{T}/examples").json()["count"]


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate, gzip"])
def test_a_content_coded_body_is_415_naming_the_coding_and_changes_nothing(client: TestClient, coding: str) -> None:
    """Explore repro: a gzip body was read as if plain ("not valid JSON (not UTF-8 text)", pointing at the text
    encoding), and one labelled `br` whose bytes were plain JSON was stored."""
    body = json.dumps(EXAMPLE).encode()
    for sent in (gzip.compress(body), body):
        r = client.post(
            f"{T}/examples",
            content=sent,
            headers={"Content-Type": "application/json", "Content-Encoding": coding},
        )
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type" and f"Content-Encoding {coding!r}" in error["message"], error
        assert "uncompressed" in error["message"], error
    assert _examples(client) == 0
    plain = client.post(
        f"{T}/examples", content=body, headers={"Content-Type": "application/json", "Content-Encoding": "identity"}
    )
    assert plain.status_code == 201, plain.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_json_body_that_is_not_utf8_is_refused_like_latin1(client: TestClient, encoding: str) -> None:
    """Explore repro: a UTF-16 or UTF-32 body was detected by the JSON parser and stored, while the API's own
    refusal of a Latin-1 body says bodies are UTF-8 (RFC 8259: JSON between systems is UTF-8)."""
    latin = client.post(
        f"{T}/examples",
        content=json.dumps(EXAMPLE, ensure_ascii=False).encode("latin-1"),
        headers={"Content-Type": "application/json"},
    )
    r = client.post(
        f"{T}/examples", content=json.dumps(EXAMPLE).encode(encoding), headers={"Content-Type": "application/json"}
    )
    assert latin.status_code == r.status_code == 422, r.text
    assert r.json()["error"]["message"] == latin.json()["error"]["message"]
    assert "not UTF-8" in r.json()["error"]["message"], r.text
    assert _examples(client) == 0
    bom = client.post(
        f"{T}/examples",
        content=b"\xef\xbb\xbf" + json.dumps(EXAMPLE).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert bom.status_code == 201, bom.text  # UTF-8 with its byte-order mark is UTF-8


@pytest.mark.parametrize("path", ["/static/app.js", "/", "/docs-assets/swagger-ui.css"])
def test_files_are_revalidated_and_served_whole(client: TestClient, path: str) -> None:
    """Explore repro: the dashboard's files said `Cache-Control: no-cache` with an ETag, but a matching
    If-None-Match or If-Modified-Since got the whole file again (every page load fetched everything); and a
    Range header of a unit the server does not know, or a malformed one, was a plain-text 400 outside the
    JSON error shape, where HTTP says to ignore it. These files are small: they are always served whole."""
    first = client.get(path)
    assert first.status_code == 200 and first.content
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    for asked in ({"If-None-Match": etag}, {"If-None-Match": f'W/{etag}, "other"'}, {"If-Modified-Since": modified}):
        again = client.get(path, headers=asked)
        assert again.status_code == 304 and again.content == b"", (asked, again.status_code)
        assert again.headers["etag"] == etag
    assert client.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
    assert client.get(path, headers={"If-None-Match": '"other"', "If-Modified-Since": modified}).status_code == 200
    for ranged in ("items=0-1", "bytes=10-5", "bytes=abc", "bytes=99999999-", "bytes=0-9"):
        r = client.get(path, headers={"Range": ranged})
        assert r.status_code == 200 and r.content == first.content, (ranged, r.status_code, r.text[:200])
        assert "accept-ranges" not in r.headers and "content-range" not in r.headers


def test_a_version_report_and_loss_curve_are_revalidated_and_served_whole(trained_home: Path, settings) -> None:
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for kind in ("report", "loss-curve.png"):
            path = f"{T}/adapters/luna-adapter/versions/v1/{kind}"
            first = client.get(path)
            assert first.status_code == 200, first.text
            assert client.get(path, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
            r = client.get(path, headers={"Range": "items=0-1"})
            assert r.status_code == 200 and r.content == first.content
    store.dispose_stores()


@pytest.mark.parametrize(
    "path",
    [
        "/static/app.js/",
        "/static/",
        "/static//app.js",
        f"{T}/status/",
        f"{T}/lora/jobs/%2F",
        f"{T}/adapters/%2F",
        f"{T}/examples/",
    ],
)
def test_a_url_that_names_no_route_is_a_404_never_a_redirect(client: TestClient, path: str) -> None:
    """Explore repro: a trailing slash was an empty 307 to the path without it (docs/api.md: 404 for paths
    that match no route), so an id of `/` (`/lora/jobs/%2F`) ended on the job list, a 200 where the client
    asked for one job; `/static/app.js/` served app.js (whose relative imports then broke), and `/static/` was
    a 422."""
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.status_code, r.text)


def test_an_absolute_form_request_target_is_taken_with_its_authority_as_the_host(home: Path) -> None:
    """Explore repro: `GET http://127.0.0.1:PORT/… HTTP/1.1` (RFC 9112 §3.2.2: a server must accept the
    absolute form) was a 404. The target's authority is the request's host, checked like a Host header."""
    with Server() as server:
        for host in (f"127.0.0.1:{server.port}", "localhost"):
            status, _, body = server.request("GET", f"http://{host}{T}/examples?limit=1", host="ignored.example")
            assert status == 200 and body["count"] == 0, (status, body)
        status, _, body = server.request("GET", f"http://evil.example{T}/examples", host="127.0.0.1")
        assert status == 400 and body["error"]["code"] == "bad_host", body
        status, _, body = server.request("GET", f"http://127.0.0.1:{server.port}/nowhere")
        assert status == 404 and body["error"]["code"] == "not_found", body


class _Transport:
    """What uvicorn's protocol writes to and closes: a socket stand-in that records both."""

    def __init__(self) -> None:
        self.closed, self.sent = False, b""

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 5050), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, *args, **kwargs) -> None: ...


@pytest.mark.parametrize(
    "sent", [b"", b"GET /assistant/training/status HTTP/1.1\r\nHost: 127", b"POST /x HTTP/1.1\r\n"]
)
def test_a_connection_whose_request_head_never_completes_is_closed(sent: bytes, monkeypatch) -> None:
    """A client that connects and sends nothing, or a request head a byte at a time (slowloris), held its
    connection for good: uvicorn arms no timer before the first request's head. The services close a
    connection whose head is not complete within their head timeout; a complete head is not cut."""
    import asyncio

    import uvicorn

    from lunatrain import compat

    monkeypatch.setattr(compat, "HEAD_TIMEOUT", 0.05)

    async def app(scope, receive, send):  # answers every request at once
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run(data: bytes) -> _Transport:
        config = uvicorn.Config(app, http=compat.head_timed_http(), lifespan="off", log_level="critical")
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=uvicorn.server.ServerState(), app_state={})
        transport = _Transport()
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)
        await asyncio.sleep(0.5)
        return transport

    assert asyncio.run(run(sent)).closed
    whole = asyncio.run(run(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert whole.sent.startswith(b"HTTP/1.1 204"), whole.sent  # answered, and then kept for the next request


def test_the_head_timer_spares_a_long_answer_and_cuts_a_body_sent_a_byte_at_a_time_after_it(monkeypatch) -> None:
    """Review repros: an answer that did not wait for the body (a 401, a 404), followed by that body a byte at a
    time, held the connection for good (the timer was armed only once the client had sent everything, and
    uvicorn's own is cancelled by every byte); and a route that works longer than the timer must not be cut."""
    import asyncio

    import uvicorn

    from lunatrain import compat

    monkeypatch.setattr(compat, "HEAD_TIMEOUT", 0.2)

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(0.5)  # longer than the head timer: the request's own time
        status = 401 if scope["method"] == "POST" else 200  # a POST is refused without its body being read
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run(head: bytes, trickle: int) -> _Transport:
        config = uvicorn.Config(app, http=compat.head_timed_http(), lifespan="off", log_level="critical")
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=uvicorn.server.ServerState(), app_state={})
        transport = _Transport()
        protocol.connection_made(transport)
        protocol.data_received(head)
        for _ in range(trickle):  # a byte every 0.1 s: each one under the timer, together far over it
            await asyncio.sleep(0.1)
            if transport.closed:
                break
            protocol.data_received(b"x")
        await asyncio.sleep(0.05 if trickle else 0.8)
        return transport

    slow = asyncio.run(run(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 0))
    assert slow.sent.startswith(b"HTTP/1.1 200") and slow.sent.endswith(b"ok"), slow.sent
    refused = asyncio.run(run(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n", 20))
    assert refused.sent.startswith(b"HTTP/1.1 401") and refused.closed


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_route_never_runs(monkeypatch) -> None:
    """The head complete, a body sent slowly or never (Content-Length: 100, then nothing) held the request, its
    worker and its connection for good. A body not complete within the body timeout is a 408 and closes the
    connection; the route never sees a part of it."""
    import asyncio

    from lunatrain.web import security

    monkeypatch.setattr(security, "BODY_TIMEOUT", 0.05)
    reached = []

    async def app(scope, receive, send):  # reads the body whole, as a route does
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        reached.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = security.GuardMiddleware(app, hosts={"127.0.0.1"}, token=None, max_body_bytes=1000, realm="t")
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/assistant/training/examples",
        "raw_path": b"/assistant/training/examples",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"100"), (b"content-type", b"application/json")],
    }

    async def run(messages: list) -> list:
        sent = []

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)  # a client that sends no more

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        return sent

    sent = asyncio.run(run([{"type": "http.request", "body": b'{"a":', "more_body": True}]))
    assert sent[0]["status"] == 408 and not reached, sent
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"
    sent = asyncio.run(run([{"type": "http.request", "body": b'{"a": 1}', "more_body": False}]))
    assert sent[0]["status"] == 200 and reached, sent  # in time: the route runs

    # Review repros: the deadline was one for the whole body (a steady slow upload was cut) and ran for requests
    # without a body too (a file answer reads the connection after a route that worked longer than it).
    async def trickled() -> list:
        parts = [{"type": "http.request", "body": b" ", "more_body": True} for _ in range(5)]
        parts.append({"type": "http.request", "body": b'{"a": 1}', "more_body": False})
        sent = []

        async def receive():
            await asyncio.sleep(0.1)  # each part well within the timeout, all of them (0.6 s) over it
            return parts.pop(0)

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        return sent

    # Margins wide enough for a busy machine: a part may take 0.5 s, the whole 100 bytes 0.5 s + 2 s.
    monkeypatch.setattr(security, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(security, "BODY_MIN_RATE", 50)
    assert asyncio.run(trickled())[0]["status"] == 200
    # third review repro: with a timeout per part alone, a byte every 20 s was never cut: the whole body keeps a
    # least rate too

    async def a_byte_at_a_time() -> list:
        sent = []

        async def receive():
            await asyncio.sleep(0.1)  # each byte well within the timeout, never ending: cut at 2.5 s in all
            return {"type": "http.request", "body": b" ", "more_body": True}

        async def send(message):
            sent.append(message)

        await guard(scope, receive, send)
        return sent

    assert asyncio.run(a_byte_at_a_time())[0]["status"] == 408
    bodyless = dict(scope, method="GET", headers=[(b"host", b"127.0.0.1")])

    async def later_disconnect() -> list:
        sent, calls = [], []

        async def receive():
            calls.append(1)
            if len(calls) == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(0.2)  # the client stays: a file answer waits on this past the timeout
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        async def reads_twice(scope, receive, send):
            await receive()
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        await security.GuardMiddleware(reads_twice, hosts={"127.0.0.1"}, token=None, max_body_bytes=1000, realm="t")(
            bodyless, receive, send
        )
        return sent

    assert asyncio.run(later_disconnect())[0]["status"] == 200
