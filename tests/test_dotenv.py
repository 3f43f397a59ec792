"""One configuration file for every way of starting: `flask run`, `make run` (devtools/run.py) and the Procfile's gunicorn
command all read .env, values with ";" included, and the environment wins over the file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import requests

import server
from config import generate_secret
from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET, FakeAccounts
from devtools.process import CLOSE, free_port, json_answer, wait_for, web_command
from tests.helpers import bare_environment, copy_of_the_service, started

pytestmark = pytest.mark.e2e  # starts real processes: `pytest -m 'not e2e'` leaves it out

ROOT = Path(__file__).resolve().parent.parent
# -- server.start_config, what gunicorn.conf.py starts from ------------------------------------------------------


@pytest.fixture
def environ(monkeypatch, tmp_path) -> dict[str, str]:
    """The process environment gunicorn.conf.py will see, with only the platform's variables; cwd has a .env."""
    monkeypatch.chdir(tmp_path)
    return {"PATH": os.environ["PATH"]}


def write_dotenv(directory: Path, text: str) -> None:
    (directory / ".env").write_text(text)


def test_the_server_reads_dotenv_from_the_working_directory(environ, tmp_path):
    secret = generate_secret()
    write_dotenv(tmp_path, f"""\
# a comment
SPOTIFY_CLIENT_ID={CLIENT_ID}
SPOTIFY_CLIENT_SECRET={CLIENT_SECRET}
SPOTIFY_CLIENT_CALLBACK_URL=spotify-ios-quick-start://spotify-login-callback,http://127.0.0.1:1234/callback
ENCRYPTION_SECRET={secret}
SPOTIFY_MAX_RATE=20/second;600/minute
RATE_LIMIT_FAILURES="30/minute;100/hour"
WEB_CONCURRENCY=3
""")
    config = server.start_config(environ)
    assert server.worker_count(environ) == 3
    assert environ["ENCRYPTION_SECRET"] == secret and config.encryption_secrets == (secret,)
    # The whole value, ";" and what follows included, quoted or not.
    assert environ["SPOTIFY_MAX_RATE"] == config.spotify_max_rate == "20/second;600/minute"
    assert environ["RATE_LIMIT_FAILURES"] == config.rate_limit_failures == "30/minute;100/hour"


def test_the_environment_wins_over_dotenv_even_when_empty(environ, tmp_path):
    write_dotenv(tmp_path, f"""\
SPOTIFY_CLIENT_ID={CLIENT_ID}
SPOTIFY_CLIENT_SECRET=from-the-file
SPOTIFY_CLIENT_CALLBACK_URL=myapp://callback
ENCRYPTION_SECRET={generate_secret()}
CORS_ORIGINS=https://from-the-file.example
""")
    environ.update(SPOTIFY_CLIENT_SECRET="from-the-platform", CORS_ORIGINS="")
    config = server.start_config(environ)
    assert environ["SPOTIFY_CLIENT_SECRET"] == config.client_secret == "from-the-platform"
    assert environ["CORS_ORIGINS"] == "" and config.cors_origins == ()  # set, though empty: as `flask run` has it


def test_the_server_still_refuses_a_bad_configuration_from_dotenv(environ, tmp_path, capsys):
    write_dotenv(tmp_path, "SPOTIFY_CLIENT_ID=x\nSPOTIFY_CLIENT_SECRET=y\nSPOTIFY_CLIENT_CALLBACK_URL=myapp://cb\n")
    with pytest.raises(SystemExit) as stopped:
        server.start_config(environ)
    assert stopped.value.code == 1
    assert "ENCRYPTION_SECRET is not set" in capsys.readouterr().err


def test_without_dotenv_only_the_environment_counts(environ):
    with pytest.raises(SystemExit):
        server.start_config(environ)
    assert "SPOTIFY_CLIENT_ID" not in environ


def test_a_bad_web_concurrency_stops_the_start_naming_it(capsys):
    with pytest.raises(SystemExit) as stopped:
        server.worker_count({"WEB_CONCURRENCY": "0"})
    assert stopped.value.code == 1 and "WEB_CONCURRENCY='0' must be a whole number" in capsys.readouterr().err


# -- the three commands, end to end --------------------------------------------------------------


def dotenv_with_limits(fake_url: str) -> str:
    # The second limit of each is the one a request can reach in a test: had the ";" cut the value, it
    # would not apply. One worker, so one process counts.
    return f"""\
SPOTIFY_CLIENT_ID={CLIENT_ID}
SPOTIFY_CLIENT_SECRET={CLIENT_SECRET}
SPOTIFY_CLIENT_CALLBACK_URL=myapp://callback
ENCRYPTION_SECRET={generate_secret()}
SPOTIFY_ACCOUNTS_URL={fake_url}
SPOTIFY_MAX_RATE=100/second;1/minute
RATE_LIMIT_FAILURES=100/hour;2/minute
WEB_CONCURRENCY=1
"""


def assert_dotenv_limits_apply(url: str) -> None:
    first = json_answer(requests.post(url + "/swap", data={"code": "first"}, headers=CLOSE, timeout=10))
    assert first["access_token"]
    # SPOTIFY_MAX_RATE's 1/minute: the second call to Spotify is over the ceiling.
    ceiling = requests.post(url + "/swap", data={"code": "second"}, headers=CLOSE, timeout=10)
    assert json_answer(ceiling, 503)["error"] == "temporarily_unavailable"
    # RATE_LIMIT_FAILURES's 2/minute: two mistakes, then refused.
    statuses = [requests.post(url + "/swap", data={}, headers=CLOSE, timeout=10).status_code for _ in range(3)]
    assert statuses == [400, 400, 429]


@pytest.mark.parametrize("way", ["flask run", "Procfile", "make run"])
@pytest.mark.long(4)
def test_every_way_of_starting_reads_the_same_dotenv(way, tmp_path):
    directory = copy_of_the_service(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    commands = {
        "flask run": ([sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(port)], {}),
        # As a platform runs it: its PORT; stay on loopback as devtools/process.py does.
        "Procfile": (["bash", "-c", "exec " + web_command()],
                     {"PORT": str(port), "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}"}),
        "make run": ([sys.executable, "-m", "devtools.run", "--port", str(port)], {}),
    }
    command, extra = commands[way]
    with FakeAccounts() as fake:
        write_dotenv(directory, dotenv_with_limits(fake.url))
        with started(command, directory, bare_environment(**extra), url) as output:
            assert_dotenv_limits_apply(url)
            # The swap went to the .env's accounts service, with the .env's client.
            grants = [r["form"]["grant_type"] for r in fake.requests]
            assert [r["form"]["code"] for r in fake.requests if "code" in r["form"]] == ["first"]
            if way == "make run":  # its banner comes once its own wait has seen the server up
                wait_for(lambda: "The token swap service is running" in output(), 30, "the banner")
    if way == "make run":
        # .env points at the stand-in, not Spotify: the banner says so, naming the variable.
        assert f"Not Spotify: the credentials in .env, with SPOTIFY_ACCOUNTS_URL={fake.url}" in output()
        # make run checked the credentials there first, with an app-only token request.
        assert grants[0] == "client_credentials"
    else:
        assert grants == ["authorization_code"]
