"""The plain-VM recipe, tested: deploy/nginx.conf on loopback in front of the Procfile's server.

Only complete requests reach gunicorn, a flood of slow connections leaves others served within a
second, each client keeps its own failure budget (TRUSTED_PROXIES=1), nginx's own errors are JSON.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import ssl
import time

import pytest
import requests

from devtools.flood import SLOW_BODY, raise_open_file_limit, run_flood
from devtools.nginx import Nginx
from devtools.process import Server
from tests.helpers import server_env

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

BUDGET = 5  # RATE_LIMIT_FAILURES per day, for the budget test
PER_ADDRESS = 100  # deploy/nginx.conf's limit_conn per_client


@pytest.fixture(scope="module")
def proxied(fake_accounts):
    """gunicorn (one worker, so that one in-memory count is the whole budget) behind nginx."""
    env = server_env(fake_accounts.url, TRUSTED_PROXIES="1", RATE_LIMIT_FAILURES=f"{BUDGET}/day",
                     WEB_CONCURRENCY="1")
    with Server(env) as server, Nginx(server.port) as nginx:
        yield server, nginx


def request_from(source: str, port: int, method: str, path: str, body: str | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """One request on a new connection from a loopback address: (status, headers, JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request(method, path, body, {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def junk_refresh(source: str, port: int, **headers: str) -> tuple[int, str]:
    status, _, body = request_from(source, port, "POST", "/refresh", "refresh_token=not-a-sealed-token", headers)
    return status, body["error"]


@pytest.mark.window(20, "1/day")  # a real server counts on the wall clock: not across midnight UTC
def test_the_failure_budget_applies_to_each_client_behind_the_proxy(proxied):
    server, nginx = proxied
    since = len(server.output())
    assert [junk_refresh("127.0.0.4", nginx.plain_port) for _ in range(BUDGET)] == [(400, "invalid_grant")] * BUDGET
    assert junk_refresh("127.0.0.4", nginx.plain_port) == (429, "rate_limited")
    # Another client behind the same proxy still has its own budget.
    assert junk_refresh("127.0.0.5", nginx.plain_port) == (400, "invalid_grant")
    # A client cannot spend another's budget by naming it: nginx replaces X-Forwarded-For.
    for _ in range(BUDGET):
        junk_refresh("127.0.0.6", nginx.plain_port, **{"X-Forwarded-For": "127.0.0.7"})
    assert junk_refresh("127.0.0.6", nginx.plain_port) == (429, "rate_limited")
    assert junk_refresh("127.0.0.7", nginx.plain_port) == (400, "invalid_grant")

    lines = server.wait_for_access_log(2 * BUDGET + 4, since, path="/refresh")
    clients = {line["client"] for line in lines}
    assert clients == {"127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7"}


def test_tls_and_the_redirect_to_it_work_as_shipped(proxied):
    server, nginx = proxied
    response = requests.get(nginx.tls_url + "/health", verify=nginx.cert, timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response.headers["Strict-Transport-Security"] == "max-age=63072000"
    # To the configured name whatever Host says, and without the query (where a code could sit).
    redirect = requests.post(nginx.http_url + "/swap?code=secret-code", data={"code": "x"}, allow_redirects=False,
                             headers={"Host": "evil.example"}, timeout=10)
    assert (redirect.status_code, redirect.headers["Location"]) == (301, "https://tokens.example.com/swap")
    assert "evil" not in redirect.text and "secret-code" not in redirect.text


def test_the_page_behind_nginx_keeps_a_non_default_port_in_its_urls(proxied):
    server, nginx = proxied
    page = requests.get(nginx.tls_url + "/", verify=nginx.cert, timeout=10)
    assert page.status_code == 200 and f"{nginx.tls_url}/swap" in page.text


def test_nginx_answers_its_own_errors_in_json(proxied):
    server, nginx = proxied
    status, _, body = request_from("127.0.0.8", nginx.plain_port, "POST", "/swap", "code=" + "x" * 70_000)
    assert (status, body["error"]) == (413, "invalid_request")
    with socket.create_connection(("127.0.0.1", nginx.plain_port), timeout=10) as sock:
        sock.sendall(b"NOT A REQUEST\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"\r\nContent-Type: application/json\r\n" in head
    assert json.loads(body)["error"] == "invalid_request"


def raw_answer(port: int, request: bytes, tls: bool = False) -> tuple[int, dict[str, str], bytes]:
    """nginx's answer to bytes sent as they are, on a new connection: (status, headers, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    with sock:
        sock.sendall(request)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (n, b"b" * 7000) for n in range(6)) + b"\r\n",
     431),
    (b"TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
    (b"POST /swap HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, foo\r\nConnection: close\r\n\r\n", 501),
    (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"NOT A REQUEST\r\n\r\n", 400),
], ids=["one-large-header", "headers-over-32kb", "trace", "unknown-transfer-encoding", "http-version", "garbage"])
def test_every_error_nginx_answers_itself_is_json_on_each_port(proxied, request_bytes, status):
    server, nginx = proxied
    for port, tls in ((nginx.tls_port, True), (nginx.plain_port, False), (nginx.http_port, False)):
        answered, headers, body = raw_answer(port, request_bytes, tls)
        assert answered == status and headers["content-type"] == "application/json", (port, body)
        assert json.loads(body)["error"] == "invalid_request" and b"<html" not in body
        if tls:
            assert headers["strict-transport-security"] == "max-age=63072000"


def test_plain_http_on_the_tls_port_is_a_json_400(proxied):
    server, nginx = proxied
    status, headers, body = raw_answer(nginx.tls_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "invalid_request"


def test_one_address_keeps_at_most_100_requests_in_progress(proxied):
    """Slow bodies count against their address once their head is in; past the limit, 429 JSON at once."""
    server, nginx = proxied
    source, extra = "127.0.0.9", 10
    held = [socket.create_connection(("127.0.0.1", nginx.plain_port), timeout=10, source_address=(source, 0))
            for _ in range(PER_ADDRESS + extra)]
    try:
        with selectors.DefaultSelector() as selector:
            for sock in held:
                sock.sendall(SLOW_BODY)
                selector.register(sock, selectors.EVENT_READ)
            answers: dict[socket.socket, bytes] = {}
            deadline = time.monotonic() + 10
            while len(answers) < extra and time.monotonic() < deadline:
                for key, _ in selector.select(0.5):
                    selector.unregister(key.fileobj)
                    answers[key.fileobj] = key.fileobj.recv(65536)
        assert len(answers) == extra
        for answer in answers.values():
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: 1\r\n" in head + b"\r\n", answer
            assert json.loads(body)["error"] == "rate_limited"
        # With 100 still in progress, even a quick request from that address waits its turn; others do not.
        assert request_from(source, nginx.plain_port, "GET", "/health")[0] == 429
        assert request_from("127.0.0.2", nginx.plain_port, "GET", "/health")[0] == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while request_from(source, nginx.plain_port, "GET", "/health")[0] != 200:
        assert time.monotonic() < deadline, "the address stayed limited after its requests ended"
        time.sleep(0.05)


@pytest.mark.timeout(120)
@pytest.mark.long(16)
def test_a_flood_of_slow_connections_never_reaches_gunicorn_and_others_are_served_throughout():
    """3,000 idle, slow-header and slow-body connections from 20 addresses for 13 s, reopened as nginx
    closes them; /health and swaps from 127.0.0.2 through the proxy throughout, each answered within 3 s here, where
    other tests share the machine (bench/flood.py, run alone, holds it to 1 s)."""
    if raise_open_file_limit() < 8_000:
        pytest.fail("this test opens thousands of sockets: raise the hard open-file limit (ulimit -Hn)")
    result = run_flood(proxy=True, idle=1000, heads=1000, bodies=1000, sources=20, duration=13, within=3)
    print(result.summary())

    assert result.problems() == []
    assert result.reached_gunicorn == 0
    assert len(result.probes) >= 30
    # nginx closed idle connections and unfinished heads after client_header_timeout (10 s), and
    # they came back; the slow bodies, each under 100 per address, it kept reading.
    assert result.closed_by_server["idle"] >= 1000 and result.closed_by_server["head"] >= 1000
    assert "body" not in result.closed_by_server
    assert result.flood_open_min >= 2900
