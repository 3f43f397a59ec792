"""The server process: what gunicorn.conf.py computes its settings with, and the worker and logger classes
and hooks it names.

The start (`start_config`, `bind_address`, `worker_count`, `worker_connections`, `stop_seconds`): .env
loaded, the configuration checked (a bad one ends the start, naming each variable), the open-file limit
raised, before any port is bound or worker forked.

`worker_class = "server.Worker"`: gunicorn's gevent worker, which on SIGTERM goes on serving for STOP_DELAY
while GET /readyz answers 503, and knows which of its connections are waiting for a request, so that a stop
then drains them (answers that close their connection), then closes the
idle ones, and lets every request whose headers have arrived finish, its body included; the workers of a
killed master stop the same way (docs/operations.md, "Stopping").
`logger_class = "server.Logger"`: gunicorn's logger, with no code, token or forged line in what it writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import Mapping, MutableMapping
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import gevent
from dotenv import dotenv_values, find_dotenv
from greenlet import greenlet
from gunicorn import glogging, util
from gunicorn.workers.base import Worker as BaseWorker
from gunicorn.workers.ggevent import GeventWorker

import logs
import metrics
import ratelimit
import revocations
from config import STOP_MARGIN, Config, ConfigError, load_config, longest_request_seconds, token_settings

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.glogging import _AtomsDict  # the stubs' name for atoms()' answer
    from gunicorn.http import Request
    from gunicorn.http.wsgi import Response

# gunicorn.conf.py's access_log_format: client "METHOD PATH" status bytes milliseconds. Logger.atoms()
# computes these six atoms only; any other format gets gunicorn's full set.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms %({tokenswap.request_id}e)s'

# What follows a path in a request target may hold a code or a token: the query (a client that put
# its fields in the URL), a fragment, or path parameters. Redacted to the next space: gunicorn logs a
# refused request line with repr, so a quote may be part of it.
_AFTER_PATH = re.compile(r"[?#;]\S*")


def redacted(value: object) -> object:
    """A logged string with whatever follows a path (query, fragment, path parameters) replaced by '...'."""
    return _AFTER_PATH.sub("...", value) if isinstance(value, str) else value


def _escaped(value: Any) -> Any:
    # The stubs say str; an atom may be an int (bytes sent, milliseconds) or None.
    if isinstance(value, str) and not value.isprintable():
        # A percent-encoded newline in a path must not start a forged log line.
        return value.encode("unicode_escape").decode("ascii")
    return value


class SafeAtoms(glogging.SafeAtoms):
    """gunicorn's atoms for the access line, each escaped as the line's format asks for it."""

    def __getitem__(self, name: str) -> str:
        return _escaped(super().__getitem__(name))


class Logger(glogging.Logger):
    """gunicorn's logger (the `logger_class` setting), with every logged value made safe."""

    atoms_wrapper_class = SafeAtoms

    def atoms(self, resp: Response, req: Request, environ: MutableMapping[str, Any],
              request_time: timedelta) -> _AtomsDict:
        if self.cfg.access_log_format == ACCESS_LOG_FORMAT:
            # The six atoms this service's line shows, computed as gunicorn computes them
            # (tests/test_descriptors.py compares them with gunicorn's own): the stock method also
            # copies every header and environ entry and formats a date, for each request.
            status = str(resp.status).split(None, 1)[0]
            atoms: _AtomsDict = {
                "h": logs.client_field(environ.get("REMOTE_ADDR") or "-"),
                "m": environ.get("REQUEST_METHOD"),
                "U": environ.get("PATH_INFO"),
                "s": status,
                "B": getattr(resp, "sent", None),
                "M": request_time.seconds * 1000 + int(request_time.microseconds / 1000),
                # The request id (logs.py), last on the line; "-" for a request the app never saw.
                "{tokenswap.request_id}e": environ.get("tokenswap.request_id", "-"),  # type: ignore[typeddict-unknown-key]  # the stubs name gunicorn's fixed atoms; an environ atom like this is one too
            }
        else:
            atoms = super().atoms(resp, req, environ, request_time)
            atoms["h"] = logs.client_field(atoms.get("h") or "-")
        path, line = atoms.get("U"), atoms.get("r")
        if path is not None:
            atoms["U"] = _AFTER_PATH.sub("...", path)
        if line is not None:
            atoms["r"] = _AFTER_PATH.sub("...", line)
        return atoms

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        # "Invalid request from ip=...: Invalid HTTP request line: 'POST /refresh?refresh_token=...'"
        super().warning(redacted(msg), *map(redacted, args), **kwargs)

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        # "Error handling request POST /swap?code=..."
        super().exception(redacted(msg), *map(redacted, args), **kwargs)


