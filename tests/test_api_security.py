"""Security rules of the assistant API (SPEC R9), each against a real uvicorn server speaking raw HTTP, so
nothing in a client library normalizes the request first (paths, Host, chunked bodies).

Run: `.venv/bin/python -m pytest tests/test_api_security.py -q`
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from lunatrain import store
from lunatrain.api.main import create_app
from lunatrain.errors import UsageError
from lunatrain.settings import load_settings
from lunatrain.web.security import check_bind, host_name

TOKEN = "s3cret-token-for-tests"
LIMIT = 2048


class Server:
    def __init__(self, **overrides: object) -> None:
        settings = load_settings(max_body_bytes=LIMIT, lora_ensure_on_demand=False, **overrides)
        settings = settings.model_copy(update={"lora_trainer_url": "http://127.0.0.1:9"})  # nothing listens there
        self.settings = settings
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:  # startup is local and quick; the thread dies loudly on failure
            if not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        store.dispose_stores()

    def raw(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send bytes as they are; return (status, headers, body) of the response."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(request)
            data = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
                if _complete(data):
                    break
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    def request(
        self, method: str, path: str, *, host: str | None = "127.0.0.1", headers: dict | None = None, body: bytes = b""
    ) -> tuple[int, dict, dict]:
        lines = [f"{method} {path} HTTP/1.1"]
        if host is not None:
            lines.append(f"Host: {host}")
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
            lines.append("Content-Type: application/json")
        lines.append("Connection: close")
        status, hdrs, raw = self.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return status, hdrs, json.loads(raw) if raw else {}


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


@pytest.fixture
def server(home: Path) -> Iterator[Server]:
    with Server() as srv:
        yield srv


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the many parametrized refusals below, which change nothing: a server start with its
    database migrations costs more than the request."""
    home = tmp_path_factory.mktemp("security") / "home"
    home.mkdir()
    with Server(home=home) as srv:
        yield srv


@pytest.fixture
def token_server(home: Path) -> Iterator[Server]:
    with Server(api_token=TOKEN) as srv:
        yield srv


def _example_count(settings) -> int:
    return store.counts(settings)["totals"]["examples"]


# --- bind and token -----------------------------------------------------------------------------


def test_non_loopback_bind_needs_a_token() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com"):
        with pytest.raises(UsageError):
            check_bind(host, None)
        check_bind(host, TOKEN)


def test_a_token_set_with_spaces_around_it_is_the_token_without_them(tmp_path: Path) -> None:
    """Repro: ASSISTANT_API_TOKEN="secret " refused every request (HTTP drops the spaces around a header's
    value, so the configured token could never be presented), and a token of spaces alone let the API listen
    on all interfaces, where it then refused everyone."""
    app = create_app(load_settings(home=tmp_path, api_token=f" {TOKEN} "))
    client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: the guard answers first
    assert client.get("/assistant/training/adapters", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/assistant/training/adapters").status_code == 401
    blank = load_settings(home=tmp_path, api_token="   ")
    assert blank.api_token is None
    with pytest.raises(UsageError, match="ASSISTANT_API_TOKEN"):
        check_bind("0.0.0.0", blank.api_token)


@pytest.mark.slow
def test_serve_on_all_interfaces_without_token_exits_2_with_one_sentence(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ASSISTANT_API_TOKEN"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lunatrain"), "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=home,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ASSISTANT_API_TOKEN" in lines[0] and lines[0].count(". ") == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("sent", "token"),
    [(TOKEN, TOKEN), ("pass+word%2f1%2Bx", "pass word/1+x"), ("Ab\\Secret42", "Ab\\Secret42")],
    ids=["plain", "encoded", "backslash"],
)
def test_a_token_sent_in_a_query_string_is_never_written_to_the_servers_log(tmp_path: Path, sent: str, token: str):
    """Gate-bounds repro: a client that put the token in the URL (`?api_key=…`) instead of the header was
    refused (401), but uvicorn's access line wrote the URL, token and all, to the server's log."""
    import io
    import logging

    from lunatrain.cli.serve import log_handler

    handler = log_handler(load_settings(home=tmp_path, api_token=token))
    handler.setStream(out := io.StringIO())
    access = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access line, as its logger sends it
    for path in (f"/assistant/training/eval-gate?api_key={sent}", f"/x?token={sent}&b=1"):
        args = ("127.0.0.1:5", "POST", path, "1.1", 401)
        handler.handle(logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, access, args, None))
    handler.handle(logging.LogRecord("lunatrain.api", logging.WARNING, __file__, 1, "kept %s", ("as is",), None))
    handler.handle(logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "said %s", (token,), None))
    # review repro: at --log-level trace uvicorn prints the request's scope, its query string as sent
    as_sent = re.sub(r"%[0-9A-Fa-f]{2}", lambda m: m[0].swapcase(), sent)  # its hex digits in the other case
    scope = {"query_string": b"api_key=" + as_sent.encode()}
    handler.handle(logging.LogRecord("uvicorn.asgi", 5, __file__, 1, "ASGI [1] Started scope=%s", (scope,), None))
    said = out.getvalue()
    assert sent not in said and token not in said, said
    assert said.count("***") == 4 and 'api_key=*** HTTP/1.1" 401' in said and "kept as is" in said, said


