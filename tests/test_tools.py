"""`make test` where a tool is missing: the Makefile says which and goes on, the tests that need it are skipped with
the reason, the others run; where CI is set, a skip is a failure. Run on a tiny test module in a temporary directory,
with a PATH that lacks the tool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import needs

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

ROOT = Path(__file__).resolve().parent.parent

TESTS = '''
from tests.tools import needs, require
import pytest

@needs("curl")
def test_needs_curl():
    pass

@pytest.fixture
def curl():
    return require("curl")

def test_with_a_fixture_that_requires_curl(curl):
    pass

def test_needs_nothing():
    pass
'''


@pytest.fixture
def bare_path(tmp_path) -> str:
    """A PATH with Python and the shell's basics, and no curl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "env", "id", "tr"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def pytest_run(directory: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    (directory / "test_sample.py").write_text(TESTS)
    environment = {key: value for key, value in os.environ.items() if key not in ("CI", "PYTEST_ADDOPTS")}
    environment.update(PATH=path, PYTHONPATH=str(ROOT), PYTEST_PLUGINS="tests.tools", **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", "-c", os.devnull,
         "--rootdir", str(directory), str(directory / "test_sample.py")],
        capture_output=True, text=True, env=environment, cwd=directory, timeout=120,
    )


def test_without_a_tool_its_tests_are_skipped_with_the_reason_and_the_others_run(tmp_path, bare_path):
    done = pytest_run(tmp_path, bare_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 2 skipped" in done.stdout
    assert done.stdout.count("needs curl, not installed: `make test` installs it with apt-get") == 2


@needs("curl")
def test_with_the_tool_nothing_is_skipped(tmp_path):
    done = pytest_run(tmp_path, os.environ["PATH"])
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("value", ["true", "1"])
def test_where_ci_is_set_a_skip_is_a_failure(tmp_path, bare_path, value):
    done = pytest_run(tmp_path, bare_path, CI=value)
    assert done.returncode == 1, done.stdout + done.stderr
    # Skips happen at a test's setup: pytest counts a failed setup as an error.
    assert "1 passed, 2 errors" in done.stdout
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 2
    for line in errors:
        assert "skipped where CI is set, and nothing may be skipped there: needs curl, not installed" in line


def test_ci_false_is_not_ci(tmp_path, bare_path):
    done = pytest_run(tmp_path, bare_path, CI="false")
    assert done.returncode == 0 and "1 passed, 2 skipped" in done.stdout, done.stdout + done.stderr


def test_make_test_tools_without_apt_get_lists_the_missing_tools_and_goes_on(tmp_path, bare_path):
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    environment = {key: value for key, value in os.environ.items() if key != "MAKEFLAGS"}
    done = subprocess.run(
        [shutil.which("make") or "make", "--no-print-directory", "-C", str(tmp_path), "test-tools",
         "TEST_TOOLS=curl no-such-tool sh"],
        capture_output=True, text=True, env={**environment, "PATH": bare_path}, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Not installed: curl no-such-tool (the tests need curl no-such-tool sh)." in done.stdout
    assert "No apt-get here: the tests that need them are skipped" in done.stdout
    assert done.stderr == ""


def test_make_test_loads_the_plugin_and_ci_runs_make_test_with_ci_set():
    makefile = (ROOT / "Makefile").read_text()
    assert "test: export PYTEST_PLUGINS = tests.tools\n" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true\n" in ci and ci.rstrip().endswith("make test")
