"""End-to-end tests of operating the service: key rotation, legacy token migration, CORS and proxies, on real gunicorn."""

from __future__ import annotations

import secrets
import string
from urllib.parse import urlencode

import pytest
import requests

from crypto import InvalidToken, Opened, TokenSealer
from devtools.fake_accounts import CLIENT_ID
from devtools.legacy import legacy_token
from devtools.process import CLOSE, Server, json_answer
from tests.helpers import legacy_vectors, server_env, unique

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

SWAP_PATHS = ("/swap", "/api/token")
REFRESH_PATHS = ("/refresh", "/api/refresh_token")
FORM = "application/x-www-form-urlencoded"

SECRET_A = "rotation-secret-A-0123456789abcdef"
SECRET_B = "rotation-secret-B-0123456789abcdef"
# ENCRYPTION_SECRET of every server here except the rotation test's: legacy tokens migrate to it.
NEW_SECRET = "the-new-encryption-secret-0123456789"
NEW_SEALER = TokenSealer([NEW_SECRET], CLIENT_ID)

# The issue names it ../shared/legacy_token_vectors.json: made by the encrypted_strings gem itself. Every vector
# opens under its own secret in test_crypto.py and refreshes in test_app.py; here, the first secret's, end to end.
VECTORS = legacy_vectors()
LEGACY_SECRET = VECTORS[0]["secret"]

ALLOWED_ORIGINS = ("https://app.example", "https://other.example")
EVIL_ORIGIN = "https://evil.example"
CLIENT_ADDRESS = "203.0.113.7"  # TEST-NET-3: only ever a header value here


# -- servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_server(fake_accounts):
    """No legacy secret, no trusted proxy, CORS for two origins."""
    env = server_env(fake_accounts.url, ENCRYPTION_SECRET=NEW_SECRET, CORS_ORIGINS=",".join(ALLOWED_ORIGINS))
    with Server(env) as running:
        yield running


@pytest.fixture(scope="module")
def proxied_server(served_behind_proxy):
    """Behind one trusted proxy; CORS_ORIGINS unset (conftest's, for the run)."""
    return served_behind_proxy


@pytest.fixture(scope="module")
def legacy_server(fake_accounts):
    """LEGACY_ENCRYPTION_SECRET set to the first shared vectors' secret."""
    env = server_env(fake_accounts.url, ENCRYPTION_SECRET=NEW_SECRET, LEGACY_ENCRYPTION_SECRET=LEGACY_SECRET)
    with Server(env) as running:
        yield running


# -- helpers -----------------------------------------------------------------------------------


def send(server: Server, path: str, fields: dict, **headers: str) -> requests.Response:
    return requests.post(server.url + path, data=fields, headers={**CLOSE, **headers}, timeout=30)


def swap(server: Server, code: str) -> str:
    """The sealed refresh token a swap answers with."""
    return json_answer(send(server, "/swap", {"code": code}), 200)["refresh_token"]


def refreshed_with(fake) -> list[str]:
    """The raw refresh tokens the fake Spotify was sent since its last reset."""
    assert all(r["form"]["grant_type"] == "refresh_token" for r in fake.requests)
    return [r["form"]["refresh_token"] for r in fake.requests]


def assert_invalid_grant_without_spotify(response: requests.Response, fake) -> None:
    assert json_answer(response, 400) == {"error": "invalid_grant", "error_description": "Invalid refresh token"}
    assert fake.requests == []


# -- key rotation ------------------------------------------------------------------------------


def test_rotating_encryption_secret_reseals_under_the_new_key_and_drops_the_old(fake):
    code = unique()
    raw = f"AQ-refresh-for-{code}"

    with Server(server_env(fake.url, ENCRYPTION_SECRET=SECRET_A)) as server:
        under_a = swap(server, code)
    first = TokenSealer([SECRET_A], CLIENT_ID).open(under_a)
    assert first.refresh_token == raw and first.signed_in_at is not None

    # Restart with the new secret first and the old one still listed.
    with Server(server_env(fake.url, ENCRYPTION_SECRET=f"{SECRET_B},{SECRET_A}")) as server:
        fake.reset()
        under_b = json_answer(send(server, "/refresh", {"refresh_token": under_a}), 200)["refresh_token"]
        assert refreshed_with(fake) == [raw]
        # The same sign-in, under the new key: its lifetime goes on.
        assert TokenSealer([SECRET_B], CLIENT_ID).open(under_b) == Opened(
            raw, signed_in_at=first.signed_in_at, grant_id=first.grant_id
        )
        with pytest.raises(InvalidToken):
            TokenSealer([SECRET_A], CLIENT_ID).open(under_b)
        # A token already under the first key is not re-sealed again.
        assert json_answer(send(server, "/api/refresh_token", {"refresh_token": under_b}))["refresh_token"] == under_b

    # Restart with the old secret dropped.
    with Server(server_env(fake.url, ENCRYPTION_SECRET=SECRET_B)) as server:
        fake.reset()
        body = json_answer(send(server, "/refresh", {"refresh_token": under_b}), 200)
        assert body["refresh_token"] == under_b and body["access_token"]
        assert refreshed_with(fake) == [raw]

        fake.reset()
        assert_invalid_grant_without_spotify(send(server, "/refresh", {"refresh_token": under_a}), fake)


