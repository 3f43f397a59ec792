"""Deploy descriptors agree with the code: the variables they name, the command they start, the Python they use."""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import fnmatch
import io
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import requests
import yaml
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF

import crypto
from config import DEV_VARIABLES, PROXY_VARIABLES, SERVER_VARIABLES, VARIABLES, generate_secret, load_config
from devtools.process import free_port, wait_until_up, web_command
from tests.helpers import BASE_CONFIG

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {name for name, text in VARIABLES.items() if text.endswith("(required)")}
# What a stranger fills in by hand; every other variable has a default or may stay unset.
DUMMIES = {
    "SPOTIFY_CLIENT_ID": "dummy-client-id",
    "SPOTIFY_CLIENT_SECRET": "dummy-client-secret",
    "SPOTIFY_CLIENT_CALLBACK_URL": "myapp://callback",
}


# --- readers --------------------------------------------------------------------------------------


def app_json() -> dict:
    return json.loads((ROOT / "app.json").read_text())


def render_service() -> dict:
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    (service,) = blueprint["services"]
    return service


def env_example() -> list[tuple[str, str]]:
    pairs = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs.append((name.strip(), value.strip()))
    return pairs


def readme() -> str:
    return (ROOT / "README.md").read_text()


def readme_section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme(), re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def readme_config_table() -> dict[str, str]:
    """Rows of the README's configuration table: variable name -> description."""
    rows = {}
    for line in readme_section("Configuration").splitlines():
        match = re.fullmatch(r"\| `([A-Z_]+)` \| (.+?) \|", line.strip())
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is in the table twice"
            rows[match.group(1)] = match.group(2)
    return rows


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def docker_args(keyword: str) -> list[str]:
    return [args for kw, args in dockerfile() if kw == keyword]