def test_token_is_required_on_every_data_request(token_server: Server) -> None:
    path = "/assistant/training/examples"
    assert token_server.request("GET", path)[0] == 401
    status, headers, body = token_server.request("GET", path, headers={"Authorization": "Bearer wrong"})
    assert (
        status == 401
        and body["error"]["code"] == "unauthorized"
        and headers["www-authenticate"] == 'Bearer realm="lunatrain-api"'
    )
    assert token_server.request("GET", path, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert token_server.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}x"})[0] == 401
    status, _, body = token_server.request(
        "POST",
        path,
        headers={"Authorization": "Bearer nope"},
        body=json.dumps({"prompt": "p", "response": "r"}).encode(),
    )
    assert status == 401 and _example_count(token_server.settings) == 0  # refused requests change nothing
    assert token_server.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    # The schema holds no data: readable without the token so /docs loads in a browser, with its files.
    assert token_server.request("GET", "/openapi.json")[0] == 200


@pytest.mark.parametrize("factory", ["api", "trainer"])
def test_the_schema_page_loads_every_file_from_the_service_itself(tmp_path: Path, factory: str) -> None:
    """Repro: /docs and /redoc loaded Swagger UI and ReDoc (and a favicon, and fonts) from CDNs: blank without
    internet, and third-party script on a service that only its own pages should talk to. Every file /docs
    names is on the service itself, and each one is served, without the token as the schema is. There is no
    /redoc: ReDoc's bundle fetches its logo from its CDN whatever it is told."""
    page = "/docs"
    settings = load_settings(home=tmp_path, api_token=TOKEN)
    if factory == "api":
        app = create_app(settings)
    else:
        from lunatrain.service.app import create_app as create_trainer

        app = create_trainer(settings)
    client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: the pages need no store, no worker
    res = client.get(page)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html"), res.text
    html = res.text
    assert "//" not in html.replace("http://127.0.0.1", ""), html  # no URL of another host, not even //cdn
    files = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html) + re.findall(r"url: ?'([^']+)'", html)
    files += re.findall(r'spec-url="([^"]+)"', html)
    assert len(files) >= 2, html
    for url in files:
        got = client.get(url)
        assert got.status_code == 200 and len(got.content) > 100, (url, got.status_code)
    assert client.get("/redoc", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


# --- Host and Origin ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host,ok",
    [
        ("127.0.0.1", True),
        ("127.0.0.1:5050", True),
        ("localhost:1234", True),
        ("[::1]:5050", True),
        ("LOCALHOST", True),
        ("evil.example", False),
        ("evil.example:5050", False),
        ("127.0.0.1.nip.io", False),
        ("localhost@evil.example", False),
        ("", False),
        ("127.0.0.1:80:80", False),
    ],
)
def test_host_header_allowlist(server: Server, host: str, ok: bool) -> None:
    status, _, body = server.request("GET", "/assistant/training/examples", host=host)
    assert (status == 200) if ok else (status == 400 and body["error"]["code"] == "bad_host")


