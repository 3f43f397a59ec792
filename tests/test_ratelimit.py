"""Rate limits: failed requests per client address, the ceiling on calls to Spotify, shared counts in Redis."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
import responses
from flask.testing import FlaskClient

from crypto import TokenSealer
from devtools.fake_accounts import CLIENT_ID
from devtools.process import Server, free_port
from devtools.redis import RedisServer
from tests.helpers import BASE_CONFIG, SECRET, TOKEN_URL, Clock, app_for, server_env

# The README's promise: a burst of junk overshoots the failure budget by at most this many calls.
SUCCESS_ROOM = 10

TOKENS = {"access_token": "BQ-access", "token_type": "Bearer", "expires_in": 3600, "refresh_token": "AQ-raw"}
INVALID_GRANT = {"error": "invalid_grant", "error_description": "Invalid authorization code"}
JSON = "application/json"
# The access log line of the end-to-end tests: worker pid, path, status.
PID_LOG = "--access-logformat '%(p)s %(U)s %(s)s'"
PID_LINE = re.compile(r"^<(\d+)> (/\S*) (\d{3})$", re.MULTILINE)


def limited_client(**settings: str) -> FlaskClient:
    return app_for({**BASE_CONFIG, **settings}, Clock()).test_client()


def spotify_ok(mock: responses.RequestsMock) -> None:
    mock.post(TOKEN_URL, json=TOKENS)


def assert_rate_limited(response) -> int:
    """The limiter's answer; returns its Retry-After in seconds."""
    assert response.status_code == 429, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == JSON
    body = response.get_json()
    assert body["error"] == "rate_limited"
    assert body["error_description"]
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    return int(retry_after)


def fail_once(client: FlaskClient, kind: str, **kwargs):
    """One request that the service refuses as the client's mistake."""
    if kind == "invalid_request":
        return client.post("/swap", data={}, **kwargs)
    if kind == "invalid_grant":
        return client.post("/refresh", data={"refresh_token": "not-a-sealed-token"}, **kwargs)
    if kind == "too_large":
        return client.post("/swap", data={"code": "x" * 70_000}, **kwargs)
    if kind == "not_found":
        return client.post("/no/such/path", **kwargs)
    if kind == "wrong_method":
        return client.put("/api/token", **kwargs)
    raise ValueError(kind)


FAILURES = {
    "invalid_request": 400,
    "invalid_grant": 400,
    "too_large": 413,
    "not_found": 404,
    "wrong_method": 405,
}


# -- failures per address ----------------------------------------------------------------------


def test_successful_requests_never_count():
    client = limited_client(RATE_LIMIT_FAILURES="3/hour")
    sealed = TokenSealer([SECRET], CLIENT_ID).seal("AQ-raw-refresh")
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        for n in range(200):
            path, field, value = ("/swap", "code", f"code-{n}") if n % 2 else ("/refresh", "refresh_token", sealed)
            assert client.post(path, data={field: value}).status_code == 200
        assert len(spotify.calls) == 200
    # The whole budget is still there: three failures, then the limit.
    assert [fail_once(client, "invalid_request").status_code for _ in range(3)] == [400] * 3
    assert_rate_limited(fail_once(client, "invalid_request"))


@pytest.mark.parametrize("kind", FAILURES)
def test_each_kind_of_client_mistake_counts(kind):
    client = limited_client(RATE_LIMIT_FAILURES="2/hour")
    assert [fail_once(client, kind).status_code for _ in range(2)] == [FAILURES[kind]] * 2
    assert_rate_limited(fail_once(client, kind))


