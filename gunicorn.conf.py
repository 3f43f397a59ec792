"""gunicorn settings for the token swap service (read by the Procfile's and the Dockerfile's command)."""

import os
import sys

from dotenv import find_dotenv, load_dotenv

from config import ConfigError, load_config

# One configuration file for every way of starting: `flask run` reads .env (found from the working
# directory up, by python-dotenv), so this does too, before the configuration is checked. A variable
# already set in the environment, by the platform or the shell, wins over the file; set but empty
# counts as set, as it does for `flask run`.
_DOTENV = find_dotenv(usecwd=True)
if _DOTENV:
    load_dotenv(_DOTENV, override=False)

# Refuse to start on a bad configuration, before binding a port or forking a worker.
try:
    load_config()
except ConfigError as err:
    print(f"{err}\nThe service did not start.", file=sys.stderr, flush=True)
    sys.exit(1)

# Empty counts as unset, as for every variable the application reads.
bind = f"0.0.0.0:{os.environ.get('PORT', '').strip() or '8000'}"
# One process per core. A process's CPU, not waiting, is the limit, so a worker beyond the cores
# adds only memory (measured in bench/README.md). Platforms size WEB_CONCURRENCY to the instance.
try:
    workers = int(os.environ.get("WEB_CONCURRENCY", "").strip() or "2")
    if workers < 1:
        raise ValueError
except ValueError:
    print(f"WEB_CONCURRENCY={os.environ['WEB_CONCURRENCY']!r} must be a whole number of worker "
          "processes, 1 or more (default 2)\nThe service did not start.", file=sys.stderr, flush=True)
    sys.exit(1)


# -- Connection floods: as many open files as the system allows, and a word at start on what ------
# -- one instance holds and on counts kept per worker (docs/deploy-vm.md). -------------------------
import resource  # noqa: E402

from config import connections_per_worker  # noqa: E402

# Every connection a worker holds is an open file: raise the soft limit to the hard one (what an
# unprivileged process may), in the master, before the workers inherit it.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != _hard:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
    except (ValueError, OSError):  # an unlimited hard limit the kernel caps lower (macOS)
        pass


def when_ready(server) -> None:  # type: ignore[no-untyped-def]
    """Once listening, in the master: what one instance holds, and limits counted per worker."""
    cfg, log = server.cfg, server.log
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log.info("Open-file limit %s: each of the %s workers serves up to %s connections at once",
             open_files, cfg.workers, cfg.worker_connections)
    config = load_config()
    if cfg.workers > 1 and config.rate_limit_failures and config.rate_limit_storage_uri.startswith("memory://"):
        from limits import parse_many

        def budget(times: int) -> str:
            # Written out, not as the variable's own text: the logger cuts a value at ";" (a code
            # could follow one in a request line), and several windows are joined with ";".
            return ", ".join(
                f"{times * item.amount} per "
                + (item.GRANULARITY.name if item.multiples == 1 else f"{item.multiples} {item.GRANULARITY.name}s")
                for item in parse_many(config.rate_limit_failures)
            )

        log.warning("RATE_LIMIT_STORAGE_URI is memory://: each of the %s workers counts failures on its "
                    "own, so a client's failure budget is up to %s x RATE_LIMIT_FAILURES (%s) = %s on each "
                    "instance. Set RATE_LIMIT_STORAGE_URI to a Redis URL to count them once.",
                    cfg.workers, cfg.workers, budget(1), budget(cfg.workers))


# Each request spends almost all its time waiting on Spotify: gevent workers keep up to
# worker_connections of them waiting at once per process, at a few KB each, instead of a thread
# or process apiece. app.UPSTREAM_POOL_SIZE matches it, so each has a pooled upstream connection.
# gthread workers pay a thread per waiting request and serve fewer (bench/README.md).
worker_class = "gevent"
# A worker whose connections are all taken accepts no more: as many as the open-file limit allows
# (two files each, the client's and its own to Spotify), so that a flood of idle ones leaves room.
worker_connections = connections_per_worker()

# SPOTIFY_TIMEOUT is at most 300 s, usually 10; a request never outlives graceful_timeout's wait.
timeout = 30
graceful_timeout = 30
# How long an idle connection is kept, and, the same timer in gunicorn, how long a client may take
# to send a request's headers. Longer than the idle timeout of the load balancers in front of the
# platforms this runs on (Heroku's router 90 s, AWS's 60 s), so they always close first and never
# send a request on a connection gunicorn is closing (docs/deploy-vm.md).
keepalive = 95

# gunicorn 27's control socket sits at one fixed path per user: two servers on one machine would
# fight over it, and a read-only container home cannot hold it. Nothing here uses it.
control_socket_disable = True

# One line per request: client, method, path (never the query string), status, bytes, milliseconds,
# to stdout. gunicorn's own messages and tracebacks go to stderr.
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'


# -- Logging: no code, token or forged line in gunicorn's own log lines ---------------------------
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import weakref  # noqa: E402

from gunicorn import glogging  # noqa: E402

# What follows a path in a request target may hold a code or a token: the query (a client that put
# its fields in the URL), a fragment, or path parameters. Redacted to the next space: gunicorn logs a
# refused request line with repr, so a quote may be part of it.
_AFTER_PATH = re.compile(r"[?#;]\S*")