def test_missing_host_header_is_refused(server: Server) -> None:
    status, _, raw = server.raw(b"GET /assistant/training/examples HTTP/1.0\r\n\r\n")
    assert status == 400 and json.loads(raw)["error"]["code"] == "bad_host"


def test_host_name_parsing() -> None:
    assert host_name("[::1]:8080") == "::1" and host_name("Example.COM") == "example.com"
    assert host_name("a:b:c") is None and host_name("x/y") is None and host_name("[::1]x") is None


def test_cross_origin_requests_are_refused_and_no_cors_headers(server: Server) -> None:
    body = json.dumps({"prompt": "p", "response": "r"}).encode()
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example:5050"):
        status, headers, resp = server.request(
            "POST", "/assistant/training/examples", headers={"Origin": origin}, body=body
        )
        assert status == 403 and resp["error"]["code"] == "forbidden_origin"
        assert not any(k.startswith("access-control-") for k in headers)
    assert _example_count(server.settings) == 0
    status, headers, _ = server.request(
        "OPTIONS",
        "/assistant/training/examples",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert status >= 400 and not any(k.startswith("access-control-") for k in headers)
    # The dashboard itself (same origin) may post.
    status, headers, _ = server.request(
        "POST", "/assistant/training/examples", headers={"Origin": f"http://127.0.0.1:{server.port}"}, body=body
    )
    assert status == 201 and "access-control-allow-origin" not in headers


def test_no_page_of_another_site_may_frame_the_dashboard_or_the_api(server: Server) -> None:
    """Explore repro: no answer said it may not be framed, so a page of any site could hold the dashboard in an
    invisible frame and take the user's clicks on its buttons (its own requests are same-origin, so the Origin
    rule passes them): export, start training, delete, activate."""
    for path in ("/", "/assistant/training/status", "/no/such/page"):
        status, headers, _ = server.raw(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        assert headers.get("x-frame-options") == "DENY", (path, status, headers)
        assert headers.get("content-security-policy") == "frame-ancestors 'none'", (path, headers)
        assert headers.get("x-content-type-options") == "nosniff", (path, headers)
    status, headers, _ = server.request("GET", "/assistant/training/status", host="evil.example")
    assert status == 400 and headers.get("x-frame-options") == "DENY"  # the guard's own answers too


def test_a_request_a_browser_says_another_site_sent_is_refused(server: Server) -> None:
    """Explore repro: `<img src="http://127.0.0.1:5050/assistant/training/lora/provider-health?ensureTrainer=true">`
    on any web page started a trainer: an image's GET carries no Origin. Browsers say who sent a request
    (Sec-Fetch-Site); one from another site, or from another port of this host (a dev server, a notebook:
    "same-site"), is refused before it reaches a route. The dashboard's own ("same-origin") and a typed
    address ("none") pass, and so does the dashboard page itself opened from a link."""
    path = "/assistant/training/lora/provider-health?ensureTrainer=true"
    for site in ("cross-site", "same-site"):
        status, _, body = server.request("GET", path, headers={"Sec-Fetch-Site": site})
        assert status == 403 and body["error"]["code"] == "forbidden_origin", (site, status, body)
    assert not server.settings.trainer_url_file.exists()  # no trainer was started
    for site in ("same-origin", "none"):
        status, _, _ = server.request("GET", "/assistant/training/examples", headers={"Sec-Fetch-Site": site})
        assert status == 200, site
    page = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: cross-site\r\nConnection: close\r\n\r\n"
    assert server.raw(page)[0] == 200


@pytest.mark.parametrize("token", ["tök-geheim", "tab\there", "bell\x07"])
def test_a_token_no_client_can_send_is_refused_when_set(tmp_path: Path, token: str) -> None:
    """Explore repro: a token with "ö" could never be presented (curl sends UTF-8, the guard compared the
    header read as Latin-1; httpx cannot send it at all), and the trainer's client then said its address was
    "held by a service that is not a lunatrain trainer". A bearer token is printable ASCII without spaces."""
    with pytest.raises(UsageError) as refused:
        load_settings(home=tmp_path, api_token=token)
    assert "ASSISTANT_API_TOKEN" in refused.value.message and "printable ASCII" in refused.value.message, refused.value
    from typer.testing import CliRunner

    from lunatrain.cli import app

    result = CliRunner().invoke(app, ["status"], env={"ASSISTANT_HOME": str(tmp_path), "ASSISTANT_API_TOKEN": token})
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "printable ASCII" in result.output


def test_a_passphrase_with_inner_spaces_is_a_token_a_client_can_send(tmp_path: Path) -> None:
    """Review repro: "correct horse battery staple" worked as a token (a client sends its spaces as they are)
    and was then refused by every command."""
    phrase = "correct horse battery staple"
    app = create_app(load_settings(home=tmp_path, api_token=phrase))
    client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: the guard answers first
    assert client.get("/assistant/training/adapters", headers={"Authorization": f"Bearer {phrase}"}).status_code == 200
    assert client.get("/assistant/training/adapters", headers={"Authorization": "Bearer correct"}).status_code == 401


# --- body cap -----------------------------------------------------------------------------------


def test_oversized_body_with_content_length_is_refused_unread(server: Server) -> None:
    body = json.dumps({"prompt": "p", "response": "x" * (LIMIT * 2)}).encode()
    status, headers, resp = server.request("POST", "/assistant/training/examples", body=body)
    assert status == 413 and resp["error"]["code"] == "payload_too_large" and headers.get("connection") == "close"
    assert _example_count(server.settings) == 0


def test_oversized_chunked_body_is_cut_off_while_streaming(server: Server) -> None:
    payload = json.dumps({"prompt": "p", "response": "y" * (LIMIT * 3)}).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + 500]), payload[i : i + 500]) for i in range(0, len(payload), 500)
    )
    head = (
        b"POST /assistant/training/examples HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    status, _, raw = server.raw(head + chunks + b"0\r\n\r\n")
    assert status == 413 and json.loads(raw)["error"]["code"] == "payload_too_large"
    assert _example_count(server.settings) == 0
    # A chunked body under the cap is accepted: the cap counts bytes, it does not refuse chunking.
    small = json.dumps({"prompt": "p", "response": "fine"}).encode()
    status, _, _ = server.raw(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small))
    assert status == 201 and _example_count(server.settings) == 1


