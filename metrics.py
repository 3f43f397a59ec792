"""Prometheus metrics: what the service counts, GET /metrics behind METRICS_TOKEN, and the server
process's part (the multiprocess directory every worker writes its counts to, a dead worker).

prometheus_client chooses where values live (in memory, or in files shared by gunicorn's workers)
when it is first imported, from PROMETHEUS_MULTIPROC_DIR: so it is imported only inside functions,
after the server process has settled that variable and before the workers import the app.
"""

from __future__ import annotations

import glob
import hmac
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, current_app, g, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from ratelimit import Refused

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from config import Config

# prometheus_client's own variable: the directory gunicorn's workers write their counts to.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "tokenswap"
# Seconds: Spotify usually answers in 0.1-0.3 s; SPOTIFY_TIMEOUT is 10 by default, at most 300.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Days since the sign-in: a week, months, and the edge of Spotify's six (181 to 184 days).
AGE_BUCKETS = (1.0, 7.0, 30.0, 60.0, 90.0, 120.0, 150.0, 170.0, 181.0, 184.0, 366.0)
# Why a sign-in was refused before Spotify was called: past REFRESH_TOKEN_LIFETIME, or signed out (POST /revoke).
GRANT_REFUSALS = ("expired", "signed_out")
# The directories the server makes when PROMETHEUS_MULTIPROC_DIR is not set: this, the master's pid, "-".
_MADE_PREFIX = "tokenswap-metrics-"
# A label value taken from an answer: an OAuth error code is lower-case letters and underscores.
_CODE = re.compile(r"[a-z_]{1,40}")
# Deploy platforms name the commit being run in one of these (Heroku, Render, others).
_COMMIT_VARIABLES = ("SOURCE_VERSION", "RENDER_GIT_COMMIT", "GIT_COMMIT")


# -- the server process (gunicorn.conf.py's hooks) -------------------------------------------------


def prepare_directory() -> str | None:
    """Before any worker starts: make PROMETHEUS_MULTIPROC_DIR exist and hold no counts of an
    earlier run. When it is not set, a fresh temporary directory is made and set (the workers
    inherit it); its path is returned so that the server removes it at exit, else None."""
    directory = os.environ.get(MULTIPROC_DIR, "").strip()
    if not directory:
        sweep_dead_directories()
        # Named by this master's pid, so that a later start can tell it was left by a dead one.
        made = tempfile.mkdtemp(prefix=f"{_MADE_PREFIX}{os.getpid()}-")
        os.environ[MULTIPROC_DIR] = made
        return made
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)
    return None


