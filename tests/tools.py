"""The programs some tests start besides Python, and what becomes of those tests where one is missing.

`needs("nginx")` marks a test (or, as `pytestmark`, a module) that starts a tool: where the tool is not installed,
the test is skipped, with the reason and how to install it; everything else still runs. As a pytest plugin
(`make test` loads it through PYTEST_PLUGINS), this module turns every skip into a failure when the environment
variable CI is set (`.ci/run` sets it, as CI services do): there, every tool is installed, and a skip would stand in
for a test that never ran.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator

import pytest

# Each tool the tests start, and where to get it. Debian package = command name; `make test` installs the missing
# ones with apt-get where there is one (the Makefile's TEST_TOOLS).
TOOLS = {
    "chromium": "the browser tests (Playwright drives it; no browser download)",
    "redis-server": "the shared rate-limit storage tests",
    "openssl": "test certificates (the stand-in's and nginx's TLS)",
    "npm": "a Node OAuth client library, installed by `make test` from tests/node/package-lock.json",
    "node": "a Node OAuth client library",
    "curl": "the README's examples",
    "nginx": "deploy/nginx.conf in front of the server",
    "prometheus": "scraping /metrics for real (Debian's package also brings promtool)",
    "promtool": "checking deploy/prometheus-rules.yml (Debian's prometheus package)",
    "wrk": "a short run of the benchmark (bench/run.py drives its load with wrk)",
    "haproxy": "deploy/haproxy.cfg in front of three instances, checking /readyz",
}
# Debian puts nginx and haproxy (and other daemons) in /usr/sbin, which is not on every user's PATH.
SBIN = "/usr/sbin:/usr/local/sbin"


def find(tool: str) -> str | None:
    """The tool's path, or None when it is not installed."""
    return shutil.which(tool) or shutil.which(tool, path=SBIN)


def missing(*tools: str) -> list[str]:
    return [tool for tool in tools if find(tool) is None]


def reason(tools: list[str]) -> str:
    return (f"needs {', '.join(tools)}, not installed: `make test` installs it with apt-get; elsewhere install it "
            "with your package manager")


def needs(*tools: str) -> pytest.MarkDecorator:
    """Skip the test where one of these tools is not installed (a failure when CI is set)."""
    absent = missing(*tools)
    return pytest.mark.skipif(bool(absent), reason=reason(absent))


def require(tool: str) -> str:
    """In a fixture: the tool's path, or a skip of the tests that use it."""
    path = find(tool)
    if path is None:
        pytest.skip(reason([tool]))
    return path


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                           pytest.TestReport]:
    report = yield
    if on_ci() and report.skipped and not hasattr(report, "wasxfail"):
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        why = why.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped where CI is set, and nothing may be skipped there: {why}"
    return report
