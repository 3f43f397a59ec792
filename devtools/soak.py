"""Soak: the Procfile's server under a mix of swaps, refreshes, junk and upstream faults, for a set time.

    python bench/soak.py                              # 5 minutes, 16 clients, then the shutdown check
    python bench/soak.py --duration 1800 --warmup 60  # half an hour
    python bench/soak.py --duration 60 --clients 32 --workers 3 --latency 0.1
    python bench/soak.py --json bench/results/soak.json

It starts a fake accounts service (devtools/fake_accounts.py, in this process, with --latency before
every answer) and the Procfile's web command (real gunicorn) pointed at it, with SPOTIFY_TIMEOUT=1,
TRUSTED_PROXIES=1 and a failure limit of --attacker-limit per second. Then, for --duration seconds:

- --clients threads send a weighted mix (KINDS below): swaps, refreshes with and without rotation,
  six kinds of junk (missing field, forged token, bad JSON, unknown path, wrong method, 70 KB body),
  codes Spotify refuses, and the upstream faults timeout (no answer within SPOTIFY_TIMEOUT), reset
  and 500. Each comes from a random address (X-Forwarded-For), so none of them is rate limited. Two bad
  answers in a row engage the brake (brake.py): every request that would reach Spotify may then get its
  429/503 with Retry-After. Spotify's own 429 is not in the mix: it holds the whole app for its
  Retry-After, which tests/test_brake.py holds under 6 clients at once.
- one attacker thread floods junk codes from a single address: it must be held to its limit.
- a prober asks GET /health every 0.25 s on a new connection.
- a sampler reads each worker's VmRSS and open file descriptors from /proc every second.

It passes when every answer is the contract's for its kind (status, media type, error code; no
secret or raw token in any answer or log line), the workers are the same processes at the end as at
the start, each worker's RSS grew by less than --max-rss-growth-mb and its open descriptors by fewer
than --max-fd-growth between the end of the warm-up and the end, the attacker got no more failures
through than its limit allows, and every /health probe got 200 within a second.

Then (unless --no-shutdown) the graceful-shutdown check: a new server, a 2 s upstream, --in-flight
swaps waiting on it, SIGTERM to the gunicorn master: every swap must complete with 200 and the
master must exit 0 within gunicorn.conf.py's graceful_timeout.

Exit status 0 when everything passed, 1 otherwise. Everything stays on 127.0.0.1.
tests/test_soak.py runs the same code for ~12 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import requests

from crypto import InvalidToken, TokenSealer
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET, FakeAccounts
from devtools.process import Server

ROOT = Path(__file__).resolve().parent.parent

SECRET = "soak-secret-0123456789abcdef-not-for-production"
# Stricter than the graceful_timeout gunicorn.conf.py computes (35 s with the default SPOTIFY_TIMEOUT):
# the soak's stop must end well within it.
GRACEFUL_TIMEOUT = 30.0
ATTACKER = "198.51.100.66"
RAW_REFRESH = "AQ-soak-raw-refresh"
# Strings that must never leave the server: in an answer or in its log.
NEVER_SHOWN = (CLIENT_SECRET, SECRET, RAW_REFRESH, "AQ-refresh-for-", "rotated-soak")
JSON = "application/json"


def server_env(accounts_url: str, **overrides: str) -> dict[str, str]:
    """The service's variables, pointed at the fake accounts service."""
    return {
        "SPOTIFY_CLIENT_ID": CLIENT_ID,
        "SPOTIFY_CLIENT_SECRET": CLIENT_SECRET,
        "SPOTIFY_CLIENT_CALLBACK_URL": "myapp://callback",
        "ENCRYPTION_SECRET": SECRET,
        "SPOTIFY_ACCOUNTS_URL": accounts_url,
        # The soak refreshes a handful of tokens over and over, which the per-token ceiling stops.
        "RATE_LIMIT_PER_TOKEN": "off",
        **overrides,
    }


# -- what is sent, and what must come back ---------------------------------------------------------

Check = Callable[[requests.Response], "str | None"]


