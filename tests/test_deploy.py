"""The deploy recipes that sit in front of several instances: deploy/haproxy.cfg's checks against STOP_DELAY, and
deploy/kubernetes.yaml (valid for the Kubernetes API, probes on /livez and /readyz, a grace period from the
service's own stop time)."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]  # the package ships no types
import yaml

from config import VARIABLES, Config, load_config
from server import stop_seconds
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
    settings = dict(zip(line[2::2], line[3::2], strict=True))
    [check_timeout] = re.findall(r"timeout check (\S+)", text)
    assert "option httpchk GET /readyz" in text and re.search(r"^\s*retries 0$", text, re.M)
    noticed = (_seconds(settings["inter"]) + (int(settings["fall"]) - 1) * _seconds(settings["fastinter"])
               + _seconds(check_timeout))
    default = load_config(BASE_CONFIG).stop_delay
    assert default == Config.stop_delay
    assert default >= noticed + 1, (default, noticed)  # a second to spare, at least


def manifest() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()) if doc]


def test_the_kubernetes_manifest_is_valid_for_the_kubernetes_api():
    """Each document against the API's own schemas, strict (no unknown field), as bundled in kubernetes-validate:
    nothing is fetched."""
    documents = manifest()
    assert [doc["kind"] for doc in documents] == ["Secret", "Deployment", "Service"]
    for document in documents:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_kubernetes_pods_configuration_is_valid_and_its_grace_period_is_the_services_stop_time():
    """The Deployment's variables and the Secret's make a configuration the service accepts; the grace period is
    server.stop_seconds for that configuration (STOP_DELAY included) plus the master's few seconds; the probes ask
    /livez and /readyz, and a readiness failure is seen within STOP_DELAY."""
    secret, deployment, service = manifest()
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    assert set(env) | set(secret["stringData"]) <= set(VARIABLES)
    # The credentials only in the Secret, which the container reads whole.
    assert {"SPOTIFY_CLIENT_SECRET", "ENCRYPTION_SECRET"} <= set(secret["stringData"]) and not \
        {"SPOTIFY_CLIENT_SECRET", "ENCRYPTION_SECRET"} & set(env)
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    config = load_config({**secret["stringData"], **env, "ENCRYPTION_SECRET": "x" * 32})
    assert pod["terminationGracePeriodSeconds"] == stop_seconds(config) + 5 == 50
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert liveness["httpGet"] == {"path": "/livez", "port": "http"}
    assert readiness["httpGet"] == {"path": "/readyz", "port": "http"}
    noticed = readiness["periodSeconds"] * readiness["failureThreshold"] + readiness["timeoutSeconds"]
    assert noticed < config.stop_delay
    assert {"name": "http", "containerPort": 8080} in container["ports"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
