"""GET /metrics: off by default, bearer-only, and counting what the service did (one process)."""

from __future__ import annotations

import json
import os

import pytest
import responses
from prometheus_client.parser import text_string_to_metric_families

import metrics
from config import load_config
from crypto import TokenSealer, key_id
from devtools.fake_accounts import CLIENT_ID
from devtools.legacy import legacy_token
from tests.helpers import TOKEN_URL, Clock, app_for, spotifyapiserver_token

TOKEN = "metrics-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OLD_SECRET = "metrics-old-secret-0123456789abcdef"
NEW_SECRET = "metrics-new-secret-0123456789abcdef"
LEGACY_SECRET = "legacy secret of the ruby service"
TOKENS = {"access_token": "BQAccess", "token_type": "Bearer", "expires_in": 3600}


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """These run in one process: its own registry, not a gunicorn directory from the shell."""
    monkeypatch.delenv(metrics.MULTIPROC_DIR, raising=False)


@pytest.fixture
def spotify():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def make_client(config, **overrides):
    return app_for({**config, "METRICS_TOKEN": TOKEN, **overrides}).test_client()


def samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    found = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_off_without_a_token(client):
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789abcdef", f"Basic {TOKEN}",
                                    f"Bearer {TOKEN}x", f"bearer  {TOKEN}", f"Bearer {TOKEN[:-1]}"])
def test_only_the_bearer_of_the_token_reads_them(config, header):
    client = make_client(config)
    response = client.get("/metrics", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["WWW-Authenticate"].lower().startswith("bearer")
    body = response.get_json()
    assert body["error"] == "unauthorized"
    assert TOKEN not in response.get_data(as_text=True)


def test_a_short_token_is_refused_by_the_configuration(config):
    with pytest.raises(Exception, match="METRICS_TOKEN"):
        load_config({**config, "METRICS_TOKEN": "short"})


def test_reading_them_is_never_counted_against_a_budget(config, spotify):
    client = make_client(config, RATE_LIMIT_FAILURES="2/minute")
    for _ in range(5):
        assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=AUTH).status_code == 200
    spotify.post(TOKEN_URL, json=TOKENS)
    assert client.post("/swap", data={"code": "c0de"}).status_code == 200


def test_the_landing_page_does_not_mention_them(config):
    client = make_client(config)
    page = client.get("/").get_data(as_text=True)
    assert "/metrics" not in page and "METRICS_TOKEN" not in page


def test_swaps_refreshes_and_their_outcomes_are_counted(config, spotify):
    client = make_client(config)
    spotify.post(TOKEN_URL, json={**TOKENS, "refresh_token": "AQDraw"})
    sealed = client.post("/swap", data={"code": "c0de"}).get_json()["refresh_token"]
    spotify.replace(responses.POST, TOKEN_URL, json={"error": "invalid_grant"}, status=400)
    assert client.post("/swap", data={"code": "spent"}).status_code == 400
    spotify.replace(responses.POST, TOKEN_URL, json=TOKENS)
    assert client.post("/refresh", data={"refresh_token": sealed}).status_code == 200
    # Answered before Spotify is asked: counted with the error sent, and the grant asked for.
    assert client.post("/swap", data={"grant_type": "refresh_token", "refresh_token": "nope"}).status_code == 400
    assert client.post("/refresh", data={"grant_type": "password"}).status_code == 400
    assert client.post("/swap", data={}).status_code == 400

    found = samples(client)
    name = "tokenswap_requests_total"
    assert value(found, name, grant="authorization_code", outcome="ok") == 1
    assert value(found, name, grant="authorization_code", outcome="invalid_grant") == 1
    assert value(found, name, grant="authorization_code", outcome="invalid_request") == 1
    assert value(found, name, grant="refresh_token", outcome="ok") == 1
    assert value(found, name, grant="refresh_token", outcome="invalid_grant") == 1
    assert value(found, name, grant="refresh_token", outcome="unsupported_grant_type") == 1
    duration = "tokenswap_spotify_request_duration_seconds_count"
    assert value(found, duration, grant="authorization_code", outcome="ok") == 1
    assert value(found, duration, grant="authorization_code", outcome="invalid_grant") == 1
    assert value(found, duration, grant="refresh_token", outcome="ok") == 1
    assert value(found, "tokenswap_spotify_requests_in_flight") == 0
    assert value(found, "tokenswap_requests_in_progress") == 0, "the scrape does not count itself"
    build = [labels for (sample, labels) in found if sample == "tokenswap_build_info"]
    assert len(build) == 1 and ("python", os.sys.version.split()[0]) in build[0]


