"""Sign-out: the stores that keep revocations (clock injected), and POST /revoke with the refreshes it ends."""

from __future__ import annotations

import logging
import os

import pytest

import revocations
from crypto import Opened
from revocations import ProcessMemory, Revocations, SharedFile, Unavailable
from tests.helpers import (
    CODE,
    RAW_REFRESH,
    ROTATED,
    TOKENS,
    Clock,
    assert_error,
    assert_token_answer,
    expect,
    refresh_form,
    swap_form,
    unseal,
)

LIFETIME = 1000


@pytest.fixture(params=["memory", "file"])
def store_and_clock(request, tmp_path):
    clock = Clock()
    if request.param == "memory":
        return ProcessMemory(clock), clock
    path = str(tmp_path / revocations.FILE_NAME)
    SharedFile.create(path)
    return SharedFile(path, clock), clock


# -- the stores -----------------------------------------------------------------------------------


def test_a_store_holds_a_key_for_its_seconds_and_no_longer(store_and_clock):
    store, clock = store_and_clock
    store.add("grant:a", 10)
    assert store.holds(["token:x", "grant:a"]) and not store.holds(["grant:b"])
    clock.now += 9.9
    assert store.holds(["grant:a"])
    clock.now += 0.1
    assert not store.holds(["grant:a"])


def test_a_store_never_shortens_what_it_holds(store_and_clock):
    store, clock = store_and_clock
    store.add("grant:a", 100)
    store.add("grant:a", 10)
    clock.now += 50
    assert store.holds(["grant:a"])


def test_every_worker_of_an_instance_sees_the_shared_file(tmp_path):
    path = str(tmp_path / revocations.FILE_NAME)
    SharedFile.create(path)
    clock = Clock()
    one, two = SharedFile(path, clock), SharedFile(path, clock)
    one.add("grant:a", 10)
    assert two.holds(["grant:a"])


def test_the_shared_file_drops_what_has_expired_when_it_writes(tmp_path):
    path = str(tmp_path / revocations.FILE_NAME)
    SharedFile.create(path)
    clock = Clock()
    store = SharedFile(path, clock)
    store.add("grant:old", 10)
    clock.now += 11
    store.add("grant:new", 10)
    import sqlite3

    with sqlite3.connect(path) as db:
        assert [key for (key,) in db.execute("SELECT key FROM revoked")] == ["grant:new"]
    db.close()


# -- what a sign-out keeps, and how long --------------------------------------------------------------


def opened(signed_in_at: int | None = None, grant_id: str | None = "ab" * 16, raw: str = RAW_REFRESH) -> Opened:
    return Opened(raw, signed_in_at=signed_in_at, grant_id=grant_id)


def test_a_sign_out_holds_the_grant_and_the_spotify_token_by_digest_never_the_token():
    keys = Revocations.keys(opened())
    assert keys[0] == "grant:" + "ab" * 16 and keys[1].startswith("token:")
    assert not any(RAW_REFRESH in key for key in keys)
    assert Revocations.keys(opened(grant_id=None)) == keys[1:]  # an older token: that Spotify token alone


def test_a_sign_out_lasts_as_long_as_the_grant_can_live():
    clock = Clock()
    held = Revocations(ProcessMemory(clock), LIFETIME, clock=clock)
    signed_in = int(clock.now) - 400
    assert held.seconds_left(opened(signed_in)) == 600
    assert held.seconds_left(opened(None)) == LIFETIME  # sign-in time not known: the whole lifetime
    held.revoke(opened(signed_in))
    clock.now += 599
    assert held.revoked(opened(signed_in))
    clock.now += 1
    assert not held.revoked(opened(signed_in))


def test_a_grant_past_its_lifetime_is_not_kept():
    clock = Clock()
    store = ProcessMemory(clock)
    Revocations(store, LIFETIME, clock=clock).revoke(opened(int(clock.now) - LIFETIME))
    assert not store.holds(Revocations.keys(opened()))


