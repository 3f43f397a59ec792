"""Unit tests of the HTTP contract: what reaches Spotify, and what every answer looks like."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import requests
from flask import jsonify, request

from api import REFRESH_PATHS, SWAP_PATHS
from crypto import Opened, TokenSealer
from devtools.legacy import legacy_token
from tests.helpers import (
    CALLBACK,
    CODE,
    JSON_CT,
    NEVER_SHOWN,
    OTHER_CALLBACK,
    RAW_REFRESH,
    ROTATED,
    SECRET_A,
    SECRET_B,
    TOKEN_URL,
    TOKENS,
    VERIFIER,
    CheckedClient,
    assert_error,
    assert_token_answer,
    expect,
    legacy_vectors,
    post,
    refresh_form,
    seal,
    swap_form,
    unseal,
)

ROOT = Path(__file__).resolve().parent.parent
LEGACY_VECTORS = legacy_vectors()
GRANT_ID = "0123456789abcdef0123456789abcdef"

# Swap


# Routing once per path (a swap at each swap path, a refresh at each refresh path), each body style once: the
# paths meet in one view, and what is checked of a request (the fields, their shapes) is checked on one path.
PATH_STYLES = [(path, "json" if path == "/swap" else "form") for path in SWAP_PATHS]
REFRESH_PATH_STYLES = [(path, "json" if path == "/refresh" else "form") for path in REFRESH_PATHS]


@pytest.mark.parametrize("path, style", PATH_STYLES + [("/swap", "form")])
def test_swap_sends_code_and_seals_refresh_token(client, spotify, clock, path, style):
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH, "extra": [1]})
    body = assert_token_answer(post(client, path, {"code": CODE}, style))
    assert {k: body[k] for k in TOKENS} == TOKENS
    assert body["extra"] == [1]  # fields Spotify adds pass through
    assert type(body["expires_in"]) is int
    opened = unseal(body["refresh_token"])
    assert (opened.refresh_token, opened.needs_reseal, opened.signed_in_at) == (RAW_REFRESH, False, int(clock.now))
    assert re.fullmatch(r"[0-9a-f]{32}", opened.grant_id or "")
    assert len(spotify.calls) == 1
    assert "code_verifier" not in spotify.calls[0].request.body


@pytest.mark.parametrize("style", ["form", "json"])
def test_swap_with_allowed_non_default_redirect_uri(client, spotify, style):
    expect(spotify, swap_form(redirect_uri=OTHER_CALLBACK), json=TOKENS)
    fields = {"code": CODE, "redirect_uri": OTHER_CALLBACK}
    assert assert_token_answer(post(client, "/swap", fields, style))["access_token"]


@pytest.mark.parametrize(
    "redirect_uri",
    ["https://evil.example/callback", CALLBACK + "/", "MYAPP://callback", OTHER_CALLBACK + "?x=1"],
)
def test_swap_with_redirect_uri_not_allowed(client, spotify, redirect_uri):
    response = client.post("/swap", data={"code": CODE, "redirect_uri": redirect_uri})
    assert "SPOTIFY_CLIENT_CALLBACK_URL" in assert_error(response, 400, "invalid_request")["error_description"]
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("path, style", [("/api/token", "form"), ("/swap", "json")])
def test_swap_forwards_code_verifier(client, spotify, path, style):
    expect(spotify, swap_form(code_verifier=VERIFIER), json=TOKENS)
    fields = {"code": CODE, "code_verifier": VERIFIER}
    assert assert_token_answer(post(client, path, fields, style))["access_token"]


@pytest.mark.parametrize("verifier", ["short", "x" * 129, "v" * 42 + "!", 43 * "é"])
def test_swap_with_malformed_code_verifier(client, spotify, verifier):
    response = client.post("/swap", data={"code": CODE, "code_verifier": verifier})
    assert_error(response, 400, "invalid_request")
    assert len(spotify.calls) == 0


def test_swap_without_refresh_token_in_spotify_answer(client, spotify):
    expect(spotify, swap_form(), json=TOKENS)
    body = assert_token_answer(client.post("/swap", data={"code": CODE}))
    assert "refresh_token" not in body


@pytest.mark.parametrize("sent, kept", [("3600", 3600), (3600.0, 3600), (3599, 3599)])
def test_expires_in_is_an_integer(client, spotify, sent, kept):
    expect(spotify, swap_form(), json={**TOKENS, "expires_in": sent})
    body = assert_token_answer(client.post("/swap", data={"code": CODE}))
    assert body["expires_in"] == kept
    assert type(body["expires_in"]) is int


@pytest.mark.parametrize(
    "sent", ["3600s", "nan", "inf", True, None, [3600], "", 1e400], ids=repr
)
def test_expires_in_that_is_no_number_of_seconds_is_502(client, spotify, sent):
    expect(spotify, swap_form(), json={**TOKENS, "expires_in": sent})
    assert_error(client.post("/swap", data={"code": CODE}), 502, "server_error")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("status", [200, 400])
def test_spotify_answer_with_non_json_numbers_is_502(client, spotify, constant, status):
    """Python's json reads NaN and Infinity; passed on, they would make our answer invalid JSON."""
    body = '{"access_token": "BQ-x", "error": "invalid_grant", "x": ' + constant + "}"
    spotify.post(TOKEN_URL, status=status, body=body, content_type="application/json")
    assert_error(client.post("/swap", data={"code": CODE}), 502, "server_error")