@pytest.mark.parametrize("code", ["ïnvalid_grant", "Invalid_Grant", "x" * 41, "", "<html>"])
def test_an_error_code_from_spotify_that_is_not_one_is_labelled_other_on_both_metrics(config, spotify, code):
    """Spotify's text never becomes a label value of its own: one check (metrics.label) for both series."""
    client = make_client(config)
    spotify.post(TOKEN_URL, json={"error": code}, status=400)
    client.post("/swap", data={"code": "c0de"})
    found = samples(client)
    assert value(found, "tokenswap_spotify_request_duration_seconds_count",
                 grant="authorization_code", outcome="other") == 1
    assert all(dict(labels).get("outcome") != code for _, labels in found)


def test_spotify_unreachable_is_an_outcome_of_its_own(config):
    # conftest's SPOTIFY (127.0.0.1:9) never listens: a real refused connection.
    client = make_client(config)
    assert client.post("/swap", data={"code": "c0de"}).status_code == 503
    found = samples(client)
    assert value(found, "tokenswap_spotify_request_duration_seconds_count",
                 grant="authorization_code", outcome="unreachable") == 1
    assert value(found, "tokenswap_requests_total",
                 grant="authorization_code", outcome="temporarily_unavailable") == 1


def test_tokens_opened_are_counted_by_key_id_as_check_lists_them(config, spotify):
    client = make_client(config, ENCRYPTION_SECRET=f"{NEW_SECRET},{OLD_SECRET}",
                         LEGACY_ENCRYPTION_SECRET=LEGACY_SECRET)
    spotify.post(TOKEN_URL, json=TOKENS)
    old = TokenSealer([OLD_SECRET], CLIENT_ID).seal("AQDold")
    new = TokenSealer([NEW_SECRET], CLIENT_ID).seal("AQDnew")
    legacy = legacy_token(LEGACY_SECRET, "AQDlegacy")
    for token in (old, old, new, legacy):
        assert client.post("/refresh", data={"refresh_token": token}).status_code == 200
    found = samples(client)
    name = "tokenswap_tokens_opened_total"
    assert value(found, name, key=key_id(OLD_SECRET).hex()) == 2
    assert value(found, name, key=key_id(NEW_SECRET).hex()) == 1
    assert value(found, name, key="legacy") == 1


def test_refusals_are_counted_by_reason(config, spotify):
    # On a clock that stands still: 1/minute refuses the second request whenever the test runs.
    app = app_for({**config, "METRICS_TOKEN": TOKEN, "RATE_LIMIT_PER_TOKEN": "1/minute",
                   "RATE_LIMIT_FAILURES": "1/minute"}, Clock())
    client = app.test_client()
    spotify.post(TOKEN_URL, json=TOKENS)
    sealed = TokenSealer([config["ENCRYPTION_SECRET"]], CLIENT_ID).seal("AQDraw")
    assert client.post("/refresh", data={"refresh_token": sealed}).status_code == 200
    assert client.post("/refresh", data={"refresh_token": sealed}).status_code == 429  # token
    assert client.post("/swap", data={}).status_code == 400  # the failure budget spent
    assert client.post("/swap", data={}).status_code == 429  # failures
    found = samples(client)
    assert value(found, "tokenswap_refused_total", reason="token") == 1
    assert value(found, "tokenswap_refused_total", reason="failures") == 1
    assert value(found, "tokenswap_requests_total", grant="refresh_token", outcome="rate_limited") == 1


def test_the_server_makes_a_directory_when_none_is_set_and_removes_it(monkeypatch):
    # Recorded as unset, so that the variable prepare_directory() sets is undone after the test.
    monkeypatch.setenv(metrics.MULTIPROC_DIR, "")
    monkeypatch.delenv(metrics.MULTIPROC_DIR)
    made = metrics.prepare_directory()
    try:
        assert made is not None and os.path.isdir(made) and os.environ[metrics.MULTIPROC_DIR] == made
    finally:
        metrics.remove_directory(made)
    assert not os.path.exists(made)


