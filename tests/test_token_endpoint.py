"""Unit tests of the standard token endpoint: grant_type at every path, what OAuth libraries add,
refresh answers that always carry a token, and a misconfigured server that says so."""

from __future__ import annotations

import base64
import logging

import pytest
import responses

from api import REFRESH_PATHS, SWAP_PATHS
from app import create_app
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET
from devtools.legacy import legacy_token
from tests import helpers as h

ALL_PATHS = SWAP_PATHS + REFRESH_PATHS
LIBRARY_EXTRAS = {"client_id": CLIENT_ID, "client_secret": "", "scope": "user-read-private", "state": "xyz"}
BASIC_FROM_LIBRARY = "Basic " + base64.b64encode(f"{CLIENT_ID}:".encode()).decode()


def test_spotify_guide_paths_are_served():
    assert "/v1/swap" in SWAP_PATHS and "/v1/refresh" in REFRESH_PATHS


# -- grant_type ----------------------------------------------------------------------------------


# grant_type is read at every path (each path once, each body style once): it decides the grant, not the path.
@pytest.mark.parametrize("path, style", [(path, "json" if n == 0 else "form") for n, path in enumerate(ALL_PATHS)])
def test_authorization_code_grant_is_a_swap_at_every_path(client, spotify, path, style):
    h.expect(spotify, h.swap_form(), json={**h.TOKENS, "refresh_token": h.RAW_REFRESH})
    body = h.assert_token_answer(h.post(client, path, {"grant_type": "authorization_code", "code": h.CODE}, style))
    assert h.unseal(body["refresh_token"]).refresh_token == h.RAW_REFRESH


@pytest.mark.parametrize("path, style", [(path, "json" if n == 0 else "form") for n, path in enumerate(ALL_PATHS)])
def test_refresh_token_grant_is_a_refresh_at_every_path(client, spotify, path, style):
    h.expect(spotify, h.refresh_form(), json=h.TOKENS)
    sent = h.seal(h.RAW_REFRESH)
    body = h.assert_token_answer(h.post(client, path, {"grant_type": "refresh_token", "refresh_token": sent}, style))
    assert body == {**h.TOKENS, "refresh_token": sent}


# Without grant_type each path does what its name says: test_app.py, at every path.


def test_without_grant_type_a_swap_path_does_not_refresh(client, spotify):
    h.assert_error(client.post("/api/token", data={"refresh_token": h.seal(h.RAW_REFRESH)}), 400, "invalid_request", "Missing 'code'")


def test_ios_sdk_refresh_body_still_works(client, spotify):
    """The iOS SDK v3: client_id, grant_type and a token percent-encoded down to letters and digits."""
    sent = h.seal(h.RAW_REFRESH)
    encoded = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in sent)
    h.expect(spotify, h.refresh_form(), json=h.TOKENS)
    response = client.post(
        "/refresh", data=f"client_id={CLIENT_ID}&grant_type=refresh_token&refresh_token={encoded}",
        content_type="application/x-www-form-urlencoded",
    )
    assert h.assert_token_answer(response)["refresh_token"] == sent


@pytest.mark.parametrize("grant", ["client_credentials", "password", "implicit", "AUTHORIZATION_CODE", "refresh-token"])
def test_other_grant_types_are_unsupported(client, spotify, grant):
    body = h.assert_error(
        client.post("/swap", data={"grant_type": grant, "code": h.CODE, "refresh_token": h.seal(h.RAW_REFRESH)}),
        400, "unsupported_grant_type",
    )
    assert grant not in body["error_description"]  # nothing the client sent is echoed
    assert len(spotify.calls) == 0


@pytest.mark.parametrize("value", [["refresh_token"], 1, True, {"a": 1}])
def test_grant_type_that_is_no_string_is_invalid_request(client, spotify, value):
    h.assert_error(client.post("/api/token", json={"grant_type": value, "code": h.CODE}), 400, "invalid_request")
    assert len(spotify.calls) == 0


def test_grant_type_twice_is_invalid_request(client, spotify):
    response = client.post("/api/token", data="grant_type=authorization_code&grant_type=refresh_token&code=c",
                           content_type="application/x-www-form-urlencoded")
    h.assert_error(response, 400, "invalid_request", "'grant_type' was given more than once")


# -- what OAuth libraries add --------------------------------------------------------------------


@pytest.mark.parametrize("style", ["form", "json"])
def test_library_fields_and_basic_auth_are_accepted_and_never_forwarded(client, spotify, style):
    # h.expect() matches the exact form and the service's own Basic credentials.
    h.expect(spotify, h.swap_form(), json={**h.TOKENS, "refresh_token": h.RAW_REFRESH})
    h.expect(spotify, h.refresh_form(), json=h.TOKENS)
    headers = {"Authorization": BASIC_FROM_LIBRARY}
    fields = {**LIBRARY_EXTRAS, "grant_type": "authorization_code", "code": h.CODE, "redirect_uri": h.CALLBACK}
    request = {"json": fields} if style == "json" else {"data": fields}
    sealed = h.assert_token_answer(client.post("/api/token", headers=headers, **request))["refresh_token"]
    fields = {**LIBRARY_EXTRAS, "grant_type": "refresh_token", "refresh_token": sealed}
    request = {"json": fields} if style == "json" else {"data": fields}
    h.assert_token_answer(client.post("/api/token", headers=headers, **request))
    assert len(spotify.calls) == 2


