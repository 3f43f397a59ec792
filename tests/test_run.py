"""`make run` (devtools/run.py): .env written with a fresh secret, the stand-in for Spotify when .env has no credentials,
and what the console says."""

from __future__ import annotations

import http.server
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from dotenv import dotenv_values

from config import MIN_SECRET_LENGTH, load_config
from devtools import run
from devtools.fake_accounts import FakeAccounts
from devtools.process import CLOSE, free_port, json_answer, wait_for
from server import DRAIN_SECONDS
from tests.helpers import bare_environment, copy_of_the_service, started

# Tests that start processes are marked e2e one by one; the pure computations beside them run in the fast tier.

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


def test_a_failed_check_is_the_first_and_the_last_thing_the_banner_says():
    failed = "Spotify refuses the credentials at https://accounts.spotify.com/api/token (...): check SPOTIFY_CLIENT_SECRET"
    lines = run.banner("127.0.0.1", 1234, None, None, True, [failed]).strip().splitlines()
    assert lines[0].startswith("THE CHECK FAILED") and lines[1].strip() == failed
    assert "THE CHECK FAILED" in lines[-1] and "Using Spotify" not in "\n".join(lines)
    # Credentials with a SPOTIFY_ACCOUNTS_URL of another service: not "Using Spotify" either.
    elsewhere = run.banner("127.0.0.1", 1234, None, None, True, elsewhere=["SPOTIFY_ACCOUNTS_URL=http://127.0.0.1:9"])
    assert "Using Spotify" not in elsewhere and "Not Spotify: the credentials in .env, with SPOTIFY_ACCOUNTS_URL" in elsewhere
    # What the iOS SDK's demo projects really use (docs/clients.md): localhost, not 127.0.0.1.
    assert "demo projects use http://localhost:1234/swap" in elsewhere


@pytest.mark.e2e
def test_from_a_fresh_copy_it_serves_against_the_stand_in(tmp_path):
    """No .env: one is written, the stand-in plays Spotify, an iOS-SDK-style swap and a refresh work."""
    directory = copy_of_the_service(tmp_path)
    assert not (directory / ".env").exists()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with started([sys.executable, "-m", "devtools.run", "--port", str(port)], directory, bare_environment(), url) as output:
        assert (directory / ".env").exists()
        page = requests.get(url + "/", headers=CLOSE, timeout=10)
        assert page.status_code == 200 and 'id="stand-in"' in page.text
        # On any port (not 1234 here), the stand-in takes the page's own /callback: the login test is there.
        assert f'data-redirect-uri="{url}/callback"' in page.text
        assert "test-client-id" in page.text  # the stand-in's client
        stand_in = re.search(r'data-accounts-url="([^"]+)"', page.text).group(1)
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


