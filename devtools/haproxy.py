"""Run the repository's deploy/haproxy.cfg on loopback, in front of servers under test, for tests.

The file run is the shipped one: only its global process lines (no chroot, user or daemon: the test's own
process, in the foreground), its log (to stdout, a file here), its stats socket (a temporary directory), its binds
(one plain-HTTP listener on a free 127.0.0.1 port instead of :443 with TLS and :80 redirecting to it) and its
server lines (the instances' ports) change. Each of those lines must appear exactly once, and the server lines as
shipped, so the file cannot change shape without this noticing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from devtools.process import LoopbackProxy, free_port, replace_lines

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "haproxy.cfg"
# The backend's lines as shipped: one per instance.
SERVER = re.compile(r"server (?P<name>tokenswap\d+) 127\.0\.0\.1:\d+")
SHIPPED_INSTANCES = 3


def haproxy_binary() -> str:
    """Where haproxy is (Debian puts it in /usr/sbin, not on every user's PATH)."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("haproxy is not installed: apt-get install haproxy (.ci/run does)")
    return found


def loopback_config(text: str, *, port: int, server_ports: list[int], directory: str) -> str:
    """deploy/haproxy.cfg with its process, log, socket, bind and server lines moved to loopback."""
    servers = [line.strip() for line in text.splitlines() if SERVER.fullmatch(line.strip())]
    if len(servers) != SHIPPED_INSTANCES:
        raise ValueError(f"{CONFIG} should list {SHIPPED_INSTANCES} server lines")
    by_line = {
        "log /dev/log local0": ["log stdout format raw local0 info"],
        "chroot /var/lib/haproxy": [],
        "stats socket /run/haproxy/admin.sock mode 660 level admin": [f"stats socket {directory}/admin.sock mode 600"],
        "user haproxy": [],
        "group haproxy": [],
        "daemon": [],
        "bind :443 ssl crt /etc/haproxy/certs/tokens.example.com.pem alpn h2,http/1.1": [f"bind 127.0.0.1:{port}"],
        "bind :80": [],
        "http-request redirect scheme https code 301 unless { ssl_fc }": [],
        servers[0]: [f"server tokenswap{i} 127.0.0.1:{p}" for i, p in enumerate(server_ports, 1)],
        **{line: [] for line in servers[1:]},
    }
    return replace_lines(text, by_line, CONFIG)


class HAProxy(LoopbackProxy):
    """deploy/haproxy.cfg as a real haproxy process on loopback, in front of instances at 127.0.0.1:server_ports."""

    name = "haproxy"

    def __init__(self, *server_ports: int):
        super().__init__()
        self.server_ports = list(server_ports)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = os.path.join(self.directory, "haproxy.cfg")
        self.log = os.path.join(self.directory, "haproxy.log")
        Path(self.config).write_text(loopback_config(
            CONFIG.read_text(), port=self.port, server_ports=self.server_ports, directory=self.directory))

    def command(self) -> list[str]:
        # -db: in the foreground, its log and alerts (a server going DOWN or UP) to the log file.
        return [haproxy_binary(), "-db", "-f", self.config]

    def log_path(self) -> str:
        return self.log

    def log_text(self) -> str:
        return self.output()

    def output(self) -> str:
        """haproxy's log: a line per request, and its alerts."""
        return Path(self.log).read_text(errors="replace") if Path(self.log).exists() else ""