def test_memory_of_one_process_refuses_a_sign_out_under_several_processes():
    held = Revocations(ProcessMemory(), LIFETIME, single_process=True)
    with pytest.raises(Unavailable) as refused:
        held.revoke(opened(), multiprocess=True)
    assert refused.value.status == 500 and "RATE_LIMIT_STORAGE_URI" in refused.value.description
    held.revoke(opened(), multiprocess=False)  # flask run, tests: one process
    assert held.revoked(opened())


class Broken:
    def add(self, key: str, seconds: int) -> None:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")

    def holds(self, keys) -> bool:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")


def test_a_store_that_fails_is_a_503_both_ways_and_said_once(caplog):
    held = Revocations(Broken(), LIFETIME, logger=logging.getLogger("test"))
    for attempt in (lambda: held.revoke(opened()), lambda: held.revoked(opened())):
        with pytest.raises(Unavailable) as failed:
            attempt()
        assert failed.value.status == 503
    lines = [r for r in caplog.records if "Sign-out store unreachable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR


# -- the start ----------------------------------------------------------------------------------------


def test_the_master_makes_the_shared_file_and_removes_it(config):
    from config import load_config

    directory = revocations.prepare_directory(load_config(config))
    try:
        assert directory is not None and os.environ[revocations.DIRECTORY_VARIABLE] == directory
        store = revocations.store_for(load_config({**config, revocations.DIRECTORY_VARIABLE: directory}))
        assert isinstance(store[0], SharedFile) and store[1] is False
    finally:
        revocations.remove_directory(directory)
        os.environ.pop(revocations.DIRECTORY_VARIABLE, None)
    assert not os.path.exists(directory)
    assert revocations.prepare_directory(load_config({**config, "RATE_LIMIT_STORAGE_URI": "redis://127.0.0.1:1"})) is None


def test_the_start_and_check_say_where_sign_outs_are_kept(config):
    from config import load_config

    memory, redis = load_config(config), load_config({**config, "RATE_LIMIT_STORAGE_URI": "redis://127.0.0.1:1"})
    level, message = revocations.start_message(memory, None, 2)  # the shared directory could not be made
    assert level == logging.WARNING and "RATE_LIMIT_STORAGE_URI" in message and "500" in message
    level, message = revocations.start_message(memory, "/tmp/x", 2)
    assert level == logging.INFO and message.startswith("Sign-outs (POST /revoke) are kept by this instance only")
    assert "every instance" in revocations.kept(redis) and "this instance only" in revocations.kept(memory)


# -- POST /revoke ---------------------------------------------------------------------------------------


def swap(client, spotify, code: str = CODE, raw: str = RAW_REFRESH) -> str:
    expect(spotify, swap_form(code), json={**TOKENS, "refresh_token": raw})
    return assert_token_answer(client.post("/swap", data={"code": code}))["refresh_token"]


SIGNED_OUT = "The user signed out"


def test_a_sign_out_ends_the_grant_its_rotated_tokens_too_and_no_other(client, spotify):
    first = swap(client, spotify)
    expect(spotify, refresh_form(RAW_REFRESH), json={**TOKENS, "refresh_token": ROTATED})
    rotated = assert_token_answer(client.post("/refresh", data={"refresh_token": first}))["refresh_token"]
    other = swap(client, spotify, code="other-code", raw="AQDotherUsersRefreshToken")
    assert unseal(rotated).grant_id == unseal(first).grant_id != unseal(other).grant_id

    answer = client.post("/revoke", data={"token": first, "token_type_hint": "refresh_token"})
    assert answer.status_code == 200 and answer.get_json() == {}
    assert answer.headers["Cache-Control"] == "no-store"
    for token in (first, rotated):  # refused by the service: Spotify is not asked (nothing is registered)
        body = assert_error(client.post("/refresh", data={"refresh_token": token}), 400, "invalid_grant")
        assert body["error_description"].startswith(SIGNED_OUT) and "do not retry" in body["error_description"]
    expect(spotify, refresh_form("AQDotherUsersRefreshToken"), json=TOKENS)
    assert_token_answer(client.post("/refresh", data={"refresh_token": other}))


@pytest.mark.parametrize("token", ["not-a-token", "BQAccessToken-abc"])
def test_a_token_that_does_not_open_is_a_200_that_changes_nothing(client, spotify, token):
    sealed = swap(client, spotify)
    answer = client.post("/revoke", data={"token": token, "token_type_hint": "access_token"})
    assert answer.status_code == 200 and answer.get_json() == {}
    expect(spotify, refresh_form(), json=TOKENS)
    assert_token_answer(client.post("/refresh", data={"refresh_token": sealed}))


def test_a_sign_out_without_a_token_is_a_400(client):
    assert_error(client.post("/revoke", data={}), 400, "invalid_request", "Missing 'token'")


def test_the_client_id_is_checked_as_at_the_token_endpoint(client, spotify):
    sealed = swap(client, spotify)
    assert_error(client.post("/revoke", data={"token": sealed, "client_id": "another-app"}), 400, "invalid_client")
    answer = client.post("/revoke", data={"token": sealed}, auth=("another-app", ""))
    assert_error(answer, 401, "invalid_client")
    expect(spotify, refresh_form(), json=TOKENS)
    assert_token_answer(client.post("/refresh", data={"refresh_token": sealed}))  # neither signed out


def test_under_several_processes_without_a_shared_store_a_sign_out_is_a_500_naming_the_setting(client, spotify):
    sealed = swap(client, spotify)
    answer = client.post("/revoke", data={"token": sealed}, environ_overrides={"wsgi.multiprocess": True})
    body = assert_error(answer, 500, "server_error")
    assert "RATE_LIMIT_STORAGE_URI" in body["error_description"]


def test_a_browser_may_sign_out(make_client, spotify):
    origin = "https://app.example"
    client = make_client(CORS_ORIGINS=origin)
    preflight = client.options("/revoke", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type",
    })
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == origin
    answer = client.post("/revoke", data={"token": "x"}, headers={"Origin": origin})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == origin


