"""Log lines: request ids (X-Request-ID in, out, and on every line of a request), LOG_FORMAT=json, what a
line may show of a URL setting (redacted_url), and the throttle of lines said at most once a minute.

gunicorn takes the JSON formatter through its public `logconfig_dict` setting (json_logconfig());
the app wires the request id with init_app(). What is printed rather than logged (gevent's reports of a
failed greenlet, Python's warnings) is routed into the same JSON lines by print_as_json().
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO, cast

from flask import Flask, Response, g, has_request_context, request
from flask.logging import default_handler

HEADER = "X-Request-ID"
# Where the request id is left in the WSGI environ, for gunicorn's access line (atom
# %({tokenswap.request_id}e)s).
ENVIRON_KEY = "tokenswap.request_id"
# An incoming id is kept if printable ASCII without spaces, at most 200 characters (Heroku's router
# sends a UUID); anything else is replaced by a fresh one.
_VALID_ID = re.compile(r"[\x21-\x7e]{1,200}")
# gunicorn's access-line atoms, by the names JSON lines give them (the same atoms as the text line).
ACCESS_ATOMS = {"client": "h", "method": "m", "path": "U", "status": "s", "bytes": "B", "ms": "M"}
_ACCESS_ID_ATOM = f"{{{ENVIRON_KEY}}}e"
# Text lines of the app's own logger: Flask's format, and the request id.
TEXT_FORMAT = "[%(asctime)s] %(levelname)s in %(module)s: %(message)s (request %(request_id)s)"


class Throttle:
    """Whether a line may be logged now: at most once per `every` seconds for each cause, in this process.

    Lines that would repeat for every request ("Spotify could not be reached", "Spotify refuses the
    credentials") say so once a minute per worker and cause; the metrics count every occurrence.
    """

    def __init__(self, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._logged_at: dict[Hashable, float] = {}  # causes are the code's own few, never a client's

    def allows(self, cause: Hashable = None) -> bool:
        """True, and counted as logged, if `cause` was not logged within the last `every` seconds."""
        now = self._clock()
        with self._lock:
            last = self._logged_at.get(cause)
            if last is not None and now - last < self.every:
                return False
            self._logged_at[cause] = now
            return True


def redacted_url(url: str) -> str:
    """The URL as it may be shown (page, `check`, logs): no user name, password, query or fragment.

    Everything up to the last "@" is dropped, wherever it is: a password holding an unencoded "/",
    "?" or "#" moves the "@" out of what a URL parser calls the host, and must not show either.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "(not a URL)"
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{re.split(r'[?#]', rest, maxsplit=1)[0]}"


# The longest address a client field can hold (an IPv6 address with an IPv4 tail and a zone).
CLIENT_FIELD_LENGTH = 45


def client_field(value: str) -> str:
    """A client address as a log line shows it (the access line's client; the rate limits' warning about an
    X-Forwarded-For entry that is no address): an address as it is; anything else (an X-Forwarded-For entry
    is the client's to fill) escaped into one field of printable ASCII with no space or quote, cut at
    CLIENT_FIELD_LENGTH characters."""
    if len(value) <= CLIENT_FIELD_LENGTH and value.isascii() and value.isprintable() \
            and " " not in value and '"' not in value:
        return value
    cut = value[:CLIENT_FIELD_LENGTH]
    escaped = cut.encode("unicode_escape").decode("ascii").replace(" ", "\\x20").replace('"', "\\x22")
    return escaped + ("..." if len(value) > CLIENT_FIELD_LENGTH else "")


def request_id() -> str:
    """This request's id: the client's X-Request-ID if it is acceptable, else a fresh one."""
    rid: str | None = g.get("request_id")
    if rid is None:
        given = request.headers.get(HEADER, "")
        rid = given if _VALID_ID.fullmatch(given) else uuid.uuid4().hex
        g.request_id = rid
        request.environ[ENVIRON_KEY] = rid
    return rid


class RequestIdFilter(logging.Filter):
    """Gives each record `request_id`: the current request's, or "-" outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id() if has_request_context() else "-"
        return True


# One of each per process: the app's logger and Flask's default handler are the process's (every app
# named "app" shares them), and adding the same filter again is a no-op, so creating apps adds nothing.
_REQUEST_IDS = RequestIdFilter()
_TEXT_FORMATTER = logging.Formatter(TEXT_FORMAT)


def init_app(app: Flask) -> None:
    """Echo each request's id in its answer, and put it on the app logger's lines."""

    @app.before_request
    def take_request_id() -> None:
        request_id()

    @app.after_request
    def echo_request_id(response: Response) -> Response:
        response.headers[HEADER] = request_id()
        return response

    app.logger.addFilter(_REQUEST_IDS)
    # Flask's own handler (text mode; under LOG_FORMAT=json the root's JSON handler serves instead).
    default_handler.setFormatter(_TEXT_FORMATTER)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message; for access lines the access atoms too."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        args = record.args
        if record.name == "gunicorn.access" and isinstance(args, Mapping):
            for name, atom in ACCESS_ATOMS.items():
                line[name] = args[atom]
            rid = args[_ACCESS_ID_ATOM]
            if rid not in (None, "-"):
                line["request_id"] = rid
        request_id = getattr(record, "request_id", None)
        if request_id not in (None, "-"):
            line["request_id"] = request_id
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["traceback"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=True)


def json_logconfig() -> dict[str, Any]:
    """gunicorn's `logconfig_dict` for LOG_FORMAT=json: gunicorn's own lines to stderr, access lines
    to stdout, the application's (through the root logger) to stderr, as in text mode."""
    formatter = {"()": f"{__name__}.JsonFormatter"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        # Warnings and errors of the application, as Python logs them by default.
        "root": {"level": "WARNING", "handlers": ["error_console"]},
        "loggers": {
            # No level here: gunicorn's own loglevel setting stays in charge of its error log.
            "gunicorn.error": {"handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
            "error_console": {
                "class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr",
            },
        },
        "formatters": {"json": formatter, "generic": formatter},
    }


# How gevent's hub ends the report of a failed greenlet: its time (gevent's gmctime(), RFC 3339), then
# "<greenlet> failed with <exception>" when it knows the greenlet.
_GEVENT_REPORT_END = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ?(?P<context>.*)")
# A report longer than this goes out as it is, rather than wait for an end in a format gevent changed.
_MOST_LINES = 200


class ReportLines(io.TextIOBase):
    """A text stream for what gevent's hub prints (its documented `exception_stream`): each report, the
    traceback and the line that ends it, becomes one log record at ERROR, a JSON line under LOG_FORMAT=json."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.partial = ""
        self.lines: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *complete, self.partial = (self.partial + text).split("\n")
        for line in complete:
            end = _GEVENT_REPORT_END.fullmatch(line)
            if end:
                self.emit(end.group("context"))
            elif line or self.lines:
                self.lines.append(line)
                if len(self.lines) >= _MOST_LINES:
                    self.emit("")
        return len(text)

    def emit(self, context: str) -> None:
        traceback = "\n".join(self.lines).strip("\n")
        self.lines = []
        if not (traceback or context):
            return
        last = traceback.rsplit("\n", 1)[-1]
        record = self.logger.makeRecord(self.logger.name, logging.ERROR, "", 0, context or last, (), None)
        record.exc_text = traceback or None
        self.logger.handle(record)


def print_as_json() -> None:
    """Under LOG_FORMAT=json, in each worker: what would be printed to stderr as text goes through logging
    instead, so it comes out as JSON lines too: gevent's reports of a failed greenlet (logger "gevent")
    and Python's warnings (logger "py.warnings", logging.captureWarnings)."""
    import gevent  # here: only the gunicorn worker has a gevent hub

    # gevent's stubs say TextIO; the hub only writes text to it, which a TextIOBase does.
    gevent.get_hub().exception_stream = cast(TextIO, ReportLines(logging.getLogger("gevent")))
    logging.captureWarnings(True)
