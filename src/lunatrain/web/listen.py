"""Listening sockets for both HTTP services: the server binds its port itself and says which one it got.

Port 0 asks the OS for a free port. Binding here (not in uvicorn) lets the caller record the address the
server actually serves before uvicorn starts: the socket already listens, so a client that connects in
between waits in the backlog instead of being refused. Picking a "free" port by binding and closing a
socket, then starting a server on that number later, races with every other process on the machine.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import StorageError, UsageError
from ..fsio import atomic_write_text

BACKLOG = 2048  # uvicorn's default


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (0: a free port the OS chooses); a port that is taken or an
    address that cannot be bound is a UsageError of one sentence."""
    if not 0 <= port <= 65535:
        raise UsageError(f"Invalid port {port}: use 1-65535, or 0 for a free port.")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # IPPROTO_TCP by name: asyncio turns Nagle's algorithm off only on sockets that say so (protocol 0 does
    # not), and with it on, a response written in two parts waits 40 ms for the client's delayed ACK on every
    # request of a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # A restart right after the previous server on this port ended must not fail on its TIME_WAIT
        # connections (Linux still refuses a port another socket listens on).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"Port {port} on {host} is already in use; stop what listens there or pick another port "
                "(--port 0 picks a free one)."
            ) from None
        reason = exc.strerror or str(exc)
        raise UsageError(f"Cannot listen on {host} port {port}: {reason}.") from None
    return sock


def url(sock: socket.socket) -> str:
    """The http:// address a local client uses to reach this socket (a wildcard bind is reached on loopback)."""
    host, port = sock.getsockname()[:2]
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        addr = ipaddress.ip_address("::1" if addr.version == 6 else "127.0.0.1")
    return f"http://[{addr}]:{port}" if addr.version == 6 else f"http://{addr}:{port}"


def record(sock: socket.socket, path: Path) -> str:
    """Write the socket's address to `path` (atomically: a reader never sees half of it); return it."""
    address = url(sock)
    try:
        atomic_write_text(path, address + "\n")
    except OSError as exc:
        sock.close()
        raise StorageError(f"Could not record the address {address} in {path}: {exc.strerror or exc}.") from None
    return address


def recorded(path: Path) -> str | None:
    """The address recorded at `path`, if any (read before a server records its own: see forget)."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def forget(path: Path, address: str, previous: str | None = None) -> None:
    """Remove the record at `path` if it still names `address`: a server that stops in order leaves no
    address behind that clients would try (one that is killed does; clients treat it as stale). Another
    server of the data root that recorded itself since keeps its record. `previous`, the record this server
    replaced when it started (a second `lunatrain serve` on the data root), is put back while that server
    still listens, so that its clients find it again."""
    with contextlib.suppress(OSError):
        if path.read_text() != address + "\n":
            return
        if previous and previous != address and _listening(previous):
            atomic_write_text(path, previous + "\n")
        else:
            path.unlink()


def serves_root(address: str, home: Path) -> bool:
    """Whether the process listening at the loopback `address` serves the data root `home`: its ASSISTANT_HOME
    (else its working directory, the default root) names the same folder. A copy of a data root made while its
    server ran records the original's address; that server is not this root's. False when nothing listens
    there or the process cannot be read (another user's)."""
    import psutil

    from ..fsio import identity
    from ..procs import data_root_of

    try:
        port = urlsplit(address).port
        listening = [
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        ]
        for pid in listening:
            root = data_root_of(psutil.Process(pid))
            return root is not None and identity(root) is not None and identity(root) == identity(home)
    except (psutil.Error, OSError, ValueError):
        pass
    return False


def _listening(address: str) -> bool:
    try:
        parts = urlsplit(address)
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=2.0):
            return True
    except (OSError, ValueError):
        return False


def serve(
    app: Any, sock: socket.socket, recorded: Path | None = None, previous: str | None = None, **config: Any
) -> None:
    """Run uvicorn on the already listening socket until SIGINT/SIGTERM; `recorded` is the file its address
    was recorded in, `previous` the record it replaced (both for forget, at the end); `config` goes to
    uvicorn.Config."""
    import uvicorn

    from ..compat import head_timed_http

    address = url(sock)
    host, port = sock.getsockname()[:2]
    # No proxy headers: the client address and scheme are the socket's, never a header's claim; and no Server
    # header naming the stack.
    config |= {"proxy_headers": False, "server_header": False}
    # A request head not complete within compat.HEAD_TIMEOUT closes its connection (slowloris, idle connects).
    config.setdefault("http", head_timed_http())
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **config))
    # uvicorn ends a graceful shutdown by raising the signal again under the handler it found; under the
    # default one a SIGTERM would end the process right there, before the finally below.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # A closed terminal (SIGHUP) ends the server as SIGTERM does, cleanly: its default ended the process at
    # once, leaving its address record and a running job's worker behind. Under `nohup` it stays ignored.
    hung_up: list[int] = []

    def hang_up(signum: int, _frame: Any) -> None:
        hung_up.append(signum)
        server.should_exit = True

    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, hang_up)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if recorded is not None:
            forget(recorded, address, previous)
    if hung_up:
        raise SystemExit(128 + signal.SIGHUP)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # the shell's status for "ended by this signal"