def _redacted(value: object) -> object:
    return _AFTER_PATH.sub("...", value) if isinstance(value, str) else value


def _escaped(value: object) -> object:
    if isinstance(value, str) and not value.isprintable():
        # A percent-encoded newline in a path must not start a forged log line.
        return value.encode("unicode_escape").decode("ascii")
    return value


class _SafeAtoms(glogging.SafeAtoms):
    """gunicorn's atoms for the access line, each escaped as the line's format asks for it."""

    def __getitem__(self, name: str) -> object:
        return _escaped(super().__getitem__(name))


class Logger(glogging.Logger):
    """gunicorn's logger (the `logger_class` setting), with every logged value made safe."""

    atoms_wrapper_class = _SafeAtoms

    def atoms(self, resp, req, environ, request_time):  # type: ignore[no-untyped-def]
        if self.cfg.access_log_format == access_log_format:
            # The six atoms this service's line shows, computed as gunicorn computes them
            # (tests/test_descriptors.py compares them with gunicorn's own): the stock method also
            # copies every header and environ entry and formats a date, for each request.
            status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
            atoms = {
                "h": environ.get("REMOTE_ADDR", "-"),
                "m": environ.get("REQUEST_METHOD"),
                "U": environ.get("PATH_INFO"),
                "s": status,
                "B": getattr(resp, "sent", None),
                "M": request_time.seconds * 1000 + int(request_time.microseconds / 1000),
                # observe (issue 16): the request id (logs.ENVIRON_KEY), last on the line.
                "{tokenswap.request_id}e": environ.get("tokenswap.request_id", "-"),
            }
        else:
            atoms = super().atoms(resp, req, environ, request_time)
        for name in ("U", "r"):
            if name in atoms:
                atoms[name] = _redacted(atoms[name])
        return atoms

    def warning(self, msg, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # "Invalid request from ip=...: Invalid HTTP request line: 'POST /refresh?refresh_token=...'"
        super().warning(_redacted(msg), *map(_redacted, args), **kwargs)

    def exception(self, msg, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # "Error handling request POST /swap?code=..."
        super().exception(_redacted(msg), *map(_redacted, args), **kwargs)


logger_class = Logger


# -- A prompt stop: idle keep-alive connections are closed at once on SIGTERM ----------------------
# The gevent worker waits for every connection's greenlet before it exits, and one waiting for a
# next request on an idle keep-alive connection waits up to `keepalive`: graceful_timeout in all.
# Each connection that has answered a request is remembered; once the worker stops, the reading
# side of each is shut: an idle one ends at once, one still answering finishes its answer (its body
# was read before the app began) and then closes, as gunicorn closes every connection once stopping.
def post_request(worker, req, environ, resp) -> None:  # type: ignore[no-untyped-def]
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        worker.tokenswap_connections.add(sock)


def post_worker_init(worker) -> None:  # type: ignore[no-untyped-def]
    worker.tokenswap_connections = weakref.WeakSet()
    import gevent

    def close_idle_on_stop() -> None:
        while worker.alive:
            gevent.sleep(0.1)
        connections = list(worker.tokenswap_connections)
        worker.log.info("Stopping: closing %d keep-alive connection(s) once their answers are sent", len(connections))
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:  # already closed by the client
                pass

    gevent.spawn(close_idle_on_stop)


# -- The one patch of gunicorn's internals (pinned gunicorn==27.0.1) ------------------------------
# gunicorn answers a request it cannot parse (bad request line or header, URL or header too long)
# itself, with an HTML page that echoes the input; it has no setting or hook for that answer. The
# contract says every error is JSON, so each worker replaces gunicorn.util.write_error, the function
# that writes it. tests/test_e2e.py::test_requests_the_server_cannot_parse_get_json_errors fails if an
# upgrade renames or bypasses it.
from gunicorn import util  # noqa: E402


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:  # type: ignore[no-untyped-def]
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


def post_fork(server, worker) -> None:  # type: ignore[no-untyped-def]
    util.write_error = _write_json_error


# -- observe (issue 16): metrics shared by the workers, JSON log lines ----------------------------
# For the lead to port into server.py / the settings. With METRICS_TOKEN set, the workers write
# their counts to PROMETHEUS_MULTIPROC_DIR (made and emptied here before any worker starts, removed
# at exit if it was made here), and a dead worker's per-worker gauges are dropped. With
# LOG_FORMAT=json, gunicorn's own, access and application lines are each one JSON object.
import logs  # noqa: E402
import metrics  # noqa: E402

_observed = load_config()
# The access line ends with the request's id (X-Request-ID, logs.py), "-" for a request the app never saw.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms %({tokenswap.request_id}e)s'
if _observed.log_format == "json":
    logconfig_dict = logs.json_logconfig()


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    if _observed.metrics_token:
        server.tokenswap_metrics_dir = metrics.prepare_directory()


def child_exit(server, worker) -> None:  # type: ignore[no-untyped-def]
    if _observed.metrics_token:
        metrics.mark_dead(worker.pid)


def on_exit(server) -> None:  # type: ignore[no-untyped-def]
    metrics.remove_directory(getattr(server, "tokenswap_metrics_dir", None))
