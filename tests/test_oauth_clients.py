"""End-to-end: real, unmodified OAuth 2.0 client libraries use the Procfile's server as their token
endpoint, and those with a revocation call sign out at /revoke; a wrong client secret is the server's problem;
`flask --app app check` checks for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from authlib.integrations.base_client import OAuthError as AuthlibError
from authlib.integrations.requests_client import OAuth2Session as AuthlibSession
from oauthlib.oauth2 import InvalidGrantError, WebApplicationClient
from requests_oauthlib import OAuth2Session as OAuthlibSession

from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET
from devtools.process import CLOSE, ROOT, Server, json_answer
from tests.helpers import BASE_CONFIG, SEALER, server_env, unique
from tests.tools import needs

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

CALLBACK = BASE_CONFIG["SPOTIFY_CLIENT_CALLBACK_URL"].split(",")[0]


@pytest.fixture(scope="module")
def server(served):
    return served


def assert_holds(token: dict, code: str, access_token_prefix: str = "access-") -> None:
    """What a client library ends up holding: a fresh access token and the sealed refresh token."""
    assert token["access_token"].startswith(access_token_prefix)
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3600
    assert SEALER.open(token["refresh_token"]).refresh_token == f"AQ-refresh-for-{code}"


def assert_spotify_got_only_the_grants(fake, code: str) -> None:
    forms = [r["form"] for r in fake.requests]
    assert forms[0] == {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK}
    assert forms[1:] == [{"grant_type": "refresh_token", "refresh_token": f"AQ-refresh-for-{code}"}] * 3


def swap_then_refresh_three_times(client, server: Server, code: str, first: dict) -> None:
    """What the issue asks of each library: the swap, two refreshes at the token URL, one at /refresh."""
    assert_holds(first, code)
    tokens = [first] + [client.refresh_token(url) for url in (server.url + "/api/token",) * 2 + (server.url + "/refresh",)]
    for token in tokens[1:]:
        assert_holds(token, code)
    assert client.token["refresh_token"] == first["refresh_token"]
    assert len({token["access_token"] for token in tokens}) == 4


def test_authlib_swaps_then_refreshes_at_the_token_url(server, fake):
    code = unique("authlib")
    token_url = server.url + "/api/token"
    # authlib without a client secret sends client_id in the body (no Basic header).
    with AuthlibSession(CLIENT_ID, redirect_uri=CALLBACK, token_endpoint=token_url, headers=CLOSE) as client:
        swap_then_refresh_three_times(client, server, code, client.fetch_token(token_url, code=code))
    assert_spotify_got_only_the_grants(fake, code)


def test_authlib_refreshes_by_itself_when_the_token_has_expired(server, fake):
    code = unique("authlib-auto")
    token_url = server.url + "/api/token"
    with AuthlibSession(CLIENT_ID, redirect_uri=CALLBACK, token_endpoint=token_url, headers=CLOSE) as client:
        first = client.fetch_token(token_url, code=code)
        client.token = {**client.token, "expires_at": 1}  # long expired
        assert client.ensure_active_token(client.token)
        assert client.token["access_token"] != first["access_token"]
        assert_holds(client.token, code)


def test_requests_oauthlib_swaps_then_refreshes_at_the_token_url(server, fake, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the test server speaks plain HTTP on loopback
    code = unique("oauthlib")
    token_url = server.url + "/api/token"
    client = OAuthlibSession(CLIENT_ID, redirect_uri=CALLBACK)
    client.headers.update(CLOSE)
    swap_then_refresh_three_times(client, server, code, client.fetch_token(token_url, code=code, include_client_id=True))
    client.close()
    assert_spotify_got_only_the_grants(fake, code)


def test_requests_oauthlib_auto_refresh_url(server, fake, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    code = unique("oauthlib-auto")
    token_url = server.url + "/api/token"
    saved = []
    client = OAuthlibSession(CLIENT_ID, redirect_uri=CALLBACK, auto_refresh_url=token_url, token_updater=saved.append)
    client.headers.update(CLOSE)
    first = client.fetch_token(token_url, code=code, include_client_id=True)
    client.token = {**client.token, "expires_in": -10, "expires_at": 1}  # expired: the next call refreshes
    # Any protected resource will do: the service's own /health, with the new bearer token.
    assert client.get(server.url + "/health").status_code == 200
    [refreshed] = saved
    assert refreshed["access_token"] != first["access_token"]
    assert_holds(refreshed, code)
    client.close()


def run_node(script: str, server: Server, code: str):
    """One of tests/node's scripts against the server, with the code to swap: what it printed, as JSON."""
    node = ROOT / "tests" / "node"
    result = subprocess.run(
        ["node", str(node / script), server.url, CLIENT_ID, code, CALLBACK],
        cwd=node, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs("node", "npm")
def test_node_simple_oauth2_swaps_then_refreshes_and_never_loses_its_refresh_token(server, fake):
    """simple-oauth2 copies refresh_token from every answer: without one, its next refresh sent it empty."""
    code = unique("simple-oauth2")
    held = run_node("simple_oauth2.js", server, code)
    assert len(held) == 4
    for token in held:
        assert_holds(token, code)
    assert len({token["access_token"] for token in held}) == 4
    assert_spotify_got_only_the_grants(fake, code)


# -- signing out: the libraries' revocation calls (RFC 7009) at /revoke --------------------------------

SIGNED_OUT = "The user signed out"


def test_authlib_signs_out_with_revoke_token(server, fake):
    code = unique("authlib-revoke")
    token_url = server.url + "/api/token"
    with AuthlibSession(CLIENT_ID, redirect_uri=CALLBACK, token_endpoint=token_url, headers=CLOSE) as client:
        token = client.fetch_token(token_url, code=code)
        answer = client.revoke_token(server.url + "/revoke", token=token["refresh_token"],
                                     token_type_hint="refresh_token")
        assert answer.status_code == 200
        with pytest.raises(AuthlibError) as refused:
            client.refresh_token(token_url)
    assert refused.value.error == "invalid_grant" and refused.value.description.startswith(SIGNED_OUT)
    assert len(fake.requests) == 1  # the swap: the refused refresh never reached Spotify


def test_requests_oauthlib_signs_out_with_oauthlibs_revocation_request(server, fake, monkeypatch):
    """requests-oauthlib has no revocation call; oauthlib, which it is built on, prepares the request."""
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    code = unique("oauthlib-revoke")
    token_url = server.url + "/api/token"
    oauth = WebApplicationClient(CLIENT_ID)
    client = OAuthlibSession(client=oauth, redirect_uri=CALLBACK)
    client.headers.update(CLOSE)
    token = client.fetch_token(token_url, code=code, include_client_id=True)
    url, headers, body = oauth.prepare_token_revocation_request(
        server.url + "/revoke", token["refresh_token"], token_type_hint="refresh_token"
    )
    assert client.post(url, data=body, headers=headers).status_code == 200
    with pytest.raises(InvalidGrantError, match=SIGNED_OUT):
        client.refresh_token(token_url)
    client.close()


@needs("node", "npm")
def test_node_simple_oauth2_signs_out_with_revoke_all(server, fake):
    code = unique("simple-oauth2-revoke")
    held = run_node("simple_oauth2_revoke.js", server, code)
    assert_holds(held["token"], code)
    assert held["refused"]["status"] == 400
    assert held["refused"]["body"]["error"] == "invalid_grant"
    assert held["refused"]["body"]["error_description"].startswith(SIGNED_OUT)


def test_a_wrong_client_secret_is_the_servers_problem(fake_accounts):
    """The day the secret is rotated in the dashboard and not on the server: apps get a 5xx to retry,
    not a 4xx that logs their user out, and the operator's log says what to fix. Two refusals in a row
    engage the brake (brake.py): a worker that saw one says 'misconfigured' with Retry-After, the other
    only that Spotify is held."""
    env = server_env(fake_accounts.url, SPOTIFY_CLIENT_SECRET="rotated-away-secret", RATE_LIMIT_FAILURES="3/hour")
    with Server(env) as server:
        sealed = SEALER.seal("AQ-raw")
        statuses = []
        for n in range(6):  # twice the failure budget: never a 429
            swap = requests.post(server.url + "/swap", data={"code": f"c-{n}"}, headers=CLOSE, timeout=10)
            refresh = requests.post(server.url + "/refresh", data={"refresh_token": sealed}, headers=CLOSE, timeout=10)
            for response in (swap, refresh):
                body = json_answer(response, {500, 503})
                statuses.append(response.status_code)
                if response.status_code == 500:
                    assert body["error"] == "server_error" and "misconfigured" in body["error_description"]
                else:  # held by the brake in a worker that did not see the refusal itself: still a 5xx
                    assert body["error"] == "temporarily_unavailable" and response.headers["Retry-After"].isdigit()
        output = server.output()
    assert statuses[0] == 500, "the first refusal is said as what it is"
    errors = [line for line in output.splitlines() if "SPOTIFY_CLIENT_SECRET" in line]
    assert len(errors) in (1, 2), "at most once a minute per worker (2 workers)"
    assert "Invalid client secret" in errors[0]
    assert "rotated-away-secret" not in output and "AQ-raw" not in output


# -- flask --app app check --------------------------------------------------------------------


def run_check(env: dict[str, str], cwd: Path = ROOT, app: str = "app") -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", app, "check"],
        cwd=cwd, env={**base, "FLASK_SKIP_DOTENV": "1", **env}, capture_output=True, text=True, timeout=60,
    )


