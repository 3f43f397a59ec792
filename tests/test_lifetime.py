"""A sign-in's life at the HTTP layer: refresh_token_expires_in, the service's own refusal past
REFRESH_TOKEN_LIFETIME, what a client is told when Spotify ends it, and the tokens of other servers
(SpotifyAPIServer, raw ones) answered in this service's format. The clock is the test's (conftest's `clock`)."""

from __future__ import annotations

import pytest

import check
from config import load_config
from tests.helpers import (
    CODE,
    RAW_REFRESH,
    ROTATED,
    TOKENS,
    assert_error,
    assert_token_answer,
    expect,
    refresh_form,
    seal,
    spotifyapiserver_token,
    swap_form,
    unseal,
)

DAY = 86400
DEFAULT_LIFETIME = 184 * DAY
GRANT_ID = "fedcba9876543210fedcba9876543210"
SAS_SECRET = "SpotifyAPIServer's SECRET_KEY"


def signed_in(clock, days_ago: float, raw: str = RAW_REFRESH) -> str:
    return seal(raw, signed_in_at=int(clock.now - days_ago * DAY), grant_id=GRANT_ID)


# refresh_token_expires_in


def test_a_swap_answers_the_whole_lifetime(client, spotify):
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    body = assert_token_answer(client.post("/swap", data={"code": CODE}))
    assert body["refresh_token_expires_in"] == DEFAULT_LIFETIME
    assert type(body["refresh_token_expires_in"]) is int


def test_a_later_refresh_answers_what_is_left_and_a_rotated_token_keeps_the_sign_in(make_client, spotify, clock):
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    expect(spotify, refresh_form(), json={**TOKENS, "refresh_token": ROTATED})
    expect(spotify, refresh_form(ROTATED), json=TOKENS)
    client = make_client(REFRESH_TOKEN_LIFETIME="12h")
    swapped = assert_token_answer(client.post("/swap", data={"code": CODE}))
    assert swapped["refresh_token_expires_in"] == 12 * 3600
    clock.advance(3600.5)
    rotated = assert_token_answer(client.post("/refresh", data={"refresh_token": swapped["refresh_token"]}))
    assert rotated["refresh_token_expires_in"] == 11 * 3600
    assert unseal(rotated["refresh_token"]).grant_id == unseal(swapped["refresh_token"]).grant_id
    clock.advance(3600)
    again = assert_token_answer(client.post("/refresh", data={"refresh_token": rotated["refresh_token"]}))
    assert again["refresh_token_expires_in"] == 10 * 3600
    assert again["refresh_token"] == rotated["refresh_token"]


def test_no_expires_in_when_the_sign_in_time_is_not_known(client, spotify):
    """A token sealed before sign-in times were kept, or migrated from another server: never guessed."""
    expect(spotify, refresh_form(), json={**TOKENS, "refresh_token": ROTATED})
    body = assert_token_answer(client.post("/refresh", data={"refresh_token": seal(RAW_REFRESH)}))
    assert "refresh_token_expires_in" not in body


# Past the lifetime: refused here


def test_a_sign_in_past_the_lifetime_is_refused_without_calling_spotify(make_client, spotify, clock):
    client = make_client(REFRESH_TOKEN_LIFETIME="90s")
    token = seal(RAW_REFRESH, signed_in_at=int(clock.now) - 90, grant_id=GRANT_ID)
    body = assert_error(client.post("/refresh", data={"refresh_token": token}), 400, "invalid_grant")
    assert "sign-in has expired" in body["error_description"]
    assert "must log in again" in body["error_description"]
    assert len(spotify.calls) == 0


def test_a_sign_in_a_second_before_its_end_still_refreshes(make_client, spotify, clock):
    expect(spotify, refresh_form(), json=TOKENS)
    client = make_client(REFRESH_TOKEN_LIFETIME="90s")
    token = seal(RAW_REFRESH, signed_in_at=int(clock.now) - 89, grant_id=GRANT_ID)
    assert assert_token_answer(client.post("/refresh", data={"refresh_token": token}))["refresh_token_expires_in"] == 1


# Spotify refuses the token: the client is told why, and not to retry