# -- legacy tokens -----------------------------------------------------------------------------


def form(token: str) -> bytes:
    return urlencode({"refresh_token": token}).encode()


# How legacy tokens arrive in the field, each as the request body a client sends.
DAMAGE = {
    "as-given": form,
    "literal-backslash-n": lambda token: form(token.replace("\n", "\\n")),
    "no-trailing-newline": lambda token: form(token.rstrip("\n")),
    # A client that does not URL-encode: the server's form parser turns each '+' into a space.
    "plus-as-space": lambda token: b"refresh_token=" + token.encode(),
}


def spotify_like_token() -> str:
    """A random plaintext shaped like a Spotify refresh token."""
    alphabet = string.ascii_letters + string.digits + "-_"
    return "AQ" + "".join(secrets.choice(alphabet) for _ in range(40 + secrets.randbelow(160)))


def fresh_legacy_tokens(secret: str, count: int = 3) -> list[tuple[str, str]]:
    """(token, plaintext) pairs not in the shared file; the first has a '+' for plus-as-space to damage."""
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:
        plaintext = spotify_like_token()
        token = legacy_token(secret, plaintext)
        if pairs or "+" in token:
            pairs.append((token, plaintext))
    return pairs


def assert_migrates(server: Server, fake, token: str, plaintext: str, damage: str) -> None:
    """The damaged legacy token refreshes, and comes back in this service's format, which refreshes too."""
    fake.reset()
    response = requests.post(
        server.url + "/refresh", data=DAMAGE[damage](token),
        headers={"Content-Type": FORM, **CLOSE}, timeout=30,
    )
    body = json_answer(response, 200)
    assert refreshed_with(fake) == [plaintext], (damage, token)
    migrated = body["refresh_token"]
    opened = NEW_SEALER.open(migrated)
    assert (opened.refresh_token, opened.needs_reseal, opened.signed_in_at) == (plaintext, False, None)

    fake.reset()
    again = json_answer(send(server, "/refresh", {"refresh_token": migrated}), 200)
    # Opened as a current token of our own: no legacy path, so nothing to re-seal.
    assert again["refresh_token"] == migrated
    assert refreshed_with(fake) == [plaintext]


def test_legacy_tokens_refresh_and_migrate_in_every_form_they_arrive_in(legacy_server, fake):
    """The shared vectors under the secret, and tokens beyond the file, each as clients damage them."""
    pairs = [(v["ciphertext"], v["plaintext"]) for v in VECTORS if v["secret"] == LEGACY_SECRET]
    pairs += fresh_legacy_tokens(LEGACY_SECRET)
    for damage in DAMAGE:
        for token, plaintext in pairs:
            assert_migrates(legacy_server, fake, token, plaintext, damage)


def test_a_migrated_token_refreshes_where_no_legacy_secret_is_set(legacy_server, plain_server, fake):
    [(token, plaintext)] = fresh_legacy_tokens(LEGACY_SECRET, count=1)
    migrated = json_answer(send(legacy_server, "/refresh", {"refresh_token": token}), 200)["refresh_token"]

    fake.reset()
    json_answer(send(plain_server, "/api/refresh_token", {"refresh_token": migrated}), 200)
    assert refreshed_with(fake) == [plaintext]


def test_a_legacy_token_under_another_secret_is_invalid_grant_without_calling_spotify(legacy_server, fake):
    others = [v["ciphertext"] for v in VECTORS if v["secret"] != LEGACY_SECRET]
    others += [token for token, _ in fresh_legacy_tokens(secrets.token_urlsafe(12), count=2)]
    for token in others:
        assert_invalid_grant_without_spotify(send(legacy_server, "/refresh", {"refresh_token": token}), fake)


