"""Three instances behind the shipped HAProxy configuration, sharing one Redis, restarted one at a time under load:
not one request may fail, and HAProxy takes each out on its 503 at /readyz (docs/deploy-vm.md, "Several instances")."""

from __future__ import annotations

import re
import time

import pytest

from devtools.fake_accounts import FakeAccounts
from devtools.haproxy import HAProxy
from devtools.process import Server
from tests.helpers import server_env
from tests.rolling import INSTANCES, LATENCY, roll
from tests.tools import require

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out


@pytest.mark.timeout(150)
@pytest.mark.long(40)
def test_three_instances_behind_haproxy_checking_readyz_roll_without_a_retry_or_a_failure(redis_server):
    """deploy/haproxy.cfg (active checks on /readyz, retries 0, no redispatch) in front of three instances with a
    STOP_DELAY of 3 s, CLIENTS clients swapping and refreshing; each instance in turn stopped as systemd does (SIGTERM
    to the master) and started again, the next one only once HAProxy sends the restarted one traffic. Not one
    request may fail, and HAProxy must have taken each instance out on its 503 at /readyz, while it still served,
    never on a refused connection. (The default STOP_DELAY, 5 s, leaves HAProxy more time than this: test_deploy
    holds it against haproxy.cfg's check intervals.)"""
    require("haproxy")
    started = time.monotonic()
    with FakeAccounts(latency=LATENCY) as fake:
        env = server_env(fake.url, TRUSTED_PROXIES="1", RATE_LIMIT_STORAGE_URI=redis_server.url, WEB_CONCURRENCY="1",
                         SPOTIFY_TIMEOUT="10", STOP_DELAY="3")
        servers = [Server(env) for _ in range(INSTANCES)]
        try:
            for server in servers:  # all three starting at once
                server.start(wait=False)
            for server in servers:
                server.wait_ready()
            with HAProxy(*(server.port for server in servers)) as haproxy:
                total, figures, failures, stops = roll(servers, haproxy.url, "HAProxy")
                log = haproxy.output()
            outputs = [server.output() for server in servers]
        finally:
            for server in servers:
                server.stop()
    took = time.monotonic() - started
    # Each state change is said twice (an alert, and the log line): one DOWN per instance, and why.
    downs = set(re.findall(r"Server tokenswap/(tokenswap\d) is DOWN, reason: ([^,]+), code: (\d+)", log))
    print(f"rolling restart behind HAProxy: {total} requests ({figures}), {len(failures)} failed, {took:.1f} s; "
          f"taken out: {sorted(downs)}; stops took {[f'{s:.1f}' for s in stops]} s")
    assert failures == [], failures[:10]
    assert total >= 500, figures
    assert downs == {(f"tokenswap{i}", "Layer7 wrong status", "503") for i in range(1, INSTANCES + 1)}, log
    for output in outputs:
        assert "Traceback" not in output and "[ERROR]" not in output
