"""Both servers bind their port themselves (`--port 0`: one the OS picks) and record the address they serve,
so no test or product path picks a "free" port that another process can take before it is bound.

Run: `.venv/bin/python -m pytest tests/test_ports.py -q` (starts real trainer and API processes).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from lunatrain.cli import app
from lunatrain.errors import UsageError
from lunatrain.service import client
from lunatrain.settings import load_settings
from lunatrain.web import listen

from trainer_helpers import healthy, read_url, recorded_url, start_trainer, stop_group, trainer_env

LUNATRAIN = str(Path(sys.executable).parent / "lunatrain")


@pytest.fixture
def busy() -> Iterator[int]:
    """A port something listens on for the whole test."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_bind_port_0_listens_on_a_port_the_os_picked():
    sock = listen.bind("127.0.0.1", 0)
    try:
        url = listen.url(sock)
        assert url == f"http://127.0.0.1:{sock.getsockname()[1]}" and _port(url) > 0
        # already listening: a client that connects before the server runs waits in the backlog
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=5):
            pass
    finally:
        sock.close()
    wildcard = listen.bind("0.0.0.0", 0)
    try:
        assert listen.url(wildcard) == f"http://127.0.0.1:{wildcard.getsockname()[1]}"  # reached on loopback
    finally:
        wildcard.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connections_on_a_bound_socket_send_without_nagles_delay(host):
    """Repro: every request after the first on a kept-alive connection took 44 ms (curl, a browser polling
    the dashboard, the bench's clients): asyncio turns Nagle's algorithm off only on sockets that name
    IPPROTO_TCP, and `bind` made its socket with protocol 0, so a response written in two parts waited for
    the client's delayed ACK. Checked on the socket asyncio hands a connection's handler, the one uvicorn
    writes to."""
    import asyncio

    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")

    async def accepted_nodelay() -> int:
        sock = listen.bind(host, 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=sock)
        async with server:
            _reader, writer = await asyncio.open_connection(host, sock.getsockname()[1])
            try:
                return await asyncio.wait_for(seen, 30)
            finally:
                writer.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_record_is_forgotten_only_while_it_names_the_server(tmp_path):
    record = tmp_path / "api.url"
    sock = listen.bind("127.0.0.1", 0)
    try:
        ours = listen.record(sock, record)
    finally:
        sock.close()
    listen.forget(record, "http://127.0.0.1:1")  # another server's address: not ours to remove
    assert read_url(record) == ours
    listen.forget(record, ours)
    assert not record.exists()
    listen.forget(record, ours)  # already gone: nothing to do


def test_a_second_server_of_the_data_root_gives_the_record_back_when_it_stops(tmp_path):
    """Repro: with two `lunatrain serve` on one data root, the second one's record replaced the first one's,
    and when the second stopped it removed the record: clients of the data root no longer found the API that
    was still running. A server that stops puts back the record it replaced while that server still listens."""
    record = tmp_path / "api.url"
    first, second = listen.bind("127.0.0.1", 0), listen.bind("127.0.0.1", 0)
    try:
        theirs = listen.record(first, record)
        previous = listen.recorded(record)
        ours = listen.record(second, record)
        assert previous == theirs != ours
        listen.forget(record, ours, previous)
        assert read_url(record) == theirs  # the first server still listens: its record is back
        listen.record(second, record)
        first.close()
        listen.forget(record, ours, previous)
        assert not record.exists()  # the one it replaced is gone too: nothing to put back
    finally:
        first.close()
        second.close()
    assert listen.recorded(tmp_path / "none.url") is None


def test_a_recorded_server_of_another_data_root_is_not_taken_as_this_roots(tmp_path):
    """Move-root repro: a data root copied while its `serve` ran carried that server's address in data/api/api.url;
    the copy's `serve` took it for "another server of this data root" and wrote it back when it stopped, so a
    script of the copy (`curl $(cat data/api/api.url)/…`) wrote into the original. A recorded address is
    given back only when the process listening there serves this data root."""
    import os

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    copy.mkdir()
    # a listener standing in for the original's serve; 120 s only bounds its life should a test not kill it
    script = (
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "print(s.getsockname()[1], flush=True); time.sleep(120)\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "ASSISTANT_HOME": str(original)},
    )
    try:
        address = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        assert listen.serves_root(address, original)
        assert not listen.serves_root(address, copy)
    finally:
        server.kill()
        server.wait()
    assert not listen.serves_root(address, original)  # nothing listens there any more
    # review repro: the root named as settings read it (`~`, spaces, another case) was taken for another one
    user = tmp_path / "user"
    (user / "root").mkdir(parents=True)
    server = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k.upper() != "ASSISTANT_HOME"}
        | {"HOME": str(user), "assistant_home": " ~/root "},
    )
    try:
        address = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        assert listen.serves_root(address, user / "root")
    finally:
        server.kill()
        server.wait()