def test_check_passes_against_the_accounts_service(fake_accounts):
    result = run_check(server_env(fake_accounts.url))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") >= 3 and "FAIL" not in result.stdout
    assert {"grant_type": "client_credentials"} in [r["form"] for r in fake_accounts.requests]


def test_check_names_a_wrong_secret_without_printing_it(fake_accounts):
    result = run_check(server_env(fake_accounts.url, SPOTIFY_CLIENT_SECRET="wrong-secret-value"))
    assert result.returncode != 0
    assert "SPOTIFY_CLIENT_SECRET" in result.stdout
    assert "wrong-secret-value" not in result.stdout + result.stderr
    assert CLIENT_SECRET not in result.stdout + result.stderr


def test_check_names_an_unreachable_redis(fake_accounts):
    result = run_check(server_env(fake_accounts.url, RATE_LIMIT_STORAGE_URI="redis://127.0.0.1:1/0"))
    assert result.returncode != 0
    [failure] = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert "RATE_LIMIT_STORAGE_URI" in failure


def test_check_reads_dot_env_as_flask_run_does(fake_accounts, tmp_path):
    env = server_env(fake_accounts.url, SPOTIFY_CLIENT_SECRET="wrong-in-dot-env")
    (tmp_path / ".env").write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", str(ROOT / "app.py"), "check"],
        cwd=tmp_path, env=base, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "SPOTIFY_CLIENT_SECRET" in result.stdout and "wrong-in-dot-env" not in result.stdout
