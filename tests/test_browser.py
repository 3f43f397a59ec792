"""The landing page in a real browser: Debian's chromium driven by Playwright (PyPI; no browser download), against
the Procfile's gunicorn and the tests' stand-in for Spotify. Also the docs' `fetch` snippet from other origins."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET, FakeAccounts
from devtools.process import CLOSE, Server, free_port, json_answer
from tests.helpers import SECRET, server_env
from tests.tools import require

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

ROOT = Path(__file__).resolve().parent.parent
# The machine has no internet, and a test talks to 127.0.0.1 only: nothing in the background.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
IOS_CALLBACK = "spotify-login-sdk-test-app-swift://spotify-login-callback"  # the iOS SDK demo's
SNIPPET_CALLBACK = "https://app.example.com/callback"  # the redirect URI the docs' fetch snippet sends
TIMEOUT_MS = 20_000  # two shared cores: generous, and only reached when something is wrong
# Any CSP violation, also when the browser would not log one, becomes a console error.
REPORT_CSP = """document.addEventListener("securitypolicyviolation", (e) =>
  console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`));"""


# -- browser, stand-in, services -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require("chromium")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAccounts]:
    with FakeAccounts(display_name="Test Listener") as running:
        yield running


class Site:
    """A static page and script served from an origin of its own (another port on 127.0.0.1)."""

    def __init__(self, files: dict[str, tuple[str, str]]):
        self.files = files = dict(files)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                content_type, body = files.get(self.path, ("text/plain", ""))
                self.send_response(200 if self.path in files else 204)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def snippet_sites() -> Iterator[tuple[Site, Site]]:
    """Two origins serving a page that runs the docs' fetch snippet; the service allows the first."""
    files = {"/": ("text/html", '<!doctype html><title>app</title><link rel="icon" href="data:,">'
                                '<script type="module" src="/snippet.js"></script>')}
    allowed, other = Site(files), Site(files)
    yield allowed, other
    allowed.close()
    other.close()


@pytest.fixture(scope="module")
def service(fake, snippet_sites) -> Iterator[Server]:
    """The service as `make run` sets it up with the stand-in, the page's /callback allowed."""
    port = free_port()
    env = server_env(
        fake.url,
        SPOTIFY_API_URL=fake.url,
        SPOTIFY_CLIENT_CALLBACK_URL=f"{IOS_CALLBACK},http://127.0.0.1:{port}/callback,{SNIPPET_CALLBACK}",
        CORS_ORIGINS=snippet_sites[0].url,
    )
    with Server(env, port=port, extra_args="--workers 1") as running:
        yield running


class Watched:
    """A fresh browser tab whose console errors and warnings, page errors and CSP violations are kept."""

    def __init__(self, browser: Browser, **context_options: Any):
        self.context = browser.new_context(**context_options)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.add_init_script(script=REPORT_CSP)
        self.page: Page = self.context.new_page()
        self.messages: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.messages.append(f"page error: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.messages.append(f"console {message.type}: {message.text}")

    def problems(self, *expected: str) -> list[str]:
        """What went wrong in the page, apart from messages matching the expected patterns."""
        return [m for m in self.messages if not any(re.search(pattern, m) for pattern in expected)]


@pytest.fixture
def tab(browser) -> Iterator[Watched]:
    watched = Watched(browser)
    yield watched
    watched.context.close()


def start_login(tab: Watched, service: Server, fake: FakeAccounts) -> None:
    """From the page to the stand-in's consent page."""
    response = tab.page.goto(service.url + "/")
    assert response is not None and response.status == 200
    expect(tab.page.locator("#stand-in")).to_contain_text("Not Spotify")
    tab.page.get_by_role("button", name="Log in with Spotify").click()
    tab.page.wait_for_url(fake.url + "/authorize?**")
    expect(tab.page.locator("body")).to_contain_text("Stand-in for Spotify")


# -- the login test ----------------------------------------------------------------------------------


def test_login_swaps_shows_the_user_and_refreshes(tab, service, fake):
    fake.reset()
    requests_made = []
    tab.page.on("request", lambda request: requests_made.append(request))
    since = len(service.output())
    start_login(tab, service, fake)
    with tab.page.expect_response(service.url + "/swap") as swap:
        tab.page.get_by_role("button", name="Agree").click()
    tokens = swap.value.json()

    expect(tab.page.locator("#user")).to_have_text("Logged in as Test Listener")
    expect(tab.page.locator("#token-type")).to_have_text("Bearer")
    expect(tab.page.locator("#scope")).to_have_text("user-read-private")
    expect(tab.page.locator("#expires")).to_contain_text("in 3600 seconds")
    expect(tab.page.locator("#sealed")).to_contain_text("sealed by this service")
    # The code is out of the address bar.
    assert tab.page.url == service.url + "/callback"

    # The login as Spotify saw it: code, PKCE S256, a random state, the page's scope and redirect URI.
    login, agreed = fake.authorizations  # the page's redirect, then the consent page's Agree
    assert agreed == {**login, "decision": "accept"}
    assert login["response_type"] == "code" and login["client_id"] == CLIENT_ID
    assert login["redirect_uri"] == service.url + "/callback" and login["scope"] == "user-read-private"
    assert login["code_challenge_method"] == "S256" and re.fullmatch(r"[A-Za-z0-9_-]{43}", login["code_challenge"])
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", login["state"])
    (swapped,) = [r["form"] for r in fake.requests if r["form"].get("grant_type") == "authorization_code"]
    # The stand-in checked the verifier against the challenge: the swap succeeded.
    assert swapped["redirect_uri"] == service.url + "/callback" and len(swapped["code_verifier"]) == 43
    code = swapped["code"]

    with tab.page.expect_response(service.url + "/refresh") as refreshed:
        tab.page.get_by_role("button", name="Refresh").click()
    expect(tab.page.locator("#refreshed")).to_contain_text("Refreshed at")
    assert refreshed.value.status == 200
    (refresh,) = [r["form"] for r in fake.requests if r["form"].get("grant_type") == "refresh_token"]
    assert refresh["refresh_token"] == f"AQ-refresh-for-{code}"  # Spotify's own token, opened by the service

    # Tokens only in the page's memory: nothing left in storage or cookies.
    assert tab.page.evaluate("[sessionStorage.length, localStorage.length]") == [0, 0]
    assert tab.context.cookies() == []
    # Nothing secret in the page, nor any token: only what it says about them.
    html = tab.page.content()
    secrets = (CLIENT_SECRET, SECRET, code, tokens["access_token"], tokens["refresh_token"], refresh["refresh_token"])
    for value in secrets:
        assert value not in html
    # No request of the page carried a Referer (the callback's address holds the code).
    # (The redirect to /callback comes from the stand-in's consent page: its Referer is Spotify's business.)
    page_requests = [r for r in requests_made if r.url.startswith((service.url, fake.url + "/v1/"))
                     and not r.is_navigation_request()]
    assert {urlsplit(r.url).path for r in page_requests} >= {"/static/page.js", "/swap", "/v1/me", "/refresh"}
    for request in page_requests:
        assert "referer" not in request.all_headers(), request.url
    # Nothing about the tokens in the service's log.
    log = service.output()[since:]
    assert '"GET /callback" 200' in log
    for value in secrets:
        assert value not in log
    assert tab.problems() == []


def test_page_headers_in_the_browser(tab, service, fake):
    response = tab.page.goto(service.url + "/callback?code=not-used&state=x")
    headers = response.all_headers()
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    policy = headers["content-security-policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    assert f"connect-src 'self' {fake.url};" in policy  # SPOTIFY_API_URL's origin
    assert tab.problems() == []


def test_cancel_shows_access_denied_with_its_hint(tab, service, fake):
    start_login(tab, service, fake)
    tab.page.get_by_role("button", name="Cancel").click()
    expect(tab.page.locator("#error-code")).to_have_text("access_denied")
    expect(tab.page.locator("#error-hint")).to_contain_text("cancelled on the consent screen")
    expect(tab.page.locator("#result")).to_be_hidden()
    assert tab.page.url == service.url + "/callback"
    assert tab.problems() == []


def test_a_callback_this_tab_did_not_start_is_refused(tab, service, fake):
    fake.reset()
    tab.page.goto(service.url + "/callback?code=planted-code&state=planted-state")
    expect(tab.page.locator("#error-code")).to_have_text("state_mismatch")
    expect(tab.page.locator("#error-hint")).to_contain_text("start again from this page")
    assert tab.page.url == service.url + "/callback"
    assert fake.requests == []  # the planted code was never swapped
    assert tab.problems() == []


def test_refused_credentials_show_their_hint(tab, browser, fake):
    port = free_port()
    # As make run starts it after its check failed: the failure is the first thing a phone's first screen says.
    failed = f"Spotify refuses the credentials at {fake.url}/api/token (...): check SPOTIFY_CLIENT_SECRET"
    env = server_env(fake.url, SPOTIFY_API_URL=fake.url, SPOTIFY_CLIENT_SECRET="not-the-secret",
                     SPOTIFY_CLIENT_CALLBACK_URL=f"http://127.0.0.1:{port}/callback",
                     TOKENSWAP_CREDENTIALS_CHECKED="failed", TOKENSWAP_CHECK_FAILED=failed)
    with Server(env, port=port, extra_args="--workers 1") as wrong_secret:
        phone = Watched(browser, **SIZES["phone"])
        try:
            phone.page.goto(wrong_secret.url + "/")
            expect(phone.page.locator("#status")).to_be_in_viewport(ratio=1)
            expect(phone.page.locator("#status")).to_contain_text("The check failed")
            expect(phone.page.locator("#status")).to_contain_text("check SPOTIFY_CLIENT_SECRET")
            expect(phone.page.get_by_text("Up and running")).to_have_count(0)  # no green line over it
        finally:
            phone.context.close()
        start_login(tab, wrong_secret, fake)
        tab.page.get_by_role("button", name="Agree").click()
        # The service's own credentials: its problem (a 5xx), and the hint says which settings to check.
        expect(tab.page.locator("#error-code")).to_have_text("server_error")
        expect(tab.page.locator("#error-hint")).to_contain_text("check SPOTIFY_CLIENT_ID and SPOTIFY_CLIENT_SECRET")
        assert "not-the-secret" not in tab.page.content()
        # Its keep-alive connections would hold the server's worker at SIGTERM for the whole graceful timeout.
        tab.context.close()
    # The browser itself logs the failed /swap; nothing else went wrong.
    assert tab.problems(r"Failed to load resource: the server responded with a status of 500") == []


# -- without an allowed /callback; the rate limits -----------------------------------------------------


@pytest.fixture(scope="module")
def plain_service(fake) -> Iterator[Server]:
    """A deployment whose redirect URIs are an app's only, with a tight failure budget."""
    env = server_env(fake.url, SPOTIFY_API_URL=fake.url, SPOTIFY_CLIENT_CALLBACK_URL=IOS_CALLBACK,
                     RATE_LIMIT_FAILURES="2/day")
    with Server(env, extra_args="--workers 1") as running:
        yield running


def test_without_an_allowed_callback_the_page_says_which_uri_to_add_and_where(tab, plain_service):
    tab.page.goto(plain_service.url + "/callback?code=arrived-anyway&state=s")
    missing = tab.page.locator("#callback-missing")
    expect(missing).to_contain_text(plain_service.url + "/callback")
    expect(missing).to_contain_text("Spotify developer dashboard")
    expect(missing).to_contain_text("SPOTIFY_CLIENT_CALLBACK_URL")
    expect(tab.page.get_by_role("button", name="Log in with Spotify")).to_have_count(0)
    assert tab.page.url == plain_service.url + "/callback"  # the code is out of the address bar here too
    assert tab.problems() == []


@pytest.mark.window(30, "1/day")  # a real server counts on the wall clock: not across midnight UTC
def test_page_views_never_spend_the_failure_budget(tab, plain_service):
    for _ in range(4):
        for path in ("/", "/callback?error=access_denied&state=s", "/callback?code=c&state=s"):
            assert tab.page.goto(plain_service.url + path).status == 200
    # A JSON answer in the tab: the browser asks for /favicon.ico by itself, and gets one.
    since = len(plain_service.output())
    assert tab.page.goto(plain_service.url + "/static/no-such-file.js").status == 404
    deadline = time.monotonic() + 10
    while not any(line["path"] == "/favicon.ico" for line in plain_service.access_log(since)):
        assert time.monotonic() < deadline, "the browser asked for no /favicon.ico"
        time.sleep(0.05)
    assert [line["status"] for line in plain_service.access_log(since) if line["path"] == "/favicon.ico"] == ["200"]
    # The whole budget of two failures is still there, and a swap works.
    assert json_answer(requests.post(plain_service.url + "/swap", data={"code": "ok"}, headers=CLOSE, timeout=10))
    failures = [requests.post(plain_service.url + "/swap", data={}, headers=CLOSE, timeout=10).status_code
                for _ in range(3)]
    assert failures == [400, 400, 429]
    # A spent address still sees the page.
    assert tab.page.goto(plain_service.url + "/").status == 200


# -- the docs' fetch snippet from other origins ----------------------------------------------------------


def fetch_snippet() -> str:
    """The browser `fetch` example of the README, or of docs/ where it moved."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```js\n(.*?)```", path.read_text(), re.S):
            if "new URLSearchParams(fields)" in block:
                return block
    raise AssertionError("no fetch snippet (a js block with new URLSearchParams(fields)) in README.md or docs/")


def run_snippet(tab: Watched, site: Site, service: Server, code: str) -> dict:
    """Load a page from the site that runs the snippet against the service; what came of it."""
    snippet = fetch_snippet()
    pointed = re.sub(r'const SERVICE = "[^"]*";', f'const SERVICE = "{service.url}";', snippet)
    assert pointed != snippet, "the snippet no longer starts with const SERVICE = ..."
    site.files["/snippet.js"] = ("text/javascript", (
        f'const code = "{code}";\nconst verifier = "{"v" * 43}";\ntry {{\n{pointed}\n'
        "  window.outcome = { ok: true, tokens, refreshed };\n} catch (error) {\n"
        "  window.outcome = { ok: false, name: error.name, message: error.message };\n}\n"
    ))
    tab.page.goto(site.url + "/")
    tab.page.wait_for_function("window.outcome !== undefined")
    return tab.page.evaluate("window.outcome")


def test_fetch_snippet_from_an_allowed_origin_reads_the_answers(tab, snippet_sites, service, fake):
    fake.reset()
    outcome = run_snippet(tab, snippet_sites[0], service, "snippet-code-allowed")
    assert outcome["ok"], outcome
    assert outcome["tokens"]["access_token"] and outcome["tokens"]["refresh_token"]
    assert outcome["refreshed"]["access_token"] != outcome["tokens"]["access_token"]
    (swap, _) = [r["form"] for r in fake.requests]
    assert swap["code"] == "snippet-code-allowed" and swap["redirect_uri"] == SNIPPET_CALLBACK
    assert tab.problems() == []


def test_fetch_snippet_from_another_origin_is_refused_by_the_browser(tab, snippet_sites, service):
    outcome = run_snippet(tab, snippet_sites[1], service, "snippet-code-other")
    assert outcome == {"ok": False, "name": "TypeError", "message": "Failed to fetch"}
    assert any("has been blocked by CORS policy" in m for m in tab.messages), tab.messages
    assert tab.problems("blocked by CORS policy", "Failed to load resource: net::ERR_FAILED") == []


# -- on a phone and on a desktop: the result in view, nothing wider than the screen, dark mode -------------------

SIZES: dict[str, dict[str, Any]] = {
    "desktop": {"viewport": {"width": 1280, "height": 800}},
    "phone": {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True,
              "has_touch": True},
}
# Where a URL or URI may wrap: after a "/", ",", "?", "&" (the page's <wbr>), or a "-" (the browser's own).
BREAKS = set("/,?&-")
# Each element that sticks out past the right edge of the window, and where a URL or URI (outside code blocks) wraps.
LAYOUT = """() => {
  const width = document.documentElement.clientWidth;
  const wider = [...document.querySelectorAll("body *")]
    .filter((element) => element.getBoundingClientRect().right > width + 0.5)
    .map((element) => `${element.tagName.toLowerCase()}#${element.id}: ${element.textContent.slice(0, 40)}`);
  const wraps = [...document.querySelectorAll(":not(pre) > code")].filter((code) => code.textContent.includes("://"))
    .map((code) => {
      const after = [];
      let top = null;
      let previous = "";
      const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        for (let i = 0; i < node.length; i++) {
          const range = document.createRange();
          range.setStart(node, i);
          range.setEnd(node, i + 1);
          const rect = range.getBoundingClientRect();
          if (top !== null && rect.top > top + 1) after.push(previous);
          top = rect.top;
          previous = node.data[i];
        }
      }
      return { text: code.textContent, after };
    });
  return { scrollWidth: document.documentElement.scrollWidth, width, wider, wraps };
}"""


@pytest.fixture(params=SIZES)
def sized(request, browser) -> Iterator[Watched]:
    watched = Watched(browser, **SIZES[request.param])
    yield watched
    watched.context.close()


def fits(tab: Watched) -> list[tuple[str, list[str]]]:
    """Asserts that nothing is wider than the window; each URL shown, with the character before each of its wraps."""
    layout = tab.page.evaluate(LAYOUT)
    assert layout["wider"] == [] and layout["scrollWidth"] <= layout["width"], layout
    return [(wrap["text"], wrap["after"]) for wrap in layout["wraps"]]


def test_after_agree_the_result_is_in_view_focused_and_announced_then_the_refresh(sized, service, fake):
    start_login(sized, service, fake)
    assert fits(sized) is not None  # the consent page too
    sized.page.get_by_role("button", name="Agree").click()
    expect(sized.page.locator("#user")).to_have_text("Logged in as Test Listener")
    expect(sized.page.locator("#result")).to_be_in_viewport()
    expect(sized.page.locator("#result")).to_be_focused()
    expect(sized.page.locator("#announce")).to_have_text("Logged in as Test Listener")
    assert fits(sized) is not None

    refresh = sized.page.get_by_role("button", name="Refresh")
    refresh.click()
    expect(sized.page.locator("#refreshed")).to_contain_text("Refreshed at")
    expect(sized.page.locator("#refreshed")).to_be_in_viewport()
    expect(refresh).to_be_focused()  # ready for the next one
    expect(sized.page.locator("#announce")).to_contain_text("Refreshed at")
    assert sized.problems() == []


def test_after_cancel_the_error_is_in_view_focused_and_announced(sized, service, fake):
    start_login(sized, service, fake)
    sized.page.get_by_role("button", name="Cancel").click()
    expect(sized.page.locator("#error-code")).to_have_text("access_denied")
    expect(sized.page.locator("#error")).to_be_in_viewport()
    expect(sized.page.locator("#error")).to_be_focused()
    expect(sized.page.locator("#announce")).to_contain_text("access_denied")
    assert sized.problems() == []


def test_on_a_phone_urls_wrap_after_slashes_and_commas_and_code_wraps(browser, service, plain_service):
    phone = Watched(browser, **SIZES["phone"])
    try:
        for url in (service.url + "/", plain_service.url + "/callback"):
            phone.page.goto(url)
            urls = fits(phone)
            assert all(set(after) <= BREAKS for _, after in urls), urls
            # The iOS demo's redirect URI is wider than a phone: it wraps, once, after its "//".
            demo = [after for text, after in urls if text == IOS_CALLBACK]
            assert demo and all(after == ["/"] for after in demo), urls
            # Code blocks wrap: none scrolls sideways.
            for pre in phone.page.locator("pre").all():
                assert pre.evaluate("(element) => element.scrollWidth <= element.clientWidth"), pre.text_content()
        assert phone.problems() == []
    finally:
        phone.context.close()


def test_the_consent_page_wears_the_pages_style_dark_mode_included(browser, service, fake):
    backgrounds = {}
    for scheme in ("light", "dark"):
        watched = Watched(browser, color_scheme=scheme, **SIZES["phone"])
        try:
            start_login(watched, service, fake)
            answer = watched.page.request.get(watched.page.url)  # the consent page's own headers
            policy = answer.headers["content-security-policy"]
            assert re.search(r"style-src 'sha256-[A-Za-z0-9+/]+={0,2}';", policy) and "default-src 'none'" in policy
            assert "unsafe-inline" not in policy
            body = watched.page.locator("body")
            backgrounds[scheme] = body.evaluate("(element) => getComputedStyle(element).backgroundColor")
            # The service's own buttons: its green, rounded.
            agree = watched.page.get_by_role("button", name="Agree")
            assert agree.evaluate("(element) => getComputedStyle(element).borderRadius") == "999px"
            assert fits(watched) is not None
            # The page itself changes with the scheme too.
            watched.page.goto(service.url + "/")
            assert body.evaluate("(element) => getComputedStyle(element).backgroundColor") == backgrounds[scheme]
            assert watched.problems() == []
        finally:
            watched.context.close()
    assert backgrounds["light"] != backgrounds["dark"]
    luminance = {scheme: sum(map(int, re.findall(r"\d+", color)[:3])) for scheme, color in backgrounds.items()}
    assert luminance["dark"] < 150 < luminance["light"], backgrounds