def docker_copied_files() -> list[str]:
    sources = []
    for args in docker_args("COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        sources.extend(parts[:-1])
    return sources


def docker_env() -> dict[str, str]:
    env = {}
    for args in docker_args("ENV"):
        for pair in shlex.split(args):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def healthcheck_command() -> list[str]:
    (args,) = docker_args("HEALTHCHECK")
    return json.loads(args.split(" CMD ", 1)[1])


def local_imports(module: Path) -> set[str]:
    """Files of this repository that a module imports, directly or through other local modules."""
    seen, todo = set(), [module.name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for imported in names:
                path = imported.split(".")[0] + ".py"
                if (ROOT / path).is_file():
                    todo.append(path)
    return seen


def descriptor_environment(name: str) -> dict[str, str]:
    """The environment a descriptor gives the service when the stranger fills in only what is asked."""
    if name == "app.json":
        env = {}
        for key, spec in app_json()["env"].items():
            env[key] = generate_secret() if spec.get("generator") == "secret" else spec.get("value", "")
    elif name == "render.yaml":
        env = {}
        for spec in render_service()["envVars"]:
            if spec.get("generateValue"):
                env[spec["key"]] = generate_secret()
            elif "value" in spec:
                env[spec["key"]] = str(spec["value"])
    else:
        env = dict(env_example())
        env["ENCRYPTION_SECRET"] = env["ENCRYPTION_SECRET"] or generate_secret()
    for key, value in DUMMIES.items():
        env[key] = env.get(key) or value
    return env


# --- every descriptor names exactly the variables the config reads --------------------------------


def test_descriptors_are_checked_against_a_nonempty_variable_list():
    assert {"SPOTIFY_CLIENT_ID", "ENCRYPTION_SECRET", "RATE_LIMIT_FAILURES"} <= set(VARIABLES)
    assert REQUIRED == {
        "SPOTIFY_CLIENT_ID",
        "SPOTIFY_CLIENT_SECRET",
        "SPOTIFY_CLIENT_CALLBACK_URL",
        "ENCRYPTION_SECRET",
    }
    assert set(SERVER_VARIABLES) == {"PORT", "WEB_CONCURRENCY"}


class _Recording(dict):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: dict[str, str]):
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def __contains__(self, name):
        self.read.add(name)
        return super().__contains__(name)


def test_config_reads_exactly_the_listed_variables():
    """VARIABLES, which every descriptor is checked against, is what load_config really reads."""
    environ = _Recording({**DUMMIES, "ENCRYPTION_SECRET": generate_secret()})
    load_config(environ)
    # And the proxy variables requests reads, checked at start as it will read them (not the service's own).
    assert environ.read == set(VARIABLES) | set(DEV_VARIABLES) | set(PROXY_VARIABLES)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorn_conf_is_settings_computed_by_server_and_reads_exactly_the_server_variables(
        monkeypatch, tmp_path, log_format):
    """gunicorn.conf.py as gunicorn reads it (the one place the file itself is run): its settings are
    server.py's, its hooks server.py's, and it reads the application's variables and SERVER_VARIABLES."""
    import logs
    import server

    monkeypatch.chdir(tmp_path)  # away from a developer's .env, which would add its names
    environ = _Recording({**os.environ, **DUMMIES, "ENCRYPTION_SECRET": generate_secret(), "LOG_FORMAT": log_format})
    monkeypatch.setattr(os, "environ", environ)
    settings = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert environ.read - set(VARIABLES) - set(DEV_VARIABLES) - set(PROXY_VARIABLES) == set(SERVER_VARIABLES)
    config = load_config(environ)
    assert (settings["bind"], settings["workers"]) == (server.bind_address(environ), server.worker_count(environ))
    assert settings["graceful_timeout"] == settings["timeout"] == server.stop_seconds(config)
    assert settings["worker_connections"] == server.connections_per_worker()
    assert (settings["worker_class"], settings["logger_class"]) == ("server.Worker", "server.Logger")
    assert settings["access_log_format"] == server.ACCESS_LOG_FORMAT
    hooks = ("when_ready", "on_starting", "child_exit", "on_exit") + (("post_worker_init",) if log_format == "json" else ())
    assert {name: settings[name] for name in hooks} == {name: getattr(server, name) for name in hooks}
    assert ("post_worker_init" in settings, "logconfig_dict" in settings) == (log_format == "json",) * 2
    assert settings.get("logconfig_dict", logs.json_logconfig()) == logs.json_logconfig()


def test_app_json_names_exactly_the_variables():
    env = app_json()["env"]
    # PORT and WEB_CONCURRENCY are the platform's to set: Heroku sets both per dyno.
    assert set(env) == set(VARIABLES)


def test_render_yaml_names_exactly_the_variables():
    keys = [spec["key"] for spec in render_service()["envVars"]]
    assert len(keys) == len(set(keys)), "a variable is listed twice"
    # Render sets PORT; WEB_CONCURRENCY keeps gunicorn.conf.py's default.
    assert set(keys) == set(VARIABLES)


def test_env_example_names_exactly_the_variables():
    names = [name for name, _ in env_example()]
    assert len(names) == len(set(names)), "a variable is listed twice"
    # `flask run` reads .env and ignores PORT and WEB_CONCURRENCY, so the file leaves them out.
    assert set(names) == set(VARIABLES)


def test_readme_configuration_table_names_every_variable_with_its_description():
    table = readme_config_table()
    # The README documents everything an operator can set, the server's own variables included.
    assert table == {**VARIABLES, **SERVER_VARIABLES}


# --- what the descriptors preset --------------------------------------------------------------------


def test_app_json_requires_what_config_requires_and_generates_the_secret():
    manifest = app_json()
    for name, spec in manifest["env"].items():
        assert spec["required"] is (name in REQUIRED), name
        assert spec["description"].startswith(VARIABLES[name]), name
        assert isinstance(spec.get("value", ""), str), f"{name}: Heroku takes only string values"
    for name in REQUIRED - {"ENCRYPTION_SECRET"}:
        assert "value" not in manifest["env"][name], f"{name} has no sensible preset value"
    assert manifest["env"]["ENCRYPTION_SECRET"]["generator"] == "secret"
    assert "web" in manifest["formation"]
    assert {"url": "heroku/python"} in manifest["buildpacks"]


def test_render_yaml_generates_the_secret_and_prompts_for_the_others():
    service = render_service()
    specs = {spec["key"]: spec for spec in service["envVars"]}
    assert specs["ENCRYPTION_SECRET"] == {"key": "ENCRYPTION_SECRET", "generateValue": True}
    for name in ("SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "SPOTIFY_CLIENT_CALLBACK_URL", "LEGACY_ENCRYPTION_SECRET"):
        assert specs[name] == {"key": name, "sync": False}, f"{name} must be prompted for, not committed"
    for spec in specs.values():
        assert isinstance(spec.get("value", ""), str), f"{spec['key']}: quote it, Render takes strings"
    assert service["type"] == "web"
    assert service["runtime"] == "python"
    assert service["buildCommand"] == "pip install -r requirements.txt"
    assert service["healthCheckPath"] == "/health"


@pytest.mark.parametrize(
    "descriptor, trusted_proxies",
    [("app.json", 1), ("render.yaml", 1), (".env.example", 0)],
)
def test_descriptor_presets_load_to_the_documented_defaults(descriptor, trusted_proxies):
    env = descriptor_environment(descriptor)
    loaded = load_config(env)
    defaults = load_config({name: env[name] for name in REQUIRED})
    # Only the proxy count differs: Heroku's and Render's routers are one hop in front; and on Heroku, whose
    # router stops sending to a dyno it stops and whose 30 s grace period is fixed, no STOP_DELAY
    # (docs/operations.md, "Readiness and STOP_DELAY").
    stop_delay = 0 if descriptor == "app.json" else defaults.stop_delay
    assert loaded == dataclasses.replace(defaults, trusted_proxies=trusted_proxies, stop_delay=stop_delay)
    assert loaded.rate_limit_failures == "60/minute"


def test_generated_secrets_are_accepted():
    # Heroku's generator gives 64 hex characters, Render's a base64 256-bit value: neither has a comma.
    for secret in ("0123456789abcdef" * 4, "q83vEjRZqvwx2QoH6b9N1k1dDcmT0m4xk5GZ4Rw+/Ac="):
        assert load_config({**DUMMIES, "ENCRYPTION_SECRET": secret}).encryption_secrets == (secret,)


# --- one start command, one Python ----------------------------------------------------------------


def test_render_start_command_is_the_procfile_web_command():
    assert render_service()["startCommand"] == web_command()


def test_dockerfile_cmd_is_the_procfile_web_command_in_exec_form():
    (cmd,) = docker_args("CMD")
    assert json.loads(cmd) == shlex.split(web_command())
    assert not docker_args("ENTRYPOINT"), "CMD alone, so `docker run IMAGE flask --app app gen-secret` works"


def test_python_version_matches_the_dockerfile_base_image():
    version = (ROOT / ".python-version").read_text().strip()
    (base,) = docker_args("FROM")
    assert re.fullmatch(r"3\.\d+", version)
    assert base == f"python:{version}-slim"


def test_requirements_are_pinned():
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    pins = [line for line in lines if line]
    assert pins
    for pin in pins:
        assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[a-z0-9,_-]+\])?==[0-9][A-Za-z0-9.+!-]*", pin), pin


