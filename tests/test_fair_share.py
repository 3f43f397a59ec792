"""A fair share under a hostile internet: one budget per client however its address is spelled,
a ceiling per refresh token, and bursts that stay within the budget whatever came before."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest
import responses

import ratelimit
from devtools.fake_accounts import FakeAccounts
from devtools.process import Server
from tests.helpers import BASE_CONFIG, SEALER, TOKEN_URL, Clock, app_for, server_env, unique

# The README's promise: a burst of junk overshoots the failure budget by at most this many calls.
SUCCESS_ROOM = 10

TOKENS = {"access_token": "BQ-access", "token_type": "Bearer", "expires_in": 3600}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


# -- canonical addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling, key",
    [
        ("203.0.113.9", "203.0.113.9"),
        ("203.0.113.9:5555", "203.0.113.9"),
        (" 203.0.113.9 ", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("[::ffff:203.0.113.9]:80", "203.0.113.9"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:DB8::1", "2001:db8::/64"),
        ("2001:db8:0::1", "2001:db8::/64"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::/64"),
        ("[2001:db8::1]", "2001:db8::/64"),
        ("[2001:db8::1]:443", "2001:db8::/64"),
        ("2001:db8::1%eth0", "2001:db8::/64"),
        ("2001:db8::ffff:ffff:ffff:ffff", "2001:db8::/64"),
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("::1", "::/64"),
    ],
)
def test_each_spelling_of_an_address_has_one_key(spelling, key):
    assert ratelimit.canonical_address(spelling) == key


@pytest.mark.parametrize("spelling", ["", "unknown", "not-an-ip", "203.0.113", "999.1.1.1", "[2001:db8::1", "a:b:c"])
def test_what_is_no_address_has_no_key(spelling):
    assert ratelimit.canonical_address(spelling) is None


def test_a_forwarded_entry_that_is_no_address_counts_under_the_connection_and_is_logged_once(caplog):
    app = app_for({**BASE_CONFIG, "TRUSTED_PROXIES": "1", "RATE_LIMIT_FAILURES": "2/hour"}, Clock())
    client = app.test_client()
    for spelling in ["not-an-ip \u00fcn\u00efcode", "also-not", "nope"]:
        response = client.post("/swap", data={}, headers={"X-Forwarded-For": spelling})
        assert response.status_code in (400, 429)
    # The connection's own address spent its budget: a real address behind it is unaffected.
    assert client.post("/swap", data={}).status_code == 429
    assert client.post("/swap", data={}, headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 400
    warnings = [r.getMessage() for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert len(warnings) == 1 and "\\xfcn" in warnings[0]  # written escaped


def test_a_forwarded_entry_is_never_logged_whole(caplog):
    """A client fills its headers as it likes: a code put there must not reach the log."""
    app = app_for({**BASE_CONFIG, "TRUSTED_PROXIES": "1", "RATE_LIMIT_FAILURES": "5/hour"}, Clock())
    code = "AQ" + uuid.uuid4().hex * 8
    app.test_client().post("/swap", data={}, headers={"X-Forwarded-For": code})
    [warning] = [r.getMessage() for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert code[:45] in warning and code not in warning


# -- the per-token ceiling ---------------------------------------------------------------------------


def test_a_token_refreshed_past_its_ceiling_is_429_without_calling_spotify():
    # On a clock that stands still: the test never straddles a window's end.
    app = app_for({**BASE_CONFIG, "RATE_LIMIT_PER_TOKEN": "3/day"}, Clock())
    greedy, other = SEALER.seal("AQ-greedy"), SEALER.seal("AQ-other")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as spotify:
        spotify.post(TOKEN_URL, json=TOKENS)
        statuses = [app.test_client().post("/refresh", data={"refresh_token": greedy}).status_code for _ in range(6)]
        assert len(spotify.calls) == 3
        refused = app.test_client().post("/refresh", data={"refresh_token": greedy})
        assert app.test_client().post("/refresh", data={"refresh_token": other}).status_code == 200
    assert statuses == [200] * 3 + [429] * 3
    assert refused.get_json()["error"] == "rate_limited" and 0 < int(refused.headers["Retry-After"]) <= 86401


def test_the_ceiling_is_counted_by_a_hash_of_the_token_never_the_token(monkeypatch):
    keys = []
    original = ratelimit.Limits._spend

    def spend(self, entries):
        keys.extend(str(entry) for entry in entries)
        return original(self, entries)

    monkeypatch.setattr(ratelimit.Limits, "_spend", spend)
    app = app_for({**BASE_CONFIG, "RATE_LIMIT_PER_TOKEN": "3/minute"}, Clock())
    with responses.RequestsMock() as spotify:
        spotify.post(TOKEN_URL, json=TOKENS)
        app.test_client().post("/refresh", data={"refresh_token": SEALER.seal("AQ-raw-secret-token")})
    assert keys and not any("AQ-raw-secret-token" in key for key in keys)


def test_per_token_ceiling_on_by_default_and_off_on_request():
    from config import load_config

    base = {k: v for k, v in BASE_CONFIG.items() if k != "RATE_LIMIT_PER_TOKEN"}
    assert load_config(base).rate_limit_per_token == "5/minute"
    assert load_config({**base, "RATE_LIMIT_PER_TOKEN": "off"}).rate_limit_per_token is None


# -- end to end, against the Procfile's server --------------------------------------------------------


def post_from(server: Server, source: str, path: str, fields: dict, headers: dict | None = None) -> tuple[int, dict]:
    """One POST from a loopback source address of our choosing, on its own connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", path, body=urlencode(fields), headers={**FORM, **(headers or {}), "Connection": "close"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.e2e
