"""App-only tokens (CLIENT_CREDENTIALS), Basic client ids, and Peter Schorn's server's paths.

Unit tests fake Spotify with responses; the end-to-end test replays Schorn's ClientCredentialsFlowProxyBackend
request (a form body `grant_type=client_credentials`, nothing else) against the Procfile's gunicorn with 2 workers.
"""

from __future__ import annotations

import base64
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET, FakeAccounts
from devtools.process import CLOSE, Server, json_answer
from ratelimit import Refused
from resources import AppTokens
from spotify import Unreachable
from tests.helpers import (
    CALLBACK,
    CODE,
    RAW_REFRESH,
    TOKEN_URL,
    TOKENS,
    VERIFIER,
    assert_error,
    assert_token_answer,
    expect,
    refresh_form,
    seal,
    server_env,
    swap_form,
)

APP_TOKEN = {"access_token": "BQ-app-only", "token_type": "Bearer", "expires_in": 3600}
# Exactly what ClientCredentialsFlowProxyBackend sends (shared/CLIENTS.md): URLSession's form content type.
SCHORN_FORM = "grant_type=client_credentials"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def basic(username: str, password: str | None) -> dict[str, str]:
    raw = f"{username}:{password}" if password is not None else f"{username}:"
    return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}


# -- app-only tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/client-credentials-tokens", "/api/token", "/swap", "/refresh"])
def test_app_only_tokens_are_off_by_default_and_say_which_variable_turns_them_on(client, spotify, path):
    body = assert_error(client.post(path, data=SCHORN_FORM, headers=FORM), 400, "unsupported_grant_type")
    assert "CLIENT_CREDENTIALS=on" in body["error_description"]
    assert len(spotify.calls) == 0


def test_schorns_client_credentials_request_gets_an_app_only_token(make_client, spotify):
    client = make_client(CLIENT_CREDENTIALS="on")
    expect(spotify, {"grant_type": "client_credentials"}, json=APP_TOKEN)
    body = assert_token_answer(client.post("/client-credentials-tokens", data=SCHORN_FORM, headers=FORM))
    assert body["access_token"] == "BQ-app-only" and body["token_type"] == "Bearer"
    assert 3590 <= body["expires_in"] <= 3600 and isinstance(body["expires_in"], int)
    assert "refresh_token" not in body


def test_one_spotify_call_serves_every_app_while_the_token_is_fresh(make_client, spotify):
    client = make_client(CLIENT_CREDENTIALS="on")
    expect(spotify, {"grant_type": "client_credentials"}, json={**APP_TOKEN, "refresh_token": "never-passed-on"})
    answers = [
        assert_token_answer(client.post(path, data=SCHORN_FORM, headers=FORM))
        for path in ("/client-credentials-tokens", "/api/token", "/client-credentials-tokens")
    ]
    assert {a["access_token"] for a in answers} == {"BQ-app-only"}
    assert all("refresh_token" not in a for a in answers)
    assert len(spotify.calls) == 1


def test_app_only_tokens_do_not_disturb_the_other_grants(make_client, spotify):
    client = make_client(CLIENT_CREDENTIALS="on")
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    assert "refresh_token" in assert_token_answer(client.post("/client-credentials-tokens", data=swap_form()))


def test_spotify_refusing_the_credentials_is_the_servers_fault(make_client, spotify):
    client = make_client(CLIENT_CREDENTIALS="on")
    expect(spotify, {"grant_type": "client_credentials"}, status=400,
           json={"error": "invalid_client", "error_description": "Invalid client secret"})
    assert_error(client.post("/client-credentials-tokens", data=SCHORN_FORM, headers=FORM), 500, "server_error")


def test_app_only_requests_spend_the_failure_budget_and_the_ceiling(make_client, spotify):
    client = make_client(CLIENT_CREDENTIALS="on", SPOTIFY_MAX_RATE="1/hour")
    expect(spotify, {"grant_type": "client_credentials"}, status=503, body="<html>down</html>")
    assert_error(client.post("/client-credentials-tokens", data=SCHORN_FORM, headers=FORM), 502, "server_error")
    # The ceiling's one call is spent: the next one is refused before Spotify.
    assert_error(client.post("/client-credentials-tokens", data=SCHORN_FORM, headers=FORM), 503,
                 "temporarily_unavailable")
    assert len(spotify.calls) == 1