def test_spotify_timeout_is_applied(make_client, spotify):
    expect(spotify, swap_form(), json=TOKENS)
    make_client(SPOTIFY_TIMEOUT="2.5").post("/swap", data={"code": CODE})
    assert spotify.calls[0].request.req_kwargs["timeout"] == 2.5


def test_charset_in_json_content_type(client, spotify):
    expect(spotify, swap_form(), json=TOKENS)
    response = client.post(
        "/swap",
        data=json.dumps({"code": CODE}),
        content_type="application/json; charset=utf-8",
    )
    assert_token_answer(response)


# Refresh


@pytest.mark.parametrize("path, style", REFRESH_PATH_STYLES + [("/refresh", "form")])
def test_refresh_sends_opened_token(client, spotify, path, style):
    expect(spotify, refresh_form(), json=TOKENS)
    sent = seal(RAW_REFRESH)
    body = assert_token_answer(post(client, path, {"refresh_token": sent}, style))
    # Spotify kept the token: the answer carries the one sent, so a client that stores what it
    # receives never loses it.
    assert body == {**TOKENS, "refresh_token": sent}


def test_refresh_rotation_comes_back_sealed_with_the_same_sign_in(client, spotify, clock):
    """The lifetime is the sign-in's: a rotated token keeps its time and grant id."""
    expect(spotify, refresh_form(), json={**TOKENS, "refresh_token": ROTATED})
    sent = seal(RAW_REFRESH, signed_in_at=int(clock.now) - 86400, grant_id=GRANT_ID)
    body = assert_token_answer(client.post("/api/refresh_token", data={"refresh_token": sent}))
    assert unseal(body["refresh_token"]) == Opened(ROTATED, signed_in_at=int(clock.now) - 86400, grant_id=GRANT_ID)


# Every way to break a token is test_crypto.py's (the crypto layer owns them); here, one token that does not open,
# in each body style, and tokens that reach the opener by other routes: a raw Spotify token (the raw-token
# fallback is off), text that is no token, and one that is not ASCII.
INVALID_REFRESH_TOKENS = {
    "another key": seal(RAW_REFRESH, "another-secret-0123456789abcdef"),
    "raw spotify token": RAW_REFRESH,
    "(null)": "(null)",
    "non-ascii": "tökén",
}


@pytest.mark.parametrize("token", INVALID_REFRESH_TOKENS.values(), ids=INVALID_REFRESH_TOKENS)
def test_invalid_refresh_token(client, spotify, token):
    for style in ("form", "json"):
        response = post(client, "/refresh", {"refresh_token": token}, style)
        assert_error(response, 400, "invalid_grant", "Invalid refresh token")
    assert len(spotify.calls) == 0


# Malformed requests: 400 invalid_request, Spotify not called

# A request's fields are read by one function for every path: one swap path and one refresh path.
ALL_PATHS = [("/swap", "code"), ("/refresh", "refresh_token")]