def error(statuses: set[int], codes: set[str]) -> Check:
    """An OAuth error answer with one of these statuses and error codes."""

    def check(response: requests.Response) -> str | None:
        if response.status_code not in statuses:
            return f"HTTP {response.status_code}, expected {sorted(statuses)}"
        if response.headers.get("Content-Type") != JSON:
            return f"Content-Type {response.headers.get('Content-Type')!r}"
        code = response.json().get("error")
        return None if code in codes else f"error {code!r}, expected {sorted(codes)}"

    return check


def tokens(sealer: TokenSealer, *, refresh_token: bool) -> Check:
    """A 200 with tokens, and a refresh token sealed by this deployment when refresh_token, none otherwise."""

    def check(response: requests.Response) -> str | None:
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        if response.headers.get("Content-Type") != JSON:
            return f"Content-Type {response.headers.get('Content-Type')!r}"
        body = response.json()
        if not isinstance(body.get("access_token"), str) or not isinstance(body.get("expires_in"), int):
            return f"not a token answer: {body}"
        if ("refresh_token" in body) != refresh_token:
            return f"refresh_token {'missing' if refresh_token else 'unexpected'}"
        if refresh_token:
            try:
                sealer.open(body["refresh_token"])
            except InvalidToken:
                return "refresh_token is not one this deployment sealed"
        return None

    return check


def rate_limited_or(other: Check) -> Check:
    def check(response: requests.Response) -> str | None:
        if response.status_code == 429:
            return error({429}, {"rate_limited"})(response) or (
                None if response.headers.get("Retry-After", "").isdigit() else "429 without Retry-After"
            )
        return other(response)

    return check


