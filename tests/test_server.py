"""server.py against the gunicorn it is written for (the one patch, the public methods the worker builds on), and the
bounds on a request's head, from outside."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import gevent
import gunicorn
import pytest
import requests
from gunicorn import util
from gunicorn.workers import base, base_async, ggevent

import logs
import server
from config import load_config
from devtools.flood import raise_open_file_limit
from devtools.process import CLOSE, wait_for
from tests.helpers import BASE_CONFIG, exchange


def test_the_one_patch_still_reaches_gunicorn():
    """gunicorn answers a request it refuses itself through gunicorn.util.write_error, which server.Worker
    replaces (the one patch of gunicorn's internals). If an upgrade renames it, changes its arguments or
    stops calling it, this fails; tests/test_e2e.py::test_requests_the_server_cannot_parse_get_json_errors
    checks the answers themselves."""
    assert gunicorn.__version__ == "27.0.1", "the patch was checked against gunicorn 27.0.1: check it again"
    assert list(inspect.signature(util.write_error).parameters) == ["sock", "status_int", "reason", "mesg"]
    assert list(inspect.signature(server.write_json_error).parameters) == ["sock", "status_int", "reason", "mesg"]
    assert "util.write_error(client, status_int, reason, mesg)" in inspect.getsource(base.Worker.handle_error)


def test_the_worker_overrides_only_public_methods_that_gunicorn_still_calls():
    """handle (each accepted connection), timeout_ctx (the wait for a request's headers), handle_request
    (a request whose headers have arrived), handle_exit (SIGTERM) and init_signals (the boot's handlers):
    public, and called where expected."""
    overridden = {name for name in vars(server.Worker) if callable(vars(server.Worker)[name])}
    assert not {name for name in overridden if name.startswith("_")}
    handle = inspect.getsource(base_async.AsyncWorker.handle)
    assert "with self.timeout_ctx():\n                            req = next(parser)" in handle
    assert "self.handle_request(listener_name, req, client, addr)" in handle
    run = inspect.getsource(ggevent.GeventWorker.run)
    assert "partial(self.handle, s)" in run
    # notify() with the worker no longer alive means gunicorn has closed its listening sockets (Worker.listening):
    # its run loop notifies while alive, then closes the servers, then notifies while connections remain.
    alive_loop = run.index("while self.alive:\n            self.notify()")
    closing = run.index("server.close()")
    assert alive_loop < closing < run.index("self.notify()", closing)
    assert run.count("self.notify()") == 2
    assert "signal.signal(signal.SIGTERM, self.handle_exit)" in inspect.getsource(base.Worker.init_signals)
    # The stop signals held during the boot (server.STOP_SIGNALS) are released once gunicorn's handlers are in.
    boot = inspect.getsource(base.Worker.init_process)
    assert boot.index("self.init_signals()") < boot.index("self.load_wsgi()") < boot.index("self.run()")
    # The quiet end of a wait: gunicorn's own timeout_ctx is a gevent.Timeout that ends the block.
    assert "gevent.Timeout(self.cfg.keepalive, False)" in inspect.getsource(ggevent.GeventWorker.timeout_ctx)



# -- a request's head is bounded -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded(served):
    return served


def head_of(size: int) -> bytes:
    """A request line and header fields of 1 KB each, `size` bytes in all, without the blank line that ends a head."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    number = 0
    while len(head) < size:
        number += 1
        head += b"X-Filler-%d: " % number + b"f" * 1000 + b"\r\n"
    return head[:size]


def test_the_head_bound_is_about_64_kb_and_gunicorn_conf_sets_it():
    assert 60_000 < server.MAX_HEAD_BYTES <= 65_536 + 100
    text = (Path(server.__file__).parent / "gunicorn.conf.py").read_text()
    for name in ("limit_request_line", "limit_request_fields", "limit_request_field_size"):
        assert f"{name} = server.{name.upper()}" in text


@pytest.mark.e2e  # `bounded` starts the real server
def test_100_kb_of_headers_is_a_json_431(bounded):
    one_field = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n"
    for head in (head_of(100_000) + b"\r\n", one_field):
        answer = exchange(bounded.port, head)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 431 "), answer[:200]
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in headers
        assert json.loads(body)["error"] == "invalid_request"
    # A head just under the bound is served: 38 fields of 1 KB after the line and Host.
    allowed = head_of(server.LIMIT_REQUEST_FIELDS * 1000 - 2000) + b"\r\n\r\n"
    assert exchange(bounded.port, allowed).startswith(b"HTTP/1.1 200 ")


@pytest.mark.e2e  # `bounded` starts the real server
def test_300_connections_holding_unfinished_heads_leave_health_answered_at_once(bounded):
    """Half of them hold a head just under the bound, never finished; half send more than it (refused). /health is
    answered within 3 s (not the 10 s the held heads could take), allowing for other tests on the machine."""
    raise_open_file_limit()
    held: dict[int, socket.socket] = {}

    def hold(index: int) -> None:
        sock = socket.create_connection(("127.0.0.1", bounded.port), timeout=10)
        held[index] = sock
        with contextlib.suppress(OSError):  # the oversized ones are refused mid-way
            sock.sendall(head_of(60_000 if index % 2 else 120_000))

    try:
        with ThreadPoolExecutor(max_workers=30) as pool:
            list(pool.map(hold, range(300)))
        timings = []
        for _ in range(5):
            started = time.monotonic()
            response = requests.get(bounded.url + "/health", headers=CLOSE, timeout=10)
            timings.append(time.monotonic() - started)
            assert response.status_code == 200
        assert max(timings) < 3, timings
        # The oversized ones were answered 431 and closed; the others are still held open.
        refused = 0
        for sock in [held[index] for index in range(0, 300, 2)]:
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                refused += sock.recv(65536).startswith(b"HTTP/1.1 431 ")
        assert refused >= 140, refused
    finally:
        for sock in held.values():
            sock.close()


# -- the access line's client field --------------------------------------------------------------


@pytest.mark.e2e
def test_the_access_lines_client_field_is_bounded_and_escaped(served_behind_proxy):
    """Behind a proxy the client is X-Forwarded-For's, the client's to fill: never logged whole or raw."""
    # As long as a header field may be (the head's bounds); a tab and a byte beyond ASCII in it.
    forged = '6.6.6.6 "POST /swap" 200 1 1ms\t' + "x" * 1400 + "\xe9"
    running = served_behind_proxy
    since = len(running.output())
    for value in (forged, "203.0.113.9"):
        response = requests.get(running.url + "/health", headers={**CLOSE, "X-Forwarded-For": value}, timeout=10)
        assert response.status_code == 200

    def forwarded() -> list[dict[str, str]]:  # not the start-up wait's own /health, whose line may come late
        lines = [line for line in running.access_log(since) if line["path"] == "/health"
                 and line["client"] != "127.0.0.1"]
        return lines if len(lines) >= 2 else []

    lines = wait_for(forwarded, what="the two access lines")
    output = running.output()[since:]
    assert [line["client"] for line in lines] == [logs.client_field(forged), "203.0.113.9"]
    assert len(lines[0]["client"]) <= 4 * logs.CLIENT_FIELD_LENGTH + 3
    assert "x" * 46 not in output and '6.6.6.6 "POST' not in output
    assert max(len(line) for line in output.splitlines()) < 300


def test_client_field_keeps_addresses_and_escapes_the_rest():
    for address in ("203.0.113.9", "2001:db8::1", "fe80::1%eth0", "::ffff:192.0.2.1", "-"):
        assert logs.client_field(address) == address
    assert logs.client_field("a b\"c\n\u00e9") == 'a\\x20b\\x22c\\n\\xe9'
    assert logs.client_field("y" * 8000) == "y" * 45 + "..."


def test_a_stop_signal_sent_while_a_worker_boots_waits_for_gunicorns_handlers(monkeypatch):
    """A SIGTERM or Ctrl-C that reaches a worker before gunicorn installs its handlers (init_signals) must not
    be lost (the worker would hold the port until graceful_timeout): the boot holds the stop signals pending,
    and init_signals delivers them to gunicorn's handlers."""
    mask = {}

    def now() -> set[int]:
        return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def handlers_installed(self) -> None:
        mask["handlers"] = now()

    def boot(self) -> None:  # gunicorn's boot up to and including init_signals, without serving
        mask["booting"] = now()
        self.init_signals()
        mask["booted"] = now()

    monkeypatch.setattr(base.Worker, "init_signals", handlers_installed)
    monkeypatch.setattr(ggevent.GeventWorker, "init_process", boot)
    monkeypatch.setattr(server, "load_config", lambda: load_config(BASE_CONFIG))
    monkeypatch.setattr(util, "write_error", util.write_error)  # init_process's one patch, undone after the test
    before = now()
    try:
        server.Worker.__new__(server.Worker).init_process()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert server.STOP_SIGNALS <= mask["booting"] and server.STOP_SIGNALS <= mask["handlers"]
    assert not server.STOP_SIGNALS & mask["booted"]


def test_a_second_sigterm_neither_restarts_the_stop_delay_nor_cuts_it_short(monkeypatch):
    """systemd's SIGTERM reaches the workers, and then the master's: the first begins STOP_DELAY, the second changes
    nothing (the app was told once, one stop is scheduled)."""
    told, scheduled = [], []

    class App:
        def begin_stop(self) -> None:
            told.append(True)

    worker = server.Worker.__new__(server.Worker)
    worker.announced, worker.stop_delay, worker.wsgi = False, 5.0, App()
    worker.log = logging.getLogger("test")
    monkeypatch.setattr(server.gevent, "spawn_later", lambda seconds, *call: scheduled.append(seconds))
    for _ in range(2):
        worker.handle_exit(signal.SIGTERM, None)
    assert told == [True] and scheduled == [5.0]


def test_a_connection_that_begins_to_wait_after_the_drain_ends_at_once_and_quietly():
    """A keep-alive connection whose answer went out after the drain ended does not wait `keepalive` for another
    request: its wait ends at once, as a timeout would, nothing raised."""
    worker = server.Worker.__new__(server.Worker)
    worker.waiting, worker.drained, worker.cfg = set(), True, SimpleNamespace(keepalive=60)
    ended = []

    def connection() -> None:
        with worker.timeout_ctx():
            gevent.sleep(60)  # waiting for the next request's head
            ended.append("a request came")
        ended.append("closed")

    waiting = gevent.spawn(connection)
    waiting.join(timeout=5)
    assert ended == ["closed"] and waiting.successful() and worker.waiting == set()