@pytest.mark.parametrize("path, field", ALL_PATHS)
@pytest.mark.parametrize("case", ["empty form", "other field only", "blank field"])
def test_missing_or_empty_field_in_form(client, spotify, path, field, case):
    fields = {"empty form": {}, "other field only": {"other": "x"}, "blank field": {field: ""}}
    assert_error(client.post(path, data=fields[case]), 400, "invalid_request")
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("path, field", ALL_PATHS)
@pytest.mark.parametrize("value", [None, "", 0, 1.5, True, [], ["x"], {"a": "b"}])
def test_missing_empty_or_non_string_field_in_json(client, spotify, path, field, value):
    assert_error(client.post(path, json={field: value}), 400, "invalid_request")
    assert len(spotify.calls) == 0


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"code": "x"', b"[]", b'["code"]', b'"code"', b"42", b"null", b"\xff\xfe{}"],
)
def test_unparseable_or_non_object_json(client, spotify, body):
    response = client.post("/api/token", data=body, content_type=JSON_CT)
    assert_error(response, 400, "invalid_request")
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("path, field", ALL_PATHS)
def test_duplicate_form_field(client, spotify, path, field):
    value = CODE if field == "code" else seal(RAW_REFRESH)
    body = f"{field}={value}&{field}={value}"
    response = client.post(path, data=body, content_type="application/x-www-form-urlencoded")
    assert_error(response, 400, "invalid_request")
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("path, field", ALL_PATHS)
def test_no_body(client, spotify, path, field):
    assert_error(client.post(path), 400, "invalid_request")
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("code", ["has space", "tab\tcode", "nul\x00", "ünï", "x" * 4097])
def test_malformed_code(client, spotify, code):
    assert_error(client.post("/swap", data={"code": code}), 400, "invalid_request")
    assert len(spotify.calls) == 0


# What Spotify answers, and what the client gets


def call(client, endpoint: str):
    """A well-formed swap or refresh, after Spotify's answer is registered."""
    if endpoint == "swap":
        return client.post("/swap", data={"code": CODE})
    return client.post("/refresh", data={"refresh_token": seal(RAW_REFRESH)})


def expect_call(spotify, endpoint: str, **answer):
    return expect(spotify, swap_form() if endpoint == "swap" else refresh_form(), **answer)


ENDPOINTS = ["swap", "refresh"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    "status, body",
    [
        (400, {"error": "invalid_grant", "error_description": "Invalid authorization code"}),
        (400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}),
        (400, {"error": "invalid_request"}),
        (401, {"error": "invalid_token", "error_description": "Invalid client"}),
        (403, {"error": "access_denied", "error_description": "Nope", "extra": 1}),
    ],
)
def test_spotify_4xx_json_passes_through(client, spotify, endpoint, status, body):
    expect_call(spotify, endpoint, status=status, json=body)
    response = call(client, endpoint)
    assert response.status_code == status
    assert response.headers["Content-Type"] == JSON_CT
    if endpoint == "refresh" and body["error"] == "invalid_grant":  # told why and not to retry: test_lifetime.py
        assert response.get_json()["error"] == "invalid_grant"
        assert body["error_description"] in response.get_json()["error_description"]
    else:
        assert response.get_json() == body


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_spotify_429_forwards_retry_after(client, spotify, endpoint):
    expect_call(spotify, endpoint, status=429, body="", headers={"Retry-After": "7"})
    response = call(client, endpoint)
    assert_error(response, 429, "temporarily_unavailable")
    assert response.headers["Retry-After"] == "7"