def test_dev_requirements_start_with_the_runtime_requirements():
    lines = [
        line.strip()
        for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "-r requirements.txt"
    for pin in lines[1:]:
        assert "==" in pin, pin


# --- the Dockerfile, read statically (there is no Docker engine here) -----------------------------


def test_dockerfile_runs_as_a_non_root_user():
    instructions = dockerfile()
    cmd_at = [kw for kw, _ in instructions].index("CMD")
    users = [args for kw, args in instructions[:cmd_at] if kw == "USER"]
    assert users, "no USER line: the service would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_installs_only_the_runtime_requirements_without_a_cache():
    runs = docker_args("RUN")
    installs = [run for run in runs if "pip install" in run]
    assert installs == ["pip install --no-cache-dir -r requirements.txt"]
    assert "requirements.txt" in docker_copied_files()
    assert "requirements-dev.txt" not in docker_copied_files()


def test_dockerfile_copies_every_module_the_service_imports_and_nothing_else():
    copied = set(docker_copied_files())
    needed = local_imports(ROOT / "app.py") | local_imports(ROOT / "gunicorn.conf.py")
    # Every module at the top of the tree is the service's.
    assert needed == {path.name for path in ROOT.glob("*.py")}
    # The landing page's files are read by Flask from these folders, not imported; api.py serves openapi.json.
    assert copied == needed | {"requirements.txt", "templates", "static", "openapi.json"}


def test_no_module_of_the_service_imports_tests_devtools_or_benchmarks():
    for module in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not [n for n in names if n.split(".")[0] in ("tests", "devtools", "bench")], module.name


def test_tests_do_not_import_benchmarks():
    for module in (ROOT / "tests").glob("*.py"):
        assert not re.search(r"^\s*(from|import) bench\b", module.read_text(), re.M), module.name


def test_dockerfile_defaults_port_to_8080_and_bakes_in_no_setting():
    env = docker_env()
    assert env["PORT"] == "8080"
    assert docker_args("EXPOSE") == ["8080"]
    assert docker_args("STOPSIGNAL") == ["SIGTERM"], "gunicorn stops gracefully on SIGTERM only"
    assert not set(env) & set(VARIABLES), "settings and secrets come from the platform, not the image"


def test_the_server_binds_the_port_it_is_given():
    import server

    # The Dockerfile's PORT is only a default: the platform's PORT reaches gunicorn.conf.py's bind.
    assert server.bind_address({"PORT": "9123"}) == "0.0.0.0:9123"
    assert server.bind_address({"PORT": " "}) == server.bind_address({}) == "0.0.0.0:8000"


def test_dockerignore_keeps_secrets_and_tests_out_and_the_service_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for path in (".env", ".env.local", ".git/config", ".venv/bin/python", "tests/conftest.py"):
        assert ignored(path), path
    for path in docker_copied_files():
        assert not ignored(path), f"{path} is copied but .dockerignore leaves it out of the context"


@pytest.mark.e2e
@pytest.mark.long(7)
def test_image_files_start_the_service_and_pass_the_healthcheck(tmp_path):
    """The files the Dockerfile copies, alone in a directory, run its CMD; its HEALTHCHECK sees /health."""
    for name in docker_copied_files():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tmp_path / name)
        else:
            shutil.copy(ROOT / name, tmp_path / name)
    port = free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        **docker_env(),
        **BASE_CONFIG,
        "PORT": str(port),
        # Stay on loopback; gunicorn.conf.py's own bind (0.0.0.0:$PORT) is checked above.
        "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port} --workers 1",
    }
    (cmd,) = docker_args("CMD")

    def healthcheck() -> int:
        return subprocess.run(healthcheck_command(), env=env, cwd=tmp_path, timeout=30).returncode

    log = tmp_path / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            json.loads(cmd), cwd=tmp_path, env=env, start_new_session=True,
            stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}", server), log.read_text(errors="replace")
        assert healthcheck() == 0
        # The landing page and its files, from the image's copies (Connection: close, so no keep-alive
        # connection holds a worker at SIGTERM).
        for path, text in (("/", "Spotify token swap"), ("/static/page.js", "code_verifier")):
            answer = requests.get(f"http://127.0.0.1:{port}{path}", headers={"Connection": "close"}, timeout=5)
            assert answer.status_code == 200 and text in answer.text, path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert healthcheck() != 0, "the healthcheck passed with nothing listening"


