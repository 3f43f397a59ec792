"""The contract as OpenAPI 3.1 (openapi.json, served at GET /openapi.json): a valid document, the app's own routes,
and Schemathesis (a stranger's tool) run against the real server and the stand-in for Spotify."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from api import OPENAPI
from devtools.fake_accounts import FakeAccounts
from devtools.process import Server
from tests.helpers import server_env

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = json.loads(OPENAPI.read_text())
METRICS_TOKEN = "metrics-token-0123456789abcdef"
# Bounded and repeatable: a fixed seed, a few examples per operation in the fuzzing phase; the coverage phase's
# boundary cases and the stateful phase's scenarios (a swap, then its refresh token refreshed) come on top.
SEED = 20261206
MAX_EXAMPLES = 5
# One path of each path item: the aliases (/api/token, /v1/swap, ...) are the same item by $ref, and the app
# routes each to the same view (tests/test_app.py runs every behaviour at every path).
TESTED_PATHS = r"^/(swap|refresh|revoke|client-credentials-tokens|health|livez|readyz|openapi\.json|metrics|callback)?$"


def test_the_document_is_valid_openapi_3_1():
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1.")


def test_get_openapi_json_serves_the_document_as_it_is_in_the_repository(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.data == OPENAPI.read_bytes()


def test_the_readme_and_the_page_link_it(client):
    assert "[OpenAPI 3.1 document](openapi.json)" in (ROOT / "README.md").read_text()
    page = client.get("/").get_data(as_text=True)
    assert 'href="/openapi.json"' in page


def test_every_route_of_the_app_is_described_with_its_methods_and_nothing_else(make_app):
    """The document's paths and methods are exactly the app's (with metrics on): nothing undocumented is served,
    nothing documented is missing. The favicon and the page's static files are the browser's, not the contract."""
    app = make_app(METRICS_TOKEN=METRICS_TOKEN)
    served = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "page.favicon"):
            continue
        served[rule.rule] = sorted((rule.methods or set()) - {"HEAD"})
    documented = {}
    for path, item in DOCUMENT["paths"].items():
        if "$ref" in item:
            item = DOCUMENT["paths"][item["$ref"].removeprefix("#/paths/").replace("~1", "/")]
        documented[path] = sorted(method.upper() for method in item if method in ("get", "post", "options"))
    # Flask answers OPTIONS on every path (an empty 204, a CORS preflight when CORS_ORIGINS is set): the document
    # describes it where browsers ask, at the token paths.
    assert {path: [m for m in methods if m != "OPTIONS"] for path, methods in served.items()} == \
        {path: [m for m in methods if m != "OPTIONS"] for path, methods in documented.items()}
    assert {path for path, methods in documented.items() if "OPTIONS" in methods} == \
        {path for path, methods in documented.items() if "POST" in methods}


def test_schemathesis_settings_leave_out_one_check_and_take_503_for_load_shedding():
    settings = tomllib.loads((ROOT / "schemathesis.toml").read_text())
    assert settings == {"workers": 1, "checks": {
        "positive_data_acceptance": {"enabled": False},
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]},
    }}


def test_each_path_style_links_a_swap_to_a_refresh():
    """Schemathesis' stateful phase follows these links: the sealed refresh token a swap answers refreshes."""
    swap = DOCUMENT["paths"]["/swap"]["post"]["responses"]["200"]["links"]["refresh"]
    assert swap["operationRef"] == "#/paths/~1refresh/post"
    assert swap["requestBody"] == {"refresh_token": "$response.body#/refresh_token"}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The Procfile's server against the stand-in, with metrics on and CORS set; the failure budget off, or the
    generated bad requests would soon all be answered 429 and nothing else would be tested."""
    with FakeAccounts() as fake:
        env = server_env(fake.url, METRICS_TOKEN=METRICS_TOKEN, CORS_ORIGINS="https://app.example",
                         RATE_LIMIT_FAILURES="off", RATE_LIMIT_PER_TOKEN="off")
        with Server(env) as running:
            yield running


@pytest.mark.e2e
@pytest.mark.timeout(150)
@pytest.mark.long(8)
def test_schemathesis_finds_the_running_service_as_described(server, tmp_path):
    """Every check Schemathesis has but positive_data_acceptance (no 5xx, status codes, content types, headers and
    bodies as described, data the document forbids refused), over the coverage, fuzzing and stateful phases, with no
    failure, as schemathesis.toml sets it (it says why that check is off, and why one worker)."""
    since = len(server.output())
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "schemathesis.toml"), "--no-color",
         "run", f"{server.url}/openapi.json", "--phases", "coverage,fuzzing,stateful", "--seed", str(SEED),
         "--max-examples", str(MAX_EXAMPLES), "--include-path-regex", TESTED_PATHS,
         "--header", f"Authorization: Bearer {METRICS_TOKEN}", "--request-timeout", "20",
         "--generation-database", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=140,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert re.search(r"Test cases:\s+\d+ generated, \d+ passed", report), report
    links = re.search(r"API Links:\s+(\d+) covered", report)
    assert links and int(links.group(1)) >= 1, report  # a swap's token refreshed, at least
    output = server.output()[since:]
    assert "Traceback" not in output and "[ERROR]" not in output, output
    # Every POST that reached the service was answered; some of them refreshed a swap's token.
    statuses = {line["status"] for line in server.access_log(since) if line["path"] == "/refresh"}
    assert "200" in statuses, statuses
