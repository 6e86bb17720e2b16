"""`lunatrain serve`: the assistant API (default 127.0.0.1:5050, ASSISTANT_API_HOST / ASSISTANT_API_PORT).

Port 0 asks the OS for a free port; the address served is recorded in data/api/api.url either way.
"""

from __future__ import annotations

import logging
import re
import sys

import typer

from ..errors import LunaError, UsageError
from ..settings import Settings
from ..startup import collector_paused
from ..wire import AcceptFailures, UtcLogFormatter
from .app import app, fail

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="address to bind; non-loopback needs ASSISTANT_API_TOKEN"),
    port: int = typer.Option(
        None, "--port", min=0, max=65535, help="port (default ASSISTANT_API_PORT, 5050); 0: a free port"
    ),
    log_level: str = typer.Option(
        "info", "--log-level", "--logLevel", help=f"uvicorn log level: {', '.join(LOG_LEVELS)}"
    ),
) -> None:
    """Run the assistant API (OpenAPI at /docs, dashboard at /); its address is recorded in data/api/api.url."""
    with collector_paused():  # the API's imports (startup.py)
        from ..api.main import create_app
        from ..settings import check_data_root, load_settings
        from ..web import listen
        from ..web.security import check_bind

    try:
        if log_level not in LOG_LEVELS:  # before anything listens or is recorded
            raise UsageError(f"Unknown --log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}.")
        check_host_flag(host)
        overrides = {k: v for k, v in (("api_host", host), ("api_port", port)) if v is not None}
        settings = load_settings(**overrides)
        check_bind(settings.api_host, settings.api_token)
        if settings.chat_quantize != "none":  # said now, not as a 500 at the first chat request
            from ..models import check_quantize_installed

            check_quantize_installed(settings.chat_quantize)
        # The console script leaves bitsandbytes out of PEFT's import (compat.without_bitsandbytes); a server lets
        # it in whatever it chats on: its POST /eval-gate loads a QLoRA adapter's base in 4 bits, which it could
        # not once a chat had imported PEFT without it. Paid once, when PEFT is first used.
        from ..compat import with_bitsandbytes

        with_bitsandbytes()
        sock = listen.bind(settings.api_host, settings.api_port)  # first: a port in use changes nothing
    except LunaError as err:
        raise fail(err) from None
    try:
        check_data_root(settings)  # makes data/ and reports/training/: only once the port is ours
    except LunaError as err:
        sock.close()
        raise fail(err) from None
    try:
        from .. import store
        from ..errors import StorageError

        try:
            store.open_store(settings)  # a URL naming no usable database (sqlite:///, a typo) is said now
        except StorageError:
            pass  # damaged or unreachable: served anyway, each request that needs it answers 503 with why
        api = create_app(settings, bound_host=settings.api_host)
        previous = listen.recorded(settings.api_url_file)  # another server of this data root: given back at exit
        if previous and not listen.serves_root(previous, settings.home):
            previous = None  # recorded in a copy of the root made while its server ran: not this root's
        address = listen.record(sock, settings.api_url_file)
    except LunaError as err:
        sock.close()
        raise fail(err) from None
    typer.echo(f"assistant API for {settings.home} on {address}", err=True)
    # log_config=None: uvicorn's loggers propagate to this handler, at the levels --log-level gives them; the
    # project's own loggers speak from warnings up, as before.
    verbose = log_level in ("debug", "trace")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, handlers=[log_handler(settings)], force=True
    )
    listen.serve(api, sock, settings.api_url_file, previous, log_level=log_level, log_config=None)


def check_host_flag(host: str | None) -> None:
    """An empty --host is the flag's mistake, said with its name (not as ASSISTANT_API_HOST's, nor as none)."""
    if host is not None and not host.strip():
        raise UsageError("--host is empty: give the address to listen on, such as 127.0.0.1, or leave it out.")


def log_handler(settings: Settings) -> logging.Handler:
    """The server's log on stderr: uvicorn's own lines (requests among them) stamped as the trainer's log and
    every record are (UTC, Z; its default format has no time at all), and never the API token."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UtcLogFormatter())
    handler.addFilter(AcceptFailures())
    if settings.api_token:
        handler.addFilter(_WithoutToken(settings.api_token))
    return handler


class _WithoutToken(logging.Filter):
    """The token said as ***. A client that sends it in a query string (`?api_key=…`) instead of the header is
    refused, but uvicorn's access line (and at `trace` its scope) holds the URL as sent: the token is found in
    every spelling a URL may give it, each character as it is or percent-encoded (either case of hex), a space
    also as `+`, a backslash also doubled."""

    def __init__(self, token: str) -> None:
        super().__init__()
        # The token is printable ASCII (settings): one byte a character. A space may come as +, and a backslash
        # doubled, as Python writes it in the repr of the scope's bytes.
        extra = {" ": r"|\+", "\\": r"|\\\\"}
        spelled = (f"(?:{re.escape(c)}|(?i:%{ord(c):02x}){extra.get(c, '')})" for c in token)
        self.pattern = re.compile("".join(spelled))

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        said = self.pattern.sub("***", text)
        if said != text:
            record.msg, record.args = said, ()
        return True
