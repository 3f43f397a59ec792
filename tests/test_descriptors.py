"""Deploy descriptors agree with the code: the variables they name, the command they start, the Python they use."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fnmatch
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

import crypto
from config import SERVER_VARIABLES, VARIABLES, generate_secret, load_config
from tests.conftest import BASE_CONFIG
from tests.server import free_port, web_command

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

    def get(self, name, default=None):  # type: ignore[override]
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
    assert environ.read == set(VARIABLES)


def test_gunicorn_config_reads_exactly_the_server_variables(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # away from a developer's .env, which would add its names
    environ = _Recording({**os.environ, **DUMMIES, "ENCRYPTION_SECRET": generate_secret()})
    monkeypatch.setattr(os, "environ", environ)
    runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert environ.read - set(VARIABLES) == set(SERVER_VARIABLES)


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
    # Only the proxy count differs: Heroku's and Render's routers are one hop in front.
    assert loaded == dataclasses.replace(defaults, trusted_proxies=trusted_proxies)
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
    assert needed == {"app.py", "config.py", "crypto.py", "page.py", "ratelimit.py", "spotify.py", "gunicorn.conf.py"}
    # The landing page's files are read by Flask from these folders, not imported.
    assert copied == needed | {"requirements.txt", "templates", "static"}


def test_dockerfile_defaults_port_to_8080_and_bakes_in_no_setting():
    env = docker_env()
    assert env["PORT"] == "8080"
    assert docker_args("EXPOSE") == ["8080"]
    assert docker_args("STOPSIGNAL") == ["SIGTERM"], "gunicorn stops gracefully on SIGTERM only"
    assert not set(env) & set(VARIABLES), "settings and secrets come from the platform, not the image"


def test_gunicorn_config_binds_the_port_it_is_given(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a developer's .env would leave its values in this process's environment
    # The Dockerfile's PORT is only a default: the platform's PORT reaches gunicorn.conf.py.
    for name, value in {**DUMMIES, "ENCRYPTION_SECRET": generate_secret(), "PORT": "9123"}.items():
        monkeypatch.setenv(name, value)
    settings = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert settings["bind"] == "0.0.0.0:9123"


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
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log.read_text(errors="replace")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the service did not answer /health"
            time.sleep(0.1)
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
    # The README shows `make test`, or (until its quick start) the two commands it runs.
    text = readme()
    assert re.search(r"^\s*make test\s*$", text, re.M) or (
        re.search(r"^\s*python -m pytest\s*$", text, re.M)
        and re.search(r"^\s*pip install -r requirements-dev\.txt\s*$", text, re.M)
    )


def test_readme_shows_the_procfile_web_command():
    assert web_command() in readme()


def test_readme_documents_every_route(app):
    paths = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert {"/swap", "/api/token", "/refresh", "/api/refresh_token", "/health", "/", "/callback"} <= paths
    # The README, or the docs/ it points to.
    text = "\n".join([readme(), *(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))])
    for path in paths:
        assert f"`POST {path}`" in text or f"`GET {path}`" in text, path


def test_readme_token_diagram_is_the_one_in_crypto():
    lines = crypto.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("offset 0"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("AAD"))
    diagram = "\n".join(lines[start : end + 1])
    assert "+---------+" in diagram
    assert diagram in readme()