def sweep_dead_directories(root: str | None = None) -> list[str]:
    """Remove the directories prepare_directory() made for masters that are gone without removing them (a
    kill -9, a crash): their counts were never scraped after the last scrape, and never will be."""
    swept = []
    for path in glob.glob(os.path.join(root or tempfile.gettempdir(), f"{_MADE_PREFIX}*")):
        pid = os.path.basename(path)[len(_MADE_PREFIX):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def mark_dead(pid: int) -> None:
    """A worker exited: its per-worker gauges leave the metrics (its counts stay in the sums)."""
    if os.environ.get(MULTIPROC_DIR):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def remove_directory(path: str | None) -> None:
    """At the server's exit: remove the directory prepare_directory() made, if it made one."""
    if path:
        shutil.rmtree(path, ignore_errors=True)


# -- the application -------------------------------------------------------------------------------


class Metrics:
    """The service's metrics in one process. Also the observer of calls to Spotify (spotify.Observer)."""

    def __init__(self, keys: tuple[str, ...] = (), grants: tuple[str, ...] = ()) -> None:
        """`keys`: the ids of the keys that open tokens (and "legacy"); `grants`: those the token endpoints
        serve; both shown from the start at 0."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # A registry per app, so that several apps in one process (tests) each count their own.
        # In multiprocess mode the values go to files, and GET /metrics reads those instead.
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Swaps and refreshes answered, by grant and outcome (the error sent, or ok)",
            ["grant", "outcome"], registry=registry,
        )
        self.spotify_duration = Histogram(
            f"{PREFIX}_spotify_request_duration_seconds",
            "Calls to Spotify's token endpoint, by grant and outcome (ok, Spotify's error code, "
            "unreachable, timeout, bad_answer)",
            ["grant", "outcome"], buckets=DURATION_BUCKETS, registry=registry,
        )
        self.tokens_opened = Counter(
            f"{PREFIX}_tokens_opened",
            "Refresh tokens opened, by the key id that opened them, or legacy, spotifyapiserver, unsealed",
            ["key"], registry=registry,
        )
        self.token_age = Histogram(
            f"{PREFIX}_token_age_at_refresh_days",
            "Days since the sign-in, at each refresh whose sign-in time is known",
            buckets=AGE_BUCKETS, registry=registry,
        )
        self.grants_refused = Counter(
            f"{PREFIX}_grants_refused",
            "Refreshes refused before Spotify was called because the sign-in ended: expired (past "
            "REFRESH_TOKEN_LIFETIME) or signed_out (POST /revoke)",
            ["reason"], registry=registry,
        )
        self.revocations = Counter(
            f"{PREFIX}_revocations", "Sign-ins ended by POST /revoke", registry=registry,
        )
        self.refused = Counter(
            f"{PREFIX}_refused", "Requests refused by a rate limit, by reason (failures, token, ceiling, busy)",
            ["reason"], registry=registry,
        )
        self.in_progress = Gauge(
            f"{PREFIX}_requests_in_progress", "Requests being answered, per worker (connections in use)",
            registry=registry, multiprocess_mode="liveall",
        )
        self.spotify_in_flight = Gauge(
            f"{PREFIX}_spotify_requests_in_flight",
            "Calls to Spotify waiting for an answer, per worker (pooled connections to Spotify in use)",
            registry=registry, multiprocess_mode="liveall",
        )
        self.build = Gauge(
            f"{PREFIX}_build_info", "The running build: always 1, its labels say which",
            ["commit", "python", "flask", "gunicorn"], registry=registry, multiprocess_mode="max",
        )
        self.build.labels(**_build_labels()).set(1)
        # Series that exist from the start, at 0: Prometheus' increase() and rate() count a series'
        # first increment only if it was seen before it.
        for key in keys:
            self.tokens_opened.labels(key)
        for reason in Refused.REASONS:
            self.refused.labels(reason)
        for reason in GRANT_REFUSALS:
            self.grants_refused.labels(reason)
        for grant in grants:
            self.requests.labels(grant, "ok")

    # spotify.Observer
    def started(self, grant: str) -> None:
        self.spotify_in_flight.inc()

    def finished(self, grant: str, outcome: str, seconds: float) -> None:
        self.spotify_in_flight.dec()
        self.spotify_duration.labels(grant, label(outcome)).observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format, summed over the workers in multiprocess mode."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry: CollectorRegistry = self.registry
        if os.environ.get(MULTIPROC_DIR):
            registry = CollectorRegistry()
            registry.register(_WorkersFiles(os.environ[MULTIPROC_DIR]))
        return generate_latest(registry)


class _WorkersFiles:
    """client_python's MultiProcessCollector.collect (every *.db file of the directory, merged), leaving out the
    files a starting worker has created but not yet sized: read in that instant, such a file has no header, and
    the whole scrape failed with a struct.error (a 500 while gunicorn replaced a worker). It holds no counts yet."""

    def __init__(self, directory: str):
        self._directory = directory

    def collect(self) -> Any:
        from prometheus_client import multiprocess

        files = []
        for path in glob.glob(os.path.join(self._directory, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except FileNotFoundError:  # a dead worker's live gauges, removed since the glob
                continue
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


def _build_labels() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    commit = next((os.environ[name] for name in _COMMIT_VARIABLES if os.environ.get(name)), "unknown")
    return {
        "commit": commit[:40], "python": platform.python_version(),
        "flask": installed("flask"), "gunicorn": installed("gunicorn"),
    }


def init_app(app: Flask, config: Config, endpoint_grants: Mapping[str, str]) -> Metrics | None:
    """With METRICS_TOKEN set: count requests and serve GET /metrics to its bearer. `endpoint_grants`:
    the endpoints whose answers are counted, and the grant each serves when a request names none (the
    api blueprint's). Returns the Metrics (the observer of calls to Spotify), or None when metrics are off."""
    if not config.metrics_token:
        return None
    from crypto import LEGACY_KEY, SPOTIFYAPISERVER_KEY, UNSEALED_KEY, key_id

    keys = tuple(key_id(secret).hex() for secret in config.encryption_secrets)
    others = ((LEGACY_KEY, config.legacy_secret), (SPOTIFYAPISERVER_KEY, config.spotifyapiserver_secret),
              (UNSEALED_KEY, config.unsealed_until))
    metrics = Metrics(keys + tuple(key for key, setting in others if setting), tuple(endpoint_grants.values()))
    app.extensions["metrics"] = metrics
    expected = f"Bearer {config.metrics_token}".encode()

    def serve_metrics() -> Response:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            raise Unauthorized(
                "GET /metrics needs Authorization: Bearer <METRICS_TOKEN>",
                www_authenticate=WWWAuthenticate("bearer", {"realm": "metrics"}),
            )
        from prometheus_client import CONTENT_TYPE_LATEST

        response = Response(metrics.exposition(), 200, content_type=CONTENT_TYPE_LATEST)
        response.headers["Cache-Control"] = "no-store"
        return response

    app.add_url_rule("/metrics", "metrics", serve_metrics, methods=["GET"])

    @app.before_request
    def count_in_progress() -> None:
        if request.endpoint == "metrics":  # the scrape reads the gauge: it does not count itself
            return
        metrics.in_progress.inc()
        g.metrics_in_progress = True

    @app.after_request
    def count_answer(response: Response) -> Response:
        default = endpoint_grants.get(request.endpoint or "")
        if default is not None:
            grant = g.get("metrics_grant") or default
            metrics.requests.labels(grant, _outcome(response)).inc()
        return response

    @app.teardown_request
    def count_done(_: BaseException | None) -> None:
        if g.pop("metrics_in_progress", False):
            metrics.in_progress.dec()

    return metrics


def _outcome(response: Response) -> str:
    if response.status_code < 400:
        return "ok"
    body: Any = response.get_json(silent=True)
    return label(body.get("error") if isinstance(body, dict) else None)


def label(value: object) -> str:
    """An error code from outside (Spotify's) as a label value: the code, or `other`."""
    return value if isinstance(value, str) and _CODE.fullmatch(value) else "other"


# -- what the views tell (nothing when metrics are off) --------------------------------------------


def _metrics() -> Metrics | None:
    return current_app.extensions.get("metrics")


def note_grant(grant: str) -> None:
    """The grant this request asked for (when it names one the path does not serve by default)."""
    if _metrics() is not None:
        g.metrics_grant = grant


def count_opened(key: str) -> None:
    """A refresh token was opened by this key (its id in hex, or legacy, spotifyapiserver, unsealed)."""
    metrics = _metrics()
    if metrics is not None:
        metrics.tokens_opened.labels(key).inc()


def count_refused(reason: str) -> None:
    """A rate limit refused the request (ratelimit.Refused.reason)."""
    metrics = _metrics()
    if metrics is not None:
        metrics.refused.labels(reason).inc()


def observe_token_age(seconds: int) -> None:
    """A refresh of a sign-in this many seconds old."""
    metrics = _metrics()
    if metrics is not None:
        metrics.token_age.observe(max(0, seconds) / 86400)


def count_grant_refused(reason: str) -> None:
    """A refresh was refused because its sign-in ended (GRANT_REFUSALS: expired, signed_out)."""
    metrics = _metrics()
    if metrics is not None:
        metrics.grants_refused.labels(reason).inc()


def count_revocation() -> None:
    """POST /revoke ended a sign-in."""
    metrics = _metrics()
    if metrics is not None:
        metrics.revocations.inc()