# The bounds on a request's head (gunicorn.conf.py's limit_request_* settings): gunicorn reads at most
# LIMIT_REQUEST_FIELDS x (LIMIT_REQUEST_FIELD_SIZE + 2) + 4 bytes of header fields after the request
# line, then answers 431. MAX_HEAD_BYTES is that whole: about 64 KB.
LIMIT_REQUEST_LINE = 4094  # gunicorn's default; a longer URL is a 414
LIMIT_REQUEST_FIELDS = 40
LIMIT_REQUEST_FIELD_SIZE = 1536
MAX_HEAD_BYTES = LIMIT_REQUEST_LINE + 2 + LIMIT_REQUEST_FIELDS * (LIMIT_REQUEST_FIELD_SIZE + 2) + 4

# How long a stopping worker keeps answering requests that arrive on its open connections (each answer
# then closes its connection) before it closes the idle ones. A load balancer that reuses idle
# connections must never send a request on one at the moment it is closed (nginx logs the reset and, for
# a POST, answers 502 unless told to retry): deploy/nginx.conf closes its idle connections to the service after 2 s
# (its upstream keepalive_timeout), so by the end of the drain every connection nginx still holds has
# been used since the stop began, and was closed by the answer. Far shorter than every platform's
# grace period (docs/operations.md, "Stopping").
DRAIN_SECONDS = 3.0


# The signals that stop a worker. One sent while the worker boots, before gunicorn installs its handlers
# (init_signals), would reach the master's handlers it inherited and be lost: the worker would hold the port
# until graceful_timeout (a make run that Ctrl-C does not stop, a deploy 40 s late). They are held pending
# from the start of the boot until gunicorn's handlers are in place, then delivered to them.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


class _Stopping(Exception):
    """Thrown into a connection's greenlet that waits for a request when the worker stops."""


