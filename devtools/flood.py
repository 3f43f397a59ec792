"""Connection floods: the Procfile's server, served directly or behind deploy/nginx.conf, while some
addresses hold thousands of idle, slow-header and slow-body connections and another times /health and swaps.

    python bench/flood.py                                  # served directly: 9,000 idle + 500 + 500, 60 s
    python bench/flood.py --proxy --idle 1000 --heads 1000 --bodies 1000 --sources 20
    python bench/flood.py --idle 6000 --heads 0 --bodies 0 --duration 20 --json bench/results/flood.json

It starts a fake accounts service (devtools/fake_accounts.py, in this process) and the Procfile's web
command (real gunicorn, the default 2 workers and failure limit) pointed at it; with --proxy, nginx
from deploy/nginx.conf in front (devtools/nginx.py) and TRUSTED_PROXIES=1. Then:

- the flood opens its connections to the server (or to nginx) from 127.0.0.3 (--sources N: from
  127.0.0.10 on, N addresses): --idle send nothing, --heads send a request head one byte a second and
  never finish it, --bodies send a complete head (Content-Length: 1000) and then one byte of body a
  second. Whatever the server closes is opened again at once, as an attacker would.
- served directly, it waits until the workers hold every flood connection (their open files);
- for --duration seconds a prober from 127.0.0.2 alternates GET /health and POST /swap, each on a
  new connection, every 0.25 s, and a sampler reads the workers' open files and RSS every second.

It passes when every probe got its 200 within a second, the workers held the whole flood at once
(served directly), and no flood request reached gunicorn (through the proxy). Exit status 0 when it
passed, 1 otherwise. Everything stays on 127.x loopback addresses. tests/test_flood.py and
tests/test_proxy.py run the same code for 12-13 seconds, allowing a probe 3 s there, where other tests share the
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import itertools
import json
import os
import resource
import selectors
import socket
import statistics
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import server
from devtools.fake_accounts import FakeAccounts
from devtools.nginx import Nginx
from devtools.process import Server
from devtools.soak import rss_kb, server_env, workers_of

ROOT = Path(__file__).resolve().parent.parent

PROBE_SOURCE = "127.0.0.2"
FLOOD_SOURCE = "127.0.0.3"
# Slow heads never end theirs; slow bodies announce 1000 bytes and send one a second.
SLOW_HEAD = b"POST /swap HTTP/1.1\r\nHost: flood\r\nContent-Type: application/x-www-form-urlencoded\r\nX-Slow: "
SLOW_BODY = (b"POST /swap HTTP/1.1\r\nHost: flood\r\nContent-Type: application/x-www-form-urlencoded\r\n"
             b"Content-Length: 1000\r\n\r\ncode=")
BODY_LENGTH = 1000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+; Python 3.12+ names it
KINDS = ("idle", "head", "body")


def raise_open_file_limit() -> int:
    """This process's open-file limit, raised to the hard one as the server raises its own."""
    server.raise_open_file_limit()
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def flood_sources(count: int) -> list[str]:
    """127.0.0.3 alone, or `count` addresses from 127.0.0.10 on."""
    return [FLOOD_SOURCE] if count <= 1 else [f"127.0.0.{10 + n}" for n in range(count)]


# -- the flood -------------------------------------------------------------------------------------


@dataclass
class _Connection:
    sock: socket.socket
    kind: str
    opened: float
    sent: int = 0  # bytes of the request sent so far
    head_sent_at: float | None = None  # when a slow body's head had all gone out
    answer: bytes = b""


