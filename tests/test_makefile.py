"""The Makefile's first step: the Python it needs, checked before anything is installed, and a .venv made by
another Python made again. Run in a copy of the Makefile in a temporary directory (never on the checkout's .venv,
which may be shared), offline: nothing is installed from an index."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

# Tests that start processes are marked e2e one by one; the pure computations beside them run in the fast tier.

ROOT = Path(__file__).resolve().parent.parent
# What the service needs, as the Makefile says it.
MIN_PYTHON = tuple(int(part) for part in re.findall(
    r"^MIN_PYTHON = (\d+\.\d+)$", (ROOT / "Makefile").read_text(), re.M)[0].split("."))
# Where an older interpreter may be found on a developer's machine (pyenv's, or one on PATH).
PYENV_VERSIONS = Path.home() / ".pyenv" / "versions"


def version_of(python: str) -> str:
    return subprocess.run([python, "-c", 'import sys; print("%d.%d" % sys.version_info[:2])'],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def old_python(tmp_path_factory) -> Path:
    """A Python older than MIN_PYTHON: a real one when installed (pyenv's 3.9, 3.10, or on PATH); otherwise this
    interpreter started with sys.version_info set to 3.9's, which is all the Makefile asks of it."""
    candidates = sorted(PYENV_VERSIONS.glob("3.*/bin/python3")) if PYENV_VERSIONS.is_dir() else []
    candidates += [Path(path) for name in ("python3.9", "python3.10")
                   if (path := shutil.which(name))]
    for candidate in candidates:
        try:
            if tuple(map(int, version_of(str(candidate)).split("."))) < MIN_PYTHON:
                return candidate
        except (subprocess.CalledProcessError, OSError, ValueError):
            continue
    stand_in = tmp_path_factory.mktemp("old-python") / "python3.9"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "sys.version_info = (3, 9, 18, 'final', 0)\n"
        "assert sys.argv[1] == '-c', sys.argv\n"
        "code, sys.argv = sys.argv[2], ['-c', *sys.argv[3:]]\n"
        "exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})\n"
    )
    stand_in.chmod(0o755)
    return stand_in


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The Makefile with empty requirements and a devtools/run.py that says which Python runs it."""
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    for name in ("requirements.txt", "requirements-dev.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "devtools").mkdir()
    (tmp_path / "devtools" / "run.py").write_text('import sys\nprint("run.py on Python %d.%d" % sys.version_info[:2])\n')
    return tmp_path


def make(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("MAKEFLAGS", None)
    return subprocess.run(["make", "--no-print-directory", "-C", str(directory), *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.e2e
def test_an_old_python_is_refused_with_what_to_install_and_how_to_name_it(checkout, old_python):
    old = version_of(str(old_python))
    for goal in ("run", "test"):
        done = make(checkout, goal, f"PYTHON={old_python}")
        assert done.returncode != 0
        assert f"Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed; PYTHON={old_python} is Python {old}." \
            in done.stderr
        assert f"make {goal} PYTHON=python3.11" in done.stderr
        # Nothing else was tried: no .venv, no pip, no run.
        assert not (checkout / ".venv").exists() and "pip" not in done.stdout + done.stderr
        assert "run.py on" not in done.stdout


@pytest.mark.e2e
def test_a_missing_python_is_named(checkout):
    done = make(checkout, "run", "PYTHON=no-such-python3")
    assert done.returncode != 0
    assert "PYTHON=no-such-python3 is not found." in done.stderr and "make run PYTHON=python3.11" in done.stderr


@pytest.mark.e2e
@pytest.mark.long(5)
def test_a_venv_made_by_another_python_is_made_again_and_a_linked_one_is_left_whole(checkout, old_python, tmp_path):
    # A .venv that is a symlink to a virtualenv elsewhere, made by the old Python (or a stand-in for one).
    shared = tmp_path / "elsewhere" / "venv"
    if old_python.name == "python3.9" and old_python.parent.name.startswith("old-python"):
        (shared / "bin").mkdir(parents=True)
        (shared / "bin" / "python").symlink_to(old_python)
    else:
        subprocess.run([str(old_python), "-m", "venv", "--without-pip", str(shared)], check=True, timeout=120)
    (shared / "bin" / "kept").write_text("")
    (checkout / ".venv").symlink_to(shared)
    (shared / ".run-installed").write_text("")  # installed, as far as make can tell

    done = make(checkout, "run", f"PYTHON={sys.executable}")
    current = version_of(sys.executable)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Making .venv again: it was made by Python {version_of(str(old_python))}, PYTHON={sys.executable} " \
           f"is Python {current}." in done.stdout
    assert f"run.py on Python {current}" in done.stdout
    # The link went; what it pointed to is untouched.
    assert not (checkout / ".venv").is_symlink() and (shared / "bin" / "kept").exists()
    assert version_of(str(checkout / ".venv" / "bin" / "python")) == current

    # Made by this Python: kept as it is.
    again = make(checkout, "run", f"PYTHON={sys.executable}")
    assert again.returncode == 0 and "Making .venv again" not in again.stdout
    assert again.stdout.count("pip install") == 0 and f"run.py on Python {current}" in again.stdout


@pytest.mark.e2e
@pytest.mark.long(4)
def test_a_venv_whose_python_is_gone_is_made_again(checkout):
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").symlink_to(checkout / "uninstalled-python")
    (checkout / ".venv" / ".run-installed").write_text("")
    done = make(checkout, "run", f"PYTHON={sys.executable}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Making .venv again: it was made by a Python that is gone" in done.stdout
    assert f"run.py on Python {version_of(sys.executable)}" in done.stdout


@pytest.mark.e2e
def test_port_from_the_environment_or_the_command_line_is_the_same_and_host_only_from_the_command_line(checkout):
    def run_line(*args: str, **environ: str) -> str:
        env = {**os.environ, **environ}
        env.pop("MAKEFLAGS", None)
        out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(checkout), "run", *args],
                             capture_output=True, text=True, env=env, timeout=60).stdout
        return next(line for line in out.splitlines() if "devtools.run" in line)

    assert run_line(PORT="").endswith("--host 127.0.0.1 --port 1234")
    assert run_line(PORT="8000").endswith("--port 8000") and run_line("PORT=8000").endswith("--port 8000")
    assert run_line("PORT=8001", PORT="8000").endswith("--port 8001")  # the command line wins
    assert "--host 127.0.0.1 " in run_line(HOST="my-laptop.local")  # zsh's HOST is the machine's name
    assert "--host 0.0.0.0 " in run_line("HOST=0.0.0.0")


def test_the_python_version_is_stated_alike_in_pyproject_and_the_readme():
    minimum = ".".join(map(str, MIN_PYTHON))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={minimum}"
    assert f"Python {minimum} or newer" in (ROOT / "README.md").read_text()
    assert sys.version_info[:2] >= MIN_PYTHON
