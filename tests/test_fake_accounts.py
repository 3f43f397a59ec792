"""The stand-in's login side behaves as Spotify's does where the service and the page meet it: PKCE, codes that
work once, the redirect URI, access_denied, and /v1/me for the tokens it issued."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET, FakeAccounts

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

REDIRECT = "http://127.0.0.1:1234/callback"
VERIFIER = "v" * 43


def challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def fake():
    with FakeAccounts(display_name="Test Listener") as running:
        yield running


def authorize(fake: FakeAccounts, **query: str) -> requests.Response:
    params = {"client_id": CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT, "state": "s-1",
              "code_challenge_method": "S256", "code_challenge": challenge(VERIFIER), **query}
    return requests.get(fake.url + "/authorize", params=params, allow_redirects=False, timeout=5)


def redirected(response: requests.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def token(fake: FakeAccounts, **form: str) -> requests.Response:
    return requests.post(fake.url + "/api/token", data={"grant_type": "authorization_code", **form},
                         auth=(CLIENT_ID, CLIENT_SECRET), timeout=5)


def test_consent_page_then_a_code_that_works_once_with_its_verifier(fake):
    page = authorize(fake)
    assert page.status_code == 200 and "Stand-in for Spotify" in page.text and "Agree" in page.text
    back = redirected(authorize(fake, decision="accept"))
    assert back["state"] == "s-1"
    swap = token(fake, code=back["code"], redirect_uri=REDIRECT, code_verifier=VERIFIER)
    assert swap.status_code == 200 and swap.json()["refresh_token"]
    again = token(fake, code=back["code"], redirect_uri=REDIRECT, code_verifier=VERIFIER)
    assert again.json() == {"error": "invalid_grant", "error_description": "Invalid authorization code"}


@pytest.mark.parametrize("form, description", [
    ({"redirect_uri": REDIRECT, "code_verifier": "w" * 43}, "code_verifier was incorrect"),
    ({"redirect_uri": REDIRECT}, "code_verifier was incorrect"),
    ({"redirect_uri": "myapp://callback", "code_verifier": VERIFIER}, "Invalid redirect URI"),
])
def test_a_code_is_refused_without_its_verifier_or_redirect_uri(fake, form, description):
    code = redirected(authorize(fake, decision="accept"))["code"]
    answer = token(fake, code=code, **form)
    assert answer.status_code == 400
    assert answer.json() == {"error": "invalid_grant", "error_description": description}


def test_cancel_redirects_with_access_denied(fake):
    assert redirected(authorize(fake, decision="deny")) == {"error": "access_denied", "state": "s-1"}


def test_unknown_client_or_redirect_uri_is_an_error_page_not_a_redirect():
    with FakeAccounts(redirect_uris=(REDIRECT,)) as fake:
        for query, message in (({"client_id": "someone-else"}, "INVALID_CLIENT: Invalid client"),
                               ({"redirect_uri": "http://127.0.0.1:9/callback"}, "INVALID_CLIENT: Invalid redirect URI")):
            answer = authorize(fake, decision="accept", **query)
            assert answer.status_code == 400 and message in answer.text


def test_me_answers_for_issued_access_tokens_only_with_cors(fake):
    code = redirected(authorize(fake, decision="accept"))["code"]
    access = token(fake, code=code, redirect_uri=REDIRECT, code_verifier=VERIFIER).json()["access_token"]
    me = requests.get(fake.url + "/v1/me", headers={"Authorization": f"Bearer {access}"}, timeout=5)
    assert me.status_code == 200 and me.json()["display_name"] == "Test Listener"
    assert me.headers["Access-Control-Allow-Origin"] == "*"
    for headers in ({"Authorization": "Bearer access-forged"}, {}):
        assert requests.get(fake.url + "/v1/me", headers=headers, timeout=5).status_code == 401
    preflight = requests.options(fake.url + "/v1/me", timeout=5, headers={
        "Origin": "http://127.0.0.1:1234", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 204
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]


def test_refresh_tokens_end_a_lifetime_after_their_swap_rotated_ones_too():
    """As Spotify's do since 2026: refreshing does not extend a sign-in; tokens it never issued never end."""
    now = [1_000_000.0]
    with FakeAccounts(refresh_token_lifetime=60, clock=lambda: now[0]) as fake:

        def refresh(raw: str) -> requests.Response:
            return token(fake, grant_type="refresh_token", refresh_token=raw)

        issued = token(fake, code="rotating-x").json()["refresh_token"]
        assert issued == "rotate-rotating-x"
        now[0] += 59
        rotated = refresh(issued).json()["refresh_token"]
        assert rotated == "rotated-rotating-x" and refresh(rotated).status_code == 200
        now[0] += 1
        for raw in (issued, rotated):
            answer = refresh(raw)
            assert answer.status_code == 400
            assert answer.json() == {"error": "invalid_grant", "error_description": "Refresh token expired"}
        assert refresh("AQ-never-issued-here").status_code == 200
