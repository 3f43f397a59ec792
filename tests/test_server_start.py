"""What the Procfile's server does and says at start: the open-file limit raised, what each worker holds,
and a warning when failures are counted per worker."""

from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.process import Server
from server import MAX_CONNECTIONS_PER_WORKER, OTHER_OPEN_FILES, connections_per_worker
from tests.helpers import BASE_CONFIG, app_for, server_env

# Tests that start processes are marked e2e one by one; the pure computations beside them run in the fast tier.

WARNING = re.compile(r"\[WARNING\] RATE_LIMIT_STORAGE_URI is memory://.*")


@pytest.mark.parametrize(
    "soft, expected",
    [
        (1024, (1024 - OTHER_OPEN_FILES) // 2),
        (20_000, (20_000 - OTHER_OPEN_FILES) // 2),
        (1_048_576, MAX_CONNECTIONS_PER_WORKER),
        (resource.RLIM_INFINITY, MAX_CONNECTIONS_PER_WORKER),
        (OTHER_OPEN_FILES, 1),
    ],
)
def test_connections_per_worker_are_half_the_open_files_left_at_most_the_cap(monkeypatch, soft, expected):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    assert connections_per_worker() == expected


def test_the_upstream_pool_is_as_large_as_a_workers_connections():
    client = app_for(BASE_CONFIG).extensions["tokenswap"].spotify
    adapter = client._session.get_adapter(client.token_url)
    assert adapter.poolmanager.connection_pool_kw["maxsize"] == connections_per_worker()


@contextlib.contextmanager
def soft_open_file_limit(soft: int) -> Iterator[None]:
    """This process's soft open-file limit lowered for a while (what a child started meanwhile inherits)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def open_file_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) open-file limit of a process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


@pytest.mark.e2e
def test_the_server_raises_its_open_file_limit_and_sizes_its_workers_to_it(fake_accounts):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.fail(f"the hard open-file limit ({hard}) leaves nothing to raise to")
    with soft_open_file_limit(1024), Server(server_env(fake_accounts.url)) as server:
        pass_on = [open_file_limits(pid) for pid in server.pids()]
        output = server.output()

    assert pass_on == [(hard, hard)] * 3  # the master and both workers
    per_worker = min(MAX_CONNECTIONS_PER_WORKER, (hard - OTHER_OPEN_FILES) // 2)
    assert f"Open-file limit {hard}: each of the 2 workers serves up to {per_worker} connections at once" in output
    assert "[WARNING]" not in output


def warnings_at_start(fake_url: str, **env: str) -> list[str]:
    with Server(server_env(fake_url, **env)) as server:
        return WARNING.findall(server.output())


@pytest.mark.e2e
def test_memory_storage_with_two_workers_counting_failures_warns_with_the_budget_a_client_gets(fake_accounts):
    [warning] = warnings_at_start(fake_accounts.url, RATE_LIMIT_FAILURES="60/minute")
    assert warning.endswith(
        "RATE_LIMIT_STORAGE_URI is memory://: each of the 2 workers counts on its own, so on each instance a "
        "client's failure budget up to 2 x RATE_LIMIT_FAILURES (60 per minute) = 120 per minute. "
        "Set RATE_LIMIT_STORAGE_URI to a Redis URL to count them once."
    )


# What the warning says for each setting is test_memory_warning.py's (ratelimit.memory_storage_warning); here, that
# the server says it at its start, with the number of workers it runs.


@pytest.mark.e2e
def test_the_warning_names_every_window_of_the_failure_limit(fake_accounts):
    [warning] = warnings_at_start(fake_accounts.url, WEB_CONCURRENCY="3", RATE_LIMIT_FAILURES="5/second;100 per 2 hours")
    assert "each of the 3 workers" in warning
    assert "up to 3 x RATE_LIMIT_FAILURES (5 per second, 100 per 2 hours) = 15 per second, 300 per 2 hours." in warning


@pytest.mark.e2e
def test_no_warning_when_one_worker_counts(fake_accounts):
    assert warnings_at_start(fake_accounts.url, RATE_LIMIT_FAILURES="60/minute", WEB_CONCURRENCY="1") == []