def test_bind_refuses_a_port_in_use_and_one_out_of_range(busy):
    with pytest.raises(UsageError) as info:
        listen.bind("127.0.0.1", busy)
    assert info.value.message == (
        f"Port {busy} on 127.0.0.1 is already in use; stop what listens there or pick another port "
        "(--port 0 picks a free one)."
    )
    with pytest.raises(UsageError, match="Invalid port 70000"):
        listen.bind("127.0.0.1", 70000)


def test_only_a_loopback_record_is_followed_and_port_0_goes_by_the_record(home):
    settings = load_settings()
    settings.trainer_url_file.parent.mkdir(parents=True)
    settings.trainer_url_file.write_text("http://127.0.0.1:6123\n")
    assert client.base_url(settings) == "http://127.0.0.1:6123"
    assert client.base_url(load_settings(lora_trainer_url="http://127.0.0.1:0")) == "http://127.0.0.1:6123"
    assert client.base_url(load_settings(lora_trainer_url="http://127.0.0.1:7000")) == "http://127.0.0.1:7000"
    # a record naming another host never sends this client (and its token) there
    settings.trainer_url_file.write_text("http://192.0.2.7:6123\n")
    assert client.base_url(settings) == settings.lora_trainer_url
    # where a trainer starts by default is the configured address, never a record of where the last one was
    settings.trainer_url_file.write_text("http://127.0.0.1:6123\n")
    assert client.trainer_address(settings) == ("127.0.0.1", 5051)
    assert client.trainer_address(load_settings(lora_trainer_url="http://127.0.0.1:0")) == ("127.0.0.1", 0)


@pytest.mark.slow
def test_trainers_on_port_0_record_where_they_listen_and_two_at_once_differ(tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    started: dict[Path, subprocess.Popen] = {}
    errors: list[BaseException] = []

    def start(home: Path) -> None:
        home.mkdir()
        try:
            # `lunatrain trainer --port 0`; no job runs here, so no warm worker (its imports are seconds of CPU)
            started[home] = start_trainer(home, ASSISTANT_LORA_WARM_WORKER="false")
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(h,)) for h in homes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=330)  # start_trainer's own bound is 300 s
    try:
        assert not errors, errors
        urls = [started[h].url for h in homes]
        assert all(u.startswith("http://127.0.0.1:") and _port(u) > 0 for u in urls), urls
        assert _port(urls[0]) != _port(urls[1])
        for home, url in zip(homes, urls, strict=True):
            assert (home / "data" / "trainer" / "trainer.url").read_text() == url + "\n"
            assert healthy(url)["dataRoot"]["path"] == str(home.resolve())
            # a client of this data root, with no address configured, finds it through the record
            assert client.health(load_settings(home=home)).data_root.path == str(home.resolve())
        # Stopped in order, a trainer takes its record with it; the other one's stays.
        stop_group(started[homes[0]].pid, signal.SIGTERM)
        assert started[homes[0]].wait(timeout=60) == 128 + signal.SIGTERM
        assert not (homes[0] / "data" / "trainer" / "trainer.url").exists()
        assert read_url(homes[1] / "data" / "trainer" / "trainer.url") == urls[1]
    finally:
        for proc in started.values():
            stop_group(proc.pid)


@pytest.mark.slow
def test_serve_on_port_0_records_its_address_and_answers_there(home):
    record = load_settings().api_url_file
    log = home / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [LUNATRAIN, "serve", "--port", "0"],
            cwd=home,
            env=trainer_env(home) | {"ASSISTANT_LORA_TRAINER_URL": "http://127.0.0.1:0"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = recorded_url(record, proc, 120)
        assert url and url.startswith("http://127.0.0.1:") and _port(url) > 0, log.read_text()
        # The socket listened before the address was recorded: this request waits in the backlog until the
        # app has started, instead of being refused.
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
            assert http.get("/openapi.json").status_code == 200
            status = http.get("/assistant/training/status")
            assert status.status_code == 200 and status.json()["trainer"]["label"] == "Offline"
        assert f"assistant API for {home.resolve()} on {url}" in log.read_text()
        stop_group(proc.pid, signal.SIGTERM)  # stopped in order: no address left behind
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM and not record.exists()
    finally:
        stop_group(proc.pid)
        proc.wait(timeout=30)


@pytest.mark.parametrize("command", ["trainer", "serve"])
def test_a_port_in_use_is_one_sentence_exit_2_and_changes_nothing(home, busy, command):
    settings = load_settings()
    records = [settings.trainer_url_file, settings.api_url_file]
    for path in records:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("http://127.0.0.1:6123\n")
    result = CliRunner().invoke(app, [command, "--port", str(busy)])
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"error: Port {busy} on 127.0.0.1 is already in use; stop what listens there or pick another port "
        "(--port 0 picks a free one).\n"
    )
    assert [p.read_text() for p in records] == ["http://127.0.0.1:6123\n"] * 2
    assert not (settings.data_dir / "trainer" / "trainer.lock").exists()  # the data root was never claimed
    for port in ("-1", "65536"):
        out_of_range = CliRunner().invoke(app, [command, "--port", port])
        assert out_of_range.exit_code == 2 and "Invalid value for '--port'" in out_of_range.output


