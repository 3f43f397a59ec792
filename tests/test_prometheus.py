"""A real Prometheus scrapes the Procfile's server (2 workers) and counts exactly what the test did;
the alerting rules pass promtool."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from crypto import TokenSealer, key_id
from devtools.fake_accounts import CLIENT_ID
from devtools.legacy import legacy_token
from devtools.nginx import Nginx
from devtools.process import CLOSE, Server, free_port, json_answer, with_children
from tests.helpers import server_env
from tests.tools import require

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus-rules.yml"
TOKEN = "scrape-token-0123456789abcdef"
NEW_SECRET = "prometheus-new-secret-0123456789ab"
OLD_SECRET = "prometheus-old-secret-0123456789ab"
LEGACY_SECRET = "the legacy service's secret"


def tool(name: str) -> str:
    return require(name)  # skipped where it is missing, a failure where CI is set (tests/tools.py)


def test_promtool_accepts_the_rules():
    result = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_each_alert_fires_on_its_series_and_not_before():
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "prometheus-rules-test.yml"],
        cwd=ROOT / "tests" / "data", capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    """Debian's prometheus on a free 127.0.0.1 port, scraping its targets (each instance) every second."""

    def __init__(self, target_ports: int | list[int], directory: str):
        ports = target_ports if isinstance(target_ports, list) else [target_ports]
        self.targets = len(ports)
        targets = ", ".join(f"'127.0.0.1:{port}'" for port in ports)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = Path(directory) / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n"
            "  - job_name: tokenswap\n"
            f"    authorization: {{type: Bearer, credentials: '{TOKEN}'}}\n"
            f"    static_configs: [{{targets: [{targets}]}}]\n"
        )
        self.log = Path(directory) / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={directory}/data",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> dict:
        answer = requests.get(self.url + "/api/v1/" + path, params=params, timeout=5).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def active_targets(self) -> list[dict]:
        try:
            return list(self.api("targets")["activeTargets"])
        except requests.RequestException:
            return []

    def scraped_after(self, moment: float, timeout: float = 20) -> None:
        """Wait for a successful scrape of every target that began after `moment` (time.time())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text())
            targets = self.active_targets()
            if len(targets) == self.targets and all(
                    t["health"] == "up" and _unix(t["lastScrape"]) > moment for t in targets):
                return
            time.sleep(0.2)
        raise AssertionError(f"no scrape after the test's requests: {self.active_targets()}\n{self.log.read_text()}")

    def query(self, expression: str, *by: str) -> dict[tuple[str, ...], float]:
        result = self.api("query", query=expression)["result"]
        return {tuple(item["metric"].get(name, "") for name in by): float(item["value"][1]) for item in result}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _unix(rfc3339: str) -> float:
    from datetime import datetime

    # Prometheus writes nanoseconds; Python reads up to microseconds.
    head, _, rest = rfc3339.partition(".")
    fraction = "".join(c for c in rest if c.isdigit())[:6]
    zone = rest[len(rest.rstrip("Z+-0123456789:")):] if rest else ""
    text = f"{head}.{fraction or '0'}{'+00:00' if zone in ('', 'Z') else zone}"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def scraped(fake_accounts) -> Iterator[tuple[Server, Prometheus]]:
    env = server_env(
        fake_accounts.url, METRICS_TOKEN=TOKEN, WEB_CONCURRENCY="2",
        ENCRYPTION_SECRET=f"{NEW_SECRET},{OLD_SECRET}", LEGACY_ENCRYPTION_SECRET=LEGACY_SECRET,
        RATE_LIMIT_PER_TOKEN="2/hour", RATE_LIMIT_FAILURES="off",
    )
    with tempfile.TemporaryDirectory(prefix="tokenswap-prometheus-") as directory:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(directory) / "multiproc")
        # Counts of an earlier run left in the directory: the server must start from zero.
        os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"])
        stale = Path(env["PROMETHEUS_MULTIPROC_DIR"]) / "counter_12345.db"
        stale.write_bytes(b"not a count of this run")
        with Server(env) as server:
            assert not stale.exists()
            prometheus = Prometheus(server.port, directory)
            try:
                yield server, prometheus
            finally:
                prometheus.stop()


def post(server: Server, path: str, **form: str) -> requests.Response:
    return requests.post(server.url + path, data=form, headers=CLOSE, timeout=10)


@pytest.mark.long(7)
def test_prometheus_counts_exactly_what_the_clients_did(scraped):
    server, prometheus = scraped
    prometheus.scraped_after(time.time())  # up and scraping before anything is counted
    old = TokenSealer([OLD_SECRET], CLIENT_ID).seal("AQ-old-user")
    new = TokenSealer([NEW_SECRET], CLIENT_ID).seal("AQ-new-user")
    legacy = legacy_token(LEGACY_SECRET, "AQ-legacy-user")

    for number in range(5):  # separate connections: both workers serve some
        json_answer(post(server, "/swap", code=f"code-{number}"))
    for _ in range(2):
        json_answer(post(server, "/swap", code="invalid-code"), 400)
    # memory:// counts per worker: one keep-alive connection keeps the token's refreshes on one.
    with requests.Session() as session:
        def refresh_old() -> requests.Response:
            return session.post(server.url + "/refresh", data={"refresh_token": old}, timeout=10)

        json_answer(refresh_old())
        json_answer(refresh_old())
        assert json_answer(refresh_old(), 429)["error"] == "rate_limited"
    json_answer(post(server, "/refresh", refresh_token=new))
    json_answer(post(server, "/api/token", grant_type="refresh_token", refresh_token=legacy))
    json_answer(post(server, "/refresh", refresh_token="not-a-sealed-token"), 400)
    # Reading the metrics, rightly or not, is not a swap or a refresh.
    assert requests.get(server.url + "/metrics", headers=CLOSE, timeout=5).status_code == 401
    done = time.time()

    prometheus.scraped_after(done)
    requests_total = prometheus.query("sum by (grant, outcome) (tokenswap_requests_total)", "grant", "outcome")
    assert requests_total == {
        ("authorization_code", "ok"): 5,
        ("authorization_code", "invalid_grant"): 2,
        ("refresh_token", "ok"): 4,
        ("refresh_token", "rate_limited"): 1,
        ("refresh_token", "invalid_grant"): 1,
        ("client_credentials", "ok"): 0,  # every grant's ok series exists from the start
    }
    calls = prometheus.query(
        "sum by (grant, outcome) (tokenswap_spotify_request_duration_seconds_count)", "grant", "outcome"
    )
    assert calls == {
        ("authorization_code", "ok"): 5,
        ("authorization_code", "invalid_grant"): 2,
        ("refresh_token", "ok"): 4,
    }
    refused = prometheus.query("sum by (reason) (tokenswap_refused_total)", "reason")
    assert refused == {("token",): 1, ("failures",): 0, ("ceiling",): 0, ("busy",): 0}
    opened = prometheus.query("sum by (key) (tokenswap_tokens_opened_total)", "key")
    assert opened == {(key_id(OLD_SECRET).hex(),): 3, (key_id(NEW_SECRET).hex(),): 1, ("legacy",): 1}
    # One series per worker for the per-worker gauges; one build.
    workers = prometheus.query("tokenswap_requests_in_progress", "pid")
    assert len(workers) == 2
    assert len(prometheus.query("tokenswap_build_info", "commit")) == 1

    # The key-usage query of docs/operations.md's rotation procedure names the old key.
    usage = prometheus.query(_rotation_query(), "key")
    assert set(usage) == set(opened)
    assert all(value > 0 for value in usage.values()), usage


def test_a_dead_worker_leaves_its_counts_and_drops_its_gauges(scraped):
    server, prometheus = scraped
    before = _scrape(server)
    totals = _sum(before, "tokenswap_requests_total")
    master, *workers = server.pids()
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        current = with_children(master)[1:]
        if victim not in current and len(current) == 2:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("gunicorn did not replace the killed worker")
    deadline = time.monotonic() + 20
    while True:
        after = _scrape(server)
        pids = {labels.get("pid") for name, labels, _ in after if name == "tokenswap_requests_in_progress"}
        if len(pids) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert str(victim) not in pids and len(pids) == 2
    assert _sum(after, "tokenswap_requests_total") == totals


def _scrape(server: Server) -> list[tuple[str, dict[str, str], float]]:
    response = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}", **CLOSE}, timeout=5)
    assert response.status_code == 200
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(response.text) for sample in family.samples
    ]


def _sum(samples: list[tuple[str, dict[str, str], float]], name: str) -> float:
    return sum(value for sample, _, value in samples if sample == name)


def _rotation_query() -> str:
    """The PromQL query docs/operations.md gives for key usage, as written there."""
    text = (ROOT / "docs" / "operations.md").read_text()
    marker = "sum by (key) (increase(tokenswap_tokens_opened_total"
    line = next(line for line in text.splitlines() if marker in line)
    return line.strip().strip("`")


def test_without_a_directory_set_the_server_makes_one_and_removes_it_at_exit(tmp_path):
    env = server_env("http://127.0.0.1:9", METRICS_TOKEN=TOKEN, TMPDIR=str(tmp_path))
    with Server(env) as server:
        [made] = list(tmp_path.glob("tokenswap-metrics-*"))
        assert any(made.glob("*.db")), "the workers write their counts there"
        assert len(_scrape(server)) > 0
    assert list(tmp_path.glob("tokenswap-metrics-*")) == []


# -- several instances behind the shipped nginx, each scraped on its own (docs/operations.md) --------------


def _documented_scrape_job() -> dict:
    """The scrape job docs/operations.md gives, as Prometheus would read it."""
    text = (ROOT / "docs" / "operations.md").read_text()
    block = text.split("```yaml\nscrape_configs:", 1)[1].split("```", 1)[0]
    [job] = yaml.safe_load("scrape_configs:" + block)["scrape_configs"]
    return job


@pytest.mark.long(13)
def test_two_instances_behind_nginx_scraped_each_count_exactly_and_a_drained_key_reads_zero(fake_accounts):
    # As documented: one target per instance (the example lists several), never the load balancer's name.
    [targets] = [config["targets"] for config in _documented_scrape_job()["static_configs"]]
    assert len(targets) > 1 and all(":" in target for target in targets), targets
    env = server_env(fake_accounts.url, METRICS_TOKEN=TOKEN, WEB_CONCURRENCY="1", TRUSTED_PROXIES="1",
                     ENCRYPTION_SECRET=f"{NEW_SECRET},{OLD_SECRET}", RATE_LIMIT_PER_TOKEN="off")
    old_key, new_key = key_id(OLD_SECRET).hex(), key_id(NEW_SECRET).hex()
    olds = [TokenSealer([OLD_SECRET], CLIENT_ID).seal(f"AQ-old-user-{n}") for n in range(6)]
    with tempfile.TemporaryDirectory(prefix="tokenswap-prometheus-") as directory, \
            Server(env) as first, Server(env) as second, Nginx(first.port, second.port) as nginx:
        prometheus = Prometheus([first.port, second.port], directory)
        try:
            prometheus.scraped_after(time.time())

            def refresh(token: str) -> str:
                # A new connection each: nginx spreads them over both instances.
                response = requests.post(nginx.url + "/refresh", data={"refresh_token": token}, headers=CLOSE,
                                         timeout=10)
                return str(json_answer(response)["refresh_token"])

            # Every old token refreshed once: each answer carries it sealed under the new key (drained).
            drained = [refresh(token) for token in olds]
            prometheus.scraped_after(time.time())
            per_instance = prometheus.query(
                f'tokenswap_tokens_opened_total{{key="{old_key}"}}', "instance")
            assert len(per_instance) == 2 and all(v > 0 for v in per_instance.values()), (
                "both instances served old tokens, each its own series")
            assert prometheus.query("sum by (key) (tokenswap_tokens_opened_total)", "key") == {
                (old_key,): 6, (new_key,): 0}

            # From now on only the drained tokens are used: the documented query, over a window that
            # starts after the drain, reads zero for the old key while the new one is counted.
            window = 3
            drained_at = time.time()
            query = _rotation_query().replace("[30d]", f"[{window}s]")
            deadline = time.monotonic() + 30
            while True:
                for token in drained:
                    refresh(token)
                prometheus.scraped_after(time.time())
                usage = prometheus.query(query, "key")
                if time.time() - drained_at > window + 1 or time.monotonic() > deadline:
                    break
            assert usage.get((old_key,)) == 0 and usage.get((new_key,), 0) > 0, usage
        finally:
            prometheus.stop()