class Flood:
    """Connections that hold a server's resources until stopped; one the server closes is opened again.

    Idle ones send nothing. Slow heads send a request head, then one byte of it every `interval`
    seconds, never ending it. Slow bodies send a whole head, then one byte of body every `interval`.
    Everything runs on one thread with one selector; counts are read from others.
    """

    def __init__(self, port: int, *, idle: int = 0, heads: int = 0, bodies: int = 0,
                 sources: list[str] | None = None, interval: float = 1.0):
        self.port = port
        self.wanted = {"idle": idle, "head": heads, "body": bodies}
        self.sources = itertools.cycle(sources or [FLOOD_SOURCE])
        self.interval = interval
        self.opened = 0
        self.failed_connects = 0
        self.closed_by_server: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()  # "kind status", e.g. "body 408"
        self.answer_seconds: dict[str, list[float]] = {}  # "kind status": seconds from head sent to answer
        self._connections: dict[int, _Connection] = {}
        self._selector = selectors.DefaultSelector()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    @property
    def total(self) -> int:
        return sum(self.wanted.values())

    @property
    def open_now(self) -> int:
        return len(self._connections)

    def start(self, accepted: Callable[[int], bool] | None = None, batch: int = 1000, timeout: float = 30) -> Flood:
        """Open every connection, `batch` at a time, and wait until each is established.

        A burst larger than the server's accept queue would have some connections wait for the
        kernel's retransmission (seconds): when `accepted(n)` can tell whether the server has taken
        the first n, each batch waits for it.
        """
        deadline = time.monotonic() + timeout
        kinds = [kind for kind, count in self.wanted.items() for _ in range(count)]
        for start in range(0, len(kinds), batch):
            for kind in kinds[start:start + batch]:
                self._open(kind)
            while accepted is not None and not accepted(len(self._connections)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not take {len(self._connections)} connections in {timeout}s")
                time.sleep(0.02)
        pending = list(self._connections.values())
        while pending:
            pending = [c for c in pending if not _established(c.sock)]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} of {self.total} flood connections not established in {timeout}s")
            if pending:
                time.sleep(0.05)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending, and reset every connection still open."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for connection in list(self._connections.values()):
            self._close(connection)

    def _open(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # Let connect() pick the port: a bind to port 0 searches the whole range, slower each time.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((next(self.sources), 0))
            code = sock.connect_ex(("127.0.0.1", self.port))
        except OSError as err:
            code = err.errno if err.errno is not None else -1
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed_connects += 1
            return
        connection = _Connection(sock, kind, time.monotonic())
        self._connections[sock.fileno()] = connection
        self._selector.register(sock, selectors.EVENT_READ, connection)
        self.opened += 1

    def _close(self, connection: _Connection) -> None:
        """Close with a reset, as a flood would: no TIME_WAIT left on this side."""
        self._connections.pop(connection.sock.fileno(), None)
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        try:
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        connection.sock.close()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stopped.is_set():
            for key, _ in self._selector.select(max(0.0, next_tick - time.monotonic())):
                self._read(key.data)
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick += self.interval

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if not connection.answer:
                status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "?"
                label = f"{connection.kind} {status}"
                self.answers[label] += 1
                if connection.head_sent_at is not None:
                    self.answer_seconds.setdefault(label, []).append(time.monotonic() - connection.head_sent_at)
            connection.answer += data
            return
        self.closed_by_server[connection.kind] += 1
        self._close(connection)
        if not self._stopped.is_set():
            self._open(connection.kind)

    def _tick(self) -> None:
        for connection in list(self._connections.values()):
            if connection.kind == "idle" or connection.answer:
                continue
            request = SLOW_HEAD if connection.kind == "head" else SLOW_BODY
            if connection.sent < len(request):
                chunk = request[connection.sent:]
            elif connection.kind == "body" and connection.sent >= len(request) + BODY_LENGTH - len("code=") - 1:
                continue  # never the last byte: the body stays unfinished
            else:
                chunk = b"a"
            try:
                connection.sent += connection.sock.send(chunk)
            except (BlockingIOError, OSError):  # not connected yet, or closed: the reader will see
                continue
            if connection.kind == "body" and connection.head_sent_at is None and connection.sent >= len(request):
                connection.head_sent_at = time.monotonic()


def connections_from(pids: list[int], addresses: list[str]) -> int:
    """TCP connections these processes hold whose other end is one of these IPv4 addresses (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:  # closed meanwhile
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
        except OSError:
            continue
    # /proc/net/tcp writes an address as the hex of its 32 bits in host (little-endian) order.
    peers = {socket.inet_aton(address)[::-1].hex().upper() for address in addresses}
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[2].split(":")[0] in peers and fields[9] in inodes:
                count += 1
    return count


def _established(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


# -- the other client ------------------------------------------------------------------------------


@dataclass
class Probe:
    kind: str  # "health" or "swap"
    at: float  # seconds since probing started
    seconds: float
    status: int  # 0: no answer
    ok: bool  # 200, application/json, and the body the kind expects
    detail: str = ""


class Prober:
    """GET /health and POST /swap in turn from another loopback address, each on a new connection."""

    def __init__(self, port: int, *, source: str = PROBE_SOURCE, interval: float = 0.25, timeout: float = 5):
        self.port, self.source, self.interval, self.timeout = port, source, interval, timeout
        self.probes: list[Probe] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def start(self) -> Prober:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[Probe]:
        self._stopped.set()
        self._thread.join(self.timeout + 5)
        return self.probes

    def _run(self) -> None:
        for n in itertools.count():
            if self._stopped.is_set():
                return
            self.probes.append(self.probe("health" if n % 2 == 0 else "swap"))
            self._stopped.wait(self.interval)

    def probe(self, kind: str) -> Probe:
        at = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout,
                                                source_address=(self.source, 0))
        try:
            if kind == "health":
                connection.request("GET", "/health")
            else:
                connection.request("POST", "/swap", f"code=flood-probe-{uuid.uuid4().hex}",
                                   {"Content-Type": "application/x-www-form-urlencoded"})
            response = connection.getresponse()
            body = response.read()
            seconds = time.monotonic() - at
            expected = b'{"status":"ok"}' if kind == "health" else b'"access_token"'
            ok = (response.status == 200 and response.getheader("Content-Type") == "application/json"
                  and expected in body)
            return Probe(kind, at - self._started, seconds, response.status, ok, "" if ok else body[:200].decode())
        except (OSError, http.client.HTTPException) as err:
            return Probe(kind, at - self._started, time.monotonic() - at, 0, False, repr(err))
        finally:
            connection.close()


# -- a run -----------------------------------------------------------------------------------------


@dataclass
class FloodResult:
    """What a flood run saw, and the verdict."""

    proxy: bool
    wanted: dict[str, int]
    duration: float
    sources: int
    within: float = 1.0  # every probe's 200 within this many seconds
    open_file_limit: int = 0
    # Served directly: the most flood connections the workers held at once, and how long after the
    # flood began they first held them all.
    server_held_max: int = 0
    seconds_to_hold: float = 0.0
    flood_open_min: int = 0  # the fewest flood connections open at a sample while probing
    flood_opened: int = 0  # connections opened in all, reconnections included
    failed_connects: int = 0
    closed_by_server: dict[str, int] = field(default_factory=dict)
    flood_answers: dict[str, int] = field(default_factory=dict)  # "kind status": count
    answer_seconds: dict[str, list[float]] = field(default_factory=dict)  # "kind status": [min, max]
    probes: list[Probe] = field(default_factory=list)
    worker_rss_mb: dict[str, list[float]] = field(default_factory=dict)  # pid: [before, max while probing]
    proxy_rss_mb: dict[str, float] = field(default_factory=dict)  # nginx worker pid: max while probing
    reached_gunicorn: int = 0  # through the proxy: flood requests in gunicorn's access log

    def latencies(self, kind: str) -> list[float]:
        return sorted(p.seconds for p in self.probes if p.kind == kind)

    def problems(self) -> list[str]:
        found = []
        slow = [p for p in self.probes if not p.ok or p.seconds >= self.within]
        if slow:
            found.append(f"{len(slow)} of {len(self.probes)} probes failed or took {self.within:g} s or more: "
                         + "; ".join(f"{p.kind} at {p.at:.1f}s: {p.status} in {p.seconds:.2f}s {p.detail}"
                                     for p in slow[:5]))
        if len(self.probes) < self.duration / 1.25:
            found.append(f"only {len(self.probes)} probes in {self.duration}s")
        total = sum(self.wanted.values())
        if not self.proxy and self.server_held_max < total:
            found.append(f"the workers held at most {self.server_held_max} of the {total} flood connections")
        if self.proxy and self.reached_gunicorn:
            found.append(f"{self.reached_gunicorn} flood requests reached gunicorn through the proxy")
        return found

    def summary(self) -> str:
        lines = [f"{'through nginx' if self.proxy else 'served directly'}: flood {self.wanted} from "
                 f"{self.sources} address(es) for {self.duration:.0f}s, open-file limit {self.open_file_limit}"]
        if not self.proxy:
            lines.append(f"  workers held at most {self.server_held_max} flood connections "
                         f"(all of them {self.seconds_to_hold:.1f}s after the flood began)")
        lines.append(f"  flood: {self.flood_opened} connections opened, at least {self.flood_open_min} open "
                     f"while probing, closed by the server {self.closed_by_server}, answers {self.flood_answers}"
                     f", seconds from head to answer {self.answer_seconds}")
        for kind in ("health", "swap"):
            seconds = self.latencies(kind)
            if seconds:
                lines.append(f"  {kind}: {len(seconds)} probes, p50 {statistics.median(seconds) * 1000:.1f} ms, "
                             f"max {seconds[-1] * 1000:.1f} ms, failed {sum(not p.ok for p in self.probes if p.kind == kind)}")
        lines.append(f"  worker RSS MB [before, max]: {self.worker_rss_mb}")
        if self.proxy:
            lines.append(f"  nginx worker RSS MB: {self.proxy_rss_mb}; flood requests that reached gunicorn: "
                         f"{self.reached_gunicorn}")
        problems = self.problems()
        lines.append("  PASSED" if not problems else "  FAILED:\n    " + "\n    ".join(problems))
        return "\n".join(lines)


def _mb(kb: int | None) -> float:
    return round((kb or 0) / 1024, 1)


def run_flood(*, idle: int = 9000, heads: int = 500, bodies: int = 500, duration: float = 60,
              proxy: bool = False, sources: int = 1, workers: int = 2, latency: float = 0.0,
              within: float = 1.0) -> FloodResult:
    """One flood run; see the module docstring. `within`: the seconds a probe may take."""
    addresses = flood_sources(sources)
    result = FloodResult(proxy, {"idle": idle, "head": heads, "body": bodies}, duration, len(addresses), within)
    result.open_file_limit = raise_open_file_limit()
    env = {"WEB_CONCURRENCY": str(workers), "TRUSTED_PROXIES": "1" if proxy else "0"}
    with contextlib.ExitStack() as running:
        fake = running.enter_context(FakeAccounts(latency=latency, record=False))
        server = running.enter_context(Server(server_env(fake.url, **env)))
        nginx = running.enter_context(Nginx(server.port)) if proxy else None
        pids = workers_of(server)
        rss_before = {pid: rss_kb(pid) for pid in pids}

        def held() -> int:
            return connections_from(pids, addresses)

        began = time.monotonic()
        flood = Flood(nginx.plain_port if nginx else server.port, idle=idle, heads=heads, bodies=bodies,
                      sources=addresses)
        try:
            flood.start(accepted=None if proxy else (lambda count: held() >= count))
            if not proxy:
                result.server_held_max = held()
                result.seconds_to_hold = time.monotonic() - began
            since = len(server.output())
            rss_max = dict(rss_before)
            proxy_rss: dict[int, int] = {}
            open_min = flood.open_now
            prober = Prober(nginx.plain_port if nginx else server.port).start()
            end = time.monotonic() + duration
            while time.monotonic() < end:
                open_min = min(open_min, flood.open_now)
                if not proxy:
                    result.server_held_max = max(result.server_held_max, held())
                for pid in pids:
                    rss_max[pid] = max(rss_max[pid] or 0, rss_kb(pid) or 0)
                for pid in (nginx.pids()[1:] if nginx else []):
                    proxy_rss[pid] = max(proxy_rss.get(pid, 0), rss_kb(pid) or 0)
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            result.probes = prober.stop()
            result.flood_open_min = min(open_min, flood.open_now)
        finally:
            flood.stop()
        result.flood_opened, result.failed_connects = flood.opened, flood.failed_connects
        result.closed_by_server = dict(flood.closed_by_server)
        result.flood_answers = dict(flood.answers)
        result.answer_seconds = {label: [round(min(s), 3), round(max(s), 3)]
                                 for label, s in flood.answer_seconds.items()}
        result.worker_rss_mb = {str(pid): [_mb(rss_before[pid]), _mb(rss_max[pid])] for pid in pids}
        result.proxy_rss_mb = {str(pid): _mb(kb) for pid, kb in proxy_rss.items()}
        result.reached_gunicorn = sum(line["client"] in addresses for line in server.access_log(since))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=9000)
    parser.add_argument("--heads", type=int, default=500, help="slow-header connections")
    parser.add_argument("--bodies", type=int, default=500, help="slow-body connections")
    parser.add_argument("--duration", type=float, default=60, help="seconds of probing while the flood is held")
    parser.add_argument("--proxy", action="store_true", help="through nginx (deploy/nginx.conf)")
    parser.add_argument("--sources", type=int, default=1, help="flood from this many loopback addresses")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.0, help="the fake Spotify's seconds per answer")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = run_flood(idle=args.idle, heads=args.heads, bodies=args.bodies, duration=args.duration,
                       proxy=args.proxy, sources=args.sources, workers=args.workers, latency=args.latency)
    print(result.summary())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0 if not result.problems() else 1


if __name__ == "__main__":
    sys.exit(main())
