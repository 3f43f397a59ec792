"""`make run` (run.py): .env written with a fresh secret, the stand-in for Spotify when .env has no credentials,
and what the console says."""

from __future__ import annotations

import pytest

import re
import stat
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from dotenv import dotenv_values

import run
from config import MIN_SECRET_LENGTH, load_config
from devtools.process import CLOSE, free_port, json_answer
from tests.test_dotenv import bare_environment, copy_of_the_service, started

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / ".env.example"


def test_a_missing_dotenv_is_written_from_the_example_with_a_fresh_secret(tmp_path):
    path = tmp_path / ".env"
    assert run.prepare_env_file(path, EXAMPLE) == "Wrote .env from .env.example, with a fresh ENCRYPTION_SECRET."
    written, example = dotenv_values(path), dotenv_values(EXAMPLE)
    assert len(written["ENCRYPTION_SECRET"]) >= MIN_SECRET_LENGTH
    assert {**written, "ENCRYPTION_SECRET": ""} == example
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # What it holds is a valid configuration once the credentials are in, the page's callback allowed.
    config = load_config({**written, "SPOTIFY_CLIENT_ID": "id", "SPOTIFY_CLIENT_SECRET": "secret"})
    assert config.callback_urls == ("spotify-login-sdk-test-app-swift://spotify-login-callback",
                                    "http://127.0.0.1:1234/callback")
    other = tmp_path / "other.env"
    run.prepare_env_file(other, EXAMPLE)
    assert dotenv_values(other)["ENCRYPTION_SECRET"] != written["ENCRYPTION_SECRET"]


def test_an_empty_secret_is_filled_in_and_nothing_else_changes(tmp_path, monkeypatch):
    path = tmp_path / ".env"
    path.write_text("# mine\nSPOTIFY_CLIENT_ID=abc\nENCRYPTION_SECRET=\nSPOTIFY_MAX_RATE=20/second;600/minute\n")
    assert run.prepare_env_file(path, EXAMPLE) == "Added a fresh ENCRYPTION_SECRET to .env."
    values = dotenv_values(path)
    assert len(values["ENCRYPTION_SECRET"]) >= MIN_SECRET_LENGTH
    assert values["SPOTIFY_CLIENT_ID"] == "abc" and values["SPOTIFY_MAX_RATE"] == "20/second;600/minute"
    assert path.read_text().startswith("# mine\n")
    before = path.read_text()
    assert run.prepare_env_file(path, EXAMPLE) is None
    assert path.read_text() == before
    # A secret from the environment is the one the service uses: the file is left alone.
    path.write_text("ENCRYPTION_SECRET=\n")
    monkeypatch.setenv("ENCRYPTION_SECRET", "from-the-environment-0123456789")
    assert run.prepare_env_file(path, EXAMPLE) is None
    assert path.read_text() == "ENCRYPTION_SECRET=\n"


def test_banner_on_every_interface_gives_the_urls_for_a_phone():
    text = run.banner("0.0.0.0", 1234, None, "192.168.1.20", callback_allowed=True)
    assert "open http://127.0.0.1:1234 in a browser" in text
    assert "swap URL http://192.168.1.20:1234/swap, refresh URL http://192.168.1.20:1234/refresh" in text
    assert "Using Spotify" in text
    unknown = run.banner("0.0.0.0", 1234, None, None, callback_allowed=True)
    assert "http://<this machine's address>:1234/swap" in unknown


def test_banner_says_plainly_when_a_stand_in_plays_spotify_and_what_the_page_needs():
    text = run.banner("127.0.0.1", 5000, "STAND-IN DESCRIPTION", None, callback_allowed=False)
    assert "No Spotify credentials in .env" in text and "STAND-IN DESCRIPTION" in text
    assert "http://127.0.0.1:5000/callback in SPOTIFY_CLIENT_CALLBACK_URL" in text
    assert "every interface" not in text


def test_from_a_fresh_copy_it_serves_against_the_stand_in(tmp_path):
    """No .env: one is written, the stand-in plays Spotify, an iOS-SDK-style swap and a refresh work."""
    directory = copy_of_the_service(tmp_path)
    assert not (directory / ".env").exists()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with started([sys.executable, "run.py", "--port", str(port)], directory, bare_environment(), url) as output:
        assert (directory / ".env").exists()
        page = requests.get(url + "/", headers=CLOSE, timeout=10)
        assert page.status_code == 200 and 'id="stand-in"' in page.text
        assert "test-client-id" in page.text  # the stand-in's client
        stand_in = re.search(r"token requests to\s*<code>([^<]+)</code>", page.text).group(1)
        assert stand_in.startswith("http://127.0.0.1:") and stand_in != url
        # A login as the iOS SDK makes it (no PKCE, its demo app's redirect URI), then its swap: code alone.
        login = requests.get(stand_in + "/authorize", allow_redirects=False, timeout=10, params={
            "client_id": "test-client-id", "response_type": "code", "decision": "accept",
            "redirect_uri": "spotify-login-sdk-test-app-swift://spotify-login-callback", "scope": "user-read-private"})
        code = parse_qs(urlsplit(login.headers["Location"]).query)["code"][0]
        tokens = json_answer(requests.post(url + "/swap", data={"code": code}, headers=CLOSE, timeout=10))
        refreshed = requests.post(url + "/refresh", data={"refresh_token": tokens["refresh_token"]}, headers=CLOSE,
                                  timeout=10)
        assert json_answer(refreshed)["access_token"] != tokens["access_token"]
    console = output()
    assert "Wrote .env from .env.example, with a fresh ENCRYPTION_SECRET." in console
    assert "using a STAND-IN" in console and f"open {url} in a browser" in console
    # The secrets the console must not show: the .env's and the stand-in's client secret; nor codes or tokens.
    secret = dotenv_values(directory / ".env")["ENCRYPTION_SECRET"]
    for value in (secret, "test-client-secret", code, tokens["access_token"], tokens["refresh_token"]):
        assert value not in console