# --- the README tells the truth about commands and paths -----------------------------------------


def makefile_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_readme_test_command_is_the_one_ci_runs():
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # CI ends with `make test`, which runs pytest the README's way, in the virtualenv it installed.
    assert ci_lines[-1] == "make test"
    assert "$(VENV)/bin/python -m pytest" in makefile_recipe("test")
    assert any("requirements-dev.txt" in line for line in makefile_recipe("$(VENV)/.test-installed"))
    # The README's quick start shows `make test`.
    assert re.search(r"^\s*make test\s*(#.*)?$", readme(), re.M)


def test_readme_shows_the_procfile_web_command():
    assert web_command() in readme()


def test_readme_documents_every_route(app):
    paths = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert {"/swap", "/api/token", "/refresh", "/api/refresh_token", "/health", "/", "/callback"} <= paths
    # The README, or the docs/ it points to.
    text = "\n".join([readme(), *(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))])
    for path in paths:
        assert f"`POST {path}`" in text or f"`GET {path}`" in text, path
    # The README's API table itself lists every path of the API, each spelled whole.
    api = readme_section("API")
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api."):
            assert any(f"`{method} {rule.rule}`" in api for method in rule.methods or ()), rule.rule


def test_readme_connection_counts_are_the_servers():
    from server import MAX_CONNECTIONS_PER_WORKER, OTHER_OPEN_FILES

    floods = " ".join(readme_section("Under load and attack").split())
    workers = 2  # gunicorn.conf.py's default (WEB_CONCURRENCY)
    assert f"after {OTHER_OPEN_FILES} other files" in floods and f"at most {MAX_CONNECTIONS_PER_WORKER:,}" in floods
    assert f"limit of {workers * MAX_CONNECTIONS_PER_WORKER + OTHER_OPEN_FILES:,} or more" in floods
    assert f"one instance holds {workers * MAX_CONNECTIONS_PER_WORKER:,} idle" in floods



