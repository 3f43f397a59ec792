"""Several instances behind the shipped nginx configuration, sharing one Redis, restarted one at a time under load: not
one request may fail (docs/deploy-vm.md, "Several instances"; behind HAProxy: tests/test_haproxy.py)."""

from __future__ import annotations

import time

import pytest

from devtools.fake_accounts import FakeAccounts
from devtools.nginx import Nginx
from devtools.process import Server
from tests.helpers import server_env
from tests.rolling import INSTANCES, LATENCY, roll

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out


@pytest.mark.timeout(120)
@pytest.mark.long(20)
def test_a_rolling_restart_of_three_instances_under_load_loses_no_request(redis_server):
    """Each instance in turn is sent SIGTERM while CLIENTS clients swap and refresh through nginx, then started
    again; the next waits until the restarted one serves again. Not one request may fail."""
    started = time.monotonic()
    with FakeAccounts(latency=LATENCY) as fake:
        env = server_env(fake.url, TRUSTED_PROXIES="1", RATE_LIMIT_STORAGE_URI=redis_server.url, WEB_CONCURRENCY="1",
                         SPOTIFY_TIMEOUT="10")
        servers = [Server(env) for _ in range(INSTANCES)]
        try:
            for server in servers:
                server.start()
            with Nginx(*(server.port for server in servers)) as nginx:
                total, figures, failures, stops = roll(servers, nginx.url, "nginx")
                errors = nginx.errors()  # before its directory goes
            outputs = [server.output() for server in servers]
        finally:
            for server in servers:
                server.stop()
    took = time.monotonic() - started
    resets = errors.count("(104: Connection reset by peer)")
    print(f"rolling restart: {total} requests ({figures}), {len(failures)} failed, {len(stops)} restarts, "
          f"{took:.1f} s; nginx sent {resets} reset request(s) to another instance")
    assert failures == [], failures[:10]
    assert len(stops) == INSTANCES
    assert total >= 500, figures
    # What nginx saw: refused connections (a stopped instance), and resets of connections that sat in the
    # listening queue of a stopping instance, their request never read, each retried on another instance; the
    # reset reaches nginx while it connects or while it waits for the answer, depending on the timing. Nothing else.
    for line in errors.splitlines():
        assert "[alert] " in line and "setrlimit" in line or "connect() failed (111: Connection refused)" in line \
            or "connect() failed (104: Connection reset by peer) while connecting to upstream" in line \
            or "recv() failed (104: Connection reset by peer) while reading response header" in line, line
    for output in outputs:
        assert "Traceback" not in output and "[ERROR]" not in output


def test_the_systemd_template_unit_runs_the_procfiles_command_on_its_port_and_waits_out_a_stop(monkeypatch, tmp_path):
    import server
    from config import load_config
    from devtools.process import ROOT, web_command
    from tests.helpers import BASE_CONFIG

    unit = dict(line.split("=", 1) for line in (ROOT / "deploy/spotify-token-swap@.service").read_text().splitlines()
                if "=" in line and not line.startswith("#"))
    assert unit["ExecStart"] == "/opt/spotify-token-swap/.venv/bin/" + web_command().replace("'", '"')
    assert unit["Environment"] == '"GUNICORN_CMD_ARGS=--bind 127.0.0.1:%i"'
    assert (unit["KillSignal"], unit["KillMode"]) == ("SIGTERM", "mixed")  # the master alone gets SIGTERM
    assert int(unit["TimeoutStopSec"]) > server.stop_seconds(load_config(BASE_CONFIG))
