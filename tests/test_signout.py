"""End-to-end: a sign-out (POST /revoke) holds on every worker of the Procfile's server with the default settings,
and on every instance sharing a real Redis; rotated tokens of the grant too, while another grant refreshes."""

from __future__ import annotations

import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

import revocations
from config import load_config
from crypto import TokenSealer
from devtools.fake_accounts import CLIENT_ID
from devtools.process import CLOSE, Server, json_answer, with_children
from tests.helpers import SECRET, server_env

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

SEALER = TokenSealer([SECRET], CLIENT_ID)
# The access line with the worker's pid first (gunicorn's %(p)s atom): which worker answered each request.
PID_LINE = re.compile(r"<(?P<pid>\d+)> (?P<path>\S+) (?P<status>\d{3})")
PID_FORMAT = "--access-logformat '%(p)s %(U)s %(s)s'"
SIGNED_OUT = "The user signed out"


@pytest.fixture(scope="module")
def instance(fake_accounts):
    """The default settings (memory:// storage, 2 workers), with the answering worker's pid in each access line."""
    with Server(server_env(fake_accounts.url), extra_args=PID_FORMAT) as running:
        yield running


@pytest.fixture(scope="module")
def two_instances(fake_accounts, redis_server):
    """Two instances of the service sharing one Redis."""
    env = server_env(fake_accounts.url, RATE_LIMIT_STORAGE_URI=redis_server.url)
    with Server(env) as one, Server(env) as two:
        yield one, two


def post(server: Server, path: str, fields: dict[str, str]) -> requests.Response:
    return requests.post(server.url + path, data=fields, headers=CLOSE, timeout=30)


def sign_in(server: Server, rotate: bool = False) -> str:
    """A swap's sealed refresh token; with `rotate`, one whose first refresh Spotify answers with a new token."""
    code = f"rotating-{uuid.uuid4().hex}" if rotate else f"signout-{uuid.uuid4().hex}"
    return json_answer(post(server, "/swap", {"code": code}))["refresh_token"]


def refresh(server: Server, token: str) -> requests.Response:
    return post(server, "/refresh", {"refresh_token": token})


def assert_signed_out(answer: requests.Response) -> None:
    body = json_answer(answer, 400)
    assert body["error"] == "invalid_grant" and body["error_description"].startswith(SIGNED_OUT)


def sign_in_and_rotate(server: Server) -> tuple[str, str]:
    """A sign-in's first token, and the rotated one its refresh gave; both of one grant."""
    first = sign_in(server, rotate=True)
    rotated = json_answer(refresh(server, first))["refresh_token"]
    assert SEALER.open(rotated).refresh_token != SEALER.open(first).refresh_token
    assert SEALER.open(rotated).grant_id == SEALER.open(first).grant_id is not None
    return first, rotated


def test_a_sign_out_holds_on_every_worker_with_the_default_settings(instance, fake):
    first, rotated = sign_in_and_rotate(instance)
    other = sign_in(instance)
    assert json_answer(post(instance, "/revoke", {"token": rotated, "token_type_hint": "refresh_token"})) == {}
    fake.reset()

    workers = set(with_children(instance.process.pid)) - {instance.process.pid}
    assert len(workers) == 2
    since = len(instance.output())
    answered_by: set[int] = set()
    # Refreshes of the grant's two tokens, on fresh connections, several at once, until each worker has answered
    # some: which worker accepts a connection is the kernel's choice.
    with ThreadPoolExecutor(8) as pool:
        for _ in range(50):
            for answer in pool.map(lambda token: refresh(instance, token), [first, rotated] * 4):
                assert_signed_out(answer)
            lines = [PID_LINE.fullmatch(line) for line in instance.output()[since:].splitlines()]
            answered_by = {int(m["pid"]) for m in lines if m and m["path"] == "/refresh" and m["status"] == "400"}
            if answered_by >= workers:
                break
    assert answered_by == workers
    assert fake.requests == []  # refused by the service itself: Spotify never asked
    json_answer(refresh(instance, other))
    assert "Sign-outs (POST /revoke) are kept by this instance only" in instance.output()


def test_a_sign_out_holds_on_every_instance_sharing_redis_for_the_grants_lifetime(two_instances, redis_server):
    one, two = two_instances
    first, rotated = sign_in_and_rotate(one)
    other = sign_in(two)
    assert json_answer(post(two, "/revoke", {"token": first})) == {}
    for server in (one, two):
        for token in (first, rotated):
            assert_signed_out(refresh(server, token))
        json_answer(refresh(server, other))

    opened = SEALER.open(first)
    lifetime = load_config(server_env("http://127.0.0.1:9")).refresh_token_lifetime
    with redis.Redis(port=redis_server.port) as client:
        keys = {key.decode() for key in client.keys(f"*{revocations.KEY_PREFIX}*")}
        assert any(key.endswith(f"grant:{opened.grant_id}") for key in keys)
        for key in keys:  # as long as the grant can live, counted from its sign-in, and no longer
            assert lifetime - 300 < client.ttl(key) <= lifetime
        assert not any(opened.refresh_token in key for key in keys)
    assert "Sign-outs (POST /revoke) are kept in the rate-limit storage" in one.output()


def test_the_shared_file_lives_as_long_as_the_server(fake_accounts):
    with Server(server_env(fake_accounts.url)) as server:
        said = re.search(r"Sign-outs \(POST /revoke\) are kept by this instance only \(in (\S+), shared", server.output())
        assert said, server.output()
        directory = said[1]
        assert os.path.isfile(os.path.join(directory, revocations.FILE_NAME))
    assert not os.path.exists(directory)
