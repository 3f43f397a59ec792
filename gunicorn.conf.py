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
# One process per core. A process's CPU, not waiting, is the limit: on 2 cores one worker
# tops out near 540 refreshes/s against a 100 ms upstream, two reach 770-940, three no more
# (bench/README.md). Platforms size WEB_CONCURRENCY to the instance.
try:
    workers = int(os.environ.get("WEB_CONCURRENCY", "").strip() or "2")
    if workers < 1:
        raise ValueError
except ValueError:
    print(f"WEB_CONCURRENCY={os.environ['WEB_CONCURRENCY']!r} must be a whole number of worker "
          "processes, 1 or more (default 2)\nThe service did not start.", file=sys.stderr, flush=True)
    sys.exit(1)

# Each request spends almost all its time waiting on Spotify: gevent workers keep up to
# worker_connections of them waiting at once per process, at a few KB each, instead of a thread
# or process apiece. app.UPSTREAM_POOL_SIZE matches it, so each has a pooled upstream connection.
# Measured against gthread (2 x 128 threads): 767 vs 443 refreshes/s at 256 clients, and
# 0.29 vs 0.49 ms of CPU per request for gunicorn's own part.
worker_class = "gevent"
worker_connections = 1000

# SPOTIFY_TIMEOUT is at most 300 s, usually 10; a request never outlives graceful_timeout's wait.
timeout = 30
graceful_timeout = 30
# Longer than the idle timeout of the common load balancers (60 s), so they close first.
keepalive = 75

# gunicorn 27's control socket sits at one fixed path per user: two servers on one machine would
# fight over it, and a read-only container home cannot hold it. Nothing here uses it.
control_socket_disable = True

# One line per request: client, method, path (never the query string), status, bytes, milliseconds,
# to stdout. gunicorn's own messages and tracebacks go to stderr.
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'


# -- gunicorn's defaults, adjusted (pinned gunicorn==27.0.1): two costs per request removed, -------
# -- no secret or forged line in its log, JSON for requests it cannot parse. -----------------------
import json  # noqa: E402
import re  # noqa: E402

from gunicorn import glogging, util  # noqa: E402
from gunicorn.http import wsgi  # noqa: E402

# A query string may hold a code or a token (a client that put its fields in the URL).
_QUERY = re.compile(r"\?\S*")  # to the next space: quotes may be part of the query


def _quoted(value: object) -> object:
    if not isinstance(value, str):
        return value
    if not value.isprintable():
        # A percent-encoded newline in a path must not start a forged log line.
        value = value.encode("unicode_escape").decode("ascii")
    return value.replace('"', '\\"')


def _redacted(value: object) -> object:
    return _QUERY.sub("?...", value) if isinstance(value, str) else value


class AccessLogger(glogging.Logger):
    """gunicorn's logger, writing the access line above without the general formatter.

    The stock access() copies every request header, response header and environ entry into a
    dict for each request; the line above needs six values. The output is the same, quoting
    included; any other access_log_format goes through the stock code.
    """

    def access(self, resp, req, environ, request_time) -> None:  # type: ignore[no-untyped-def]
        if self.cfg.access_log_format != access_log_format:
            return super().access(resp, req, environ, request_time)
        if not self.access_log_enabled:
            return None
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        self.access_log.info(
            '%s "%s %s" %s %s %sms',
            *map(_quoted, (environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD"),
                           environ.get("PATH_INFO"), status)),
            resp.sent,
            request_time.seconds * 1000 + int(request_time.microseconds / 1000),
        )
        return None


    def warning(self, msg, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # "Invalid request from ip=...: Invalid HTTP request line: 'POST /refresh?refresh_token=...'"
        super().warning(_redacted(msg), *map(_redacted, args), **kwargs)

    def exception(self, msg, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # "Error handling request POST /swap?code=..."
        super().exception(_redacted(msg), *map(_redacted, args), **kwargs)


logger_class = AccessLogger


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:  # type: ignore[no-untyped-def]
    """gunicorn's answer to a request it cannot parse, as JSON like every other error.

    The stock one is an HTML page that echoes the bad input; this one does not echo it.
    """
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


class _Held:
    """Stands in for the client socket while a response's first write is assembled."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.parts.append(data)


class OneWriteResponse(wsgi.Response):
    """gunicorn's response, sending the head with the first piece of body in one write.

    The stock one writes them separately: two packets and two wakeups of the client for every
    answer, and a wakeup is the dearest part of a send (on loopback, in a VM).
    """

    def write(self, arg: bytes) -> None:
        if self.headers_sent or self.chunked:
            return super().write(arg)
        client, self.sock = self.sock, _Held()
        try:
            super().write(arg)
        finally:
            held, self.sock = self.sock, client
        util.write(client, b"".join(held.parts))
        return None


def post_fork(server, worker) -> None:  # type: ignore[no-untyped-def]
    """In each worker: wsgi.create() builds every request's Response, and the worker writes
    answers to unparseable requests, by these module-level names."""
    wsgi.Response = OneWriteResponse
    util.write_error = _write_json_error