def test_a_start_sweeps_the_directories_of_dead_masters_only(tmp_path):
    gone = 2**22 + 1  # above Linux's highest possible pid (PID_MAX_LIMIT): no process has it
    dead = tmp_path / f"tokenswap-metrics-{gone}-a1b2"
    living = tmp_path / f"tokenswap-metrics-{os.getpid()}-c3d4"
    other = tmp_path / "tokenswap-metrics-not-ours"
    for directory in (dead, living, other):
        directory.mkdir()
    assert metrics.sweep_dead_directories(str(tmp_path)) == [str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([living.name, other.name])


def test_the_server_empties_a_directory_that_is_set_and_keeps_it(monkeypatch, tmp_path):
    directory = tmp_path / "multiproc"
    monkeypatch.setenv(metrics.MULTIPROC_DIR, str(directory))
    assert metrics.prepare_directory() is None and directory.is_dir()
    (directory / "counter_1.db").write_bytes(b"old")
    (directory / "gauge_liveall_42.db").write_bytes(b"old")
    (directory / "README").write_text("not ours")
    assert metrics.prepare_directory() is None
    assert sorted(p.name for p in directory.iterdir()) == ["README"]
    (directory / "gauge_liveall_42.db").write_bytes(b"old")
    (directory / "counter_42.db").write_bytes(b"old")
    metrics.mark_dead(42)
    assert sorted(p.name for p in directory.iterdir()) == ["README", "counter_42.db"]


def test_token_age_expiry_refusals_and_other_formats_are_counted(config, spotify, clock):
    client = app_for(
        {**config, "METRICS_TOKEN": TOKEN, "REFRESH_TOKEN_LIFETIME": "30d",
         "SPOTIFYAPISERVER_SECRET_KEY": "swift secret", "UNSEALED_TOKENS_UNTIL": "2999-12-31"},
        clock,
    ).test_client()
    found = samples(client)
    assert value(found, "tokenswap_grants_refused_total", reason="expired") == 0  # there from the start
    assert value(found, "tokenswap_tokens_opened_total", key="spotifyapiserver") == 0
    spotify.post(TOKEN_URL, json=TOKENS)
    sealer = TokenSealer([config["ENCRYPTION_SECRET"]], CLIENT_ID)
    now = int(clock.now)
    for token, status in [
        (sealer.seal("AQDweek", signed_in_at=now - 7 * 86400 - 5), 200),
        (sealer.seal("AQDold", signed_in_at=now - 30 * 86400), 400),  # the lifetime's end: refused
        (sealer.seal("AQDunknown"), 200),  # no sign-in time: no age
        (spotifyapiserver_token("swift secret", "AQDswift"), 200),
        ("AQDraw-spotify-token", 200),
    ]:
        assert client.post("/refresh", data={"refresh_token": token}).status_code == status
    found = samples(client)
    assert value(found, "tokenswap_token_age_at_refresh_days_count") == 1
    assert value(found, "tokenswap_token_age_at_refresh_days_bucket", le="7.0") == 0
    assert value(found, "tokenswap_token_age_at_refresh_days_bucket", le="30.0") == 1
    assert value(found, "tokenswap_grants_refused_total", reason="expired") == 1
    assert value(found, "tokenswap_tokens_opened_total", key="spotifyapiserver") == 1
    assert value(found, "tokenswap_tokens_opened_total", key="unsealed") == 1


def test_a_file_a_starting_worker_has_not_sized_yet_is_no_error(config, monkeypatch, tmp_path):
    """A worker's counts file exists, empty, for an instant after the worker creates it: a scrape in that instant is
    answered, without it (it holds no counts yet), rather than failing whole."""
    from prometheus_client.mmap_dict import MmapedDict

    written = MmapedDict(str(tmp_path / "counter_101.db"))  # a running worker's, one count
    written.write_value(json.dumps(["tokenswap_probe", "tokenswap_probe_total", {}, "A count."]), 3.0, 0.0)
    written.close()
    (tmp_path / "counter_102.db").touch()  # a starting worker's
    monkeypatch.setenv(metrics.MULTIPROC_DIR, str(tmp_path))
    app = app_for({**config, "METRICS_TOKEN": TOKEN})
    assert b"tokenswap_probe_total 3.0" in app.extensions["metrics"].exposition()
