"""The benchmark: the Procfile's server against a fake accounts service, driven by wrk, one command.

    python bench/run.py                          # every scenario, 20 s each
    python bench/run.py --scenario light --duration 10
    python bench/run.py --workers 3 --gunicorn-args "--worker-class gthread --threads 64"
    python bench/run.py --scenario cpu --env RATE_LIMIT_FAILURES=off

For each scenario it starts devtools/fake_accounts.py as its own process (latency, HTTPS, a delay on
each new connection), times the same load straight at it (the upstream alone), starts the
Procfile's web command (real gunicorn, the Procfile's defaults unless told otherwise) pointed at
it, warms up with wrk, then measures a wrk run of POST /refresh with a sealed refresh token. It
prints one table, marks each target met or missed, and writes the numbers to
bench/results/<timestamp>.json. Everything stays on 127.0.0.1. Method: bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crypto import TokenSealer  # noqa: E402
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET  # noqa: E402
from devtools.process import Server  # noqa: E402

BENCH = Path(__file__).resolve().parent
SECRET = "bench-secret-0123456789abcdef-not-for-production"
# What the fake accounts service hands back without rotation: the server only opens, never reseals.
SPOTIFY_REFRESH_TOKEN = "AQ-bench-refresh-token"
UPSTREAM_AUTHORIZATION = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
RSS_LIMIT_MB = 80.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    """One load shape and its targets (issue 4)."""

    name: str
    latency: float  # seconds the fake waits before every answer
    clients: int  # wrk connections, all kept alive
    tls: bool = False
    connect_delay: float = 0.0  # extra seconds on each new upstream connection
    max_cpu_ms: float | None = None
    min_rps: float | None = None
    max_p99_ms: float | None = None
    max_p50_over_upstream_ms: float | None = None
    max_p99_over_upstream_ms: float | None = None
    probe_health: bool = False
    description: str = ""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("cpu", 0.0, 16, max_cpu_ms=1.0,
                 description="plain HTTP, no latency, 16 clients: server CPU per refresh"),
        Scenario("capacity", 0.100, 256, min_rps=1800, max_p99_ms=400, probe_health=True,
                 description="plain HTTP, 100 ms upstream, 256 clients: throughput while waiting"),
        Scenario("light", 0.030, 4, tls=True, connect_delay=0.060,
                 max_p50_over_upstream_ms=2, max_p99_over_upstream_ms=10,
                 description="HTTPS, 30 ms upstream, +60 ms per new connection, 4 clients: added latency"),
    )
}


@dataclass
class Result:
    """What one scenario measured, and which targets it met."""

    scenario: str
    clients: int
    upstream_ms: float
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    # The same wrk load sent straight to the fake accounts service, without the server.
    upstream_alone_p50_ms: float | None = None
    upstream_alone_p99_ms: float | None = None
    errors: int = 0
    error_detail: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    cpu_ms_per_request: float = 0.0
    fake_cpu_ms_per_request: float = 0.0
    workers: int = 0
    worker_restarts: int = 0
    peak_rss_mb_per_worker: list[float] = field(default_factory=list)
    master_rss_mb: float = 0.0
    upstream_connections_total: int = 0  # since the server started, warm-up included
    upstream_connections_measured: int = 0  # during the measured run only
    upstream_requests_measured: int = 0
    wrk_cpu_ms_per_request: float = 0.0
    # Share of the machine's CPU used during the run by processes outside the benchmark: other
    # people's work on a shared machine. Above a few percent, the numbers are not comparable.
    others_cpu_percent: float = 0.0
    health_max_ms: float | None = None
    health_p50_ms: float | None = None
    targets: dict[str, bool] = field(default_factory=dict)


# -- /proc ------------------------------------------------------------------------------------------
def cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ", comm may hold spaces
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of one process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_ticks(pids: list[int]) -> dict[int, int]:
    return {pid: t for pid in pids if (t := cpu_ticks(pid)) is not None}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait), summed over CPUs."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def own_and_children_seconds() -> tuple[float, float]:
    """CPU seconds of this process (its threads included) and of its waited-for children (wrk)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