def test_one_client_hammering_its_own_token_leaves_spotify_to_the_others(fake_accounts):
    """SPOTIFY_MAX_RATE=10/second: four threads refresh one token for 3 s from 127.0.0.1 while
    another client swaps from 127.0.0.2 at 4 a second; every one of its swaps succeeds."""
    env = server_env(fake_accounts.url, SPOTIFY_MAX_RATE="10/second")
    del env["RATE_LIMIT_PER_TOKEN"]  # the default
    with Server(env) as server:
        greedy = SEALER.seal(unique("AQ-greedy"))
        stop = threading.Event()
        greedy_statuses: Counter[int] = Counter()

        def hammer() -> None:
            while not stop.is_set():
                greedy_statuses[post_from(server, "127.0.0.1", "/refresh", {"refresh_token": greedy})[0]] += 1

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        others = []
        try:
            for _ in range(12):
                started = time.monotonic()
                others.append(post_from(server, "127.0.0.2", "/swap", {"code": unique("other")})[0])
                time.sleep(max(0.0, 0.25 - (time.monotonic() - started)))  # pacing the other client
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
    assert others == [200] * 12
    # The default: 5 refreshes a minute per token, counted per worker with memory storage (2 workers), in limits'
    # moving window: exact, whenever the test runs.
    assert greedy_statuses[200] <= 5 * 2, greedy_statuses
    assert greedy_statuses[429] > 0 and set(greedy_statuses) <= {200, 429}


SPELLINGS_V6 = ["2001:DB8::1", "2001:db8:0::1", "2001:0db8:0000:0000:0000:0000:0000:0001", "[2001:db8::1]",
                "[2001:db8::1]:443", "2001:db8::1%eth0", "2001:db8::beef"]
SPELLINGS_V4 = ["::ffff:203.0.113.9", "203.0.113.9:5555", "[::ffff:203.0.113.9]:1"]


@pytest.mark.e2e
@pytest.mark.window(15, "1/day")  # a real server counts on the wall clock: not across midnight UTC
def test_every_spelling_of_an_address_spends_one_budget(fake_accounts):
    env = server_env(fake_accounts.url, TRUSTED_PROXIES="1", RATE_LIMIT_FAILURES="5/day", WEB_CONCURRENCY="1")
    with Server(env) as server:
        for first, others in (("2001:db8::1", SPELLINGS_V6), ("203.0.113.9", SPELLINGS_V4)):
            spent = [post_from(server, "127.0.0.1", "/swap", {}, {"X-Forwarded-For": first})[0] for _ in range(5)]
            assert spent == [400] * 5
            for spelling in others:
                status, body = post_from(server, "127.0.0.1", "/swap", {}, {"X-Forwarded-For": spelling})
                assert (status, body["error"]) == (429, "rate_limited"), spelling
        # Another /64, and another IPv4 address, have budgets of their own.
        assert post_from(server, "127.0.0.1", "/swap", {}, {"X-Forwarded-For": "2001:db8:0:1::1"})[0] == 400
        assert post_from(server, "127.0.0.1", "/swap", {}, {"X-Forwarded-For": "203.0.113.10"})[0] == 400


@pytest.mark.e2e
@pytest.mark.window(30, "1/day")  # a real server counts on the wall clock: not across midnight UTC
@pytest.mark.long(8)
def test_a_burst_of_junk_after_many_successes_stays_within_the_budget_plus_success_room():
    """300 successes banked, then 100 junk swaps at once: at most 5 + SUCCESS_ROOM reach Spotify."""
    with FakeAccounts(latency=0.3) as fake:
        env = server_env(fake.url, RATE_LIMIT_FAILURES="5/day", WEB_CONCURRENCY="1", SPOTIFY_TIMEOUT="10")
        with Server(env) as server:
            with ThreadPoolExecutor(50) as pool:
                banked = list(pool.map(lambda n: post_from(server, "127.0.0.1", "/swap", {"code": f"ok-{n}"})[0], range(300)))
            assert banked == [200] * 300
            fake.reset()
            start = threading.Barrier(100, timeout=30)

            def junk(n: int) -> int:
                start.wait()
                return post_from(server, "127.0.0.1", "/swap", {"code": f"invalid-{n}"})[0]

            with ThreadPoolExecutor(100) as pool:
                statuses = Counter(pool.map(junk, range(100)))
            reached = len(fake.requests)
    assert 5 <= reached <= 5 + SUCCESS_ROOM, (reached, statuses)
    assert statuses[400] == reached and statuses[429] + statuses[503] == 100 - reached
