"""Request ids (X-Request-ID) and LOG_FORMAT=json: unit tests, then the real server's output."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator

import pytest
import requests

import logs
from devtools.process import CLOSE, Server, free_port, json_answer
from tests.helpers import server_env

FRESH = re.compile(r"[0-9a-f]{32}")
CODE = "AQC-secret-code-never-logged"
TOKEN_IN_QUERY = "token-in-the-query-never-logged"


# -- lines said at most once a minute ------------------------------------------------------------


def test_a_throttle_allows_each_cause_once_per_period():
    now = [100.0]
    throttle = logs.Throttle(60.0, clock=lambda: now[0])
    assert throttle.allows("a") and not throttle.allows("a")
    assert throttle.allows("b"), "each cause has its own period"
    now[0] += 59.9
    assert not throttle.allows("a")
    now[0] += 0.1
    assert throttle.allows("a") and not throttle.allows("a")
    assert throttle.allows("b"), "b was logged at 100.0: its minute is over too"
    now[0] += 60
    assert throttle.allows(None) and not throttle.allows(None), "a single line needs no cause"


# -- request ids in the app ----------------------------------------------------------------------


@pytest.mark.parametrize("given", ["heroku-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718", "x", "!" * 200])
def test_an_acceptable_request_id_is_echoed(client, given):
    assert client.get("/health", headers={"X-Request-ID": given}).headers["X-Request-ID"] == given


@pytest.mark.parametrize("given", [None, "", "a" * 201, "has space", "tab\there", "caf\u00e9"])
def test_any_other_gets_a_fresh_one(client, given):
    headers = {"X-Request-ID": given} if given is not None else {}
    first = client.get("/health", headers=headers).headers["X-Request-ID"]
    second = client.get("/health", headers=headers).headers["X-Request-ID"]
    assert FRESH.fullmatch(first) and FRESH.fullmatch(second) and first != second


def test_errors_carry_it_too(client):
    response = client.post("/nowhere", headers={"X-Request-ID": "req-404"})
    assert response.status_code == 404 and response.headers["X-Request-ID"] == "req-404"


def test_the_app_logs_it_on_every_line_of_the_request(app, caplog):
    caplog.set_level(logging.WARNING, logger=app.logger.name)
    # conftest's Spotify (127.0.0.1:9) refuses: the app logs why, within the request.
    response = app.test_client().post("/swap", data={"code": CODE}, headers={"X-Request-ID": "req-warn"})
    assert response.status_code == 503
    [record] = [r for r in caplog.records if r.name == app.logger.name]
    assert record.request_id == "req-warn"
    assert logging.Formatter(logs.TEXT_FORMAT).format(record).endswith("(request req-warn)")



def test_creating_apps_adds_nothing_to_the_processs_loggers():
    """The app logger and Flask's handler are the process's: a second create_app adds no second filter."""
    from tests.helpers import BASE_CONFIG, app_for

    first, second = app_for(BASE_CONFIG), app_for(BASE_CONFIG)
    assert first.logger is second.logger
    assert [type(f) for f in second.logger.filters].count(logs.RequestIdFilter) == 1

# -- the JSON formatter -----------------------------------------------------------------------------


def test_an_access_record_becomes_its_atoms():
    atoms = {"h": "203.0.113.9", "m": "POST", "U": "/refresh", "s": "200", "B": 187, "M": 94,
             "{tokenswap.request_id}e": "req-7"}

    class Atoms(dict):
        def __getitem__(self, name):
            return super().get(name, "-")

    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1,
                               '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms %({tokenswap.request_id}e)s', (), None)
    record.args = Atoms(atoms)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == '203.0.113.9 "POST /refresh" 200 187 94ms req-7'
    assert {k: line[k] for k in ("client", "method", "path", "status", "bytes", "ms", "request_id", "level")} == {
        "client": "203.0.113.9", "method": "POST", "path": "/refresh", "status": "200", "bytes": 187, "ms": 94,
        "request_id": "req-7", "level": "INFO",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])


def test_a_traceback_stays_in_its_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("app", logging.ERROR, __file__, 1, "Unhandled error", (), sys.exc_info())
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["traceback"]


@pytest.fixture
def json_records() -> Iterator[list[str]]:
    """The JSON lines the "gevent" logger would write, as under LOG_FORMAT=json."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("gevent")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_a_failed_greenlets_report_from_gevents_hub_is_one_json_line(json_records):
    """gevent's hub prints a failed greenlet's traceback to its exception_stream, not through logging."""
    import gevent

    hub = gevent.get_hub()
    previous = hub.exception_stream
    hub.exception_stream = logs.ReportLines(logging.getLogger("gevent"))
    try:
        def fails() -> None:
            raise ValueError("boom")

        def fails_twice() -> None:
            try:
                raise ZeroDivisionError("first")
            except ZeroDivisionError as err:
                raise KeyError("second") from err

        for function in (fails, fails_twice):
            gevent.spawn(function).join()
    finally:
        hub.exception_stream = previous
    assert len(json_records) == 2, json_records
    first, chained = (json.loads(line) for line in json_records)
    assert first["level"] == chained["level"] == "ERROR"
    assert first["logger"] == "gevent"
    assert re.fullmatch(r"<Greenlet at 0x[0-9a-f]+: fails> failed with ValueError", first["message"]), first
    assert first["traceback"].startswith("Traceback (most recent call last):")
    assert first["traceback"].endswith("ValueError: boom")
    # A chained exception's report stays whole: both tracebacks, in one line.
    assert "ZeroDivisionError: first" in chained["traceback"] and chained["traceback"].endswith("KeyError: 'second'")
    assert "fails_twice> failed with KeyError" in chained["message"]


