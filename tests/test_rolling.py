"""Several instances behind the shipped nginx configuration, or the shipped HAProxy one, sharing one Redis, restarted
one at a time under load: not one request may fail (docs/deploy-vm.md, "Several instances")."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests

from devtools.fake_accounts import FakeAccounts
from devtools.haproxy import HAProxy
from devtools.nginx import Nginx
from devtools.process import Server
from devtools.redis import RedisServer
from tests.helpers import server_env, unique
from tests.tools import require

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

INSTANCES = 3
CLIENTS = 20


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[str]:
    """A throwaway redis-server on a free 127.0.0.1 port, no persistence."""
    require("redis-server")
    with RedisServer() as server:
        yield server.url


class Clients:
    """CLIENTS threads, each swapping a code and then refreshing the sealed token it got, over and over,
    on keep-alive connections to nginx; every answer that is not a 200 with a token is a failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: Counter[str] = Counter()
        self.failures: list[str] = []
        self.running = True
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def client(self) -> None:
        with requests.Session() as session:
            while self.running:
                sealed = self.call(session, "/swap", {"code": unique("code")})
                for _ in range(3):
                    if not self.running or sealed is None:
                        break
                    self.call(session, "/refresh", {"refresh_token": sealed})

    def call(self, session: requests.Session, path: str, form: dict[str, str]) -> str | None:
        """One request; the sealed refresh token of a successful swap."""
        sealed = None
        try:
            response = session.post(self.url + path, data=form, timeout=30)
            ok = response.status_code == 200 and "access_token" in response.json()
            outcome = "200" if ok else f"{response.status_code} {response.text[:200]}"
            if ok and path == "/swap":
                sealed = response.json()["refresh_token"]
        except (requests.RequestException, ValueError) as err:
            ok, outcome = False, f"{type(err).__name__}: {err}"
        with self.lock:
            self.results[path] += 1
            if not ok:
                self.failures.append(f"{time.monotonic():.3f} {path}: {outcome}")
        return sealed

    def total(self) -> int:
        with self.lock:
            return sum(self.results.values())

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(40)


def roll(servers: list[Server], balancer_url: str, balancer: str) -> tuple[int, dict, list, list[float]]:
    """20 clients swapping and refreshing through the balancer while each server in turn is stopped as systemd
    does (SIGTERM to the master) and started again, the next only once the balancer sends the restarted one
    traffic: (requests, figures, failures, seconds each stop took)."""
    stops: list[float] = []
    with Clients(balancer_url) as clients:
        for server in servers:
            # Load on every instance, this one included, before it is stopped.
            since = len(server.output())
            assert len(server.wait_for_access_log(50, since, timeout=15)) >= 50, "the instance got no traffic"
            stopping = time.monotonic()
            assert server.stop() == 0
            stops.append(time.monotonic() - stopping)
            server.start()
            since = len(server.output())
            assert len(server.wait_for_access_log(50, since, timeout=15)) >= 50, \
                f"{balancer} never sent the restarted instance traffic"  # back in its rotation
        total = clients.total()
    return total, dict(clients.results), list(clients.failures), stops


@pytest.mark.timeout(120)
def test_a_rolling_restart_of_three_instances_under_load_loses_no_request(shared_redis):
    """Each instance in turn is sent SIGTERM while 20 clients swap and refresh through nginx, then started
    again; the next waits until the restarted one serves again. Not one request may fail."""
    started = time.monotonic()
    with FakeAccounts(latency=0.02) as fake:
        env = server_env(fake.url, TRUSTED_PROXIES="1", RATE_LIMIT_STORAGE_URI=shared_redis, WEB_CONCURRENCY="1",
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


@pytest.mark.timeout(150)
def test_three_instances_behind_haproxy_checking_readyz_roll_without_a_retry_or_a_failure(shared_redis):
    """deploy/haproxy.cfg (active checks on /readyz, retries 0, no redispatch) in front of three instances with the
    default STOP_DELAY, 20 clients swapping and refreshing; each instance in turn stopped as systemd does (SIGTERM
    to the master) and started again, the next one only once HAProxy sends the restarted one traffic. Not one
    request may fail, and HAProxy must have taken each instance out on its 503 at /readyz, while it still served,
    never on a refused connection."""
    require("haproxy")
    started = time.monotonic()
    with FakeAccounts(latency=0.02) as fake:
        env = server_env(fake.url, TRUSTED_PROXIES="1", RATE_LIMIT_STORAGE_URI=shared_redis, WEB_CONCURRENCY="1",
                         SPOTIFY_TIMEOUT="10", STOP_DELAY="")  # blank: the default
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
