"""What many tests share: the base configuration, an app built from variables, a real server's environment, test vectors.

Fixtures live in conftest.py; the stand-in for Spotify and the server-process runner in devtools/.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient
from responses import matchers

from app import create_app
from config import load_config
from crypto import Opened, TokenSealer
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET
from devtools.process import wait_until_up

ROOT = Path(__file__).resolve().parent.parent
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


class Clock:
    """A wall clock that moves only when a test moves it: seconds since the epoch."""

    START = 1_780_000_000.25  # 2026-05-28, a fixed instant with a fraction

    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def app_for(variables: Mapping[str, str], clock: Callable[[], float] = time.time) -> Flask:
    """The app, in testing mode, for a configuration given as environment variables; its test clients
    fail the test when an answer shows a secret, a code or a raw token."""
    app = create_app(load_config(variables), clock=clock)
    app.testing = True
    app.test_client_class = CheckedClient
    return app


def server_env(spotify_url: str, **overrides: str) -> dict[str, str]:
    """Environment for a real server process pointed at a fake accounts service."""
    return {**BASE_CONFIG, "SPOTIFY_ACCOUNTS_URL": spotify_url, "SPOTIFY_TIMEOUT": "2", **overrides}


# The sealer of a server started with server_env(): what its tokens open with.
SEALER = TokenSealer([SECRET], CLIENT_ID)


def unique(prefix: str = "code") -> str:
    """A code or token no other test uses: the fake accounts service is shared by a module's tests."""
    return f"{prefix}-{uuid.uuid4().hex}"


def legacy_vectors() -> list[dict[str, str]]:
    """Tokens made by the legacy Ruby services' own cipher code (the encrypted_strings gem), with secrets and plaintexts.

    A copy of the team's shared/legacy_token_vectors.json, kept in the repo so a clean clone tests it.
    """
    path = Path(__file__).parent / "data" / "legacy_token_vectors.json"
    vectors: list[dict[str, str]] = json.loads(path.read_text())["vectors"]
    return vectors


# -- the unit tests' vocabulary: Spotify's side faked with responses ------------------------------

CALLBACK = "myapp://callback"  # the first configured callback: the default
OTHER_CALLBACK = "https://example.com/callback"
BASIC_AUTH = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
CODE = "AQCauthorizationCode-c0de-9f8e7d6c5b4a"
RAW_REFRESH = "AQDrawSpotifyRefreshToken-r4w-0123456789"
ROTATED = "AQDrotatedSpotifyRefreshToken-n3w-987654"
VERIFIER = "v" * 20 + "-._~" + "0123456789abcdefghijklm"  # 47 characters, RFC 7636 alphabet
SECRET_A = "rotation-secret-A-0123456789abcdef"
SECRET_B = "rotation-secret-B-0123456789abcdef"

# Strings that must never appear in an answer (body or headers) or a log line.
NEVER_SHOWN = (CLIENT_SECRET, SECRET, SECRET_A, SECRET_B, CODE, RAW_REFRESH, ROTATED)

TOKENS = {
    "access_token": "BQAccessToken-abc",
    "token_type": "Bearer",
    "scope": "user-read-private streaming",
    "expires_in": 3600,
}
JSON_CT = "application/json"


class CheckedClient(FlaskClient):
    """A test client that fails the test when an answer shows something it must not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.never_shown = set(NEVER_SHOWN)

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        shown = response.get_data(as_text=True) + str(response.headers)
        for secret in self.never_shown:
            assert secret not in shown, "an answer showed a secret, code or raw token"
        return response


def seal(
    raw: str, *secrets: str, client_id: str = CLIENT_ID, signed_in_at: int | None = None, grant_id: str | None = None
) -> str:
    return TokenSealer(list(secrets or [SECRET]), client_id).seal(raw, signed_in_at, grant_id)


def spotifyapiserver_token(secret_key: str, plaintext: str, nonce: bytes = b"\x07" * 12) -> str:
    """A token as Peter Schorn's SpotifyAPIServer seals one (its Cryptography.swift: AES.GCM.seal(...).combined,
    unpadded base64url), made with pyca/cryptography's AESGCM: an implementation apart from crypto.py's."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = hashlib.sha256(secret_key.encode("utf-8")).digest()
    combined = nonce + AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), None)  # ciphertext || tag
    return base64.urlsafe_b64encode(combined).rstrip(b"=").decode("ascii")