@pytest.mark.parametrize(
    "days_ago, why",
    [
        (None, "sign-in time is not known"),
        (10, "10 days old, within its lifetime"),
        (182, "182 days old, past Spotify's six-month lifetime"),
    ],
)
def test_spotify_refusing_the_token_says_whether_it_was_past_its_lifetime(client, spotify, clock, days_ago, why):
    expect(spotify, refresh_form(), status=400, json={"error": "invalid_grant", "error_description": "Refresh token revoked"})
    token = seal(RAW_REFRESH) if days_ago is None else signed_in(clock, days_ago)
    body = assert_error(client.post("/refresh", data={"refresh_token": token}), 400, "invalid_grant")
    assert why in body["error_description"]
    assert "(Refresh token revoked)" in body["error_description"]
    assert body["error_description"].endswith("log in again; do not retry")


# Other servers' tokens, answered in this service's format


def test_a_spotifyapiserver_token_refreshes_and_comes_back_sealed_here(make_client, spotify):
    expect(spotify, refresh_form(), json=TOKENS)
    client = make_client(SPOTIFYAPISERVER_SECRET_KEY=SAS_SECRET)
    body = assert_token_answer(client.post("/refresh", data={"refresh_token": spotifyapiserver_token(SAS_SECRET, RAW_REFRESH)}))
    migrated = unseal(body["refresh_token"])
    assert (migrated.refresh_token, migrated.signed_in_at) == (RAW_REFRESH, None)
    assert "refresh_token_expires_in" not in body


def test_a_spotifyapiserver_token_without_its_secret_is_invalid_grant(client, spotify):
    response = client.post("/refresh", data={"refresh_token": spotifyapiserver_token(SAS_SECRET, RAW_REFRESH)})
    assert_error(response, 400, "invalid_grant", "Invalid refresh token")
    assert len(spotify.calls) == 0


def test_a_raw_token_is_sealed_while_unsealed_tokens_are_on(make_client, spotify, clock):
    expect(spotify, refresh_form(), json=TOKENS)
    client = make_client(UNSEALED_TOKENS_UNTIL="2026-05-28")  # the clock's day: still on
    body = assert_token_answer(client.post("/refresh", data={"refresh_token": RAW_REFRESH}))
    assert unseal(body["refresh_token"]).refresh_token == RAW_REFRESH
    clock.advance(DAY)  # the day after: off
    response = client.post("/refresh", data={"refresh_token": RAW_REFRESH})
    assert_error(response, 400, "invalid_grant", "Invalid refresh token")
    assert len(spotify.calls) == 1


# What is on, said by the page and by `check` (one list: config.token_settings)


def test_the_page_says_the_lifetime_and_which_migrations_are_on(make_client):
    page = make_client(REFRESH_TOKEN_LIFETIME="12h", SPOTIFYAPISERVER_SECRET_KEY=SAS_SECRET,
                       UNSEALED_TOKENS_UNTIL="2026-06-30").get("/").get_data(as_text=True)
    assert "a sign-in lasts 12 hours (shorter than Spotify&#39;s 6 months)" in page
    assert "tokens of SpotifyAPIServer are read" in page
    assert "tokens of the legacy Ruby/Sinatra services are not read" in page
    assert "raw Spotify refresh tokens are accepted and sealed through 2026-06-30 UTC" in page


@pytest.mark.parametrize(
    "until, says",
    [
        (None, "raw Spotify refresh tokens are refused (UNSEALED_TOKENS_UNTIL is not set)"),
        ("2999-01-01", "raw Spotify refresh tokens are accepted and sealed through 2999-01-01 UTC"),
        ("2001-01-01", "raw Spotify refresh tokens are refused: UNSEALED_TOKENS_UNTIL=2001-01-01 has passed"),
    ],
)
def test_check_says_whether_raw_tokens_are_on(config, until, says):
    lines: list[str] = []
    check._information(load_config({**config, **({"UNSEALED_TOKENS_UNTIL": until} if until else {})}), lines.append)
    assert any(line.startswith(f"info {says}") for line in lines)
    assert "info a sign-in lasts 184 days (REFRESH_TOKEN_LIFETIME); refreshing does not extend it" in lines
