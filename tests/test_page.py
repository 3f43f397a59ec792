"""The landing page as served: what it shows, what it never shows, its headers, and the rate limits leaving it alone.

What it does in a browser is tests/test_browser.py's.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from dotenv import dotenv_values

import page
from crypto import key_id
from devtools.fake_accounts import CLIENT_SECRET
from tests.helpers import BASE_CONFIG, SECRET, Clock, app_for

PAGE_CALLBACK = "http://localhost/callback"  # the test client's origin
HEADERS = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def page_client(**config: str):
    return app_for({**BASE_CONFIG, **config}).test_client()


def csp(response) -> dict[str, str]:
    policy = response.headers["Content-Security-Policy"]
    return {d.split()[0]: " ".join(d.split()[1:]) for d in (part.strip() for part in policy.split(";")) if d}


def test_page_says_what_this_is_and_the_urls_to_paste():
    html = page_client().get("/").get_data(as_text=True).replace("<wbr>", "")
    assert "token swap and refresh service" in html
    assert "Up and running" in html
    for text in (
        'tokenSwapURL = URL(string: "http://localhost/swap")',
        'tokenRefreshURL = URL(string: "http://localhost/refresh")',
        'new TokenSwapTokenRequest(new Uri("http://localhost/swap"), code)',
        'new TokenSwapRefreshRequest(new Uri("http://localhost/refresh"), refreshToken)',
        'const SERVICE = "http://localhost";',
        BASE_CONFIG["SPOTIFY_CLIENT_ID"],
        *BASE_CONFIG["SPOTIFY_CLIENT_CALLBACK_URL"].split(","),
    ):
        assert text in html, text


def test_page_shows_no_secret_nor_key_id():
    client = page_client(SPOTIFY_CLIENT_CALLBACK_URL=PAGE_CALLBACK, LEGACY_ENCRYPTION_SECRET="legacy-secret-value")
    kid = key_id(SECRET)
    for path in ("/", "/callback?code=abc&state=xyz"):
        html = client.get(path).get_data(as_text=True)
        for secret in (CLIENT_SECRET, SECRET, "legacy-secret-value", kid.hex(), base64.urlsafe_b64encode(kid).decode().rstrip("=")):
            assert secret not in html, secret
        # Nor the code from the address: the page's script reads it there.
        assert "abc" not in html


def test_login_test_is_offered_when_this_origins_callback_is_allowed():
    html = page_client(SPOTIFY_CLIENT_CALLBACK_URL=f"myapp://callback,{PAGE_CALLBACK}").get("/").get_data(as_text=True)
    assert 'id="login-button"' in html
    for name, value in (
        ("data-redirect-uri", PAGE_CALLBACK),
        ("data-client-id", BASE_CONFIG["SPOTIFY_CLIENT_ID"]),
        ("data-accounts-url", BASE_CONFIG["SPOTIFY_ACCOUNTS_URL"]),
        ("data-api-url", "https://api.spotify.com"),
        ("data-scope", "user-read-private"),
    ):
        assert f'{name}="{value}"' in html
    assert 'id="callback-missing"' not in html


def test_without_an_allowed_callback_the_page_says_which_uri_to_add_and_where():
    html = page_client().get("/", base_url="http://127.0.0.1:1234").get_data(as_text=True)
    assert 'id="login-button"' not in html
    missing = re.search(r'id="callback-missing".*?</div>', html, re.S).group(0)
    # <wbr> where the URI may wrap on a phone, nothing else.
    assert '<code id="missing-uri">http://127.0.0.1:1234/callback</code>' in missing.replace("<wbr>", "")
    assert "Spotify developer dashboard" in missing and "https://developer.spotify.com/dashboard" in missing
    assert "SPOTIFY_CLIENT_CALLBACK_URL" in missing


def test_on_localhost_the_page_points_to_the_allowed_loopback_address():
    html = page_client(SPOTIFY_CLIENT_CALLBACK_URL="myapp://cb,http://127.0.0.1:1234/callback").get(
        "/", base_url="http://localhost:1234"
    ).get_data(as_text=True)
    assert 'id="login-button"' not in html
    assert '<a href="http://127.0.0.1:1234/">' in html


def test_the_page_never_advises_a_redirect_uri_spotify_refuses():
    """Spotify takes http redirect URIs on loopback address literals only, never localhost."""
    at_localhost = page_client(SPOTIFY_CLIENT_CALLBACK_URL="myapp://cb").get("/", base_url="http://localhost:8000")
    html = at_localhost.get_data(as_text=True).replace("<wbr>", "")
    assert '<code id="missing-uri">http://127.0.0.1:8000/callback</code>' in html
    assert '<a href="http://127.0.0.1:8000/">' in html and "localhost:8000/callback" not in html
    # localhost allowed (a stand-in takes it): the login runs, and the hint says Spotify itself refuses it.
    allowed = page_client(SPOTIFY_CLIENT_CALLBACK_URL=f"myapp://cb,{PAGE_CALLBACK}").get("/").get_data(as_text=True)
    assert 'id="login-button"' in allowed
    assert "If Spotify answers" not in allowed and "Spotify itself refuses" in allowed
    # Plain http on a network address: nothing to add would work; https or 127.0.0.1 would.
    lan = page_client().get("/", base_url="http://192.168.1.20:1234").get_data(as_text=True).replace("<wbr>", "")
    assert 'id="missing-uri"' not in lan and "192.168.1.20:1234/callback" not in lan
    assert "only on loopback addresses" in lan
    assert [page.spotify_takes(uri) for uri in ("https://a.example/cb", "http://127.0.0.1:1234/callback",
                                                "http://[::1]:1234/callback", "http://localhost:1234/callback",
                                                "http://192.168.1.20:1234/callback")] == [True, True, True, False,
                                                                                          False]


def test_behind_a_trusted_proxy_the_page_uses_the_address_the_browser_sees():
    client = page_client(SPOTIFY_CLIENT_CALLBACK_URL="myapp://cb,https://tokens.example.com/callback", TRUSTED_PROXIES="1")
    html = client.get("/", headers={"X-Forwarded-Proto": "https", "Host": "tokens.example.com"}).get_data(as_text=True)
    assert 'tokenSwapURL = URL(string: "https://tokens.example.com/swap")' in html
    assert 'data-redirect-uri="https://tokens.example.com/callback"' in html


def test_a_stand_in_for_spotify_is_said_plainly():
    stand_in = page_client(SPOTIFY_ACCOUNTS_URL="http://127.0.0.1:4321", SPOTIFY_API_URL="http://127.0.0.1:4321")
    html = stand_in.get("/").get_data(as_text=True)
    assert 'id="stand-in"' in html and "Not Spotify" in html and "<code>http://127.0.0.1:4321</code>" in html
    # Why, as make run says it: no credentials in .env, so it started the stand-in.
    started = page_client(SPOTIFY_ACCOUNTS_URL="http://127.0.0.1:4321", TOKENSWAP_CREDENTIALS_CHECKED="stand-in")
    assert "has no <code>SPOTIFY_CLIENT_ID</code>" in started.get("/").get_data(as_text=True)
    # Credentials in .env with a local SPOTIFY_ACCOUNTS_URL: neither "no credentials" nor "Spotify accepts".
    checked = page_client(SPOTIFY_ACCOUNTS_URL="http://127.0.0.1:4321", TOKENSWAP_CREDENTIALS_CHECKED="accepted")
    html = checked.get("/").get_data(as_text=True)
    assert "with the credentials in <code>.env</code>" in html and "the accounts service at" in html
    assert "has no" not in html and "Spotify accepts" not in html
    spotify = page_client(SPOTIFY_ACCOUNTS_URL="https://accounts.spotify.com")
    assert 'id="stand-in"' not in spotify.get("/").get_data(as_text=True)


@pytest.mark.parametrize("path", ["/", "/callback", "/callback?code=c&state=s", "/static/page.js", "/static/page.css"])
def test_page_and_its_files_carry_the_security_headers(path):
    with page_client(SPOTIFY_API_URL="https://api.example.net:8443/v1-base").get(path) as response:
        assert response.status_code == 200
    for name, value in HEADERS.items():
        assert response.headers[name] == value
    policy = csp(response)
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"  # no 'unsafe-inline', no other host
    assert policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self' https://api.example.net:8443"
    assert policy["frame-ancestors"] == "'none'"


def test_page_has_no_inline_script_or_style():
    html = page_client(SPOTIFY_CLIENT_CALLBACK_URL=PAGE_CALLBACK).get("/").get_data(as_text=True)
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/page.js" defer>']
    assert not re.search(r"<[^>]+\son[a-z]+=", html), "inline event handler"
    assert not re.search(r"<[^>]+\sstyle=", html), "inline style"
    assert "<style" not in html
    # Nothing from another host: every src and href of the page's own is a path (or a link: the dashboard, and
    # this page at 127.0.0.1, as the test client's localhost is for Spotify).
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith("/") or url in ("https://developer.spotify.com/dashboard", "http://127.0.0.1/"), url


def test_the_api_and_its_errors_are_unchanged():
    client = page_client()
    for response in (client.get("/health"), client.get("/nope"), client.post("/swap", data={}), client.get("/swap")):
        assert response.headers["Content-Type"] == "application/json"
        assert "Content-Security-Policy" not in response.headers
        assert "Referrer-Policy" not in response.headers
    assert client.get("/nope").get_json()["error"] == "not_found"
    assert client.get("/health").get_json() == {"status": "ok"}


def test_other_methods_on_the_page_are_json_405():
    response = page_client().post("/", data={"code": "x"})
    assert response.status_code == 405
    assert response.headers["Content-Type"] == "application/json"
    assert response.get_json()["error"] == "method_not_allowed"


def test_page_gets_are_neither_counted_nor_refused_by_the_failure_limit():
    # On a clock that stands still: the budget's window never ends during the test.
    variables = {**BASE_CONFIG, "RATE_LIMIT_FAILURES": "2/hour", "SPOTIFY_CLIENT_CALLBACK_URL": PAGE_CALLBACK}
    client = app_for(variables, Clock()).test_client()
    for _ in range(5):
        for path in ("/", "/callback?code=c&state=s", "/callback?error=access_denied", "/static/page.js"):
            with client.get(path) as response:
                assert response.status_code == 200
        assert client.head("/").status_code == 200
        assert client.get("/static/missing.js").status_code == 404
        # Browsers ask for it by themselves, even on a JSON answer.
        with client.get("/favicon.ico") as icon:
            assert (icon.status_code, icon.mimetype) == (200, "image/svg+xml")
    # The whole budget is still there: two failures, then the limit.
    assert [client.post("/swap", data={}).status_code for _ in range(3)] == [400, 400, 429]
    # A spent address still sees the page (reads never reach Spotify); the API stays refused.
    assert client.get("/").status_code == 200
    assert client.post("/refresh", data={}).status_code == 429


# The redirect URIs of Spotify's iOS apps (spotify/ios-sdk DemoProjects/SPTLoginSampleAppSwift, ViewController.swift
# and README.md; developer.spotify.com's iOS quick start).
SWIFT_DEMO = "spotify-login-sdk-test-app-swift://spotify-login-callback"
QUICK_START = "spotify-ios-quick-start://spotify-login-callback"
ROOT = Path(__file__).resolve().parent.parent


def test_the_ios_sdk_demo_works_unchanged_its_redirect_uri_first():
    """The SDK sends no redirect_uri: the demo whose swap URL is http://localhost:1234/swap needs its URI first."""
    example = dotenv_values(ROOT / ".env.example")["SPOTIFY_CLIENT_CALLBACK_URL"] or ""
    assert example.split(",")[0] == SWIFT_DEMO
    html = page_client(SPOTIFY_CLIENT_CALLBACK_URL=example).get("/").get_data(as_text=True)
    first = re.search(r'<ul id="redirect-uris">\s*<li><code>([^<]+)</code> \(the default', html.replace("<wbr>", ""))
    assert first and first.group(1) == SWIFT_DEMO
    for text in (ROOT / "README.md").read_text(), (ROOT / "docs" / "clients.md").read_text(), html.replace("<wbr>", ""):
        assert SWIFT_DEMO in text and QUICK_START in text and "http://localhost:1234/swap" in text