def test_past_the_limit_an_address_is_refused_without_calling_spotify():
    client = limited_client(RATE_LIMIT_FAILURES="5/hour")
    statuses = [fail_once(client, kind).status_code for kind in FAILURES]
    assert statuses == list(FAILURES.values())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as spotify:
        spotify_ok(spotify)
        swap = client.post("/swap", data={"code": "a-perfectly-good-code"})
        refresh = client.post("/refresh", json={"refresh_token": TokenSealer([SECRET], CLIENT_ID).seal("AQ-x")})
        assert len(spotify.calls) == 0
    # At most the window, plus the second by which Retry-After is rounded up, so a client never comes back early.
    assert 0 < assert_rate_limited(swap) <= 3601
    assert 0 < assert_rate_limited(refresh) <= 3601
    assert swap.headers["Cache-Control"] == "no-store"


def test_failures_answered_by_spotify_count_too():
    client = limited_client(RATE_LIMIT_FAILURES="3/hour")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as spotify:
        spotify.post(TOKEN_URL, status=400, json=INVALID_GRANT)
        for n in range(3):
            response = client.post("/swap", data={"code": f"junk-{n}"})
            assert response.status_code == 400 and response.get_json() == INVALID_GRANT
        assert_rate_limited(client.post("/swap", data={"code": "junk-3"}))
        assert len(spotify.calls) == 3


def test_spotify_rate_limiting_the_app_is_not_a_client_failure():
    client = limited_client(RATE_LIMIT_FAILURES="2/hour")
    with responses.RequestsMock() as spotify:
        spotify.post(TOKEN_URL, status=429, headers={"Retry-After": "7"})
        for _ in range(5):
            response = client.post("/swap", data={"code": "fine"})
            assert response.status_code == 429
            assert response.get_json()["error"] != "rate_limited"
    assert [fail_once(client, "invalid_request").status_code for _ in range(2)] == [400, 400]


def test_another_address_is_unaffected():
    client = limited_client(RATE_LIMIT_FAILURES="3/hour")
    flooder = {"environ_base": {"REMOTE_ADDR": "198.51.100.7"}}
    neighbour = {"environ_base": {"REMOTE_ADDR": "198.51.100.8"}}
    for _ in range(3):
        fail_once(client, "invalid_request", **flooder)
    assert_rate_limited(fail_once(client, "invalid_request", **flooder))
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        assert client.post("/swap", data={"code": "c"}, **neighbour).status_code == 200
    # ... with its own, untouched budget.
    assert [fail_once(client, "not_found", **neighbour).status_code for _ in range(3)] == [404] * 3
    assert_rate_limited(fail_once(client, "not_found", **neighbour))


def test_real_users_before_and_during_a_flood_from_their_address_succeed():
    """Carrier NAT: real users and the attacker share one address."""
    client = limited_client(RATE_LIMIT_FAILURES="10/hour")
    answers = []
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        for n in range(50):  # real users first
            answers.append(client.post("/swap", data={"code": f"user-{n}"}).status_code)
        for n in range(10):  # then the flood, with real users still arriving
            answers.append(client.post("/api/token", data={"code": f"late-user-{n}"}).status_code)
            assert fail_once(client, "invalid_request").status_code == 400
        assert len(spotify.calls) == 60
    assert answers == [200] * 60
    # Once the flood has spent the address's budget, the address waits, real users included.
    assert_rate_limited(fail_once(client, "invalid_request"))


@pytest.mark.parametrize("value", ["off", "0", "OFF", " 0 "])
def test_zero_or_off_disables_the_limit(value):
    client = limited_client(RATE_LIMIT_FAILURES=value)
    statuses = Counter(fail_once(client, kind).status_code for kind in list(FAILURES) * 30)
    assert set(statuses) == set(FAILURES.values())
    assert sum(statuses.values()) == 150


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_key():
    client = limited_client(RATE_LIMIT_FAILURES="2/hour", TRUSTED_PROXIES="1")
    proxy = {"REMOTE_ADDR": "10.0.0.1"}  # every request arrives through the proxy

    def from_client(address: str) -> dict:
        return {"environ_base": proxy, "headers": {"X-Forwarded-For": address}}

    for _ in range(2):
        assert fail_once(client, "invalid_request", **from_client("203.0.113.5")).status_code == 400
    assert_rate_limited(fail_once(client, "invalid_request", **from_client("203.0.113.5")))
    # Another client behind the same proxy is not limited.
    assert fail_once(client, "invalid_request", **from_client("203.0.113.6")).status_code == 400
    # A client cannot hide behind a made-up header: the proxy appends the real address last.
    spoofed = {"environ_base": proxy, "headers": {"X-Forwarded-For": "1.2.3.4, 203.0.113.5"}}
    assert_rate_limited(fail_once(client, "invalid_request", **spoofed))