def test_legacy_tokens_are_invalid_grant_when_no_legacy_secret_is_set(plain_server, fake):
    for vector in VECTORS:
        for damage in DAMAGE.values():
            response = requests.post(
                plain_server.url + "/refresh", data=damage(vector["ciphertext"]),
                headers={"Content-Type": FORM, **CLOSE}, timeout=30,
            )
            assert_invalid_grant_without_spotify(response, fake)


# -- CORS --------------------------------------------------------------------------------------


def preflight(server: Server, path: str, origin: str) -> requests.Response:
    return requests.options(
        server.url + path,
        headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type", **CLOSE},
        timeout=30,
    )


def header_items(response: requests.Response, name: str) -> set[str]:
    return {item.strip().lower() for item in response.headers.get(name, "").split(",") if item.strip()}


def actual_post(server: Server, path: str, origin: str) -> requests.Response:
    """A request a browser page would make on path, with its Origin."""
    if path in SWAP_PATHS:
        fields = {"code": unique()}
    else:
        fields = {"refresh_token": swap(server, unique())}
    return send(server, path, fields, Origin=origin)


# Which paths the API has: test_app.py, once per path; CORS is one mechanism over all of them: a swap path and a
# refresh path here, each with one of the two listed origins.
ORIGIN_AND_PATH = list(zip(ALLOWED_ORIGINS, ("/api/token", "/refresh"), strict=True))


@pytest.mark.parametrize("origin, path", ORIGIN_AND_PATH)
def test_preflight_from_an_allowed_origin_is_allowed(plain_server, fake, origin, path):
    response = preflight(plain_server, path, origin)

    assert response.status_code in (200, 204)
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "post" in header_items(response, "Access-Control-Allow-Methods")
    assert "content-type" in header_items(response, "Access-Control-Allow-Headers")
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert fake.requests == []


@pytest.mark.parametrize("origin, path", ORIGIN_AND_PATH)
def test_answers_to_an_allowed_origin_carry_allow_origin_and_vary(plain_server, fake, origin, path):
    response = actual_post(plain_server, path, origin)

    json_answer(response, 200)
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "origin" in header_items(response, "Vary")


def test_error_answers_to_an_allowed_origin_carry_allow_origin_too(plain_server, fake):
    # Without it the page cannot read why its refresh failed.
    response = send(plain_server, "/refresh", {"refresh_token": "(null)"}, Origin=ALLOWED_ORIGINS[0])

    assert_invalid_grant_without_spotify(response, fake)
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGINS[0]
    assert "origin" in header_items(response, "Vary")


@pytest.mark.parametrize("path", ["/swap", "/api/refresh_token"])
def test_another_origin_gets_no_allow_origin(plain_server, fake, path):
    assert "Access-Control-Allow-Origin" not in preflight(plain_server, path, EVIL_ORIGIN).headers

    response = actual_post(plain_server, path, EVIL_ORIGIN)
    json_answer(response, 200)  # the browser, not the server, withholds it from the page
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("path", ["/swap", "/api/refresh_token"])
def test_no_cors_headers_when_cors_origins_is_unset(proxied_server, fake, path):
    assert "Access-Control-Allow-Origin" not in preflight(proxied_server, path, ALLOWED_ORIGINS[0]).headers

    response = actual_post(proxied_server, path, ALLOWED_ORIGINS[0])
    json_answer(response, 200)
    assert not any(name.lower().startswith("access-control-") for name in response.headers)


# -- client address behind proxies -------------------------------------------------------------


def logged_client(server: Server, forwarded_for: str) -> str:
    """The client address the request log shows for one request carrying X-Forwarded-For."""
    path = unique("/trace")
    since = len(server.output())
    json_answer(requests.get(server.url + path, headers={"X-Forwarded-For": forwarded_for, **CLOSE}, timeout=30), 404)
    # Wait for this request's own line: the server's start-up /health line may land after `since`.
    [line] = server.wait_for_access_log(1, since, path=path)
    return line["client"]


def test_with_one_trusted_proxy_the_log_shows_the_forwarded_client(proxied_server):
    assert logged_client(proxied_server, CLIENT_ADDRESS) == CLIENT_ADDRESS
    # Only the address the trusted proxy appended counts; what the client wrote before it does not.
    assert logged_client(proxied_server, f"198.51.100.9, {CLIENT_ADDRESS}") == CLIENT_ADDRESS


def test_without_trusted_proxies_the_log_shows_the_connecting_address(plain_server):
    assert logged_client(plain_server, CLIENT_ADDRESS) == "127.0.0.1"
    assert CLIENT_ADDRESS not in plain_server.output()