# --- README.md is a quick start, docs/ beside it, every link lands -------------------------------

DOCS = ROOT / "docs"
MAX_README_LINES = 250
# What a newcomer types to run the service: the development server, a make target, or the Procfile's command.
RUN_COMMAND = re.compile(r"^\s*(flask --app app run|make run)\b", re.M)
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A throughput, latency or CPU figure: those live in bench/README.md only.
PERFORMANCE_FIGURE = re.compile(
    r"\d[\d.,-]*\s*(?:req/s|requests?/s|refreshes/s|requests per second|µs|us\b|ms of CPU|MB per worker)"
    r"|\bp(?:50|90|99)\b",
    re.I,
)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]


def without_code_blocks(path: Path) -> str:
    """A Markdown file without its fenced and indented code blocks."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)


def prose(path: Path) -> str:
    """A Markdown file without any code: blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(path))


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        for title in re.findall(r"^#{1,6} (.+)$", without_code_blocks(path), re.M)
    }


def relative_links(path: Path) -> list[str]:
    return [target for target in MARKDOWN_LINK.findall(prose(path)) if not re.match(r"[a-z]+:", target)]


def test_readme_is_a_quick_start():
    lines = readme().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move the details to docs/"
    assert "## Quick start" in lines[:20]
    first_run = RUN_COMMAND.search(readme())
    assert first_run, "README.md shows no command that runs the service"
    line = readme()[: first_run.start()].count("\n") + 1
    assert line <= 40, f"a newcomer reads {line} lines before the command that runs the service"


def test_every_doc_is_linked_from_the_readme():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    docs = set(DOCS.glob("*.md"))
    assert docs, "docs/ is empty"
    for doc in docs:
        assert doc.resolve() in linked, f"{doc.name} is not linked from README.md"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{path.name} links to {target}: no such heading"