def test_browser_oauth_libraries_may_send_basic_auth_cross_origin(make_client, spotify):
    client = make_client(CORS_ORIGINS="https://app.example.com")
    response = client.options("/api/token", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    })
    assert response.status_code == 204
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()


@pytest.mark.parametrize("path", ["/api/token", "/refresh"])
def test_client_id_of_another_app_is_invalid_client(client, spotify, path):
    body = h.assert_error(
        client.post(path, data={"client_id": "someone-elses-app", "code": h.CODE, "refresh_token": h.seal(h.RAW_REFRESH)}),
        400, "invalid_client",
    )
    assert "another Spotify app" in body["error_description"]
    assert len(spotify.calls) == 0


# -- SpotifyAPI-NET's guide: the sealed token sent as `code` to the refresh URL --------------------


def test_a_sealed_token_as_code_at_a_refresh_path_is_a_refresh(client, spotify):
    h.expect(spotify, h.refresh_form(), json=h.TOKENS)
    sent = h.seal(h.RAW_REFRESH)
    assert h.assert_token_answer(client.post("/v1/refresh", data={"code": sent}))["refresh_token"] == sent


def test_a_legacy_token_as_code_at_a_refresh_path_is_a_refresh_and_migrates(make_client, spotify):
    vector = h.legacy_vectors()[0]
    h.expect(spotify, h.refresh_form(vector["plaintext"]), json=h.TOKENS)
    client = make_client(LEGACY_ENCRYPTION_SECRET=vector["secret"])
    body = h.assert_token_answer(client.post("/refresh", data={"code": vector["ciphertext"]}))
    assert h.unseal(body["refresh_token"]).refresh_token == vector["plaintext"]


@pytest.mark.parametrize("code", [h.CODE, "AQ-not-sealed-here", h.seal(h.RAW_REFRESH, h.SECRET_A)])
def test_a_code_that_does_not_open_at_a_refresh_path_is_missing_refresh_token(client, spotify, code):
    h.assert_error(client.post("/v1/refresh", data={"code": code}), 400, "invalid_request", "Missing 'refresh_token'")
    assert len(spotify.calls) == 0


def test_a_sealed_token_as_code_with_grant_type_refresh_token_is_not_read(client, spotify):
    """The fallback serves clients that name no grant; a standard request names its token properly."""
    response = client.post("/refresh", data={"grant_type": "refresh_token", "code": h.seal(h.RAW_REFRESH)})
    h.assert_error(response, 400, "invalid_request", "Missing 'refresh_token'")


def test_a_sealed_token_as_code_at_a_swap_path_is_a_code(client, spotify):
    sent = h.seal(h.RAW_REFRESH)
    h.expect(spotify, h.swap_form(sent), status=400, json={"error": "invalid_grant", "error_description": "Invalid authorization code"})
    h.assert_error(client.post("/swap", data={"code": sent}), 400, "invalid_grant")


# -- every refresh answer carries refresh_token --------------------------------------------------


def test_refresh_answer_carries_the_rotated_token_sealed(client, spotify):
    h.expect(spotify, h.refresh_form(), json={**h.TOKENS, "refresh_token": h.ROTATED})
    body = h.assert_token_answer(client.post("/api/token", data={"grant_type": "refresh_token", "refresh_token": h.seal(h.RAW_REFRESH)}))
    assert h.unseal(body["refresh_token"]).refresh_token == h.ROTATED


def test_refresh_answer_carries_the_token_resealed_under_the_newest_key(make_client, spotify):
    h.expect(spotify, h.refresh_form(), json=h.TOKENS)
    client = make_client(ENCRYPTION_SECRET=f"{h.SECRET_B},{h.SECRET_A}")
    body = h.assert_token_answer(client.post("/refresh", data={"refresh_token": h.seal(h.RAW_REFRESH, h.SECRET_A)}))
    assert h.unseal(body["refresh_token"], h.SECRET_B).refresh_token == h.RAW_REFRESH


def test_refresh_answer_carries_a_legacy_token_resealed(make_client, spotify):
    legacy = legacy_token("old-service-secret", h.RAW_REFRESH)
    h.expect(spotify, h.refresh_form(), json=h.TOKENS)
    client = make_client(LEGACY_ENCRYPTION_SECRET="old-service-secret")
    body = h.assert_token_answer(client.post("/refresh", data={"refresh_token": legacy}))
    assert h.unseal(body["refresh_token"]).refresh_token == h.RAW_REFRESH


# -- a misconfigured server says so, to its operator ---------------------------------------------


REFUSALS = [
    ({"error": "invalid_client", "error_description": "Invalid client secret"}, "SPOTIFY_CLIENT_SECRET"),
    ({"error": "invalid_client", "error_description": "Invalid client"}, "SPOTIFY_CLIENT_ID"),
    ({"error": "invalid_client"}, "SPOTIFY_CLIENT_ID"),
    ({"error": "unauthorized_client", "error_description": "Unauthorized client"}, "SPOTIFY_CLIENT_ID"),
]


