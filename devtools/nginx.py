"""Run the repository's deploy/nginx.conf on loopback, in front of a server under test, for tests and benchmarks.

The file run is the shipped one: only its listen lines (to free 127.0.0.1 ports, with a plain-HTTP
listener beside the TLS one), its certificate (a fresh self-signed one), its pid and log paths (a
temporary directory, the error log at `error` level rather than `crit`, so that tests see what nginx
met) and its upstream's ports change. Each of those lines must appear exactly once,
and the upstream's server lines as shipped, so the file cannot change shape without this noticing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from devtools.fake_accounts import make_certificate
from devtools.process import LoopbackProxy, free_port, replace_lines, with_children

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    """Where nginx is (Debian puts it in /usr/sbin, not on every user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed: apt-get install nginx (.ci/run does)")
    return found


# The upstream's lines as shipped: one per instance, each with the same parameters.
UPSTREAM_SERVER = re.compile(r"server 127\.0\.0\.1:\d+(?P<parameters>(?: [a-z_]+=\w+)*);")
SHIPPED_INSTANCES = 2


def loopback_config(text: str, *, tls_port: int, plain_port: int, http_port: int, upstream_ports: list[int],
                    directory: str, cert: str, key: str) -> str:
    """deploy/nginx.conf with its listen, certificate, pid and log lines and its upstream moved to loopback."""
    servers = [(line, match) for line in text.splitlines() if (match := UPSTREAM_SERVER.fullmatch(line.strip()))]
    if len(servers) != SHIPPED_INSTANCES or len({match["parameters"] for _, match in servers}) != 1:
        raise ValueError(f"{CONFIG} should list {SHIPPED_INSTANCES} upstream servers with the same parameters")
    parameters = servers[0][1]["parameters"]
    first = servers[0][0].strip()
    by_line = {
        "listen 443 ssl;": [f"listen 127.0.0.1:{tls_port} ssl;", f"listen 127.0.0.1:{plain_port};"],
        "listen [::]:443 ssl;": [],
        "listen 80;": [f"listen 127.0.0.1:{http_port};"],
        "listen [::]:80;": [],
        first: [f"server 127.0.0.1:{port}{parameters};" for port in upstream_ports],
        **{line.strip(): [] for line, _ in servers[1:]},
        "ssl_certificate /etc/letsencrypt/live/tokens.example.com/fullchain.pem;": [f"ssl_certificate {cert};"],
        "ssl_certificate_key /etc/letsencrypt/live/tokens.example.com/privkey.pem;": [f"ssl_certificate_key {key};"],
        "pid /run/nginx.pid;": [f"pid {directory}/nginx.pid;"],
        "error_log /var/log/nginx/error.log crit;": [f"error_log {directory}/error.log error;"],
        "access_log /var/log/nginx/access.log tokenswap;": [f"access_log {directory}/access.log tokenswap;"],
    }
    return replace_lines(text, by_line, CONFIG)


class Nginx(LoopbackProxy):
    """deploy/nginx.conf as a real nginx process on loopback, in front of instances at 127.0.0.1:upstream_ports."""

    name = "nginx"

    def __init__(self, *upstream_ports: int):
        super().__init__()
        self.upstream_ports = list(upstream_ports)
        self.tls_port, self.plain_port, self.http_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.plain_port}"
        self.tls_url = f"https://127.0.0.1:{self.tls_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        # nginx started as root runs its workers as the file's user (www-data): they must reach it.
        os.chmod(self.directory, 0o755)
        self.cert, key = make_certificate(self.directory)
        self.config = os.path.join(self.directory, "nginx.conf")
        Path(self.config).write_text(loopback_config(
            CONFIG.read_text(), tls_port=self.tls_port, plain_port=self.plain_port, http_port=self.http_port,
            upstream_ports=self.upstream_ports, directory=self.directory, cert=self.cert, key=key,
        ))

    def command(self) -> list[str]:
        return [nginx_binary(), "-p", self.directory, "-c", self.config,
                "-e", os.path.join(self.directory, "error.log"), "-g", "daemon off;"]

    def log_path(self) -> str:
        return os.path.join(self.directory, "stderr.log")

    def log_text(self) -> str:
        return self.errors()

    def errors(self) -> str:
        """nginx's own output and error log."""
        return "".join(
            Path(self.directory, name).read_text(errors="replace")
            for name in ("stderr.log", "error.log") if Path(self.directory, name).exists()
        )

    def pids(self) -> list[int]:
        """The master and its workers."""
        if self.process is None:
            raise RuntimeError("nginx was not started")
        return with_children(self.process.pid)
