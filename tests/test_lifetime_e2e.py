"""A sign-in's life from outside: the Procfile's gunicorn (2 workers) against the stand-in, with a 5-second
REFRESH_TOKEN_LIFETIME, SpotifyAPIServer's secret and raw tokens on. The unit tests (test_lifetime.py) hold
each case; these show they hold in the real server process, whichever worker answers."""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from crypto import TokenSealer
from devtools.fake_accounts import CLIENT_ID, FakeAccounts
from devtools.process import CLOSE, Server, json_answer
from tests.helpers import SECRET, server_env, spotifyapiserver_token

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

SEALER = TokenSealer([SECRET], CLIENT_ID)
SAS_SECRET = "the SECRET_KEY SpotifyAPIServer ran with"
LIFETIME = 5


@pytest.fixture(scope="module")
def stand_in():
    # Spotify's end too, as long as the service's: what the service refuses, the stand-in would.
    with FakeAccounts(refresh_token_lifetime=LIFETIME) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(stand_in):
    env = server_env(stand_in.url, WEB_CONCURRENCY="2", REFRESH_TOKEN_LIFETIME=f"{LIFETIME}s",
                     SPOTIFYAPISERVER_SECRET_KEY=SAS_SECRET, UNSEALED_TOKENS_UNTIL="2999-12-31")
    with Server(env) as running:
        yield running


@pytest.fixture
def fake(stand_in):
    stand_in.reset()
    return stand_in


def refresh(server: Server, token: str) -> requests.Response:
    return requests.post(server.url + "/refresh", data={"refresh_token": token}, headers=CLOSE, timeout=30)


def until_next_second() -> None:
    """Wait for the wall clock's next whole second: the one thing a whole-seconds countdown needs, and nothing
    can signal (a computed, bounded wait under a second)."""
    time.sleep(1.05 - time.time() % 1)


def test_the_swap_answers_the_lifetime_and_each_later_refresh_less_a_rotated_token_too(server, fake):
    swapped = json_answer(requests.post(server.url + "/swap", data={"code": f"rotating-{uuid.uuid4().hex}"},
                                        headers=CLOSE, timeout=30))
    assert swapped["refresh_token_expires_in"] in (LIFETIME, LIFETIME - 1)  # the swap may straddle a second
    until_next_second()
    first = json_answer(refresh(server, swapped["refresh_token"]))
    assert first["refresh_token_expires_in"] < swapped["refresh_token_expires_in"]
    assert first["refresh_token"] != swapped["refresh_token"]  # the stand-in rotated it: sealed anew
    until_next_second()
    second = json_answer(refresh(server, first["refresh_token"]))
    assert 0 < second["refresh_token_expires_in"] < first["refresh_token_expires_in"]
    assert [r["form"]["refresh_token"] for r in fake.requests[1:]] == [
        SEALER.open(swapped["refresh_token"]).refresh_token, SEALER.open(first["refresh_token"]).refresh_token]


def test_a_sign_in_6_seconds_old_is_refused_by_the_service_without_calling_the_stand_in(server, fake):
    """The clock is shifted in the token, not waited for: the swapped token, its sign-in moved 6 s back, sealed
    as the service would have sealed it then (this test holds ENCRYPTION_SECRET)."""
    swapped = json_answer(requests.post(server.url + "/swap", data={"code": f"code-{uuid.uuid4().hex}"},
                                        headers=CLOSE, timeout=30))["refresh_token"]
    opened = SEALER.open(swapped)
    assert opened.signed_in_at is not None and opened.grant_id is not None
    earlier = SEALER.seal(opened.refresh_token, opened.signed_in_at - 6, opened.grant_id)
    fake.reset()
    for _ in range(4):  # both workers, whichever answers
        body = json_answer(refresh(server, earlier), 400)
        assert body["error"] == "invalid_grant"
        assert "sign-in has expired" in body["error_description"]
    assert fake.requests == []


def test_spotifyapiserver_and_raw_tokens_come_back_sealed_here_and_refresh_again(server, fake):
    swift, raw = "AQ-swift-" + uuid.uuid4().hex, "AQ-raw-" + uuid.uuid4().hex
    for plaintext, sent in [(swift, spotifyapiserver_token(SAS_SECRET, swift)), (raw, raw)]:
        body = json_answer(refresh(server, sent))
        migrated = SEALER.open(body["refresh_token"])
        assert (migrated.refresh_token, migrated.signed_in_at) == (plaintext, None)  # sign-in time not known
        assert "refresh_token_expires_in" not in body
        assert json_answer(refresh(server, body["refresh_token"]))["refresh_token"] == body["refresh_token"]
    assert [r["form"]["refresh_token"] for r in fake.requests] == [swift, swift, raw, raw]


def test_the_start_says_raw_tokens_are_on_and_until_when(server):
    assert "Raw Spotify refresh tokens are accepted and sealed through 2999-12-31 UTC" in server.output()