@pytest.mark.parametrize("answer, variable, endpoint", [(*refusal, ("swap", "refresh")[n % 2])
                                                       for n, refusal in enumerate(REFUSALS)])
def test_spotify_refusing_the_services_credentials_is_a_5xx_and_logged_for_the_operator(
    make_client, spotify, caplog, endpoint, answer, variable
):
    caplog.set_level(logging.DEBUG)
    client = make_client(RATE_LIMIT_FAILURES="2/hour")
    form = h.swap_form() if endpoint == "swap" else h.refresh_form()
    spotify.post(h.TOKEN_URL, status=400, json=answer, match=[responses.matchers.urlencoded_params_matcher(form)])
    fields = {"code": h.CODE} if endpoint == "swap" else {"refresh_token": h.seal(h.RAW_REFRESH)}
    for _ in range(5):  # more than the failure budget: never counted against the app's user
        body = h.assert_error(client.post(f"/{endpoint}", data=fields), 500, "server_error")
        assert "misconfigured" in body["error_description"] and "retry later" in body["error_description"]
        assert "SPOTIFY" not in body["error_description"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "at most once a minute per worker"
    message = errors[0].getMessage()
    assert variable in message and answer["error"] in message
    other = {"SPOTIFY_CLIENT_SECRET", "SPOTIFY_CLIENT_ID"} - {variable}
    assert not any(name in message for name in other)
    assert CLIENT_SECRET not in caplog.text
    for secret in h.NEVER_SHOWN:
        assert secret not in caplog.text


def test_a_redirect_uri_spotify_does_not_know_goes_to_the_app_and_warns_the_operator(client, spotify, caplog):
    answer = {"error": "invalid_grant", "error_description": "Invalid redirect URI"}
    h.expect(spotify, h.swap_form(h.CODE, h.OTHER_CALLBACK), status=400, json=answer)
    response = client.post("/swap", data={"code": h.CODE, "redirect_uri": h.OTHER_CALLBACK})
    assert response.status_code == 400 and response.get_json() == answer
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert h.OTHER_CALLBACK in warning.getMessage() and "dashboard" in warning.getMessage()


def test_other_invalid_grants_warn_nobody(client, spotify, caplog):
    h.expect(spotify, h.swap_form(), status=400, json={"error": "invalid_grant", "error_description": "Invalid authorization code"})
    client.post("/swap", data={"code": h.CODE})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- flask --app app check -----------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch):
    """Run `flask check` in-process, with these variables as the environment."""

    def run(**variables: str):
        for name, value in h.BASE_CONFIG.items():
            monkeypatch.setenv(name, value)
        app = create_app()
        for name, value in variables.items():  # what the command reads, when it runs
            monkeypatch.setenv(name, value)
        return app.test_cli_runner().invoke(args=["check"])

    return run


def test_check_passes_a_good_deployment(cli, spotify):
    spotify.post(h.TOKEN_URL, json={"access_token": "app-token", "token_type": "Bearer", "expires_in": 3600},
                 match=[responses.matchers.urlencoded_params_matcher({"grant_type": "client_credentials"})])
    result = cli(LEGACY_ENCRYPTION_SECRET="old-secret")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["ok", "ok", "ok"]
    assert any("myapp://callback" in line and "https://example.com/callback" in line for line in lines)
    assert any("key ids" in line for line in lines) and any("tokens of the legacy Ruby/Sinatra services are read" in line for line in lines)
    for secret in (CLIENT_SECRET, h.BASE_CONFIG["ENCRYPTION_SECRET"], "old-secret"):
        assert secret not in result.output


@pytest.mark.parametrize("answer, variable", REFUSALS[:2])
def test_check_names_the_credential_spotify_refuses(cli, spotify, answer, variable):
    spotify.post(h.TOKEN_URL, status=400, json=answer)
    result = cli()
    assert result.exit_code != 0
    [failure] = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert variable in failure
    assert CLIENT_SECRET not in result.output


def test_check_names_an_unreachable_storage(cli, spotify):
    spotify.post(h.TOKEN_URL, json={"access_token": "app-token", "token_type": "Bearer"})
    result = cli(RATE_LIMIT_STORAGE_URI="redis://:hunter2-password@127.0.0.1:1/0")
    assert result.exit_code != 0
    [failure] = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert "RATE_LIMIT_STORAGE_URI" in failure
    assert "hunter2" not in result.output


def test_check_reports_a_bad_configuration_without_calling_spotify(cli, spotify):
    result = cli(SPOTIFY_CLIENT_SECRET="", ENCRYPTION_SECRET="tooShortSecret")
    assert result.exit_code != 0
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert any("SPOTIFY_CLIENT_SECRET" in line for line in failures)
    assert any("ENCRYPTION_SECRET" in line for line in failures)
    assert "tooShortSecret" not in result.output
    assert len(spotify.calls) == 0