def unseal(token: str, *secrets: str) -> Opened:
    return TokenSealer(list(secrets or [SECRET]), CLIENT_ID).open(token)


def expect(spotify, form: dict[str, str], **answer):
    """Register Spotify's answer for exactly this form, sent with the app's Basic credentials."""
    return spotify.post(
        TOKEN_URL,
        match=[
            matchers.urlencoded_params_matcher(form),
            matchers.header_matcher(
                {"Authorization": BASIC_AUTH, "Content-Type": "application/x-www-form-urlencoded"}
            ),
        ],
        **answer,
    )


def swap_form(code: str = CODE, redirect_uri: str = CALLBACK, **extra: str) -> dict[str, str]:
    return {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, **extra}


def refresh_form(raw: str = RAW_REFRESH) -> dict[str, str]:
    return {"grant_type": "refresh_token", "refresh_token": raw}


def post(client, path: str, fields: dict, style: str = "form"):
    if style == "json":
        return client.post(path, json=fields)
    return client.post(path, data=fields)


def assert_error(response, status: int, error: str, description: str | None = None) -> dict:
    assert response.status_code == status
    assert response.headers["Content-Type"] == JSON_CT
    body = response.get_json()
    assert body["error"] == error
    assert isinstance(body.get("error_description", ""), str)
    if description is not None:
        assert body["error_description"] == description
    return body


def assert_token_answer(response) -> dict:
    assert response.status_code == 200
    assert response.headers["Content-Type"] == JSON_CT
    assert response.headers["Cache-Control"] == "no-store"
    return response.get_json()


# -- the service as a user starts it: a copy of its files, an environment without its settings ----------

# What the three commands need, copied into a directory of its own with its own .env: every module of
# the service (whatever modules it grows), its files, and the development stand-in for Spotify.
FILES = tuple(sorted(p.name for p in ROOT.glob("*.py"))) + (
    "Procfile", ".env.example", "openapi.json", "templates", "static", "devtools")


def copy_of_the_service(directory: Path) -> Path:
    for name in FILES:
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target)
        else:
            shutil.copy(ROOT / name, target)
    return directory


def bare_environment(**extra: str) -> dict[str, str]:
    """Nothing of the service's configuration: it must all come from .env."""
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        **extra,
    }


@contextlib.contextmanager
def started(command: list[str], cwd: Path, env: dict[str, str], url: str) -> Iterator[Callable[[], str]]:
    """A command that serves at url, until the block ends; yields a function returning its output so far."""
    log_path = cwd / "output.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)

    def output() -> str:
        return log_path.read_text(errors="replace")

    try:
        assert wait_until_up(url, process, timeout=60), f"{command} did not answer /health:\n{output()}"
        yield output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- answers read off a raw socket: what requests and http.client would not send or would not show -----------


def split_answer(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """An HTTP/1.1 answer's (status, headers with lower-case names, body)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def exchange(port: int, request: bytes, *, tls: bool = False, timeout: float = 10) -> bytes:
    """Bytes sent as they are on a new connection to 127.0.0.1:port, and all that comes back until it closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    answer = b""
    with sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # refused with part of it unsent
            sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):  # closed with part of the request unread
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def read_answer(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One answer with a Content-Length from a connection that stays open: (status, headers, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    status, headers, body = split_answer(data)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of an answer")
        body += chunk
    return status, headers, body
