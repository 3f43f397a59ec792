"""Run the Procfile's web command (real gunicorn) on a free 127.0.0.1 port, for end-to-end tests and benchmarks."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self, TypeVar

import requests

from config import VARIABLES

ROOT = Path(__file__).resolve().parent.parent

# One request in gunicorn.conf.py's access_log_format (server.ACCESS_LOG_FORMAT): client "METHOD PATH" status bytes
# duration request-id.
ACCESS_LINE = re.compile(
    r'(?P<client>\S+) "(?P<method>[A-Z]+) (?P<path>\S*)" (?P<status>\d{3}) (?P<bytes>\S+) (?P<ms>\d+)ms'
    r' (?P<request_id>\S+)'
)


# A requests Response keeps its socket open as long as it lives. Tests send this so that the server
# closes each connection itself and no socket is left to the garbage collector's ResourceWarning.
CLOSE = {"Connection": "close"}


def json_answer(response: requests.Response, status: int | set[int] = 200) -> dict:
    """The JSON body, after checking the status and the exact media type every answer must carry."""
    statuses = {status} if isinstance(status, int) else status
    if response.status_code not in statuses:
        raise AssertionError(f"expected HTTP {sorted(statuses)}, got {response.status_code}: {response.text}")
    content_type = response.headers.get("Content-Type")
    if content_type != "application/json":
        raise AssertionError(f"Content-Type is {content_type!r}, not exactly 'application/json'")
    return response.json()


T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 10, what: str = "the condition") -> T:
    """Poll `condition` until it returns something true, and return that; an AssertionError naming `what` once
    `timeout` seconds have passed without it. The one deadline loop of the tests and benchmarks."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting ({timeout} s) for {what}")
        time.sleep(0.02)
    return value


def replace_lines(text: str, by_line: dict[str, list[str]], source: Path) -> str:
    """`text` with each line in `by_line` (stripped) replaced by its list of lines, at its indent; each must stand
    exactly once, so that a shipped file (deploy/) that changes its lines fails loudly rather than runs unchanged."""
    seen = dict.fromkeys(by_line, 0)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in by_line:
            seen[stripped] += 1
            indent = line[: len(line) - len(line.lstrip())]
            lines += [indent + new for new in by_line[stripped]]
        else:
            lines.append(line)
    wrong = {line: count for line, count in seen.items() if count != 1}
    if wrong:
        raise ValueError(f"{source} should have each of these lines once: {wrong}")
    return "\n".join(lines) + "\n"


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM to a process started in its own session, and SIGKILL to its group if it has not ended in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class LoopbackProxy:
    """A proxy from deploy/ (nginx, HAProxy) as a real process on loopback, in a temporary directory of its own:
    started in its own session, up once `url` answers through it, stopped with SIGTERM, its directory removed."""

    name = "proxy"
    url = ""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix=f"tokenswap-{self.name}-")
        self.directory = self._tmp.name

    def command(self) -> list[str]:
        """The proxy's command line, in the foreground."""
        raise NotImplementedError

    def log_path(self) -> str:
        """Where its output goes."""
        raise NotImplementedError

    def log_text(self) -> str:
        """What it said, for an error message."""
        raise NotImplementedError

    def start(self, timeout: float = 20) -> Self:
        with open(self.log_path(), "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        # Through to a server behind it: both are up (and, for HAProxy, its checks found one ready).
        if wait_until_up(self.url, self.process, timeout=timeout):
            return self
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()}")
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 10) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)  # SIGTERM: nginx's fast shutdown, HAProxy's hard stop

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            self._tmp.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


def free_port() -> int:
    """A TCP port that no socket holds right now, on any address, picked below the range the kernel takes the local
    ports of outgoing connections from: a port picked there (as binding port 0 does) can be taken by one of the
    thousands of connections tests running beside this one open, before the server this port is for binds it."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default; macOS and Windows begin at 49152
    for _ in range(100):
        port = random.randrange(10_000, ephemeral_low) if ephemeral_low > 10_000 else 0  # 0: the kernel's pick
        with socket.socket() as sock:
            try:
                sock.bind(("", port))  # every address, as the Procfile's 0.0.0.0 binds
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free TCP port between 10000 and {ephemeral_low}")


def web_command() -> str:
    """The `web:` line of the Procfile."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line[len("web:"):].strip()
    raise RuntimeError("Procfile has no web: line")