def held_or(other: Check) -> Check:
    """`other`, or the brake's answer (brake.py): Spotify answered badly twice in a row, so no call goes to it
    for a while and every request that would reach it is told, with Retry-After, when to come back."""

    def check(response: requests.Response) -> str | None:
        braked = response.status_code in (429, 503) and response.headers.get("Retry-After", "").isdigit()
        return error({429, 503}, {"temporarily_unavailable"})(response) if braked else other(response)

    return check


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix: how often, how to send it (from a sequence number), what must come back."""

    name: str
    weight: int
    request: Callable[[int], tuple[str, str, dict]]  # method, path, requests keyword arguments
    check: Check


def kinds(sealer: TokenSealer) -> list[Kind]:
    """The mix. Junk and faults are about a third of it, as on a service open to the internet."""
    sealed, sealed_rotating = sealer.seal(RAW_REFRESH), sealer.seal("rotate-soak")
    forged = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    return [
        Kind("swap", 24, lambda n: ("POST", "/swap", {"data": {"code": f"soak-{n}"}}), held_or(tokens(sealer, refresh_token=True))),
        Kind("swap-json", 6, lambda n: ("POST", "/api/token", {"json": {"code": f"soak-{n}"}}),
             held_or(tokens(sealer, refresh_token=True))),
        Kind("refresh", 20, lambda n: ("POST", "/refresh", {"data": {"refresh_token": sealed}}),
             held_or(tokens(sealer, refresh_token=True))),
        Kind("refresh-rotating", 5,
             lambda n: ("POST", "/api/refresh_token", {"json": {"refresh_token": sealed_rotating}}),
             held_or(tokens(sealer, refresh_token=True))),
        Kind("junk-missing-code", 3, lambda n: ("POST", "/swap", {"data": {"state": "x"}}),
             error({400}, {"invalid_request"})),
        Kind("junk-forged-token", 3, lambda n: ("POST", "/refresh", {"data": {"refresh_token": forged}}),
             error({400}, {"invalid_grant"})),
        Kind("junk-bad-json", 3,
             lambda n: ("POST", "/swap", {"data": b'{"code": ', "headers": {"Content-Type": JSON}}),
             error({400}, {"invalid_request"})),
        Kind("junk-unknown-path", 3, lambda n: ("POST", f"/wp-login-{n % 7}.php", {}), error({404}, {"not_found"})),
        Kind("junk-wrong-method", 3, lambda n: ("GET", "/swap", {}), error({405}, {"method_not_allowed"})),
        Kind("junk-too-large", 2, lambda n: ("POST", "/swap", {"data": {"code": "c" * 70_000}}),
             error({413}, {"invalid_request"})),
        Kind("spotify-refuses-code", 5, lambda n: ("POST", "/swap", {"data": {"code": f"invalid-{n}"}}),
             held_or(error({400}, {"invalid_grant"}))),
        Kind("fault-timeout", 2, lambda n: ("POST", "/swap", {"data": {"code": "fault-timeout"}}),
             held_or(error({504}, {"temporarily_unavailable"}))),
        Kind("fault-reset", 3, lambda n: ("POST", "/swap", {"data": {"code": "fault-reset"}}),
             held_or(error({502, 503}, {"server_error", "temporarily_unavailable"}))),
        Kind("fault-500", 3, lambda n: ("POST", "/swap", {"data": {"code": "fault-500"}}), held_or(error({502}, {"server_error"}))),
    ]


# -- measuring the server --------------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def workers_of(server: Server) -> list[int]:
    return sorted(server.pids()[1:])


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss_kb: dict[int, int | None]
    fds: dict[int, int | None]


def level(samples: list[Sample], pid: int) -> tuple[int, int] | None:
    """A worker's (RSS kB, open files) over a few consecutive samples: their medians, so that one
    connection being opened or one transient allocation at the moment of a sample is not growth."""
    rss = [s.rss_kb[pid] for s in samples]
    fds = [s.fds[pid] for s in samples]
    known_rss = [kb for kb in rss if kb is not None]
    known_fds = [count for count in fds if count is not None]
    if not samples or len(known_rss) < len(rss) or len(known_fds) < len(fds):
        return None
    return int(statistics.median(known_rss)), int(statistics.median(known_fds))


@dataclass
class SoakResult:
    """What a soak saw, and the verdict."""

    duration: float
    warmup: float
    clients: int
    workers: int
    requests: Counter = field(default_factory=Counter)  # by kind
    statuses: Counter = field(default_factory=Counter)  # "kind status"
    violations: list[str] = field(default_factory=list)  # the first few, with their kind
    violation_count: int = 0
    attacker_statuses: Counter = field(default_factory=Counter)
    attacker_allowed: int = 0  # the most failures the limit lets through in the time
    health_probes: int = 0
    health_failures: list[str] = field(default_factory=list)
    health_max_ms: float = 0.0
    workers_before: list[int] = field(default_factory=list)
    workers_after: list[int] = field(default_factory=list)
    master_alive: bool = True
    samples: list[Sample] = field(default_factory=list)
    # Per worker, {"warm": (RSS kB, fds), "end": (RSS kB, fds)}: see level().
    levels: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)
    rss_growth_kb: dict[int, int] = field(default_factory=dict)
    fd_growth: dict[int, int] = field(default_factory=dict)
    max_rss_growth_kb: int = 10 * 1024
    max_fd_growth: int = 20
    leaks_in_log: list[str] = field(default_factory=list)
    tracebacks_in_log: int = 0

    def problems(self) -> list[str]:
        """Everything that breaks the pass criteria; empty when the soak passed."""
        found = []
        if self.violation_count:
            found.append(f"{self.violation_count} answers broke the contract, e.g. {self.violations[:5]}")
        if sum(self.requests.values()) < 10 * len(self.requests):
            found.append(f"too few requests to judge: {dict(self.requests)}")
        if self.workers_before != self.workers_after or not self.master_alive:
            found.append(f"workers changed: {self.workers_before} -> {self.workers_after}, master alive {self.master_alive}")
        for pid, growth in self.rss_growth_kb.items():
            if growth >= self.max_rss_growth_kb:
                found.append(f"worker {pid} RSS grew {growth / 1024:.1f} MB after warm-up")
        for pid, growth in self.fd_growth.items():
            if growth >= self.max_fd_growth:
                found.append(f"worker {pid} open files grew by {growth} after warm-up")
        if len(self.rss_growth_kb) != self.workers:
            found.append(f"could not measure every worker: {self.rss_growth_kb}")
        failed_through = self.attacker_statuses.get(400, 0)
        if failed_through > self.attacker_allowed or not self.attacker_statuses.get(429):
            found.append(f"attacker: {dict(self.attacker_statuses)}, at most {self.attacker_allowed} failures allowed")
        if self.health_failures or self.health_probes < self.duration:
            found.append(f"/health: {len(self.health_failures)} of {self.health_probes} probes failed: {self.health_failures[:5]}")
        if self.leaks_in_log:
            found.append(f"secrets or raw tokens in the log: {self.leaks_in_log[:3]}")
        if self.tracebacks_in_log:
            found.append(f"{self.tracebacks_in_log} tracebacks in the log")
        return found

    def summary(self) -> str:
        total = sum(self.requests.values())
        lines = [
            f"soak: {self.duration:.0f} s ({self.warmup:.0f} s warm-up), {self.clients} clients, "
            f"{self.workers} workers, {total} requests ({total / self.duration:.0f}/s)",
            "  by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(self.requests.items())),
            f"  attacker: {dict(self.attacker_statuses)} (at most {self.attacker_allowed} failures allowed)",
            f"  /health: {self.health_probes} probes, {len(self.health_failures)} failed, max {self.health_max_ms:.0f} ms",
            f"  workers: {self.workers_before} -> {self.workers_after}",
        ]
        for pid, level in self.levels.items():
            (rss_warm, fds_warm), (rss_end, fds_end) = level["warm"], level["end"]
            lines.append(
                f"  worker {pid}: RSS {rss_warm / 1024:.1f} -> {rss_end / 1024:.1f} MB "
                f"(limit +{self.max_rss_growth_kb / 1024:.0f}), open files {fds_warm} -> {fds_end} "
                f"(limit +{self.max_fd_growth})"
            )
        problems = self.problems()
        lines.append("  PASS" if not problems else "  FAIL:\n" + "\n".join(f"    - {p}" for p in problems))
        return "\n".join(lines)


# -- the soak --------------------------------------------------------------------------------------


def run_soak(
    duration: float = 300,
    warmup: float = 30,
    clients: int = 16,
    workers: int = 2,
    latency: float = 0.02,
    attacker_limit: int = 5,
    max_rss_growth_mb: float = 10,
    max_fd_growth: int = 20,
    seed: int | None = None,
    health_within: float = 1.0,
) -> SoakResult:
    """Run the soak against a fresh server and fake accounts service; stop both; return what was seen."""
    if not 0 <= warmup < duration:
        raise ValueError("the warm-up must end before the soak does")
    sealer = TokenSealer([SECRET], CLIENT_ID)
    mix = kinds(sealer)
    weights = [k.weight for k in mix]
    result = SoakResult(duration, warmup, clients, workers, max_rss_growth_kb=int(max_rss_growth_mb * 1024),
                        max_fd_growth=max_fd_growth)
    lock = threading.Lock()
    stop = threading.Event()
    base_seed = random.randrange(2**32) if seed is None else seed

    def violation(what: str) -> None:
        with lock:
            result.violation_count += 1
            if len(result.violations) < 20:
                result.violations.append(what)

    # The soak refreshes the same two sealed tokens thousands of times: with RATE_LIMIT_PER_TOKEN on,
    # nearly every refresh would be that limit's 429, and the soak would test nothing else.
    env = server_env("", SPOTIFY_TIMEOUT="1", TRUSTED_PROXIES="1", RATE_LIMIT_FAILURES=f"{attacker_limit}/second",
                     RATE_LIMIT_PER_TOKEN="off")
    with FakeAccounts(latency=latency, record=False) as fake:
        env["SPOTIFY_ACCOUNTS_URL"] = fake.url
        with Server(env, extra_args=f"--workers {workers}") as server:
            deadline = time.monotonic() + 20
            while len(workers_of(server)) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            result.workers_before = workers_of(server)
            started = time.monotonic()

            def client(number: int) -> None:
                rng = random.Random(base_seed + number)
                with requests.Session() as session:
                    n = 0
                    while not stop.is_set():
                        n += 1
                        kind = rng.choices(mix, weights)[0]
                        method, path, kwargs = kind.request(number * 10_000_000 + n)
                        headers = {**kwargs.pop("headers", {}), "X-Forwarded-For": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"}
                        if kind.name == "junk-too-large":
                            headers["Connection"] = "close"  # the server will not read a body it refuses
                        try:
                            response = session.request(method, server.url + path, headers=headers, timeout=15, **kwargs)
                        except requests.RequestException as err:
                            violation(f"{kind.name}: {type(err).__name__}: {err}")
                            continue
                        problem = kind.check(response)
                        shown = response.text + str(response.headers)
                        leaked = [s for s in NEVER_SHOWN if s in shown]
                        with lock:
                            result.requests[kind.name] += 1
                            result.statuses[f"{kind.name} {response.status_code}"] += 1
                        if problem or leaked:
                            violation(f"{kind.name}: {problem or 'shows ' + repr(leaked)}")

            def attacker() -> None:
                check = rate_limited_or(held_or(error({400}, {"invalid_grant"})))
                with requests.Session() as session:
                    n = 0
                    while not stop.is_set():
                        n += 1
                        try:
                            # A new connection each time, so the flood lands on every worker.
                            response = session.post(server.url + "/swap", data={"code": f"invalid-attack-{n}"},
                                                     headers={"X-Forwarded-For": ATTACKER, "Connection": "close"},
                                                     timeout=15)
                        except requests.RequestException as err:
                            violation(f"attacker: {type(err).__name__}: {err}")
                            continue
                        if problem := check(response):
                            violation(f"attacker: {problem}")
                        with lock:
                            result.attacker_statuses[response.status_code] += 1
                        time.sleep(0.005)

            def prober() -> None:
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        # A new connection each time, so every worker gets asked in turn.
                        response = requests.get(server.url + "/health", timeout=health_within,
                                                headers={"Connection": "close"})
                        ok = response.status_code == 200 and response.json() == {"status": "ok"}
                        what = f"HTTP {response.status_code}"
                    except requests.RequestException as err:
                        ok, what = False, type(err).__name__
                    took = (time.monotonic() - began) * 1000
                    with lock:
                        result.health_probes += 1
                        result.health_max_ms = max(result.health_max_ms, took)
                        if not ok or took > health_within * 1000:
                            result.health_failures.append(f"{time.monotonic() - started:.1f}s: {what} in {took:.0f} ms")
                    stop.wait(0.25)

            def sample() -> Sample:
                pids = result.workers_before
                return Sample(time.monotonic() - started, {p: rss_kb(p) for p in pids}, {p: open_fds(p) for p in pids})

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
            threads += [threading.Thread(target=attacker, daemon=True), threading.Thread(target=prober, daemon=True)]
            for thread in threads:
                thread.start()
            while (elapsed := time.monotonic() - started) < duration:
                result.samples.append(sample())
                time.sleep(min(1.0, max(0.0, duration - elapsed)))
            result.samples.append(sample())
            result.workers_after = workers_of(server)
            result.master_alive = server.process.poll() is None
            stop.set()
            for thread in threads:
                thread.join(20)

            warm = [s for s in result.samples if s.at < warmup][-2:] + [s for s in result.samples if s.at >= warmup][:1]
            for pid in result.workers_before:
                before, after = level(warm, pid), level(result.samples[-3:], pid)
                if before and after:
                    result.levels[pid] = {"warm": before, "end": after}
                    result.rss_growth_kb[pid] = after[0] - before[0]
                    result.fd_growth[pid] = after[1] - before[1]
            # The sliding window lets through at most the limit per second, plus one window's worth;
            # in memory, each worker counts on its own (README: use Redis to share one budget).
            result.attacker_allowed = attacker_limit * (int(duration) + 2) * workers
            log = server.output()
    result.leaks_in_log = [line for line in log.splitlines() if any(s in line for s in NEVER_SHOWN)]
    result.tracebacks_in_log = log.count("Traceback")
    return result


# -- graceful shutdown ----------------------------------------------------------------------------


@dataclass
class ShutdownResult:
    in_flight: int
    upstream_latency: float
    answers: list[str] = field(default_factory=list)  # one per request: "200" or what went wrong
    exit_code: int | None = None
    exit_seconds: float | None = None  # from SIGTERM to the master's exit

    def problems(self) -> list[str]:
        found = []
        if self.answers != ["200"] * self.in_flight:
            found.append(f"requests in flight at SIGTERM: {self.answers}")
        if self.exit_code != 0:
            found.append(f"the master exited with {self.exit_code}")
        if self.exit_seconds is None or self.exit_seconds > GRACEFUL_TIMEOUT:
            found.append(f"the master took {self.exit_seconds} s to exit (graceful_timeout {GRACEFUL_TIMEOUT:.0f} s)")
        return found

    def summary(self) -> str:
        problems = self.problems()
        return (
            f"graceful shutdown: {self.in_flight} swaps waiting on a {self.upstream_latency:.1f} s upstream at SIGTERM: "
            f"{Counter(self.answers)}; master exit {self.exit_code} after {self.exit_seconds or 0:.1f} s\n"
            + ("  PASS" if not problems else "  FAIL:\n" + "\n".join(f"    - {p}" for p in problems))
        )


def check_graceful_shutdown(in_flight: int = 10, upstream_latency: float = 2.0, workers: int = 2) -> ShutdownResult:
    """SIGTERM to the gunicorn master while in_flight swaps wait on a slow upstream."""
    result = ShutdownResult(in_flight, upstream_latency)
    answers: list[str | None] = [None] * in_flight

    def swap(i: int) -> None:
        try:
            # Connection: close, so that no idle keep-alive connection holds a worker afterwards.
            response = requests.post(server.url + "/swap", data={"code": f"shutdown-{i}"},
                                     headers={"Connection": "close"}, timeout=GRACEFUL_TIMEOUT + 10)
            problem = tokens(TokenSealer([SECRET], CLIENT_ID), refresh_token=True)(response)
            answers[i] = "200" if problem is None else problem
        except requests.RequestException as err:
            answers[i] = f"{type(err).__name__}: {err}"

    with FakeAccounts(latency=upstream_latency, record=False) as fake:
        with Server(server_env(fake.url, SPOTIFY_TIMEOUT="10"), extra_args=f"--workers {workers}") as server:
            threads = [threading.Thread(target=swap, args=(i,), daemon=True) for i in range(in_flight)]
            for thread in threads:
                thread.start()
            # Each waiting swap holds its own upstream connection: wait until all have arrived.
            deadline = time.monotonic() + 10
            while fake.connections < in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                result.exit_code = server.process.wait(GRACEFUL_TIMEOUT + 10)
                result.exit_seconds = time.monotonic() - signalled
            except subprocess.TimeoutExpired:  # the verdict says so; leaving the with block kills it
                result.exit_code = None
            for thread in threads:
                thread.join(GRACEFUL_TIMEOUT + 10)
    result.answers = [a or "no answer" for a in answers]
    return result


def plain(result: SoakResult | ShutdownResult) -> dict:
    """A result as JSON-ready data (dataclasses.asdict would turn a Counter's items into keys)."""
    data = {}
    for f in fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Counter):
            value = {str(k): n for k, n in value.items()}
        elif f.name == "samples":
            value = [asdict(s) for s in value]
        data[f.name] = value
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load, warm-up included (default 300)")
    parser.add_argument("--warmup", type=float, default=30, help="seconds before the baseline sample (default 30)")
    parser.add_argument("--clients", type=int, default=16, help="client threads (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2, the Procfile's)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the fake Spotify waits (default 0.02)")
    parser.add_argument("--attacker-limit", type=int, default=5, help="RATE_LIMIT_FAILURES per second (default 5)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=10, help="per worker, after warm-up (default 10)")
    parser.add_argument("--max-fd-growth", type=int, default=20, help="per worker, after warm-up (default 20)")
    parser.add_argument("--in-flight", type=int, default=10, help="swaps waiting at SIGTERM (default 10)")
    parser.add_argument("--no-shutdown", action="store_true", help="skip the graceful-shutdown check")
    parser.add_argument("--seed", type=int, help="random seed of the request mix")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    soak = run_soak(args.duration, args.warmup, args.clients, args.workers, args.latency, args.attacker_limit,
                    args.max_rss_growth_mb, args.max_fd_growth, args.seed)
    print(soak.summary(), flush=True)
    problems = soak.problems()
    report: dict = {"soak": plain(soak), "soak_problems": problems}
    if not args.no_shutdown:
        shutdown = check_graceful_shutdown(args.in_flight, workers=args.workers)
        print(shutdown.summary(), flush=True)
        problems += shutdown.problems()
        report |= {"shutdown": plain(shutdown), "shutdown_problems": shutdown.problems()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