def test_without_a_trusted_proxy_forwarded_headers_are_ignored():
    client = limited_client(RATE_LIMIT_FAILURES="2/hour")
    for n in range(2):
        headers = {"X-Forwarded-For": f"192.0.2.{n}"}
        assert fail_once(client, "invalid_request", headers=headers).status_code == 400
    assert_rate_limited(fail_once(client, "invalid_request", headers={"X-Forwarded-For": "192.0.2.99"}))


def test_health_and_preflight_are_never_limited_nor_counted():
    client = limited_client(RATE_LIMIT_FAILURES="2/hour", CORS_ORIGINS="https://app.example")
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    for _ in range(30):
        assert client.get("/health").status_code == 200
        assert client.head("/health").status_code == 200
        assert client.options("/swap", headers=preflight).status_code in (200, 204)
        assert client.options("/nowhere").status_code in (200, 204, 404)
    assert [fail_once(client, "invalid_request").status_code for _ in range(2)] == [400, 400]
    assert_rate_limited(fail_once(client, "invalid_request"))
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json() == {"status": "ok"}
    assert client.options("/refresh", headers=preflight).status_code in (200, 204)


class slow_answer:  # noqa: N801  (used as a function: a responses callback)
    """A responses callback: Spotify answering after `seconds`, noting how many calls overlapped."""

    def __init__(self, status: int, body: str, seconds: float = 0.3):
        self._answer: tuple[int, dict[str, str], str] = (status, {}, body)
        self._seconds = seconds
        self._lock = threading.Lock()
        self._now = self._most = 0

    def __call__(self, _request: object) -> tuple[int, dict[str, str], str]:
        with self._lock:
            self._now += 1
            self._most = max(self._most, self._now)
        time.sleep(self._seconds)  # Spotify's answer time
        with self._lock:
            self._now -= 1
        return self._answer

    def most_at_once(self) -> int:
        """The most calls that were being answered at one time."""
        with self._lock:
            return self._most


def swaps_at_once(app, count: int, prefix: str) -> list[int]:
    """`count` swaps from one address, released together; their statuses, in order."""
    start = threading.Barrier(count)

    def swap(n: int) -> int:
        client = app.test_client()
        start.wait()
        return client.post("/swap", data={"code": f"{prefix}-{n}"}).status_code

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(swap, range(count)))


@pytest.mark.parametrize("earlier_failures", [0, 3])
def test_a_concurrent_burst_of_junk_cannot_overshoot_the_budget(earlier_failures):
    """A failure is counted when it is answered: a burst must not all reach Spotify before that.

    Each call in flight counts against the budget until its answer is known, so at most the failures
    left reach Spotify, whether or not the address had failed before.
    """
    app = app_for({**BASE_CONFIG, "RATE_LIMIT_FAILURES": "5/hour"}, Clock())
    burst = 20
    with responses.RequestsMock(assert_all_requests_are_fired=False) as spotify:
        spotify.add_callback(responses.POST, TOKEN_URL, callback=slow_answer(400, '{"error": "invalid_grant"}'))
        for n in range(earlier_failures):
            assert app.test_client().post("/swap", data={"code": f"first-{n}"}).status_code == 400
        statuses = Counter(swaps_at_once(app, burst, "junk"))
        assert len(spotify.calls) == 5
    assert statuses == {400: 5 - earlier_failures, 429: burst - (5 - earlier_failures)}