def test_urls_on_the_page_may_wrap_after_slashes_and_commas_only():
    html = page_client(SPOTIFY_CLIENT_CALLBACK_URL=f"myapp://spotify-login-callback,{PAGE_CALLBACK}?a=1&b=2").get("/")
    text = html.get_data(as_text=True)
    assert '<code id="swap-url">http://<wbr>localhost/<wbr>swap</code>' in text
    assert "<li><code>myapp://<wbr>spotify-login-callback</code>" in text
    # Escaped as before; the break after "&" comes after its entity, never inside it.
    assert "<code>http://<wbr>localhost/<wbr>callback?<wbr>a=1&amp;<wbr>b=2</code>" in text


def test_credentials_in_the_spotify_urls_never_reach_the_page():
    client = page_client(SPOTIFY_CLIENT_CALLBACK_URL=PAGE_CALLBACK, SPOTIFY_ACCOUNTS_URL="http://proxy-user:s3cr3t-pw@127.0.0.1:9",
                         SPOTIFY_API_URL="https://api-user:4p1-pw@api.example.com")
    response = client.get("/")
    shown = response.get_data(as_text=True) + str(response.headers)
    for secret in ("proxy-user", "s3cr3t-pw", "api-user", "4p1-pw"):
        assert secret not in shown
    assert 'data-accounts-url="http://127.0.0.1:9"' in shown
    assert "connect-src 'self' https://api.example.com;" in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize("checked, says", [
    ("accepted", "Spotify accepts"),
    ("failed", "The check failed."),
    ("", "Credentials not checked here."),
])
def test_the_page_says_whether_make_run_checked_the_credentials(checked, says):
    # Real credentials (Spotify's own accounts URL): no stand-in notice, so the check's result shows.
    failed = "Spotify refuses the credentials at https://accounts.spotify.com/api/token (...): check SPOTIFY_CLIENT_ID"
    page = page_client(SPOTIFY_ACCOUNTS_URL="https://accounts.spotify.com", SPOTIFY_API_URL="https://api.spotify.com",
                       TOKENSWAP_CREDENTIALS_CHECKED=checked,
                       TOKENSWAP_CHECK_FAILED=failed if checked == "failed" else "").get("/").get_data(as_text=True)
    assert says in page
    assert 'id="stand-in"' not in page
    # What make run found comes first, before what the service is; a failure names what to change, in place
    # of "Up and running."
    assert page.index(says) < page.index("token swap and refresh service")
    assert ("Up and running" in page) == (checked != "failed")
    if checked == "failed":
        status = re.search(r'id="status".*?</div>', page, re.S).group(0).replace("<wbr>", "")
        assert failed in status