def test_malformed_content_length_is_a_400(server: Server) -> None:
    status, _, raw = server.raw(
        b"POST /assistant/training/examples HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\nConnection: close\r\n\r\n"
    )
    assert status == 400


@pytest.mark.parametrize("path", ["/assistant/training/status", "/no/such/endpoint"])
def test_a_broken_chunked_body_is_the_clients_fault_not_an_unexpected_error(
    server: Server, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """Repro: a chunked body with an invalid chunk size, sent to a route that does not read the body, got
    uvicorn's 400, and then the server logged "ERROR lunatrain.api: unexpected error" and "Exception in ASGI
    application", each with an h11 traceback: the app's own answer could no longer be sent on the broken
    connection. A client's broken framing is logged as one warning line, without a traceback."""
    import logging

    with caplog.at_level(logging.INFO):
        status, _, _ = server.raw(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".encode()
        )
        # The app's half runs after the server answered: wait for what it says (or would have said).
        deadline = time.monotonic() + 30
        while not any("broke off" in r.getMessage() or r.levelno >= logging.ERROR for r in caplog.records):
            assert time.monotonic() < deadline, "the server said nothing about the request"
            time.sleep(0.05)  # a poll with a deadline, not a wait for a set time: a busy machine takes longer
    assert status == 400
    # Neither ours nor the server's: no traceback, no "unexpected error" (uvicorn still notes in one line that
    # the app's answer was not completed, which it cannot be on the closed connection).
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert not any("unexpected error" in r.getMessage() for r in caplog.records)
    [said] = [r for r in caplog.records if r.name == "lunatrain.api" and "broke off" in r.getMessage()]
    assert said.levelno == logging.WARNING and said.exc_info is None and path in said.getMessage()


# --- names and paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/assistant/training/adapters/..%2fetc",
        "/assistant/training/adapters/%2e%2e",
        "/assistant/training/adapters/%2e%2e/versions/v1",
        "/assistant/training/adapters/luna/versions/..",
        "/assistant/training/adapters/a..b",
        "/assistant/training/adapters/a..b/versions/v1",
        "/assistant/training/adapters/luna/versions/v1..",
        "/assistant/training/adapters/luna/versions/%2e%2e%2f%2e%2e",
        "/assistant/training/lora/jobs/..%2f..%2fjobs.db",
        "/assistant/training/examples/..%2f1/approve",
        "/static/..%2f..%2fsettings.py",
        "/static/%2e%2e/main.py",
    ],
)
def test_traversal_names_are_refused(shared_server: Server, path: str) -> None:
    status, _, body = shared_server.request("GET" if "approve" not in path else "POST", path)
    assert 400 <= status < 500 and "error" in body