def test_real_users_from_an_address_near_its_budget_wait_their_turn_rather_than_fail():
    """8 of 10 failures spent: 2 calls reach Spotify first, more as they succeed; none is refused.

    The first two successes make room for two more each: 4 at once next. Were each ended call to
    let just one waiter go, the 8 would run 2 at a time.
    """
    app = app_for({**BASE_CONFIG, "RATE_LIMIT_FAILURES": "10/hour"}, Clock())
    for _ in range(8):
        assert fail_once(app.test_client(), "invalid_request").status_code == 400
    burst = 8
    tokens = slow_answer(200, json.dumps(TOKENS), 0.2)
    with responses.RequestsMock() as spotify:
        spotify.add_callback(responses.POST, TOKEN_URL, callback=tokens)
        assert swaps_at_once(app, burst, "user") == [200] * burst
    # At most 2 + the calls done, and at most the 8 - the calls done, at once: never past 5.
    assert 4 <= tokens.most_at_once() <= 5


def test_an_address_whose_calls_succeed_is_not_held_back():
    """Thousands of users behind one carrier NAT: their successes make room for more calls at once,
    up to SUCCESS_ROOM more than the failures left; past that they take turns, and none is refused."""
    app = app_for({**BASE_CONFIG, "RATE_LIMIT_FAILURES": "5/hour"}, Clock())
    burst = 5 + SUCCESS_ROOM + 5
    tokens = slow_answer(200, json.dumps(TOKENS), 0.5)  # long enough for the threads to overlap
    with responses.RequestsMock() as spotify:
        spotify.add(responses.POST, TOKEN_URL, json=TOKENS)
        for n in range(SUCCESS_ROOM * 3):
            assert app.test_client().post("/swap", data={"code": f"earlier-{n}"}).status_code == 200
        spotify.reset()
        spotify.add_callback(responses.POST, TOKEN_URL, callback=tokens)
        assert swaps_at_once(app, burst, "user") == [200] * burst
    assert tokens.most_at_once() == 5 + SUCCESS_ROOM


def test_a_burst_of_junk_after_many_successes_overshoots_the_budget_by_at_most_success_room():
    """Banked successes buy room for real users, not a way past the budget for junk."""
    app = app_for({**BASE_CONFIG, "RATE_LIMIT_FAILURES": "5/hour"}, Clock())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as spotify:
        spotify.add(responses.POST, TOKEN_URL, json=TOKENS)
        for n in range(100):
            assert app.test_client().post("/swap", data={"code": f"earlier-{n}"}).status_code == 200
        spotify.reset()
        spotify.add_callback(responses.POST, TOKEN_URL, callback=slow_answer(400, '{"error": "invalid_grant"}'))
        statuses = Counter(swaps_at_once(app, 60, "junk"))
        reached = len(spotify.calls)
    assert 5 <= reached <= 5 + SUCCESS_ROOM
    assert statuses[400] == reached and statuses[429] == 60 - reached


def test_reads_are_never_counted_nor_refused():
    """GETs (the page, /health, a 404 for a favicon) never reach Spotify: no failure, no refusal."""
    client = limited_client(RATE_LIMIT_FAILURES="2/hour")
    for path in ["/favicon.ico", "/no/such/page", "/swap"] * 5:
        with client.get(path) as response:
            assert response.status_code in (200, 404, 405)
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        assert client.post("/swap", data={"code": "still-fine"}).status_code == 200


