"""Shared fixtures: the configuration, the app and its test clients, Spotify faked or stood in, the window guard.

Helpers and constants that tests import live in tests/helpers.py; fixtures are only here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from config import VARIABLES
from devtools.fake_accounts import FakeAccounts
from devtools.process import Server
from devtools.redis import RedisServer
from limitstore import seconds_to_window_end
from tests.helpers import BASE_CONFIG, Clock, app_for, server_env

# Where CI is set, a skipped test fails (tests/tools.py): every tool is installed there.
pytest_plugins = ["tests.tools"]



def _refuse_process(*args: object, **kwargs: object) -> None:
    raise AssertionError("this test, or a fixture it uses, starts a process: mark the test @pytest.mark.e2e")


@contextlib.contextmanager
def _no_process_unless_e2e(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("e2e") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", _refuse_process)
        yield


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject.toml): one worker per CPU for the fast tier, which computes; three per CPU, at most 8, when
    end-to-end tests run, since they mostly wait on the servers, browsers and proxies they start (on 2 cores: 4
    workers took 135 s, 6 took 116 s, 8 took 120 s). None when the command line names tests (`pytest
    tests/test_crypto.py`): starting workers would take longer than running them here (`-n 4` still asks for 4)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return 0
    if config.option.markexpr.replace(" ", "") == "note2e":
        return cpus
    return min(3 * cpus, 8)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules whose tests are marked `long(seconds)` first, the longest first (by the sum of the marks), so that
    a parallel run starts them at once rather than waiting for them at its end; xdist keeps this order
    (--no-loadscope-reorder). The figures only order: a stale one costs time, never a result."""
    seconds: dict[Path, float] = {}
    for item in items:
        mark = item.get_closest_marker("long")
        seconds[item.path] = seconds.get(item.path, 0.0) + (float(mark.args[0]) if mark else 0.0)
    items.sort(key=lambda item: -seconds[item.path])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """`pytest -m "not e2e"` stays the fast inner loop: a test not marked e2e fails if it starts a process, or if a
    fixture it sets up does (a module's fixture is set up with the first test that uses it, inside this hook)."""
    with _no_process_unless_e2e(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """The same while the test runs."""
    with _no_process_unless_e2e(item):
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", _refuse_process)
        return (yield)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable from the developer's shell leaks into a test."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _window_room(request: pytest.FixtureRequest) -> None:
    """A test marked `window(seconds, rates="1/minute")` starts with at least that many seconds left in the
    fixed windows of those rates.

    limits' sliding windows lean on fixed ones that begin on the minute, hour or day: a test that
    straddles a window's start sees its earlier counts weigh less than one each, and one more request
    gets through than it counts on. Waiting for the next window is waiting on the clock itself, which
    nothing else can signal.
    """
    marker = request.node.get_closest_marker("window")
    if marker is None:
        return
    needed = float(marker.args[0]) if marker.args else 15.0
    rates = marker.args[1] if len(marker.args) > 1 else "1/minute"
    left = seconds_to_window_end(rates)
    if left < needed:
        time.sleep(left + 0.5)


@pytest.fixture
def config() -> dict[str, str]:
    """The base configuration as environment variables; a test may change it before `app` is built."""
    return dict(BASE_CONFIG)


@pytest.fixture
def clock() -> Clock:
    """The wall clock the app reads (sign-in times, lifetimes): still unless a test moves it."""
    return Clock()


@pytest.fixture
def make_app(config: dict[str, str], clock: Clock) -> Callable[..., Flask]:
    """Build the app from `config` with some variables overridden, on the test's `clock`."""

    def make(**overrides: str) -> Flask:
        return app_for({**config, **overrides}, clock)

    return make


@pytest.fixture
def make_client(make_app: Callable[..., Flask]) -> Callable[..., FlaskClient]:
    """A test client of the app built from `config` with some variables overridden."""

    def make(**overrides: str) -> FlaskClient:
        return make_app(**overrides).test_client()

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def spotify() -> Iterator[responses.RequestsMock]:
    """Spotify's token endpoint, faked; every registered answer must be asked for."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture(scope="session")
def fake_accounts() -> Iterator[FakeAccounts]:
    """The stand-in for Spotify as a real HTTP server, one for the whole run."""
    with FakeAccounts() as fake:
        yield fake


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway redis-server on a free 127.0.0.1 port, no persistence, for one module's tests."""
    from tests.tools import require  # here: imported at the top, it would be imported before pytest_plugins names it

    require("redis-server")
    with RedisServer() as running:
        yield running


@pytest.fixture(scope="session")
def served(fake_accounts: FakeAccounts) -> Iterator[Server]:
    """The service as server_env() configures it (the Procfile's command, real gunicorn), one for the whole run:
    every end-to-end test that needs no setting of its own talks to this one. Only tests of a setting, or of
    the process's start and stop, start their own."""
    with Server(server_env(fake_accounts.url)) as running:
        yield running


@pytest.fixture(scope="session")
def served_behind_proxy(fake_accounts: FakeAccounts) -> Iterator[Server]:
    """The same behind one trusted proxy (TRUSTED_PROXIES=1), for the run."""
    with Server(server_env(fake_accounts.url, TRUSTED_PROXIES="1")) as running:
        yield running


@pytest.fixture
def fake(fake_accounts: FakeAccounts) -> FakeAccounts:
    """The module's stand-in for Spotify, with nothing received yet."""
    fake_accounts.reset()
    return fake_accounts
