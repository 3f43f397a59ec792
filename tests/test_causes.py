"""Why Spotify could not be reached, each cause produced for real: in the log and in `check`."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import check
import logs
import spotify
from devtools.fake_accounts import FakeAccounts
from devtools.process import free_port
from logs import redacted_url
from tests.helpers import BASE_CONFIG, app_for


@pytest.fixture(autouse=True)
def _no_proxy_from_the_shell(monkeypatch):
    """Each test sets the proxy and CA variables it means; none leaks in from the developer's shell."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="module")
def tls_accounts() -> Iterator[FakeAccounts]:
    """The stand-in over HTTPS, with a self-signed certificate made at its start."""
    with FakeAccounts(tls=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def slow_accounts() -> Iterator[FakeAccounts]:
    with FakeAccounts(latency=3) as fake:
        yield fake


def closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"


def check_lines(accounts_url: str, **overrides: str) -> list[str]:
    lines: list[str] = []
    environ = {**BASE_CONFIG, "SPOTIFY_ACCOUNTS_URL": accounts_url, "SPOTIFY_TIMEOUT": "0.5", **overrides}
    check.report(environ, lines.append)
    # The line of the Spotify check (the others: configuration, storage, information).
    return [line for line in lines if line[5:].startswith(("Spotify", "the proxy"))]


def swap_and_log(accounts_url: str, caplog, **overrides: str) -> tuple[int, list[logging.LogRecord]]:
    app = app_for({**BASE_CONFIG, "SPOTIFY_ACCOUNTS_URL": accounts_url, "SPOTIFY_TIMEOUT": "0.5",
                      **overrides})
    with caplog.at_level(logging.WARNING, logger=app.logger.name):
        status = app.test_client().post("/swap", data={"code": "c0de"}).status_code
    return status, [r for r in caplog.records if r.getMessage().startswith(("Spotify ", "The proxy "))]


CASES = {
    "name not resolved": lambda: "http://does-not-exist.invalid",
    "connection refused": closed_port,
}


@pytest.mark.parametrize("cause", CASES)
def test_check_and_the_log_name_the_cause(cause, caplog):
    url = CASES[cause]()
    [line] = check_lines(url)
    assert line.startswith("FAIL Spotify could not be reached at " + url + "/api/token: " + cause + ";")
    status, records = swap_and_log(url, caplog)
    assert status == 503
    [record] = records
    assert record.levelname == "WARNING"
    assert f"{url}/api/token: {cause};" in record.getMessage()


@pytest.mark.e2e  # tls_accounts makes its certificate with openssl, a process
def test_an_untrusted_certificate_is_named_with_the_ca_bundle_hint(tls_accounts, caplog, monkeypatch):
    [line] = check_lines(tls_accounts.url)
    assert "TLS certificate not trusted" in line and "REQUESTS_CA_BUNDLE" in line
    status, [record] = swap_and_log(tls_accounts.url, caplog)
    assert status == 503
    assert "TLS certificate not trusted" in record.getMessage() and "REQUESTS_CA_BUNDLE" in record.getMessage()
    # Following the hint works: the stand-in's certificate as the CA bundle.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls_accounts.cert_file)
    [line] = check_lines(tls_accounts.url)
    assert line.startswith("ok   Spotify accepts"), line


@pytest.mark.e2e  # tls_accounts makes its certificate with openssl, a process
def test_a_dead_proxy_is_named_as_the_proxy_not_as_spotify(tls_accounts, caplog, monkeypatch):
    proxy = closed_port()
    monkeypatch.setenv("HTTPS_PROXY", proxy.replace("http://", "http://user:PWSECRET@"))
    [line] = check_lines(tls_accounts.url)
    assert line.startswith(f"FAIL the proxy {proxy} failed on the way to Spotify at {tls_accounts.url}/api/token")
    assert ": proxy failed;" in line and "HTTPS_PROXY" in line and "PWSECRET" not in line
    status, [record] = swap_and_log(tls_accounts.url, caplog)
    assert status == 503 and record.getMessage().startswith(f"The proxy {proxy} failed on the way to Spotify")
    assert "PWSECRET" not in caplog.text


def test_a_timeout_is_named(slow_accounts, caplog):
    [line] = check_lines(slow_accounts.url)
    assert line.startswith(f"FAIL Spotify did not answer at {slow_accounts.url}/api/token within SPOTIFY_TIMEOUT (0.5 s): timed out;")
    status, [record] = swap_and_log(slow_accounts.url, caplog)
    assert status == 504
    assert record.getMessage().startswith(f"Spotify did not answer within 0.5 s at {slow_accounts.url}/api/token: timed out;")


def test_each_cause_is_logged_at_most_once_a_minute_per_worker(caplog):
    logger = logging.getLogger("test_causes")
    closed = closed_port()
    now = [0.0]
    throttle = logs.Throttle(clock=lambda: now[0])  # one worker: one throttle, both clients
    client = spotify.AccountsClient("id", "secret", closed, 0.5, logger=logger, throttle=throttle)
    unresolved = spotify.AccountsClient(
        "id", "secret", "http://does-not-exist.invalid", 0.5, logger=logger, throttle=throttle)
    with caplog.at_level(logging.WARNING, logger="test_causes"):
        for _ in range(3):
            with pytest.raises(spotify.Unreachable):
                client.refresh("AQDraw")
        assert len(caplog.records) == 1
        # Another cause in the same process is its own line.
        with pytest.raises(spotify.Unreachable):
            unresolved.refresh("AQDraw")
        assert [r.getMessage().split(": ")[1].split(";")[0] for r in caplog.records] == [
            "connection refused", "name not resolved"]
        # Once the minute is over, the cause is logged again.
        now[0] += 60
        with pytest.raises(spotify.Unreachable):
            client.refresh("AQDraw")
        assert len(caplog.records) == 3


def test_a_password_in_the_url_is_never_shown():
    assert redacted_url("https://user:hunter2@accounts.example:8443/api/token") == (
        "https://accounts.example:8443/api/token")