def test_a_second_trainer_of_the_data_root_names_where_the_first_one_runs(home, monkeypatch):
    """Repro: a second `lunatrain trainer` on a data root said only "Another trainer is already running for
    the data root /tmp/jt/home." - not which process, nor at which address (with --port 0 it is a port the
    OS picked), so the user could neither use that trainer nor stop it."""
    from lunatrain.errors import Conflict
    from lunatrain.service import lock

    settings = load_settings()
    monkeypatch.setattr(lock, "_instance_lock", None)
    lock.claim_data_root(settings)  # the first trainer, in this process
    held = lock._instance_lock
    try:
        lock.write_pid(settings, 4242)
        settings.trainer_url_file.write_text("http://127.0.0.1:40001\n")
        with pytest.raises(Conflict) as refused:
            lock.claim_data_root(settings)  # the second one
    finally:
        assert held is not None
        held.close()
    message = refused.value.message
    assert "already running" in message and str(settings.home) in message, message
    assert "pid 4242" in message and "http://127.0.0.1:40001" in message, message


def test_a_second_trainer_on_the_first_ones_port_says_the_data_root_has_one(home, monkeypatch):
    """Jobs repro: `lunatrain trainer --port P` twice on one data root said "Port P … is already in use; …
    (--port 0 picks a free one)": advice that, followed, starts a second trainer on the data root (refused
    then, with another sentence). The port is taken by this data root's own trainer, and that is what is said;
    a port something else holds is still a port in use."""
    import socket

    from lunatrain.service import lock

    settings = load_settings()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = CliRunner().invoke(app, ["trainer", "--port", str(port)])
        assert result.exit_code == 2 and "is already in use" in result.output, result.output  # not our trainer
        monkeypatch.setattr(lock, "_instance_lock", None)
        lock.claim_data_root(settings)  # this data root's trainer, in this process
        held = lock._instance_lock
        try:
            settings.trainer_url_file.write_text(f"http://127.0.0.1:{port}\n")
            result = CliRunner().invoke(app, ["trainer", "--port", str(port)])
        finally:
            assert held is not None
            held.close()
    finally:
        taken.close()
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "Another trainer is already running for the data root" in result.output, result.output
    assert f"http://127.0.0.1:{port}" in result.output and "--port 0" not in result.output, result.output


def test_a_trainer_on_another_port_than_the_chosen_address_is_refused(home, monkeypatch):
    """Explore repro: with ASSISTANT_LORA_TRAINER_URL naming port P, `lunatrain trainer --port 0` started and
    recorded its address, but every client of the data root went to P (a chosen address wins over the
    record): `health` said "Offline … start it" while it ran, and `lora` failed starting a second trainer."""
    monkeypatch.setenv("ASSISTANT_LORA_TRAINER_URL", "http://127.0.0.1:24773")
    for port in ("0", "24774"):
        result = CliRunner().invoke(app, ["trainer", "--port", port])
        assert result.exit_code == 2, result.output
        assert result.output == (
            "error: ASSISTANT_LORA_TRAINER_URL (http://127.0.0.1:24773) is where the clients of this data root "
            f"look for its trainer, so they would never reach one on port {port}; start it without --port, or "
            "change or unset ASSISTANT_LORA_TRAINER_URL.\n"
        )
    assert not (load_settings().data_dir / "trainer" / "trainer.lock").exists()  # the data root was never claimed