def test_an_address_that_spent_its_failure_budget_gets_no_app_only_token(make_client, spotify):
    client = make_client(CLIENT_CREDENTIALS="on", RATE_LIMIT_FAILURES="1/minute")
    assert_error(client.post("/refresh", data={"refresh_token": "not-sealed-here"}), 400, "invalid_grant")
    refused = client.post("/client-credentials-tokens", data=SCHORN_FORM, headers=FORM)
    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) > 0
    assert len(spotify.calls) == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_cached_token_counts_down_and_is_renewed_a_minute_before_it_expires():
    clock, fetched = Clock(), []

    def fetch() -> dict:
        fetched.append(clock.now)
        return {**APP_TOKEN, "access_token": f"token-{len(fetched)}"}

    tokens = AppTokens(clock)
    assert tokens.get(fetch) == {**APP_TOKEN, "access_token": "token-1", "expires_in": 3600}
    clock.now += 1000.5
    assert tokens.get(fetch) == {**APP_TOKEN, "access_token": "token-1", "expires_in": 2599}
    clock.now += 3600 - 1000.5 - AppTokens.RENEW_BEFORE - 1
    assert tokens.get(fetch)["access_token"] == "token-1"
    clock.now += 1
    assert tokens.get(fetch)["access_token"] == "token-2"
    assert len(fetched) == 2


def test_requests_waiting_on_a_failed_fetch_share_its_error_instead_of_asking_again():
    started, release, calls = threading.Event(), threading.Event(), []

    def failing() -> dict:
        calls.append(1)
        started.set()
        release.wait(5)
        raise Unreachable("Spotify down")

    tokens = AppTokens()
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(tokens.get, failing)
        assert started.wait(5)
        waiting = [pool.submit(tokens.get, failing) for _ in range(4)]
        # Each waiter holds for the lock before the fetch ends: release it only once they all wait.
        release.set()
        outcomes = [f.exception(10) for f in [first, *waiting]]
    assert all(isinstance(e, Unreachable) for e in outcomes)
    assert len(calls) == 1
    # A later request asks again.
    with pytest.raises(Unreachable):
        tokens.get(failing)
    assert len(calls) == 2


def test_a_fetching_clients_own_refusal_is_not_handed_to_the_requests_waiting_behind_it():
    """The rate limit that refuses one client's fetch speaks of that client's address: a request waiting
    for the token (another client) fetches for itself and gets the token."""
    started, release, calls = threading.Event(), threading.Event(), []

    def refused_then_fetched() -> dict:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            release.wait(5)
            raise Refused(30, Refused.FAILURES)
        return APP_TOKEN

    tokens = AppTokens()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(tokens.get, refused_then_fetched)
        assert started.wait(5)
        other = pool.submit(tokens.get, refused_then_fetched)
        release.set()
        assert isinstance(first.exception(10), Refused)
        assert other.result(10)["access_token"] == APP_TOKEN["access_token"]
    assert len(calls) == 2


# -- Basic client ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["None", "undefined", "", None, "anything-at-all"])
def test_our_client_id_as_basic_user_name_is_accepted_whatever_the_password(client, spotify, password):
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    assert_token_answer(client.post("/api/token", data=swap_form(), headers=basic(CLIENT_ID, password)))


@pytest.mark.parametrize("path", ["/api/token", "/swap", "/refresh", "/authorization-code-flow/refresh-tokens"])
def test_another_apps_client_id_in_basic_is_401_invalid_client_with_www_authenticate(client, spotify, path):
    fields = {**swap_form(), **refresh_form(seal(RAW_REFRESH))}
    del fields["grant_type"]
    response = client.post(path, data=fields, headers=basic("another-apps-client-id", "None"))
    body = assert_error(response, 401, "invalid_client")
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert "another-apps-client-id" not in body["error_description"]
    assert body["error_description"].endswith("is not its SPOTIFY_CLIENT_ID")  # the setting to compare, said whole
    assert len(spotify.calls) == 0