class Server:
    """The service as a real process. Output goes to a file, readable with .output()."""

    process: subprocess.Popen[bytes]  # once start() has run

    def __init__(self, env: dict[str, str], *, port: int | None = None, extra_args: str = ""):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            # Every setting of the service blank (unset) unless given: gunicorn.conf.py reads a developer's
            # .env for what the environment leaves out, and that must not change what a test runs with.
            **dict.fromkeys(VARIABLES, ""),
            # A stop begins at once unless a test asks for the delay a load balancer needs (STOP_DELAY).
            "STOP_DELAY": "0",
            # gunicorn from the Python running the tests, its virtualenv activated or not (`make test`).
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PORT": str(self.port),
            # The Procfile binds 0.0.0.0:$PORT; tests stay on loopback. Command-line style
            # settings in GUNICORN_CMD_ARGS override gunicorn.conf.py, as on any host.
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{self.port} {extra_args}".strip(),
            **env,
        }
        self._log = tempfile.NamedTemporaryFile(prefix="tokenswap-", suffix=".log", delete=False)
        self._log.close()  # only its name is kept: each start appends to it through its own handle

    def start(self, *, wait: bool = True, timeout: float = 20) -> Server:
        self._started_at = len(self.output())
        with open(self._log.name, "ab") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", "exec " + web_command()],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        process = self.process
        assert process is not None, "started"
        # free_port() is only a guess: until gunicorn says it listens, a 200 may come from another
        # process that took the port in the meantime.
        while "Listening at: " not in self.output()[self._started_at:]:
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not wait_until_up(self.url, process, timeout=max(0.0, deadline - time.monotonic())):
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{self.output()}")
            raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")
        # gunicorn writes the line after the answer: wait for it, so that it does not land among the
        # lines of the test that comes next.
        while "/health" not in self.output()[self._started_at:] and time.monotonic() < deadline:
            time.sleep(0.02)

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def access_log(self, since: int = 0) -> list[dict[str, str]]:
        """The request log lines written after character `since` of output(), parsed."""
        lines = self.output()[since:].splitlines()
        return [m.groupdict() for m in map(ACCESS_LINE.fullmatch, lines) if m]

    def wait_for_access_log(self, count: int, since: int = 0, timeout: float = 10,
                            path: str | None = None) -> list[dict[str, str]]:
        """At least `count` request log lines after `since` (of `path` only, if given); gunicorn writes each
        after its answer, and lines of other requests (a start-up /health) may come between."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.access_log(since) if path is None or line["path"] == path]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        return with_children(self.process.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if not hasattr(self, "process"):
            return 0
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:
            self.stop(signal.SIGKILL)  # __exit__ will not run: do not leave gunicorn behind
            raise

    def __exit__(self, *exc) -> None:
        # gunicorn's quick shutdown: a test that is done with its server does not wait out the drain a SIGTERM
        # starts (server.DRAIN_SECONDS); what a SIGTERM does is tests/test_stop.py's to show.
        self.stop(signal.SIGQUIT)
        os.unlink(self._log.name)


def with_children(pid: int) -> list[int]:
    """A process and its children (a server's master and workers), from /proc."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return pids


def run_until_exit(env: dict[str, str], timeout: float = 20) -> tuple[int, str]:
    """Start the web command expecting it to stop by itself (e.g. on bad config): (exit code, output)."""
    server = Server(env)
    server.start(wait=False)
    try:
        code = server.process.wait(timeout)
    finally:
        server.stop(signal.SIGKILL)
    output = server.output()
    os.unlink(server._log.name)
    return code, output


def quote_env(env: dict[str, str]) -> str:
    """The variables as a shell would set them, for error messages."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def wait_until_up(url: str, process: subprocess.Popen | None = None, *, timeout: float = 30,
                  verify: bool | str = True) -> bool:
    """Ask GET url/health until it answers 200 (True), or until `process` exits or `timeout` seconds pass (False).

    The one "wait until up" of the tests, the benchmarks and `make run`.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            if requests.get(url + "/health", headers=CLOSE, timeout=1, verify=verify).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.05)
    return False