# -- the fake accounts service, as its own process --------------------------------------------------
class FakeProcess:
    """The stand-in for Spotify (devtools/fake_accounts.py) run by its command line, as its own process; counts
    upstream connections via /_stats."""

    def __init__(self, scenario: Scenario, workdir: str):
        self.ready_file = os.path.join(workdir, "fake.json")
        args = [sys.executable, "-m", "devtools.fake_accounts",
                "--latency", str(scenario.latency), "--connect-delay", str(scenario.connect_delay),
                "--ready-file", self.ready_file]
        if scenario.tls:
            args.append("--tls")
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        start_new_session=True)
        self._queries = 0
        deadline = time.monotonic() + 30
        while not os.path.exists(self.ready_file):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake accounts service did not start")
            time.sleep(0.05)
        info = json.loads(Path(self.ready_file).read_text())
        self.url, self.cert = info["url"], info["cert"]

    def stats(self) -> dict[str, int]:
        """Connections opened to the fake by the server (not counting these queries), and token requests."""
        self._queries += 1  # each query is a new connection of its own, counted before it is answered
        answer = requests.get(self.url + "/_stats", verify=self.cert or True, timeout=10).json()
        return {"connections": answer["connections"] - self._queries, "requests": answer["requests"]}

    def cpu_ticks(self) -> int:
        return cpu_ticks(self.process.pid) or 0

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# -- load -------------------------------------------------------------------------------------------
def run_wrk(url: str, clients: int, seconds: float, body: str, threads: int,
            authorization: str = "") -> dict[str, Any]:
    """One wrk run POSTing body to url; the numbers printed by refresh.lua's done()."""
    command = ["wrk", "-t", str(min(threads, clients)), "-c", str(clients), "-d", f"{seconds:g}s",
               "--timeout", "5s", "--latency", "-s", str(BENCH / "refresh.lua"), url]
    env = {**os.environ, "WRK_AUTHORIZATION": authorization}
    if body.startswith("@"):  # a file of bodies, sent in turn
        env["WRK_BODIES_FILE"] = body[1:]
    else:
        env["WRK_BODY"] = body
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH "):])
    raise RuntimeError(f"wrk printed no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


class HealthProbe(threading.Thread):
    """GET /health ten times a second on one kept-alive connection, timing each answer."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures = 0
        self._done = threading.Event()

    def run(self) -> None:
        connection = HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._done.wait(0.1):
            start = time.perf_counter()
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    self.failures += 1
                    continue
            except OSError:
                self.failures += 1
                connection.close()
                continue
            self.latencies.append((time.perf_counter() - start) * 1000)
        connection.close()

    def stop(self) -> None:
        self._done.set()
        self.join(15)


# -- one scenario -----------------------------------------------------------------------------------
def server_env(spotify_url: str, cert: str | None, workers: int | None) -> dict[str, str]:
    env = {
        "SPOTIFY_CLIENT_ID": CLIENT_ID,
        "SPOTIFY_CLIENT_SECRET": CLIENT_SECRET,
        "SPOTIFY_CLIENT_CALLBACK_URL": "myapp://callback",
        "ENCRYPTION_SECRET": SECRET,
        "SPOTIFY_ACCOUNTS_URL": spotify_url,
        # gunicorn from the interpreter's environment, activated or not.
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"])),
    }
    if cert:
        env["REQUESTS_CA_BUNDLE"] = cert
    if workers:
        env["WEB_CONCURRENCY"] = str(workers)
    return env


def write_bodies(workdir: str, tokens: int) -> str:
    """A file of refresh bodies, one sealed token each: apps refresh many tokens, each once an hour,
    and the service's per-token ceiling (RATE_LIMIT_PER_TOKEN, on by default) holds them to that."""
    sealer = TokenSealer([SECRET], CLIENT_ID)
    path = os.path.join(workdir, "bodies.txt")
    with open(path, "w") as out:
        for n in range(tokens):
            out.write(f"refresh_token={sealer.seal(f'{SPOTIFY_REFRESH_TOKEN}-{n}')}\n")
    return path


def run_scenario(scenario: Scenario, args: argparse.Namespace) -> Result:
    if args.clients:
        scenario = replace(scenario, clients=args.clients)
    result = Result(scenario.name, scenario.clients, scenario.latency * 1000)
    with tempfile.TemporaryDirectory(prefix="tokenswap-bench-") as workdir:
        body = "@" + write_bodies(workdir, args.tokens)
        fake = FakeProcess(scenario, workdir)
        try:
            if args.baseline > 0 and scenario.latency > 0:
                # The same load straight at the fake: what the upstream alone costs in latency.
                direct = run_wrk(fake.url + "/api/token", scenario.clients, args.baseline,
                                 f"grant_type=refresh_token&refresh_token={SPOTIFY_REFRESH_TOKEN}",
                                 args.threads, UPSTREAM_AUTHORIZATION)
                result.upstream_alone_p50_ms = direct["p50_us"] / 1000
                result.upstream_alone_p99_ms = direct["p99_us"] / 1000
            env = {**server_env(fake.url, fake.cert, args.workers), **dict(args.env)}
            server = Server(env, extra_args=args.gunicorn_args)
            try:
                server.start(timeout=60)
                measure(server, fake, scenario, body, args, result)
                if args.verbose:
                    print(server.output()[-3000:], file=sys.stderr)
            finally:
                server.stop()
                os.unlink(server._log.name)
        finally:
            fake.stop()
    check_targets(scenario, result)
    return result


def measure(server: Server, fake: FakeProcess, scenario: Scenario, body: str,
            args: argparse.Namespace, result: Result) -> None:
    url = server.url + "/refresh"
    start_stats = fake.stats()
    if args.warmup > 0:
        run_wrk(url, scenario.clients, args.warmup, body, args.threads)

    pids = server.pids()
    before_stats = fake.stats()
    before_ticks = tree_ticks(pids)
    before_fake = fake.cpu_ticks()
    probe = HealthProbe(server.port) if scenario.probe_health else None
    if probe:
        probe.start()
    before_busy, (before_own, before_children) = machine_busy_seconds(), own_and_children_seconds()
    wrk = run_wrk(url, scenario.clients, args.duration, body, args.threads)
    if probe:
        probe.stop()
    after_busy, (after_own, after_children) = machine_busy_seconds(), own_and_children_seconds()
    after_ticks = tree_ticks(server.pids())
    after_fake = fake.cpu_ticks()
    after_stats = fake.stats()

    ticks = sum(t - before_ticks.get(pid, 0) for pid, t in after_ticks.items())
    result.worker_restarts = len(set(after_ticks) - set(before_ticks))
    result.requests = wrk["requests"]
    result.seconds = wrk["duration_us"] / 1e6
    result.rps = result.requests / result.seconds
    result.p50_ms, result.p90_ms = wrk["p50_us"] / 1000, wrk["p90_us"] / 1000
    result.p99_ms, result.max_ms = wrk["p99_us"] / 1000, wrk["max_us"] / 1000
    result.error_detail = {k: wrk[k] for k in ("status", "connect", "read", "write", "timeout") if wrk[k]}
    result.errors = sum(result.error_detail.values())
    result.cpu_seconds = ticks / CLOCK_TICKS
    result.cpu_ms_per_request = result.cpu_seconds * 1000 / max(result.requests, 1)
    fake_seconds = (after_fake - before_fake) / CLOCK_TICKS
    wrk_seconds = after_children - before_children
    result.fake_cpu_ms_per_request = fake_seconds * 1000 / max(result.requests, 1)
    result.wrk_cpu_ms_per_request = wrk_seconds * 1000 / max(result.requests, 1)
    others = (after_busy - before_busy) - result.cpu_seconds - fake_seconds - wrk_seconds - (after_own - before_own)
    result.others_cpu_percent = round(max(others, 0) / (result.seconds * (os.cpu_count() or 1)) * 100, 1)
    workers = server.pids()[1:]
    result.workers = len(workers)
    result.peak_rss_mb_per_worker = [round(peak_rss_mb(pid), 1) for pid in workers]
    result.master_rss_mb = round(peak_rss_mb(server.process.pid), 1)
    result.upstream_connections_total = after_stats["connections"] - start_stats["connections"]
    result.upstream_connections_measured = after_stats["connections"] - before_stats["connections"]
    result.upstream_requests_measured = after_stats["requests"] - before_stats["requests"]
    if probe and probe.latencies:
        result.health_max_ms = round(max(probe.latencies), 1)
        result.health_p50_ms = round(statistics.median(probe.latencies), 1)
        result.errors += probe.failures


def check_targets(scenario: Scenario, r: Result) -> None:
    t = r.targets
    if scenario.max_cpu_ms is not None:
        t[f"CPU <= {scenario.max_cpu_ms:g} ms/refresh"] = r.cpu_ms_per_request <= scenario.max_cpu_ms
    if scenario.min_rps is not None:
        t[f">= {scenario.min_rps:g} req/s"] = r.rps >= scenario.min_rps
        t["0 errors"] = r.errors == 0
    if scenario.max_p99_ms is not None:
        t[f"p99 <= {scenario.max_p99_ms:g} ms"] = r.p99_ms <= scenario.max_p99_ms
    if scenario.max_p50_over_upstream_ms is not None:
        limit = r.upstream_ms + scenario.max_p50_over_upstream_ms
        t[f"p50 <= {limit:g} ms (upstream + {scenario.max_p50_over_upstream_ms:g})"] = r.p50_ms <= limit
    if scenario.max_p99_over_upstream_ms is not None:
        limit = r.upstream_ms + scenario.max_p99_over_upstream_ms
        t[f"p99 <= {limit:g} ms (upstream + {scenario.max_p99_over_upstream_ms:g})"] = r.p99_ms <= limit
    t[f"upstream connections opened while measured <= {r.clients} clients"] = (
        r.upstream_connections_measured <= r.clients
    )
    t[f"RSS <= {RSS_LIMIT_MB:g} MB per worker"] = max(r.peak_rss_mb_per_worker or [0]) <= RSS_LIMIT_MB


# -- report -----------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": os.getloadavg()}


def print_table(results: list[Result]) -> None:
    header = ("scenario", "clients", "req/s", "p50 ms", "p99 ms", "errors", "CPU ms/req",
              "RSS MB/worker", "upstream conns", "/health max ms", "others' CPU")
    rows = [header]
    for r in results:
        rows.append((
            r.scenario, str(r.clients), f"{r.rps:.0f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
            str(r.errors), f"{r.cpu_ms_per_request:.3f}",
            f"{max(r.peak_rss_mb_per_worker or [0]):.1f} (x{r.workers})",
            f"{r.upstream_connections_measured} ({r.upstream_connections_total})",
            "-" if r.health_max_ms is None else f"{r.health_max_ms:.1f}",
            f"{r.others_cpu_percent:.0f}%",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for r in results:
        for target, met in r.targets.items():
            print(f"  {r.scenario:<9} {'met   ' if met else 'MISSED'}  {target}")
        if r.error_detail:
            print(f"  {r.scenario:<9} errors: {r.error_detail}")
        if r.worker_restarts:
            print(f"  {r.scenario:<9} {r.worker_restarts} worker(s) restarted during the run")
        if r.upstream_alone_p50_ms is not None and r.upstream_alone_p99_ms is not None:
            print(f"  {r.scenario:<9} upstream alone (same load, no server): p50 {r.upstream_alone_p50_ms:.1f} ms, "
                  f"p99 {r.upstream_alone_p99_ms:.1f} ms; the server adds {r.p50_ms - r.upstream_alone_p50_ms:.1f} ms "
                  f"at p50, {r.p99_ms - r.upstream_alone_p99_ms:.1f} ms at p99")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--duration", type=int, default=20, help="seconds measured per scenario (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load before measuring (default 3)")
    parser.add_argument("--baseline", type=int, default=5,
                        help="seconds of the same load straight at the fake first, for its own latency (default 5; 0 skips)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--tokens", type=int, default=30000,
                        help="distinct refresh tokens, sent in turn (default 30000: each under the per-token ceiling)")
    parser.add_argument("--clients", type=int, help="override the scenario's number of clients (for experiments)")
    parser.add_argument("--workers", type=int, help="WEB_CONCURRENCY for the server (default: the Procfile's)")
    parser.add_argument("--env", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                        metavar="NAME=VALUE", help="extra server environment, e.g. RATE_LIMIT_FAILURES=off")
    parser.add_argument("--gunicorn-args", default="", help="extra gunicorn flags, via GUNICORN_CMD_ARGS")
    parser.add_argument("--output", help="JSON results file (default bench/results/<timestamp>.json)")
    parser.add_argument("--verbose", action="store_true", help="print the tail of each server log")
    args = parser.parse_args()

    names = args.scenario or list(SCENARIOS)
    settings = {
        "duration": args.duration, "warmup": args.warmup, "baseline": args.baseline,
        "wrk_threads": args.threads, "clients": args.clients or "scenario default",
        "workers": args.workers or "Procfile default", "gunicorn_args": args.gunicorn_args,
        "env": dict(args.env),
    }
    info: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "settings": settings}
    print(f"{info['machine']['nproc']} x {info['machine']['cpu']}, Python {info['machine']['python']}, "
          f"load average {info['machine']['loadavg_at_start'][0]:.2f}; {args.duration:g} s per scenario\n")
    results = []
    for name in names:
        print(f"{name}: {SCENARIOS[name].description} ...", flush=True)
        results.append(run_scenario(SCENARIOS[name], args))
    print()
    print_table(results)

    out = Path(args.output) if args.output else BENCH / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0 if all(all(r.targets.values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
