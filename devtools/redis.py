"""A throwaway redis-server on a free 127.0.0.1 port, for tests and benchmarks: started, restarted on the same port, stopped."""

from __future__ import annotations

import shutil
import subprocess
import time

import redis

from devtools.process import free_port


class RedisServer:
    """redis-server on 127.0.0.1 with no persistence (unless `args` ask for it); `url` is where it listens."""

    def __init__(self, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._args = args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> RedisServer:
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server; make test does)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             *self._args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        with redis.Redis(port=self.port) as probe:
            while True:
                try:
                    probe.ping()
                    return self
                except redis.AuthenticationError:  # up, and wants a password (--requirepass)
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)

    def restart(self) -> None:
        """Stopped and started again on the same port: empty, unless its arguments made it persist."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