@pytest.mark.parametrize(
    "params",
    [
        {"adapterName": "../x"},
        {"adapterName": "%2e%2e"},
        {"adapterName": ".hidden"},
        {"adapterName": "a..b"},
        {"adapterName": "a" * 65},
        {"baseModel": "/etc"},
        {"baseModel": "../outside"},
        {"baseModel": "data/../../outside"},
        {"baseModel": "org/.."},
        {"baseModel": "."},
        {"baseModel": "data"},
        {"trustRemoteCode": True},
        {"trust_remote_code": True},
        {"resumeFrom": "/tmp/x.pkl"},
        {"outputDir": "/tmp"},
    ],
)
def test_start_refuses_paths_and_unknown_flags(shared_server: Server, params: dict) -> None:
    status, _, body = shared_server.request("POST", "/assistant/training/lora/start", body=json.dumps(params).encode())
    # a base model the API may not use has a code of its own (the dashboard says it in the page's language)
    expected = {"/etc": "base_model.outside_root", "../outside": "base_model.outside_root"}
    expected |= {"data/../../outside": "base_model.outside_root"}
    code = expected.get(
        params.get("baseModel"), "base_model.not_a_model" if "baseModel" in params else "invalid_request"
    )
    assert status == 422 and body["error"]["code"] == code, body


def test_a_protocol_error_of_our_own_answer_is_no_client_fault() -> None:
    """Review repro: the middleware took every h11 LocalProtocolError for the client's, so a response of ours
    that broke the protocol after it started (a body longer than its Content-Length) was logged as "the
    client broke off". Only an answer that could not even start is the client's doing."""
    import asyncio

    import h11

    from lunatrain.web.handlers import ClientFraming

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]})
        raise h11.LocalProtocolError("Too much data for declared Content-Length")

    async def never_started(scope, receive, send):
        raise h11.LocalProtocolError("can't handle event type Response when role=SERVER and state=MUST_CLOSE")

    async def send(message):
        return None

    scope = {"type": "http", "method": "GET", "path": "/x"}
    with pytest.raises(h11.LocalProtocolError, match="Too much data"):
        asyncio.run(ClientFraming(app)(scope, None, send))
    asyncio.run(ClientFraming(never_started)(scope, None, send))  # the client's: said in a warning, not raised