def test_a_request_that_cannot_get_a_turn_within_spotify_timeout_is_503():
    app = app_for({**BASE_CONFIG, "RATE_LIMIT_FAILURES": "2/hour", "SPOTIFY_TIMEOUT": "0.3"}, Clock())
    assert fail_once(app.test_client(), "invalid_request").status_code == 400
    in_flight, done = threading.Event(), threading.Event()

    def slow_tokens(_request):
        in_flight.set()
        done.wait(10)
        return 200, {}, json.dumps(TOKENS)

    with responses.RequestsMock() as spotify:
        spotify.add_callback(responses.POST, TOKEN_URL, callback=slow_tokens)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(lambda: app.test_client().post("/swap", data={"code": "first"}))
            assert in_flight.wait(10)
            # One failure left and one call in flight: no room until it ends, which it does not in 0.3 s.
            second = app.test_client().post("/swap", data={"code": "second"})
            done.set()
            assert first.result().status_code == 200
        assert len(spotify.calls) == 1
    assert second.status_code == 503
    assert second.get_json()["error"] == "temporarily_unavailable"
    assert second.headers["Retry-After"] == "1"


# -- the ceiling on calls to Spotify ---------------------------------------------------------


@pytest.mark.parametrize("ceiling", ["5/hour", "1000/second;5/hour", "5 per hour, 1000 per minute"])
def test_spotify_max_rate_caps_calls_forwarded_to_spotify(ceiling):
    client = limited_client(RATE_LIMIT_FAILURES="2/hour", SPOTIFY_MAX_RATE=ceiling)
    sealed = TokenSealer([SECRET], CLIENT_ID).seal("AQ-raw")
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        answers = [client.post("/swap", data={"code": f"c{n}"}) for n in range(4)]
        answers += [client.post("/refresh", data={"refresh_token": sealed}) for _ in range(6)]
        assert len(spotify.calls) == 5
    assert [a.status_code for a in answers] == [200] * 5 + [503] * 5
    for refused in answers[5:]:
        assert refused.headers["Content-Type"] == JSON
        assert refused.get_json()["error"] == "temporarily_unavailable"
        assert 0 < int(refused.headers["Retry-After"]) <= 3601
    # Not the clients' fault: none of those refusals spent their failure budget.
    assert [fail_once(client, "invalid_request").status_code for _ in range(2)] == [400, 400]


def test_spotify_max_rate_is_not_spent_by_requests_that_never_reach_spotify():
    client = limited_client(SPOTIFY_MAX_RATE="2/hour")
    for kind in list(FAILURES) * 4:
        fail_once(client, kind)
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        assert [client.post("/swap", data={"code": f"c{n}"}).status_code for n in range(3)] == [200, 200, 503]
        assert len(spotify.calls) == 2


def test_an_unreachable_limit_store_fails_open_and_says_so(caplog):
    """A Redis outage must not take the service down: the limits fall back to the worker's memory."""
    client = limited_client(
        RATE_LIMIT_FAILURES="2/hour",
        SPOTIFY_MAX_RATE="100/hour",
        RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}",
    )
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        assert client.post("/swap", data={"code": "c"}).status_code == 200
    assert [fail_once(client, "invalid_request").status_code for _ in range(2)] == [400, 400]
    assert_rate_limited(fail_once(client, "invalid_request"))
    outages = [r for r in caplog.records if "Rate limit storage unreachable" in r.getMessage()]
    assert outages and all(r.levelno == logging.ERROR for r in outages)
    assert len(outages) == 1  # once per retry period, not once per request


# -- Redis: one budget for every worker and instance ---------------------------------------------


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The Redis server's URL, the server emptied."""
    with redis.Redis.from_url(redis_server.url) as connection:
        connection.flushall()
    return redis_server.url


