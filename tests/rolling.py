"""What the rolling-restart tests share (tests/test_rolling.py behind nginx, tests/test_haproxy.py behind HAProxy):
clients that swap and refresh through a balancer, and the roll itself."""

from __future__ import annotations

import threading
import time
from collections import Counter

import requests

from devtools.process import Server
from tests.helpers import unique

INSTANCES = 3
CLIENTS = 4  # enough to keep every instance busy; more only costs the machine CPU
LATENCY = 0.05  # the stand-in's seconds per answer, about Spotify's: the clients ask at most 80 times a second
SEEN = 20  # requests an instance must have served before it is stopped, and again once it is back


class Clients:
    """CLIENTS threads, each swapping a code and then refreshing the sealed token it got, over and over,
    on keep-alive connections to the balancer; every answer that is not a 200 with a token is a failure."""

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
    """CLIENTS clients swapping and refreshing through the balancer while each server in turn is stopped as systemd
    does (SIGTERM to the master) and started again, the next only once the balancer sends the restarted one
    traffic: (requests, figures, failures, seconds each stop took)."""
    stops: list[float] = []
    with Clients(balancer_url) as clients:
        for server in servers:
            # Load on every instance, this one included, before it is stopped.
            since = len(server.output())
            assert len(server.wait_for_access_log(SEEN, since, timeout=15)) >= SEEN, "the instance got no traffic"
            stopping = time.monotonic()
            assert server.stop() == 0
            stops.append(time.monotonic() - stopping)
            server.start()
            since = len(server.output())
            assert len(server.wait_for_access_log(SEEN, since, timeout=15)) >= SEEN, \
                f"{balancer} never sent the restarted instance traffic"  # back in its rotation
        total = clients.total()
    return total, dict(clients.results), list(clients.failures), stops