@pytest.mark.e2e
@pytest.mark.parametrize("secret, says, page_says", [
    ("test-client-secret", "ok   Spotify accepts SPOTIFY_CLIENT_ID and SPOTIFY_CLIENT_SECRET", "Credentials checked."),
    ("a-wrong-secret", "FAIL Spotify refuses the credentials", "The check failed."),
])
def test_with_credentials_in_dotenv_it_checks_them_before_serving_and_the_page_says_so(tmp_path, secret, says,
                                                                                           page_says):
    directory = copy_of_the_service(tmp_path)
    with FakeAccounts(record=False) as spotify:
        # Credentials in .env, as a user's would be; the stand-in plays Spotify at SPOTIFY_ACCOUNTS_URL.
        example = (directory / ".env.example").read_text()
        (directory / ".env").write_text(example + f"\nSPOTIFY_CLIENT_ID=test-client-id\nSPOTIFY_CLIENT_SECRET={secret}\n"
                                        f"SPOTIFY_ACCOUNTS_URL={spotify.url}\nSPOTIFY_API_URL={spotify.url}\n"
                                        f"ENCRYPTION_SECRET={'s' * 32}\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with started([sys.executable, "-m", "devtools.run", "--port", str(port)], directory, bare_environment(), url) as output:
            page = requests.get(url + "/", headers=CLOSE, timeout=10).text
            # The banner comes once run.py's own wait has seen the server up, which can be after this test's did.
            wait_for(lambda: "The token swap service is running" in output(), 30, "the banner")
    console = output()
    assert "Checking this deployment before serving" in console
    assert says in console
    assert console.index(says) < console.index("The token swap service is running")
    assert page_says in page
    assert secret not in console
    # The stand-in at SPOTIFY_ACCOUNTS_URL: the credentials in .env, but not Spotify, and said so.
    assert "Using Spotify" not in console and "Not Spotify: the credentials in .env, with SPOTIFY_ACCOUNTS_URL=" in console
    if "FAIL" in says:  # first in the banner, and named on the page in place of "Up and running."
        banner = console[console.index("THE CHECK FAILED"):]
        assert banner.index("check SPOTIFY_CLIENT_SECRET") < banner.index("The token swap service is running")
        assert "check SPOTIFY_CLIENT_SECRET" in page and "Up and running" not in page


# -- stopping, and a port already taken --------------------------------------------------------


def process_tree(root: int) -> dict[int, str]:
    """A process and all its descendants, walked in /proc: {pid: start time}, the start time telling a
    process from a later one that reuses its pid."""
    parents: dict[int, int] = {}
    started_at: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name, in parentheses, may hold spaces: the fields after it are fixed.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone in between
                continue
            parents[int(entry.name)], started_at[int(entry.name)] = int(fields[1]), fields[19]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in started_at:
            tree[pid] = started_at[pid]
            todo += [child for child, parent in parents.items() if parent == pid]
    return tree


def still_running(tree: dict[int, str]) -> list[int]:
    alive = []
    for pid, started_at in tree.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == started_at and fields[0] != "Z":
            alive.append(pid)
    return alive


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
@pytest.mark.long(5)
def test_a_stop_prints_no_traceback_leaves_no_process_and_takes_seconds(tmp_path, how):
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group), or SIGTERM to run.py alone,
    with a browser-like keep-alive connection open and the stand-in for Spotify running."""
    directory = copy_of_the_service(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "console.log"
    with log_path.open("wb") as log:
        # A process group of its own, like a shell's foreground job.
        process = subprocess.Popen([sys.executable, "-m", "devtools.run", "--port", str(port)], cwd=directory,
                                   env=bare_environment(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Stop with Ctrl-C." not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        keep_alive = requests.Session()
        assert keep_alive.get(url + "/health", timeout=10).status_code == 200
        tree = process_tree(process.pid)
        assert len(tree) >= 4, tree  # run.py, the gunicorn master, its two workers
        signalled = time.monotonic()
        if how == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        took = time.monotonic() - signalled
        keep_alive.close()
        leftover = still_running(tree)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    console = log_path.read_text()
    assert code == 0, console
    assert "Traceback" not in console and "[ERROR]" not in console, console
    assert leftover == [], f"left running: {leftover}\n{console}"
    # The drain (server.DRAIN_SECONDS), then the exit: seconds, not graceful_timeout's 35 (room for a loaded machine).
    assert took < DRAIN_SECONDS + 10, f"took {took:.1f} s to stop"


@pytest.mark.e2e
def test_a_busy_port_is_said_plainly_and_no_banner_is_printed(tmp_path):
    """Another server already answers /health on the port: run.py says so and stops, non-zero."""
    directory = copy_of_the_service(tmp_path)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    port = other.server_address[1]
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        started_at = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "devtools.run", "--port", str(port)], cwd=directory,
                                env=bare_environment(), capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started_at
    finally:
        other.shutdown()
        other.server_close()
    console = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"Port {port} is in use" in console and "make run PORT=8000" in console
    assert "running" not in console and "STAND-IN" not in console
    assert took < 10
    # On every interface too: the port is taken on 127.0.0.1.
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    try:
        result = subprocess.run([sys.executable, "-m", "devtools.run", "--host", "0.0.0.0", "--port", str(other.server_address[1])],
                                cwd=directory, env=bare_environment(), capture_output=True, text=True, timeout=30)
    finally:
        other.server_close()
    assert result.returncode != 0 and "is in use" in result.stderr
