"""The README's curl examples, run as written against the configuration its quick start produces."""

from __future__ import annotations

import json
import re
import subprocess
import uuid

import requests
from dotenv import dotenv_values

from config import generate_secret
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET
from devtools.process import CLOSE, ROOT, Server, json_answer
from tests.tools import needs

pytestmark = needs("curl", "bash")

# Each curl call prints its body on a line of its own and fails the script on an HTTP error.
CURL = 'curl() { command curl -sS --fail-with-body "$@"; echo; }\n'


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
    with Server(quick_start_env(fake_accounts.url)) as server:
        code = f"readme-{uuid.uuid4().hex}"
        sealed = json_answer(requests.post(server.url + "/swap", data={"code": code}, headers=CLOSE, timeout=10))["refresh_token"]
        values = {"SERVICE": server.url, "CODE": code, "SEALED": sealed}
        script = re.sub(
            r"^(SERVICE|CODE|SEALED)=\S+", lambda m: f"{m.group(1)}={values[m.group(1)]}",
            readme_curl_block(), flags=re.M,
        )
        assert script.count(server.url) == 1 and script.count(sealed) == 1, "the block sets SERVICE, CODE, SEALED"
        done = subprocess.run(["bash", "-euc", CURL + script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(answers) == readme_curl_block().count("curl -X POST") == 5
    for answer in answers:
        assert answer["access_token"] and answer["token_type"] == "Bearer" and answer["refresh_token"]