def test_relative_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [a](missing.md), [b](#title), [c](#nowhere), `[d](in-code.md)`.\n")
    assert relative_links(page) == ["missing.md", "#title", "#nowhere"]
    assert heading_anchors(page) == {"title"}
    assert heading_anchors(ROOT / "docs" / "operations.md") >= {"behind-a-proxy-trusted_proxies"}


def test_performance_figures_live_in_bench_readme_only():
    texts = {path: path.read_text() for path in markdown_files() if path.parent.name != "bench"}
    for module in sorted(ROOT.glob("*.py")):
        tokens = tokenize.generate_tokens(io.StringIO(module.read_text()).readline)
        comments = [token.string for token in tokens if token.type == tokenize.COMMENT]
        docstrings = [
            ast.get_docstring(node) or ""
            for node in ast.walk(ast.parse(module.read_text()))
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        texts[module] = "\n".join(comments + docstrings)
    assert PERFORMANCE_FIGURE.search("two reach 770-940 refreshes/s, 0.29 ms of CPU"), "the pattern finds figures"
    for path, text in texts.items():
        found = PERFORMANCE_FIGURE.search(text)
        assert not found, f"{path.relative_to(ROOT)}: {found.group(0)!r}; figures belong in bench/README.md"
    assert PERFORMANCE_FIGURE.search((ROOT / "bench" / "README.md").read_text())


def test_the_token_diagram_has_one_copy():
    border = re.compile(r"^\s*\+-+\+-+\+", re.M)
    places = [ROOT / "README.md", *DOCS.glob("*.md"), *ROOT.glob("*.py"), ROOT / "bench" / "README.md"]
    holders = [path.relative_to(ROOT).as_posix() for path in places if border.search(path.read_text())]
    assert holders == ["docs/token-format.md"]


def test_dependencies_table_names_each_direct_runtime_requirement():
    direct = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if not line.strip() and direct:
            break  # the pins below the first blank line are what these pull in
        if line.strip() and not line.startswith("#"):
            direct.append(line.split("==")[0].lower())
    decisions = (DOCS / "decisions.md").read_text()
    section = re.search(r"^## Dependencies\n(.*?)(?=^## |\Z)", decisions, re.M | re.S)
    assert section, "docs/decisions.md has no Dependencies section"
    header, *rows = re.findall(r"^\| ([a-z][a-z0-9-]*) \| .+ \|$", section.group(1), re.M)
    assert header == "package"
    assert sorted(rows) == sorted(direct)


# --- docs/token-format.md is the format crypto.py implements ---------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenFormat:
    """What docs/token-format.md says, parsed."""

    offsets: list[str]
    fields: list[str]
    version: int
    sizes: dict[str, int]
    derivations: dict[str, tuple[bytes, bytes, int]]  # name -> (salt, info, length)
    aad: list[str]
    max_chars: int
    example: tuple[int, int, int]  # plaintext characters -> bytes, characters
    plaintext_offsets: list[str]
    plaintext_fields: list[str]
    plaintext_sizes: dict[str, int]


def token_format() -> TokenFormat:
    text = (ROOT / "docs" / "token-format.md").read_text()
    lines = text.splitlines()

    def row(pattern: str) -> list[str]:
        (line,) = [line for line in lines if re.search(pattern, line)]
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    def diagram(label: str, names: str, cells: str) -> tuple[list[str], list[str], list[str], dict[str, int]]:
        """A diagram's offsets (the line starting with `label`), field names, cells and fixed sizes."""
        (offsets,) = [line.split()[len(label.split()):] for line in lines if line.strip().startswith(label + " ")]
        fields, values = row(names), row(cells)
        sizes = {
            name: int(match.group(1)) for name, value in zip(fields, values, strict=True)
            if (match := re.fullmatch(r"(\d+) bytes(, random|, big-endian)?", value))
        }
        return offsets, fields, values, sizes

    offsets, fields, values, sizes = diagram("offset", r"^\s*\|\s*version\s*\|", r"^\s*\|\s*0x[0-9a-f]{2}\s*\|")
    plaintext_offsets, plaintext_fields, _, plaintext_sizes = diagram(
        "plaintext offset", r"^\s*\|\s*signed in at\s*\|", r"^\s*\|\s*8 bytes, big-endian\s*\|"
    )
    derivations = {
        match[1]: (match[2].encode(), match[3].encode(), int(match[4]))
        for match in re.finditer(
            r'^\s*(key id|key)\s*= HKDF-SHA256\(secret, salt="([^"]+)", info="([^"]+)", (\d+) bytes\)$',
            text,
            re.M,
        )
    }
    aad = re.search(r"^\s*AAD\s*= (.+)$", text, re.M)
    max_chars = re.search(r"tokens are at\s+most (\d+) characters", text)
    example = re.search(r"A (\d+)-character Spotify refresh token seals to (\d+) bytes, (\d+) characters", text)
    assert aad and max_chars and example, "docs/token-format.md lost a line this test reads"
    return TokenFormat(
        offsets=offsets,
        fields=fields,
        version=int(values[0], 16),
        sizes=sizes,
        derivations=derivations,
        aad=aad.group(1).split(" || "),
        max_chars=int(max_chars.group(1)),
        example=tuple(int(n) for n in example.groups()),  # type: ignore[arg-type]  # a fixed-size tuple of the regex's groups
        plaintext_offsets=plaintext_offsets,
        plaintext_fields=plaintext_fields,
        plaintext_sizes=plaintext_sizes,
    )


def test_crypto_points_to_the_token_format_page_instead_of_a_copy():
    assert "docs/token-format.md" in crypto.__doc__
    assert not re.search(r"^\s*\+-+\+", crypto.__doc__, re.M), "the diagram lives in docs/token-format.md only"


def test_token_format_page_matches_the_constants_in_crypto():
    fmt = token_format()
    assert fmt.fields == ["version", "key id", "nonce", "ciphertext", "tag"]
    assert fmt.version == crypto.VERSION
    assert fmt.sizes == {"key id": crypto.KEY_ID_SIZE, "nonce": crypto.NONCE_SIZE, "tag": crypto.TAG_SIZE}
    assert fmt.offsets == [
        "0",
        "1",
        str(crypto.HEADER_SIZE),
        str(crypto.HEADER_SIZE + crypto.NONCE_SIZE),
        f"len-{crypto.TAG_SIZE}",
        "len",
    ]
    assert crypto.MIN_TOKEN_SIZE == crypto.HEADER_SIZE + crypto.NONCE_SIZE + crypto.TAG_SIZE
    assert set(fmt.derivations) == {"key", "key id"}
    assert fmt.derivations["key"][2] == 32, "AES-256"
    assert fmt.derivations["key id"][2] == crypto.KEY_ID_SIZE
    assert fmt.max_chars == crypto.MAX_TOKEN_CHARS
    assert fmt.plaintext_fields == ["signed in at", "grant id", "Spotify refresh token"]
    assert fmt.plaintext_sizes == {"signed in at": crypto.SIGNED_IN_SIZE, "grant id": crypto.GRANT_ID_SIZE}
    assert fmt.plaintext_offsets == ["0", str(crypto.SIGNED_IN_SIZE), str(crypto.GRANT_SIZE)]


def _documented_parts(fmt: TokenFormat, secret: str, client_id: str, version: int) -> tuple[bytes, bytes, bytes]:
    """(key, header, associated data) for a secret, derived only from what the page says."""
    key, kid = (
        HKDF(secret.encode("utf-8"), length, salt, SHA256, context=info)
        for salt, info, length in (fmt.derivations["key"], fmt.derivations["key id"])
    )
    parts = {"version": bytes([version]), "key id": kid, "Spotify client id (UTF-8)": client_id.encode("utf-8")}
    header = parts["version"] + parts["key id"]
    return key, header, b"".join(parts[name] for name in fmt.aad)


def _build_from_page(fmt: TokenFormat, key: bytes, header: bytes, aad: bytes, plaintext: bytes) -> str:
    nonce = bytes(range(fmt.sizes["nonce"]))
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=fmt.sizes["tag"])
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return base64.urlsafe_b64encode(header + nonce + ciphertext + tag).rstrip(b"=").decode("ascii")


def test_a_token_built_from_the_page_opens_and_a_sealed_token_reads_by_the_page():
    fmt = token_format()
    secret, client_id, refresh = "a documented secret, 32 chars ok", "documented-client", "AQ-refresh-token_é"
    key, header, aad = _documented_parts(fmt, secret, client_id, fmt.version)
    sealer = crypto.TokenSealer([secret], client_id)
    signed_in_at, grant = 1_780_000_000, bytes(range(100, 100 + fmt.plaintext_sizes["grant id"]))
    plaintext = signed_in_at.to_bytes(fmt.plaintext_sizes["signed in at"], "big") + grant + refresh.encode("utf-8")

    built = _build_from_page(fmt, key, header, aad, plaintext)
    assert sealer.open(built) == crypto.Opened(
        refresh, needs_reseal=False, signed_in_at=signed_in_at, grant_id=grant.hex()
    )

    sealed = sealer.seal(refresh, signed_in_at=signed_in_at, grant_id=grant.hex())
    data = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    body_at, tag_at = int(fmt.offsets[3]), len(data) - fmt.sizes["tag"]
    assert data[: int(fmt.offsets[2])] == header
    cipher = AES.new(key, AES.MODE_GCM, nonce=data[int(fmt.offsets[2]) : body_at], mac_len=fmt.sizes["tag"])
    cipher.update(aad)
    assert cipher.decrypt_and_verify(data[body_at:tag_at], data[tag_at:]) == plaintext


def test_a_version_1_token_built_from_the_page_opens_without_sign_in_time():
    fmt = token_format()
    secret, client_id, refresh = "a documented secret, 32 chars ok", "documented-client", "AQ-refresh-token_é"
    key, header, aad = _documented_parts(fmt, secret, client_id, 0x01)
    built = _build_from_page(fmt, key, header, aad, refresh.encode("utf-8"))
    assert crypto.TokenSealer([secret], client_id).open(built) == crypto.Opened(refresh, needs_reseal=True)


def test_token_format_page_example_length_is_true():
    characters, size, token_chars = token_format().example
    sealed = crypto.TokenSealer(["example secret, long enough"], "client").seal("A" * characters)
    assert len(sealed) == token_chars
    assert len(base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))) == size


