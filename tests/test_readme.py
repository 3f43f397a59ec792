"""The README's curl examples, run as written against the configuration its quick start produces."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from dotenv import dotenv_values

from config import generate_secret
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET
from devtools.process import ROOT, Server
from tests.tools import needs

pytestmark = [pytest.mark.e2e, needs("curl", "bash")]

# curl fails the script on an HTTP error, the body still shown; nothing else changes in what the block runs.
CURL = 'curl() { command curl --fail-with-body "$@"; }\n'


def readme_curl_block() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    [block] = [block for block in blocks if "curl" in block and "SERVICE=" in block]
    return block


def quick_start_env(accounts_url: str) -> dict[str, str]:
    """What `make run` serves: .env.example, a fresh secret, and the stand-in for Spotify."""
    env = {name: value or "" for name, value in dotenv_values(ROOT / ".env.example").items()}
    env.update(
        SPOTIFY_CLIENT_ID=CLIENT_ID, SPOTIFY_CLIENT_SECRET=CLIENT_SECRET, ENCRYPTION_SECRET=generate_secret(),
        SPOTIFY_ACCOUNTS_URL=accounts_url,
    )
    return env


def test_the_readme_curl_examples_work_as_written(fake_accounts):
    block = readme_curl_block()
    calls = len(re.findall(r"\bcurl ", block))
    assert calls == 5
    with Server(quick_start_env(fake_accounts.url)) as server:
        # As written, but for the port: this test's server is not on make run's 1234.
        script, replaced = re.subn(r"^SERVICE=http://127\.0\.0\.1:1234\b", f"SERVICE={server.url}", block, flags=re.M)
        assert replaced == 1, "the block starts with SERVICE=http://127.0.0.1:1234, make run's address"
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", CURL + script], capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # One answer a line, each call's on a line of its own, nothing run together.
    assert done.stdout.endswith("\n")
    lines = done.stdout.splitlines()
    assert len(lines) == calls, done.stdout
    answers = [json.loads(line) for line in lines]
    for answer in answers:
        assert answer["access_token"] and answer["token_type"] == "Bearer" and answer["refresh_token"]
    # The refreshes sent the swap's sealed token: they got its access tokens, not errors.
    assert len({answer["access_token"] for answer in answers}) == calls