@pytest.mark.parametrize(
    "sent, forwarded",
    [("1.5", "2"), (" 30 ", "30"), ("0", "0"), ("soon", None), ("", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", "0")],
)
def test_spotify_429_retry_after_is_forwarded_in_whole_seconds(client, spotify, sent, forwarded):
    expect_call(spotify, "swap", status=429, body="", headers={"Retry-After": sent})
    response = call(client, "swap")
    assert_error(response, 429, "temporarily_unavailable")
    assert response.headers.get("Retry-After") == forwarded


def test_spotify_429_retry_after_as_a_date_is_forwarded_as_seconds(client, spotify):
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    expect_call(spotify, "swap", status=429, body="", headers={"Retry-After": when})
    response = call(client, "swap")
    assert 110 <= int(response.headers["Retry-After"]) <= 121


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_spotify_429_with_json_body(client, spotify, endpoint):
    body = {"error": "rate_limited", "error_description": "API rate limit exceeded"}
    expect_call(spotify, endpoint, status=429, json=body, headers={"Retry-After": "30"})
    response = call(client, endpoint)
    assert response.status_code == 429
    assert response.get_json() == body
    assert response.headers["Retry-After"] == "30"


# Each bad answer once, on a swap or a refresh in turn: both endpoints read Spotify's answer with one function.
BAD_ANSWERS = [
    {"status": 500, "body": "<html><body>Internal Server Error</body></html>"},
    {"status": 502, "body": "<html>Bad Gateway</html>", "content_type": "text/html"},
    {"status": 503, "json": {"error": "server_error"}},
    {"status": 200, "body": "<html>maintenance</html>", "content_type": "text/html"},
    {"status": 200, "json": {"token_type": "Bearer", "expires_in": 3600}},
    {"status": 200, "json": {**TOKENS, "access_token": ""}},
    {"status": 200, "json": {**TOKENS, "access_token": 42}},
    {"status": 200, "json": [TOKENS]},
    {"status": 400, "body": "<html>Bad Request</html>", "content_type": "text/html"},
    {"status": 404, "json": {"message": "no error field"}},
    {"status": 302, "body": "", "headers": {"Location": "https://example.com/"}},
]


@pytest.mark.parametrize(
    "endpoint, answer", [(ENDPOINTS[n % 2], answer) for n, answer in enumerate(BAD_ANSWERS)],
    ids=[f"{a['status']}-{'json' if 'json' in a else 'text'}" for a in BAD_ANSWERS],
)
def test_spotify_bad_answer_is_502(client, spotify, endpoint, answer):
    expect_call(spotify, endpoint, **answer)
    assert_error(call(client, endpoint), 502, "server_error")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_spotify_unreachable_is_503_and_not_retried(client, spotify, endpoint):
    expect_call(spotify, endpoint, body=requests.exceptions.ConnectionError("refused"))
    assert_error(call(client, endpoint), 503, "temporarily_unavailable")
    assert len(spotify.calls) == 1


@pytest.mark.parametrize(
    "endpoint, timeout", [("swap", requests.exceptions.ConnectTimeout), ("refresh", requests.exceptions.ReadTimeout)]
)
def test_spotify_timeout_is_504(client, spotify, endpoint, timeout):
    expect_call(spotify, endpoint, body=timeout("too slow"))
    assert_error(call(client, endpoint), 504, "temporarily_unavailable")
    assert len(spotify.calls) == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_spotify_answer_cut_off_is_502(client, spotify, endpoint):
    expect_call(spotify, endpoint, body=requests.exceptions.ChunkedEncodingError("reset"))
    assert_error(call(client, endpoint), 502, "server_error")


# HTTP-level errors are JSON too


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/nope"), ("POST", "/swap/"), ("PUT", "/api/tokens"), ("DELETE", "/health/x"), ("POST", "/callback/x")],
)
def test_unknown_path_is_404_json(client, spotify, method, path):
    assert_error(client.open(path, method=method), 404, "not_found")


# Each token path once, with one of the methods it does not take.
@pytest.mark.parametrize(
    "method, path", [(("GET", "PUT", "DELETE", "PATCH")[n % 4], path) for n, path in enumerate(SWAP_PATHS + REFRESH_PATHS)]
)
def test_wrong_method_is_405_json_with_allow(client, spotify, method, path):
    response = client.open(path, method=method)
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_post_to_health_is_405_json_with_allow(client, spotify):
    response = client.post("/health")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["Allow"]


@pytest.mark.parametrize("path, field, style", [("/swap", "code", "form"), ("/refresh", "refresh_token", "json")])
def test_body_over_64_kib_is_413_json(client, spotify, path, field, style):
    response = post(client, path, {field: "a" * (64 * 1024)}, style)
    assert_error(response, 413, "invalid_request")
    assert len(spotify.calls) == 0


def test_body_of_exactly_64_kib_is_read(client, spotify):
    body = "code=" + "a" * (64 * 1024 - len("code="))
    response = client.post("/swap", data=body, content_type="application/x-www-form-urlencoded")
    # Read and refused for its content (too long a code), not for its size.
    assert_error(response, 400, "invalid_request")


# Health


def test_health(client, spotify):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == JSON_CT
    assert response.get_json() == {"status": "ok"}
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("path, body", [("/livez", {"status": "ok"}), ("/readyz", {"status": "ready"})])
def test_live_and_ready(client, spotify, path, body):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == JSON_CT
    assert response.get_json() == body
    assert len(spotify.calls) == 0


def test_not_ready_once_a_stop_begins_but_still_alive(app, spotify):
    """server.Worker calls begin_stop on SIGTERM: /readyz says 503 at once, /livez and /health stay 200, and the
    token endpoint still serves (the instance goes on serving for STOP_DELAY)."""
    client = app.test_client()
    app.begin_stop()
    assert_error(client.get("/readyz"), 503, "temporarily_unavailable", "Not ready: this instance is stopping")
    assert client.get("/livez").status_code == 200
    assert client.get("/health").status_code == 200
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    assert client.post("/swap", data={"code": CODE}).status_code == 200


@pytest.mark.parametrize("failures", ["60/minute", "off"])  # off: no limit counts there, sign-outs still live there
@pytest.mark.parametrize("check", ["says no", "raises"])
def test_not_ready_while_its_redis_does_not_answer(make_client, spotify, monkeypatch, failures, check):
    """Nothing listens at RATE_LIMIT_STORAGE_URI's port: /readyz says so; /livez never asks it. The same when asking
    raises (limits' Redis check says False for every error today; another storage, or its next version, may not)."""
    from limits.storage import RedisStorage

    from devtools.process import free_port

    if check == "raises":
        def refused(self: RedisStorage) -> bool:
            raise ConnectionError("Error 111 connecting: Connection refused.")

        monkeypatch.setattr(RedisStorage, "check", refused)
    client = make_client(RATE_LIMIT_FAILURES=failures, RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}")
    assert_error(client.get("/readyz"), 503, "temporarily_unavailable",
                 "Not ready: its Redis (RATE_LIMIT_STORAGE_URI) does not answer")
    assert client.get("/livez").status_code == 200


# Unexpected failures: 500 JSON, a traceback in the log, nothing secret anywhere


def _assert_log_is_clean(caplog, *also: str) -> None:
    logged = caplog.text + "".join(
        str(r.args) + r.getMessage() + (r.exc_text or "") for r in caplog.records
    )
    for secret in NEVER_SHOWN + also:
        assert secret not in logged, "a log line showed a secret, code or token"


def _explode(*args, **kwargs):
    raise RuntimeError("sealer exploded")


def test_unexpected_exception_on_swap_is_500_json_and_logs_no_secret(
    client, spotify, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(TokenSealer, "seal", _explode)
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    assert_error(client.post("/swap", data={"code": CODE}), 500, "server_error")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None
    assert "sealer exploded" in caplog.text  # the traceback was logged
    _assert_log_is_clean(caplog, TOKENS["access_token"])


def test_unexpected_exception_on_refresh_is_500_json_and_logs_no_secret(
    client, spotify, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(TokenSealer, "open", _explode)
    sealed = seal(RAW_REFRESH)
    assert_error(client.post("/refresh", json={"refresh_token": sealed}), 500, "server_error")
    assert "sealer exploded" in caplog.text
    _assert_log_is_clean(caplog, sealed)
    assert len(spotify.calls) == 0


def test_ordinary_traffic_logs_no_secret(client, spotify, caplog):
    caplog.set_level(logging.DEBUG)
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    expect(spotify, refresh_form(), status=400, json={"error": "invalid_grant"})
    sealed = assert_token_answer(client.post("/swap", data={"code": CODE}))["refresh_token"]
    client.post("/refresh", data={"refresh_token": sealed})
    client.post("/refresh", data={"refresh_token": RAW_REFRESH})
    client.post("/swap", data={"code": CODE, "redirect_uri": "https://evil.example/"})
    _assert_log_is_clean(caplog, sealed, TOKENS["access_token"])


# Key rotation


def test_token_under_old_key_is_resealed_under_new(make_client, spotify, clock):
    expect(spotify, refresh_form(), json=TOKENS)
    client = make_client(ENCRYPTION_SECRET=f"{SECRET_B},{SECRET_A}")
    sent = seal(RAW_REFRESH, SECRET_A, signed_in_at=int(clock.now), grant_id=GRANT_ID)
    body = assert_token_answer(client.post("/refresh", data={"refresh_token": sent}))
    assert unseal(body["refresh_token"], SECRET_B) == Opened(RAW_REFRESH, signed_in_at=int(clock.now), grant_id=GRANT_ID)


def test_rotation_under_old_key_comes_back_under_new(make_client, spotify):
    expect(spotify, refresh_form(), json={**TOKENS, "refresh_token": ROTATED})
    client = make_client(ENCRYPTION_SECRET=f"{SECRET_B},{SECRET_A}")
    body = assert_token_answer(
        client.post("/refresh", data={"refresh_token": seal(RAW_REFRESH, SECRET_A)})
    )
    assert unseal(body["refresh_token"], SECRET_B).refresh_token == ROTATED


def test_token_under_new_key_is_not_resealed(make_client, spotify):
    expect(spotify, refresh_form(), json=TOKENS)
    client = make_client(ENCRYPTION_SECRET=f"{SECRET_B},{SECRET_A}")
    sent = seal(RAW_REFRESH, SECRET_B)
    body = assert_token_answer(client.post("/refresh", data={"refresh_token": sent}))
    assert body["refresh_token"] == sent  # kept as sent: not re-sealed


def test_token_under_removed_key_is_invalid_grant(make_client, spotify):
    client = make_client(ENCRYPTION_SECRET=SECRET_B)
    response = client.post("/refresh", data={"refresh_token": seal(RAW_REFRESH, SECRET_A)})
    assert_error(response, 400, "invalid_grant", "Invalid refresh token")
    assert len(spotify.calls) == 0


def test_swap_seals_under_first_key(make_client, spotify):
    expect(spotify, swap_form(), json={**TOKENS, "refresh_token": RAW_REFRESH})
    client = make_client(ENCRYPTION_SECRET=f"{SECRET_B},{SECRET_A}")
    body = assert_token_answer(client.post("/swap", data={"code": CODE}))
    assert not unseal(body["refresh_token"], SECRET_B).needs_reseal


# Legacy tokens


def _legacy_client(make_client, secret: str, plaintext: str) -> CheckedClient:
    client = make_client(LEGACY_ENCRYPTION_SECRET=secret)
    if len(plaintext) >= 16:  # long enough to be unmistakable in an answer
        client.never_shown.add(plaintext)
    return client


# Every vector opens in test_crypto.py; here each refreshes and migrates (its own secret each), the last in JSON.
@pytest.mark.parametrize(
    "vector, style", [(v, "json" if v is LEGACY_VECTORS[-1] else "form") for v in LEGACY_VECTORS],
    ids=lambda v: v["plaintext"][:12] if isinstance(v, dict) else v,
)
def test_legacy_token_refreshes_and_migrates(make_client, spotify, vector, style):
    expect(spotify, refresh_form(vector["plaintext"]), json=TOKENS)
    client = _legacy_client(make_client, vector["secret"], vector["plaintext"])
    response = post(client, "/refresh", {"refresh_token": vector["ciphertext"]}, style)
    body = assert_token_answer(response)
    migrated = unseal(body["refresh_token"])
    assert (migrated.refresh_token, migrated.needs_reseal) == (vector["plaintext"], False)
    assert migrated.signed_in_at is None and migrated.grant_id  # sign-in time not known: never invented
    assert {k: body[k] for k in TOKENS} == TOKENS


def test_legacy_token_with_plus_sent_unencoded(make_client, spotify):
    """A client that did not URL-encode the form: every '+' arrives as a space."""
    plaintext = "AQC-legacy-plus-11"
    ciphertext = legacy_token("s3cret", plaintext)
    assert "+" in ciphertext
    expect(spotify, refresh_form(plaintext), json={**TOKENS, "refresh_token": ROTATED})
    client = _legacy_client(make_client, "s3cret", plaintext)
    body_text = "refresh_token=" + ciphertext.replace("\n", "%0A")
    response = client.post(
        "/api/refresh_token", data=body_text, content_type="application/x-www-form-urlencoded"
    )
    assert unseal(assert_token_answer(response)["refresh_token"]).refresh_token == ROTATED


def test_legacy_token_with_literal_backslash_n_in_json(make_client, spotify):
    vector = LEGACY_VECTORS[1]
    expect(spotify, refresh_form(vector["plaintext"]), json=TOKENS)
    client = _legacy_client(make_client, vector["secret"], vector["plaintext"])
    damaged = vector["ciphertext"].replace("\n", "\\n")
    body = assert_token_answer(client.post("/refresh", json={"refresh_token": damaged}))
    assert unseal(body["refresh_token"]).refresh_token == vector["plaintext"]


def test_legacy_token_without_legacy_secret_is_invalid_grant(client, spotify):
    vector = LEGACY_VECTORS[0]
    response = client.post("/refresh", data={"refresh_token": vector["ciphertext"]})
    assert_error(response, 400, "invalid_grant", "Invalid refresh token")
    assert len(spotify.calls) == 0


def test_legacy_token_with_wrong_secret_is_invalid_grant(make_client, spotify):
    vector = LEGACY_VECTORS[0]
    client = make_client(LEGACY_ENCRYPTION_SECRET=vector["secret"] + "-wrong")
    response = client.post("/refresh", data={"refresh_token": vector["ciphertext"]})
    assert_error(response, 400, "invalid_grant", "Invalid refresh token")
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("plaintext", ["", "hello world", "tab\there", "ünïcode", "AQ\x00"])
def test_legacy_token_opening_to_garbage_is_invalid_grant(make_client, spotify, plaintext):
    client = make_client(LEGACY_ENCRYPTION_SECRET="s3cret")
    response = client.post(
        "/refresh", data={"refresh_token": legacy_token("s3cret", plaintext)}
    )
    assert_error(response, 400, "invalid_grant", "Invalid refresh token")
    assert len(spotify.calls) == 0


def test_own_tokens_unaffected_by_legacy_secret(make_client, spotify):
    expect(spotify, refresh_form(), json=TOKENS)
    client = make_client(LEGACY_ENCRYPTION_SECRET="s3cret")
    sent = seal(RAW_REFRESH)
    body = assert_token_answer(client.post("/refresh", data={"refresh_token": sent}))
    assert body["refresh_token"] == sent  # an own token under the current key is not resealed


# CORS

ORIGIN = "https://app.example"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


def preflight(client, path: str, origin: str):
    return client.options(path, headers={"Origin": origin, **PREFLIGHT})


@pytest.mark.parametrize("path", ["/swap", "/api/refresh_token"])
def test_cors_preflight_from_allowed_origin(make_client, spotify, path):
    response = preflight(make_client(CORS_ORIGINS=ORIGIN), path, ORIGIN)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "content-type" in response.headers["Access-Control-Allow-Headers"].lower()
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("allowed", [ORIGIN, f"https://other.example,{ORIGIN}", "*"])
def test_cors_actual_request_from_allowed_origin(make_client, spotify, allowed):
    expect(spotify, swap_form(), json=TOKENS)
    client = make_client(CORS_ORIGINS=allowed)
    response = client.post("/swap", data={"code": CODE}, headers={"Origin": ORIGIN})
    assert_token_answer(response)
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "origin" in response.vary


def test_cors_error_answer_to_allowed_origin_is_readable(make_client, spotify):
    client = make_client(CORS_ORIGINS=ORIGIN)
    response = client.post("/refresh", data={"refresh_token": "(null)"}, headers={"Origin": ORIGIN})
    assert_error(response, 400, "invalid_grant")
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


@pytest.mark.parametrize(
    "method, path, status", [("POST", "/swapp", 404), ("POST", "/swap/", 404), ("POST", "/health", 405)]
)
def test_cors_unrouted_error_answer_to_allowed_origin_is_readable(make_client, spotify, method, path, status):
    response = make_client(CORS_ORIGINS=ORIGIN).open(path, method=method, headers={"Origin": ORIGIN})
    assert response.status_code == status
    assert response.headers["Content-Type"] == JSON_CT
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers.getlist("Vary") == ["Origin"]


def test_cors_exposes_retry_after_to_browser_code(make_client, spotify):
    expect_call(spotify, "swap", status=429, body="", headers={"Retry-After": "7"})
    response = make_client(CORS_ORIGINS=ORIGIN).post("/swap", data={"code": CODE}, headers={"Origin": ORIGIN})
    assert response.status_code == 429
    assert "retry-after" in response.headers["Access-Control-Expose-Headers"].lower()


def test_cors_other_origin_gets_no_allow_origin(make_client, spotify):
    client = make_client(CORS_ORIGINS=ORIGIN)
    response = preflight(client, "/refresh", "https://evil.example")
    assert "Access-Control-Allow-Origin" not in response.headers
    response = client.post(
        "/refresh", data={"refresh_token": "(null)"}, headers={"Origin": "https://evil.example"}
    )
    assert_error(response, 400, "invalid_grant")
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("origin", ["https://anything.example", "http://localhost:3000"])
def test_cors_wildcard_echoes_any_origin(make_client, spotify, origin):
    client = make_client(CORS_ORIGINS="*")
    assert preflight(client, "/api/token", origin).headers["Access-Control-Allow-Origin"] == origin
    response = client.post("/refresh", data={"refresh_token": "(null)"}, headers={"Origin": origin})
    assert response.headers["Access-Control-Allow-Origin"] == origin


def test_cors_unset_sends_no_cors_headers(client, spotify):
    responses_seen = [
        preflight(client, "/swap", ORIGIN),
        client.post("/refresh", data={"refresh_token": "(null)"}, headers={"Origin": ORIGIN}),
    ]
    for response in responses_seen:
        assert not [h for h in response.headers.keys() if h.lower().startswith("access-control-")]


# Trusted proxies


def _probe_client(make_app, **overrides: str):
    app = make_app(**overrides)

    @app.get("/_test/remote")
    def remote():
        return jsonify(remote_addr=request.remote_addr, scheme=request.scheme)

    return app.test_client()


FORWARDED = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7", "X-Forwarded-Proto": "https"}


def test_one_trusted_proxy_takes_the_client_from_x_forwarded_for(make_app):
    client = _probe_client(make_app, TRUSTED_PROXIES="1")
    # One proxy trusted: only the address it appended counts, not what the client claimed.
    answer = client.get("/_test/remote", headers=FORWARDED).get_json()
    assert answer == {"remote_addr": "203.0.113.7", "scheme": "https"}


def test_no_trusted_proxy_ignores_x_forwarded_for(make_app):
    for overrides in ({"TRUSTED_PROXIES": "0"}, {}):
        client = _probe_client(make_app, **overrides)
        answer = client.get("/_test/remote", headers=FORWARDED).get_json()
        assert answer == {"remote_addr": "127.0.0.1", "scheme": "http"}


# gen-secret

SECRET_SHAPE = re.compile(r"[A-Za-z0-9_-]{32,}")


def test_gen_secret_through_cli_runner(make_app):
    runner = make_app().test_cli_runner()
    first, second = (runner.invoke(args=["gen-secret"]) for _ in range(2))
    assert first.exit_code == second.exit_code == 0
    assert SECRET_SHAPE.fullmatch(first.output.strip())
    assert first.output != second.output


def _flask(*args: str) -> subprocess.CompletedProcess:
    # No configuration at all: not the test's environment, not a developer's .env.
    environ = {"PATH": os.environ["PATH"], "FLASK_SKIP_DOTENV": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.e2e
def test_gen_secret_works_without_configuration():
    result = _flask("gen-secret")
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert SECRET_SHAPE.fullmatch(secret)
    assert len(secret) >= 32


@pytest.mark.e2e
def test_other_commands_stop_on_missing_configuration_with_a_message():
    result = _flask("routes")
    assert result.returncode != 0
    assert "ENCRYPTION_SECRET" in result.stderr
    assert "flask --app app gen-secret" in result.stderr
    assert "Traceback" not in result.stderr