class Worker(GeventWorker):
    """gunicorn's gevent worker (the `worker_class` setting), whose stop loses no request.

    On SIGTERM it first goes on serving for STOP_DELAY, the app's GET /readyz answering 503 (handle_exit).
    Then (or at once when its master is gone) it stops accepting connections (gunicorn does, within a
    second); for DRAIN_SECONDS it keeps answering requests that arrive on its open connections, each
    answer saying `Connection: close`; then it closes the connections still waiting for a request.
    gunicorn waits for every connection's greenlet before a worker exits, and one waiting for a request
    (idle after an answer, or opened and never used, as browsers and load balancers pre-connect) would
    wait up to `keepalive`. Each connection is known from the moment it is accepted (handle); while it
    waits for a request's headers it is listed as waiting (timeout_ctx, which gunicorn enters for exactly
    that wait). Each waiting connection's wait ends as if its keep-alive time had run out, which gunicorn
    treats as a quiet end of the connection: nothing logged. A request whose headers have arrived is
    not waiting: it runs to its end, body and answer included, within graceful_timeout.
    """

    def init_process(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until init_signals: see STOP_SIGNALS
        # How long a stop goes on serving, GET /readyz answering 503, before gunicorn's stop begins.
        self.stop_delay = load_config().stop_delay
        self.announced = False  # SIGTERM came: the app says it is not ready, the delay runs
        self.connections: set[socket.socket] = set()
        self.waiting: set[greenlet] = set()
        self.requests: set[Request] = set()
        self.stopping = False  # the stop has begun
        # gunicorn's listening sockets are open in this worker: a new connection may still be accepted.
        # gunicorn closes them up to a second after a stop begins (its run loop), then calls notify().
        self.listening = True
        self.drained = False  # the drain is over: a connection waiting for a request is closed
        # THE one patch of gunicorn's internals (pinned gunicorn==27.0.1): gunicorn answers a request it
        # cannot parse (bad request line or header, URL or headers too long) itself, with an HTML page that
        # echoes the input, through gunicorn.util.write_error; no setting or hook reaches that answer. The
        # contract says every error is JSON. tests/test_server.py::test_the_one_patch_still_reaches_gunicorn
        # fails if an upgrade renames or bypasses it.
        util.write_error = write_json_error
        super().init_process()

    def init_signals(self) -> None:
        """gunicorn's handlers, then the stop signals that came during the boot, delivered to them."""
        super().init_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self.connections.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self.connections.discard(client)

    def handle_request(self, listener_name: Any, req: Request, sock: Any, addr: Any) -> bool:
        self.requests.add(req)
        try:
            return bool(super().handle_request(listener_name, req, sock, addr))
        finally:
            self.requests.discard(req)

    # The stubs say None; gunicorn enters what it returns as a context manager.
    def timeout_ctx(self) -> _WaitForRequest:  # type: ignore[override]
        return _WaitForRequest(self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM: GET /readyz answers 503 at once; the worker goes on listening and serving as usual for
        STOP_DELAY, time for a load balancer that checks /readyz to stop sending it requests, then begins
        gunicorn's graceful stop, with a drain. The master has closed its own copy of the listening sockets,
        but the port stays open as long as a worker holds it: nothing waiting in its queue is reset."""
        if self.announced:
            return
        self.announced = True
        begin_stop = getattr(getattr(self, "wsgi", None), "begin_stop", None)
        if callable(begin_stop):  # app.TokenSwap's: the app says it is stopping
            begin_stop()
        if self.stop_delay > 0:
            self.log.info("Stopping in %s s (STOP_DELAY): serving meanwhile, GET /readyz answering 503",
                          self.stop_delay)
            # From a signal handler, which must not block: a greenlet of its own.
            gevent.spawn_later(self.stop_delay, self.stop_now, sig, frame)
        else:
            self.stop_now(sig, frame)

    def stop_now(self, sig: int, frame: FrameType | None) -> None:
        """gunicorn's graceful stop, with a drain."""
        super().handle_exit(sig, frame)
        self.stop()

    def notify(self) -> None:
        """The heartbeat, once a second. gunicorn's gevent worker exits at once when its master is gone
        (killed), cutting off the requests it holds: this one stops as on SIGTERM instead.
        Called once the worker is no longer alive, gunicorn has closed its listening sockets (its run loop
        closes them, then waits for the connections, calling this once a second). A worker gunicorn retires
        itself, with no signal (after --max-requests, on a reload), begins the same stop here."""
        if not self.alive:
            self.listening = False
            self.stop()
        if self.ppid != os.getppid():
            if not self.stopping:
                self.log.info("Master gone (was pid %s): stopping, requests in progress finish", self.ppid)
                self.alive = False
                self.stop()
            BaseWorker.notify(self)
        else:
            super().notify()

    def stop(self) -> None:
        """Begin the stop: answers from now on close their connection; idle ones close after the drain."""
        if self.stopping:
            return
        self.stopping = True
        for req in self.requests:
            req.force_close()  # gunicorn marks the requests that begin from now on itself
        # Called from a signal handler, which must not block: the drain is a greenlet of its own.
        gevent.spawn(self.drain)

    def drain(self) -> None:
        """Wait DRAIN_SECONDS, then close the idle connections. Less once no connection is open and none
        can be accepted any more: until gunicorn has closed its listening sockets, a connection accepted
        now must get its request answered, not closed as idle (a load balancer sends one at once)."""
        self.log.info("Stopping with %d connection(s) open: answering them with Connection: close for %s s",
                      len(self.connections), DRAIN_SECONDS)
        with gevent.Timeout(DRAIN_SECONDS, False):  # type: ignore[arg-type]  # as in _WaitForRequest
            while self.connections or self.listening:
                gevent.sleep(0.05)
        self.close_waiting()

    def close_waiting(self) -> None:
        """End the wait of each connection that waits for a request; the others finish their request,
        whose answer closes its connection (`Connection: close`)."""
        self.drained = True
        waiting = list(self.waiting)
        self.log.info("Drained: closing %d idle connection(s) (keep-alive connection or not yet used); "
                      "%d finish their request first", len(waiting), len(self.requests))
        for waiter in waiting:
            # Thrown from the hub's next turn, and only if that connection is still waiting: by then a
            # request's headers may have arrived on it, and that request must run to its end.
            gevent.get_hub().loop.run_callback(self.end_wait, waiter)

    def end_wait(self, waiter: greenlet) -> None:
        """Run by the hub: end this greenlet's wait for a request, if it still waits."""
        if waiter in self.waiting:
            waiter.throw(_Stopping)


class _WaitForRequest:
    """A connection's wait for a request's headers (GeventWorker.timeout_ctx's place): at most
    `keepalive`, then a quiet end; cut short when the worker stops."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # False: the timeout ends the block quietly (gevent's documented form; its stubs omit it).
        self.timeout = gevent.Timeout(worker.cfg.keepalive, False)  # type: ignore[arg-type]

    def __enter__(self) -> None:
        waiter = gevent.getcurrent()
        self.worker.waiting.add(waiter)
        self.timeout.start()
        if self.worker.drained:
            # After the drain, no connection waits for another request.
            gevent.get_hub().loop.run_callback(self.worker.end_wait, waiter)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: Any) -> bool:
        self.worker.waiting.discard(gevent.getcurrent())
        self.timeout.close()
        # Keep-alive time run out, or the worker stopping: the connection ends, nothing logged.
        return value is self.timeout or kind is _Stopping


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's answer to a request it refuses itself, as JSON (replaces gunicorn.util.write_error)."""
    body = json.dumps({
        "error": "invalid_request" if status_int < 500 else "server_error",
        "error_description": reason,
    }, separators=(",", ":"))
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nCache-Control: no-store\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, (head + body).encode("latin-1"))


# Most connections one gunicorn worker serves at once, however many open files it may have: each
# idle one costs its worker memory (bench/README.md, "Connection floods").
MAX_CONNECTIONS_PER_WORKER = 10_000
# Open files a worker needs besides its connections: listening socket, log, pipes, Redis, its hub.
OTHER_OPEN_FILES = 100


def connections_per_worker() -> int:
    """How many connections one worker serves at once (gunicorn's worker_connections, and the size
    of the worker's pool of connections to Spotify): two open files each, the client's and its
    own to Spotify, within this process's open-file limit; at most MAX_CONNECTIONS_PER_WORKER."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS_PER_WORKER
    return max(1, min(MAX_CONNECTIONS_PER_WORKER, (soft - OTHER_OPEN_FILES) // 2))


# -- the start (gunicorn.conf.py, in the master, before it binds or forks) --------------------------------


def start_config(environ: MutableMapping[str, str] | None = None) -> Config:
    """The configuration the server starts with, from `environ` (the process's) and .env; a bad one ends
    the process with exit status 1 and every problem named, before a port is bound or a worker forked.

    One configuration file for every way of starting: `flask run` reads .env (found from the working
    directory up, by python-dotenv), so this does too. A variable already set in the environment, by the
    platform or the shell, wins over the file; set but empty counts as set, as it does for `flask run`.
    The workers inherit what the file adds.
    """
    env = os.environ if environ is None else environ
    found = find_dotenv(usecwd=True)
    if found:
        for name, value in dotenv_values(found).items():
            if name not in env and value is not None:
                env[name] = value
    try:
        config = load_config(env)
    except ConfigError as err:
        _stop(f"{err}", env)
    return config


def bind_address(environ: Mapping[str, str] | None = None) -> str:
    """Where gunicorn listens: every interface, on PORT (default 8000; empty counts as unset)."""
    env = os.environ if environ is None else environ
    return f"0.0.0.0:{env.get('PORT', '').strip() or '8000'}"


def worker_count(environ: Mapping[str, str] | None = None) -> int:
    """WEB_CONCURRENCY worker processes (default 2), or the start ends naming it.

    One process per core. A process's CPU, not waiting, is the limit, so a worker beyond the cores adds
    only memory (measured in bench/README.md). Platforms size WEB_CONCURRENCY to the instance.
    """
    env = os.environ if environ is None else environ
    try:
        workers = int(env.get("WEB_CONCURRENCY", "").strip() or "2")
        if workers < 1:
            raise ValueError
    except ValueError:
        _stop(f"WEB_CONCURRENCY={env['WEB_CONCURRENCY']!r} must be a whole number of worker processes, "
              "1 or more (default 2)", env)
    return workers


def stop_seconds(config: Config) -> int:
    """gunicorn's graceful_timeout, and the grace period a platform must give: STOP_DELAY (5 s by default),
    during which the instance still accepts requests, then the longest of those requests (body, queue wait
    and Spotify call; 30 s with the default SPOTIFY_TIMEOUT of 10), plus STOP_MARGIN, whole seconds, so
    that no admitted request is killed by a stop (docs/operations.md, "Stopping")."""
    return math.ceil(config.stop_delay + longest_request_seconds(config) + STOP_MARGIN)


def _stop(problem: str, env: Mapping[str, str]) -> NoReturn:
    message = f"{problem}\nThe service did not start."
    if env.get("LOG_FORMAT", "").strip().lower() == "json":  # one JSON line, like every other line
        record = logging.LogRecord("gunicorn.error", logging.ERROR, __file__, 0, message, None, None)
        message = logs.JsonFormatter().format(record)
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


def worker_connections() -> int:
    """gunicorn's worker_connections, in the master: the soft open-file limit raised to the hard one
    first (the workers inherit it), then as many connections as it allows (connections_per_worker)."""
    raise_open_file_limit()
    return connections_per_worker()


def raise_open_file_limit() -> None:
    """Raise this process's soft open-file limit to the hard one (what an unprivileged process may):
    every connection a worker holds is an open file. Called in the master, before it forks."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # an unlimited hard limit the kernel caps lower (macOS)
            pass


def when_ready(arbiter: Arbiter) -> None:
    """gunicorn's when_ready hook, in the master once listening: what one instance holds, and the
    limits that memory storage counts per worker (docs/deploy-vm.md)."""
    cfg, log = arbiter.cfg, arbiter.log
    assert log is not None, "gunicorn sets up its logger before it is ready"
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log.info("Open-file limit %s: each of the %s workers serves up to %s connections at once",
             open_files, cfg.workers, cfg.worker_connections)
    config = load_config()
    warning = ratelimit.memory_storage_warning(config, cfg.workers)
    if warning:
        log.warning("%s", warning)
    if config.unsealed_until is not None:
        # Said at every start while it lasts: raw tokens in transit are Spotify's own (docs/security.md).
        [unsealed] = [line for line in token_settings(config, time.time()) if "UNSEALED_TOKENS_UNTIL" in line]
        log.warning("%s", unsealed[0].upper() + unsealed[1:])
    level, message = revocations.start_message(
        config, getattr(arbiter, "tokenswap_revocations_dir", None), cfg.workers
    )
    log.log(level, "%s", message)


def on_starting(arbiter: Arbiter) -> None:
    """gunicorn's on_starting hook, in the master before any worker: the directories the workers share, for
    sign-outs (with memory:// storage) and for the metrics."""
    config = load_config()
    arbiter.tokenswap_revocations_dir = revocations.prepare_directory(config)  # type: ignore[attr-defined]  # our own attribute on gunicorn's Arbiter
    if config.metrics_token:
        arbiter.tokenswap_metrics_dir = metrics.prepare_directory()  # type: ignore[attr-defined]  # our own attribute on gunicorn's Arbiter


def child_exit(arbiter: Arbiter, worker: Any) -> None:
    """gunicorn's child_exit hook: a dead worker's per-worker gauges are dropped."""
    if load_config().metrics_token:
        metrics.mark_dead(worker.pid)


def post_worker_init(worker: BaseWorker) -> None:
    """gunicorn's post_worker_init hook, set under LOG_FORMAT=json: in each worker, what gevent and Python
    print to stderr (a failed greenlet's report, a warning) is logged as JSON lines too."""
    logs.print_as_json()


def on_exit(arbiter: Arbiter) -> None:
    """gunicorn's on_exit hook: the directories the server made removed."""
    metrics.remove_directory(getattr(arbiter, "tokenswap_metrics_dir", None))
    revocations.remove_directory(getattr(arbiter, "tokenswap_revocations_dir", None))
