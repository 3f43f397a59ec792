"""Run the Procfile's web command (real gunicorn) on a free 127.0.0.1 port, for end-to-end tests and benchmarks."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def web_command() -> str:
    """The `web:` line of the Procfile."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line[len("web:"):].strip()
    raise RuntimeError("Procfile has no web: line")


class Server:
    """The service as a real process. Output goes to a file, readable with .output()."""

    def __init__(self, env: dict[str, str], *, port: int | None = None, extra_args: str = ""):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PORT": str(self.port),
            # The Procfile binds 0.0.0.0:$PORT; tests stay on loopback. Command-line style
            # settings in GUNICORN_CMD_ARGS override gunicorn.conf.py, as on any host.
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{self.port} {extra_args}".strip(),
            **env,
        }
        self._log = tempfile.NamedTemporaryFile(prefix="tokenswap-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def start(self, *, wait: bool = True, timeout: float = 20) -> "Server":
        self.process = subprocess.Popen(
            ["bash", "-c", "exec " + web_command()],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        os.unlink(self._log.name)


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
