"""The deploy recipes that sit in front of several instances: deploy/haproxy.cfg's checks against STOP_DELAY, and
deploy/kubernetes.yaml (valid for the Kubernetes API, probes on /livez and /readyz, a grace period from the
service's own stop time)."""

from __future__ import annotations

import re
from pathlib import Path

from config import Config, load_config
from tests.helpers import BASE_CONFIG

ROOT = Path(__file__).resolve().parent.parent


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", value).groups()  # type: ignore[union-attr]  # a shipped value; a failed match is the test failing
    return float(number) / (1000 if unit == "ms" else 1)


def test_the_default_stop_delay_outlasts_the_time_haproxy_takes_to_notice_a_503():
    """An instance must still accept requests until HAProxy has stopped sending them: the first failed check comes
    within `inter`, the fall-th `fastinter` after each, each taking up to `timeout check`."""
    text = (ROOT / "deploy/haproxy.cfg").read_text()
    [line] = [line.split() for line in text.splitlines() if line.strip().startswith("default-server check")]
    settings = dict(zip(line[2::2], line[3::2]))
    [check_timeout] = re.findall(r"timeout check (\S+)", text)
    assert "option httpchk GET /readyz" in text and re.search(r"^\s*retries 0$", text, re.M)
    noticed = (_seconds(settings["inter"]) + (int(settings["fall"]) - 1) * _seconds(settings["fastinter"])
               + _seconds(check_timeout))
    default = load_config(BASE_CONFIG).stop_delay
    assert default == Config.stop_delay
    assert default >= noticed + 1, (default, noticed)  # a second to spare, at least
