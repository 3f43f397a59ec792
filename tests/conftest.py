"""Shared fixtures: a configuration, the app and its test client, and the fake accounts service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app import create_app
from config import VARIABLES
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET, FakeAccounts

SECRET = "unit-test-secret-0123456789abcdef"
SPOTIFY = "http://127.0.0.1:9"  # never listened on: unit tests fake it with responses
TOKEN_URL = SPOTIFY + "/api/token"

BASE_CONFIG = {
    "SPOTIFY_CLIENT_ID": CLIENT_ID,
    "SPOTIFY_CLIENT_SECRET": CLIENT_SECRET,
    "SPOTIFY_CLIENT_CALLBACK_URL": "myapp://callback,https://example.com/callback",
    "ENCRYPTION_SECRET": SECRET,
    "SPOTIFY_ACCOUNTS_URL": SPOTIFY,
    "RATE_LIMIT_FAILURES": "off",
    "RATE_LIMIT_PER_TOKEN": "off",
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """No variable from the developer's shell leaks into a test."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def config() -> dict[str, str]:
    return dict(BASE_CONFIG)


@pytest.fixture
def app(config):
    return create_app({**config, "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def fake_accounts():
    with FakeAccounts() as fake:
        yield fake


def server_env(spotify_url: str, **overrides: str) -> dict[str, str]:
    """Environment for a real server process pointed at a fake accounts service."""
    return {**BASE_CONFIG, "SPOTIFY_ACCOUNTS_URL": spotify_url, "SPOTIFY_TIMEOUT": "2", **overrides}


def legacy_vectors() -> list[dict[str, str]]:
    """Tokens made by the legacy Ruby services' own cipher code (the encrypted_strings gem), with secrets and plaintexts.

    A copy of the team's shared/legacy_token_vectors.json, kept in the repo so a clean clone tests it.
    """
    path = Path(__file__).parent / "data" / "legacy_token_vectors.json"
    return json.loads(path.read_text())["vectors"]