def test_the_access_line_is_the_one_gunicorns_own_atoms_make():
    """server.Logger computes only the six atoms gunicorn.conf.py's line shows: the line must be exactly
    what gunicorn's full atoms() would make of the same request, so an upgrade that changes an atom shows."""
    from datetime import timedelta
    from types import SimpleNamespace

    from gunicorn import glogging
    from gunicorn.config import Config as GunicornConfig

    import server

    cfg = GunicornConfig()
    cfg.set("access_log_format", server.ACCESS_LOG_FORMAT)
    ours, stock = server.Logger(cfg), glogging.Logger(cfg)
    cases = [
        ("203.0.113.9", "POST", "/refresh", "200 OK", 187, timedelta(microseconds=93_999)),
        ("2001:db8::1", "GET", "/nope;token=x", "404 NOT FOUND", None, timedelta(seconds=2, microseconds=5)),
        ("-", "POST", "/x\n6.6.6.6 \"POST", "400 BAD REQUEST", 0, timedelta(0)),
    ]
    for address, method, path, status, sent, took in cases:
        environ = {"REMOTE_ADDR": address, "REQUEST_METHOD": method, "PATH_INFO": path, "RAW_URI": path,
                   "SERVER_PROTOCOL": "HTTP/1.1", "QUERY_STRING": "", "HTTP_USER_AGENT": "t"}
        resp = SimpleNamespace(status=status, sent=sent, headers=[("Content-Type", "application/json")])
        req = SimpleNamespace(headers=[("HOST", "x")])
        line = cfg.access_log_format % ours.atoms_wrapper_class(ours.atoms(resp, req, environ, took))
        full = glogging.Logger.atoms(ours, resp, req, environ, took)
        full["U"] = server.redacted(full["U"])
        assert line == cfg.access_log_format % ours.atoms_wrapper_class(full)
        assert "\n" not in line and "token=x" not in line
        assert line.startswith(address) or address == "-"
        assert stock.atoms(resp, req, environ, took)["U"] == path  # what the redaction is applied to