@pytest.mark.slow
def test_a_trainer_whose_data_root_is_moved_and_made_again_leaves_the_new_one_alone(tmp_path):
    """Explore repro: `mv luna luna.old && mkdir luna` while the trainer idled: it went on serving the new,
    empty folder as its data root, listing luna.old's jobs there and recording new jobs in luna.old's job
    database while their adapters landed in the new folder. It notices the folder is another one and stops;
    the new folder gets its own trainer."""
    home = tmp_path / "luna"
    home.mkdir()
    proc = start_trainer(home, ASSISTANT_LORA_WARM_WORKER="false")
    try:
        home.rename(tmp_path / "luna.old")
        home.mkdir()
        proc.wait(timeout=60)  # it ends by itself (a TimeoutExpired otherwise)
    finally:
        stop_group(proc.pid)
    assert not (home / "data").exists()  # nothing of the old trainer's in the new folder
    log = (tmp_path / "luna.old" / "trainer-0.log").read_text()
    assert f"data root {home} was moved or replaced; shutting down" in log, log[-2000:]


def test_a_trainer_refuses_the_clients_of_a_data_root_made_again_at_its_path(tmp_path):
    """Review repro: while it finished a job, the trainer of a replaced data root answered the new folder's
    clients as theirs (its health names the root by path): `jobs list` there showed the old root's job, and a
    new job was queued in the moved job database, never to run. Every request is refused until it stops."""
    from fastapi.testclient import TestClient

    from lunatrain.service.app import create_app

    home = tmp_path / "luna"
    home.mkdir()
    client = TestClient(create_app(load_settings(home=home)), base_url="http://127.0.0.1")  # no lifespan needed
    assert client.get("/no/such/page").status_code == 404  # it has answered: it serves this folder
    home.rename(tmp_path / "luna.old")
    home.mkdir()
    for method, path in (("GET", "/health"), ("GET", "/jobs"), ("POST", "/jobs")):
        answer = client.request(method, path, json={} if method == "POST" else None)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "data_root_gone", answer.text
        assert "while this trainer ran" in answer.json()["error"]["message"]


def _trainer_with_hang_up(home: Path, disposition: signal.Handlers) -> subprocess.Popen:
    """A trainer started with SIGHUP at `disposition` (what it inherits from the shell that starts it)."""
    home.mkdir()
    inherited = signal.signal(signal.SIGHUP, disposition)
    try:
        return start_trainer(home, ASSISTANT_LORA_WARM_WORKER="false")
    finally:
        signal.signal(signal.SIGHUP, inherited)


@pytest.mark.slow
def test_a_closed_terminal_stops_the_trainer_as_sigterm_does(tmp_path):
    """Explore repro: SIGHUP (the terminal closed) ended `lunatrain trainer` and `serve` at once, exit 129,
    leaving trainer.url and trainer.pid naming a dead process and a running job's worker behind."""
    home = tmp_path / "home"
    # As from a terminal: a suite run under `nohup` hands its children SIGHUP ignored, which they keep.
    proc = _trainer_with_hang_up(home, signal.SIG_DFL)
    try:
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 128 + signal.SIGHUP
    finally:
        stop_group(proc.pid)
    settings = load_settings(home=home)
    from lunatrain.service.lock import pid_path

    assert not settings.trainer_url_file.exists() and not pid_path(settings).exists()  # as after SIGTERM
    assert "shutdown" in (home / "trainer-0.log").read_text().lower()  # a clean one


@pytest.mark.slow
def test_under_nohup_a_hang_up_leaves_the_trainer_running(tmp_path):
    """`nohup lunatrain trainer`: SIGHUP stays ignored, as the user asked."""
    proc = _trainer_with_hang_up(tmp_path / "home", signal.SIG_IGN)
    try:
        proc.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):  # it does not end
            proc.wait(timeout=2)
        assert healthy(proc.url) is not None
    finally:
        stop_group(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_recorded_address_held_by_another_root_is_not_blamed_on_a_setting_left_at_port_0(tmp_path):
    """Move-root repro: in a copy of a data root, `jobs list` found the copied data/trainer/trainer.url naming the
    original's trainer and said to "point ASSISTANT_LORA_TRAINER_URL at a trainer started with ASSISTANT_HOME=…,
    or unset it", while that setting was port 0 (any free port): the address came from the record. Only an
    address the user chose is theirs to change."""
    free = load_settings(home=tmp_path, lora_trainer_url="http://127.0.0.1:0")
    said = client.held_by_another(free, "the trainer of another data root").message
    assert "ASSISTANT_LORA_TRAINER_URL" not in said and "lunatrain trainer --port 0" in said, said
    assert "ASSISTANT_LORA_TRAINER_URL" not in client.other_data_root(free, "another").message
    chosen = load_settings(home=tmp_path, lora_trainer_url="http://127.0.0.1:45961")
    assert "point ASSISTANT_LORA_TRAINER_URL" in client.held_by_another(chosen, "another").message