@pytest.mark.e2e
@pytest.mark.window(15, "1/day")  # a real server counts on the wall clock: not across midnight UTC
def test_two_instances_sharing_redis_share_one_budget(redis_url):
    settings = {"RATE_LIMIT_FAILURES": "4/day", "SPOTIFY_MAX_RATE": "3/day", "RATE_LIMIT_STORAGE_URI": redis_url}
    first, second = limited_client(**settings), limited_client(**settings)
    assert fail_once(first, "invalid_request").status_code == 400
    assert fail_once(second, "not_found").status_code == 404
    assert fail_once(first, "too_large").status_code == 413
    assert fail_once(second, "invalid_grant").status_code == 400
    assert_rate_limited(fail_once(first, "invalid_request"))
    assert_rate_limited(fail_once(second, "invalid_request"))
    # The ceiling on calls to Spotify is deployment-wide too.
    other = {"environ_base": {"REMOTE_ADDR": "192.0.2.1"}}
    with responses.RequestsMock() as spotify:
        spotify_ok(spotify)
        statuses = [client.post("/swap", data={"code": "c"}, **other).status_code for client in (first, second) * 3]
        assert len(spotify.calls) == 3
    assert sorted(statuses) == [200, 200, 200, 503, 503, 503]


def worker_answers(server: Server, prefix: str) -> dict[int, list[int]]:
    """Statuses each worker gave to the requests whose path starts with prefix, in log order."""
    answers: dict[int, list[int]] = {}
    for pid, path, status in PID_LINE.findall(server.output()):
        if path.startswith(prefix):
            answers.setdefault(int(pid), []).append(int(status))
    return answers


@contextlib.contextmanager
def only_worker(server: Server, pid: int) -> Iterator[None]:
    """Freeze every other worker (SIGSTOP), so that pid accepts every new connection."""
    others = [other for other in server.pids()[1:] if other != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def fail_on(server: Server, pid: int, tag: str, count: int) -> list[int]:
    """count requests for unknown paths (404: a client mistake), each on a new connection, all to one worker."""
    with only_worker(server, pid):
        return [
            requests.post(f"{server.url}/junk/{tag}{n}", headers={"Connection": "close"}, timeout=10).status_code
            for n in range(count)
        ]


def answered_by(server: Server, tag: str, count: int) -> dict[int, list[int]]:
    """Wait until the access log holds the count answers to /junk/<tag>...; by worker."""
    deadline = time.monotonic() + 10
    while True:
        answers = worker_answers(server, f"/junk/{tag}")
        if sum(map(len, answers.values())) >= count or time.monotonic() > deadline:
            return answers
        time.sleep(0.05)


def two_workers(storage_uri: str, limit: int) -> Server:
    env = server_env(
        "http://127.0.0.1:9", RATE_LIMIT_FAILURES=f"{limit}/day", RATE_LIMIT_STORAGE_URI=storage_uri
    )
    return Server(env, extra_args=f"--workers 2 {PID_LOG}")


@pytest.mark.e2e
@pytest.mark.window(15, "1/day")  # a real server counts on the wall clock: not across midnight UTC
def test_two_gunicorn_workers_share_one_budget_in_redis(redis_url):
    limit = 10
    with two_workers(redis_url, limit) as server:
        first, second = server.pids()[1:]
        # Six failures on the first worker, then the second has only the four left.
        assert fail_on(server, first, "a", 6) == [404] * 6
        assert fail_on(server, second, "b", 7) == [404] * 4 + [429] * 3
        assert fail_on(server, first, "c", 3) == [429] * 3
        log = {tag: answered_by(server, tag, n) for tag, n in (("a", 6), ("b", 7), ("c", 3))}
    assert set(log["a"]) == {first} and set(log["b"]) == {second} and set(log["c"]) == {first}


@pytest.mark.e2e
@pytest.mark.window(15, "1/day")  # a real server counts on the wall clock: not across midnight UTC
def test_with_memory_storage_each_worker_has_its_own_budget():
    """Why RATE_LIMIT_STORAGE_URI exists: memory:// counts per worker, so N workers allow N times the limit."""
    limit = 5
    with two_workers("memory://", limit) as server:
        first, second = server.pids()[1:]
        assert fail_on(server, first, "a", limit + 2) == [404] * limit + [429] * 2
        assert fail_on(server, second, "b", limit + 2) == [404] * limit + [429] * 2
        log = {tag: answered_by(server, tag, limit + 2) for tag in "ab"}
    assert set(log["a"]) == {first} and set(log["b"]) == {second}