def test_sign_outs_and_their_refusals_are_counted(make_client, spotify):
    from tests.test_metrics import TOKEN, samples, value

    client = make_client(METRICS_TOKEN=TOKEN)
    sealed = swap(client, spotify)
    assert client.post("/revoke", data={"token": sealed}).status_code == 200
    assert client.post("/revoke", data={"token": "junk"}).status_code == 200  # nothing ended: not counted
    assert client.post("/refresh", data={"refresh_token": sealed}).status_code == 400
    found = samples(client)
    assert value(found, "tokenswap_revocations_total") == 1
    assert value(found, "tokenswap_grants_refused_total", reason="signed_out") == 1


def test_a_store_that_does_not_answer_is_a_503_at_sign_out_and_at_refresh_not_at_swap(make_client, spotify):
    from devtools.process import free_port

    client = make_client(RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}")
    sealed = swap(client, spotify)  # a swap does not ask the store
    revoke = client.post("/revoke", data={"token": sealed})
    for answer in (revoke, client.post("/refresh", data={"refresh_token": sealed})):
        assert_error(answer, 503, "temporarily_unavailable")
        assert answer.headers["Retry-After"] == "5"


def test_a_raw_token_is_not_kept(make_client, spotify):
    """With UNSEALED_TOKENS_UNTIL on, any string shaped like a Spotify token opens: none is kept, or anyone could fill
    the store; the sealed token its first refresh hands out is the one to sign out."""
    client = make_client(UNSEALED_TOKENS_UNTIL="2999-12-31")
    assert client.post("/revoke", data={"token": RAW_REFRESH}).status_code == 200
    expect(spotify, refresh_form(), json=TOKENS)
    sealed = assert_token_answer(client.post("/refresh", data={"refresh_token": RAW_REFRESH}))["refresh_token"]
    assert client.post("/revoke", data={"token": sealed}).status_code == 200
    assert_error(client.post("/refresh", data={"refresh_token": sealed}), 400, "invalid_grant")