def test_a_report_without_its_end_goes_out_once_it_is_long_enough(json_records):
    stream = logs.ReportLines(logging.getLogger("gevent"))
    stream.write("a line gevent printed, and no end\n" * 199)
    assert json_records == []
    stream.write("one more\n")
    [line] = (json.loads(record) for record in json_records)
    assert line["message"] == "one more" and line["traceback"].count("\n") == 199


def test_print_as_json_routes_gevents_reports_and_pythons_warnings_into_logging(json_records, caplog):
    import warnings

    import gevent

    hub = gevent.get_hub()
    previous = hub.exception_stream
    try:
        logs.print_as_json()
        assert isinstance(hub.exception_stream, logs.ReportLines)
        with caplog.at_level(logging.WARNING, logger="py.warnings"), warnings.catch_warnings():
            warnings.simplefilter("always")  # pytest's settings make a warning an error
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
    finally:
        hub.exception_stream = previous
        logging.captureWarnings(False)
    assert [record.name for record in caplog.records] == ["py.warnings"]
    assert "a library's warning" in caplog.records[0].getMessage()


# -- the real server -----------------------------------------------------------------------------


def actions(server: Server) -> None:
    """What both log formats are compared on: a swap (Spotify refuses to connect), a request id, a
    query string, a health check, and a request line gunicorn itself refuses."""
    answer = requests.post(server.url + f"/swap?refresh_token={TOKEN_IN_QUERY}", data={"code": CODE},
                           headers={"X-Request-ID": "req-e2e-1", **CLOSE}, timeout=10)
    json_answer(answer, 503)
    assert answer.headers["X-Request-ID"] == "req-e2e-1"
    assert requests.get(server.url + "/health", headers=CLOSE, timeout=5).status_code == 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"POST /swap?code={CODE} HTTP/1.1 extra\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")


def run(log_format: str) -> list[str]:
    env = server_env(f"http://127.0.0.1:{free_port()}", LOG_FORMAT=log_format, WEB_CONCURRENCY="1")
    server = Server(env)
    with server:
        since = len(server.output())
        actions(server)
        # The swap's warning and access line, and the health check's access line, in either format.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            written = server.output()[since:]
            if written.count("req-e2e-1") >= 2 and "/health" in written:
                break
            time.sleep(0.02)
        server.stop()  # its shutdown lines too
        output = server.output()
    assert CODE not in output and TOKEN_IN_QUERY not in output
    return output.splitlines()


@pytest.fixture(scope="module")
def json_lines() -> list[dict]:
    return [json.loads(line) for line in run("json")]  # every line parses


@pytest.mark.e2e  # json_lines starts the real server
def test_every_json_line_has_time_level_and_message(json_lines):
    for line in json_lines:
        assert {"time", "level", "message"} <= set(line), line
    messages = [line["message"] for line in json_lines]
    assert any(m.startswith("Starting gunicorn") for m in messages)  # gunicorn's own
    assert any(m.startswith("Shutting down") for m in messages)


@pytest.mark.e2e  # json_lines starts the real server
def test_json_access_lines_have_the_atoms_and_the_request_id(json_lines):
    access = [line for line in json_lines if line.get("logger") == "gunicorn.access"]
    swap = next(line for line in access if line["path"] == "/swap" and line["status"] == "503")
    assert swap["method"] == "POST" and swap["client"] == "127.0.0.1" and swap["request_id"] == "req-e2e-1"
    assert int(swap["bytes"]) > 0 and int(swap["ms"]) >= 0
    health = next(line for line in access if line["path"] == "/health")
    assert FRESH.fullmatch(health["request_id"])


@pytest.mark.e2e  # json_lines starts the real server
def test_the_apps_warning_is_json_with_the_request_id(json_lines):
    [warning] = [line for line in json_lines if "could not be reached" in line["message"]]
    assert warning["level"] == "WARNING" and warning["request_id"] == "req-e2e-1"
    assert ": connection refused;" in warning["message"]


@pytest.mark.e2e  # json_lines starts the real server
def test_gunicorns_refusal_is_json(json_lines):
    [refused] = [line for line in json_lines if "Invalid request" in line["message"]]
    assert refused["level"] == "WARNING" and refused["message"].startswith("Invalid request from ip=127.0.0.1")


@pytest.mark.e2e
def test_json_logs_nothing_more_than_text(json_lines):
    text = run("text")
    # Line for line, but for /health's access lines: the start-up wait asks again when an answer takes over a second,
    # so a loaded machine logs more of them.
    assert len([line for line in json_lines if line.get("path") != "/health"]) == \
        len([line for line in text if '"GET /health"' not in line]), (json_lines, text)
    # The text access line ends with the request id too.
    swap = next(line for line in text if '"POST /swap" 503' in line)
    assert swap.endswith(" req-e2e-1")
    warning = next(line for line in text if "could not be reached" in line)
    assert warning.endswith("(request req-e2e-1)")