def test_a_percent_encoded_basic_user_name_is_decoded_first(make_client, spotify):
    # RFC 6749 section 2.3.1: the client id is form-encoded before Basic encoding (Go's x/oauth2 does so).
    client = make_client(SPOTIFY_CLIENT_ID="my app+id")
    spotify.post(TOKEN_URL, json=TOKENS)
    assert_token_answer(client.post("/swap", data={"code": CODE}, headers=basic("my+app%2Bid", "None")))


def test_other_authorization_schemes_are_ignored(client, spotify):
    expect(spotify, swap_form(), json=TOKENS)
    assert_token_answer(client.post("/swap", data={"code": CODE}, headers={"Authorization": "Bearer abc"}))


# -- Schorn's paths ---------------------------------------------------------------------------------


def test_schorns_pkce_backend_swaps_and_refreshes_at_its_own_paths(client, spotify):
    expect(spotify, swap_form(code_verifier=VERIFIER), json={**TOKENS, "refresh_token": RAW_REFRESH})
    swapped = assert_token_answer(client.post("/authorization-code-flow-pkce/retrieve-tokens", data=swap_form(
        code_verifier=VERIFIER)))
    expect(spotify, refresh_form(), json=TOKENS)
    refreshed = assert_token_answer(client.post(
        "/authorization-code-flow-pkce/refresh-tokens",
        data={"method": "PKCE", "grant_type": "refresh_token", "refresh_token": swapped["refresh_token"]},
    ))
    assert refreshed["refresh_token"] == swapped["refresh_token"]  # PKCE backend needs one in every answer


@pytest.mark.parametrize("path,form", [
    ("/authorization-code-flow/retrieve-tokens", {"grant_type": "authorization_code", "code": CODE,
                                                  "redirect_uri": CALLBACK}),
    ("/authorization-code-flow/refresh-tokens", {"grant_type": "refresh_token"}),
])
def test_schorns_authorization_code_backend_paths(client, spotify, path, form):
    if form["grant_type"] == "refresh_token":
        form = {**form, "refresh_token": seal(RAW_REFRESH)}
        expect(spotify, refresh_form(), json=TOKENS)
    else:
        expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    assert "refresh_token" in assert_token_answer(client.post(path, data=form))


# -- end to end: Schorn's exact request against gunicorn ---------------------------------------------


@pytest.mark.e2e
def test_twenty_app_only_requests_reach_spotify_at_most_once_per_worker():
    with FakeAccounts(latency=0.3) as fake, Server(server_env(fake.url, CLIENT_CREDENTIALS="on", WEB_CONCURRENCY="2",
                                                              SPOTIFY_TIMEOUT="5")) as server:
        def ask(_: int) -> dict:
            response = requests.post(server.url + "/client-credentials-tokens", data=SCHORN_FORM,
                                     headers={**FORM, **CLOSE}, timeout=30)
            return json_answer(response, 200)

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(ask, range(20)))
        grants = Counter(r["form"].get("grant_type") for r in fake.requests)
        log = server.output()

    assert all(set(a) == {"access_token", "token_type", "expires_in"} for a in answers)
    assert all(0 < a["expires_in"] <= 3600 for a in answers)
    assert 1 <= grants["client_credentials"] <= 2, grants
    assert len({a["access_token"] for a in answers}) == grants["client_credentials"]
    assert CLIENT_SECRET not in log and "app-" not in log  # neither the secret nor a token is logged


@pytest.mark.e2e
def test_a_basic_client_id_of_another_app_gets_401_from_the_real_server(served, fake_accounts):
    response = requests.post(served.url + "/api/token", data={"grant_type": "authorization_code", "code": "c"},
                             headers={**basic("someone-elses-app", None), **CLOSE}, timeout=10)
    assert json_answer(response, 401)["error"] == "invalid_client"
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert not [r for r in fake_accounts.requests if r["form"].get("code") == "c"]
