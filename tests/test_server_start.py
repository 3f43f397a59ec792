"""What the Procfile's server does and says at start: the open-file limit raised, what each worker holds."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

import app
from config import MAX_CONNECTIONS_PER_WORKER, OTHER_OPEN_FILES, connections_per_worker
from tests.conftest import server_env
from tests.server import Server


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
    assert app.UPSTREAM_POOL_SIZE == connections_per_worker()


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
