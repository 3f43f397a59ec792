"""URL settings that hold credentials: a storage URI that does not parse stops the start, and no
user name or password of any URL setting is ever shown."""

from __future__ import annotations

import json

import pytest
import responses

import check
from config import ConfigError, load_config
from devtools.process import run_until_exit
from devtools.redis import RedisServer
from logs import redacted_url
from tests.helpers import BASE_CONFIG, server_env
from tests.tools import require

PASSWORD = "pa55#w0rd"
SECRET_PARTS = ("pa55", "w0rd", "hunter2", "s3cret")


def config_problems(**settings: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config({**BASE_CONFIG, **settings})
    return caught.value.problems


@pytest.mark.parametrize(
    "uri",
    [
        "redis://:pa55#w0rd@127.0.0.1:6379",
        "redis://:pa55/w0rd@127.0.0.1:6379/0",
        "redis://:pa55?w0rd@127.0.0.1:6379",
        "rediss://user:pa55#w0rd@127.0.0.1:6380/0",
        "redis+unix://:pa55/w0rd@/run/redis.sock",
        "redis+sentinel://:pa55?w0rd@127.0.0.1:26379/mymaster",
        "redis+cluster://:pa55/w0rd@127.0.0.1:7000,127.0.0.1:7001",
    ],
)
def test_a_storage_uri_that_does_not_parse_stops_the_start_naming_the_variable_never_the_password(uri):
    [problem] = config_problems(RATE_LIMIT_STORAGE_URI=uri)
    assert "RATE_LIMIT_STORAGE_URI" in problem and "percent-encode" in problem and "%23" in problem
    assert not any(part in problem for part in SECRET_PARTS), problem


@pytest.mark.parametrize(
    "uri",
    [
        "redis://127.0.0.1:6379",
        "redis://localhost",
        "redis://:pa55%23word@127.0.0.1:6379/0",
        "redis://user:p@ss@127.0.0.1:6379/2",  # the last "@" ends the credentials
        "rediss://:s3cret@cache.example:6380/0",
        "redis+unix:///run/redis.sock?db=1",
        "redis+unix://:s3cret@/run/redis.sock",
        "redis+sentinel://:s3cret@127.0.0.1:26379,127.0.0.2:26379/mymaster",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
    ],
)
def test_storage_uris_that_parse_are_accepted(uri):
    assert load_config({**BASE_CONFIG, "RATE_LIMIT_STORAGE_URI": uri}).rate_limit_storage_uri == uri


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:hunter2@proxy.example:3128/accounts", "http://proxy.example:3128/accounts"),
        ("redis://:pa55#w0rd@host:6379", "redis://host:6379"),
        ("redis://:pa55/w0rd@host:6379/0", "redis://host:6379/0"),
        ("redis://:pa55?w0rd@host:6379/0", "redis://host:6379/0"),
        ("https://accounts.spotify.com", "https://accounts.spotify.com"),
        ("https://api.example/v1?key=s3cret#frag", "https://api.example/v1"),
        ("redis+unix://:s3cret@/run/redis.sock?db=0", "redis+unix:///run/redis.sock"),
        ("hunter2", "(not a URL)"),
    ],
)
def test_redacted_url_drops_every_credential(url, shown):
    assert redacted_url(url) == shown


def test_a_bad_url_setting_is_named_without_its_credentials():
    problems = config_problems(SPOTIFY_ACCOUNTS_URL="ftp://user:hunter2@proxy.example/", SPOTIFY_API_URL="s3cret")
    assert any("SPOTIFY_ACCOUNTS_URL" in p and "ftp://proxy.example/" in p for p in problems)
    assert any("SPOTIFY_API_URL" in p for p in problems)
    assert not any(part in p for p in problems for part in SECRET_PARTS), problems


def test_check_shows_url_settings_without_their_credentials():
    environ = {
        **BASE_CONFIG,
        "SPOTIFY_ACCOUNTS_URL": "http://user:hunter2@127.0.0.1:9",
        "RATE_LIMIT_STORAGE_URI": "redis://:s3cret@127.0.0.1:1/0",
    }
    lines: list[str] = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as spotify:
        spotify.post("http://127.0.0.1:9/api/token", json={"access_token": "app-token", "token_type": "Bearer"})
        assert not check.report(environ, lines.append)  # the storage does not answer
    output = "\n".join(lines)
    assert "at http://127.0.0.1:9/api/token" in output
    assert "redis://127.0.0.1:1/0" in output and "RATE_LIMIT_STORAGE_URI" in output
    assert not any(part in output for part in SECRET_PARTS), output


def test_check_stops_at_a_storage_uri_that_does_not_parse():
    lines: list[str] = []
    assert not check.report({**BASE_CONFIG, "RATE_LIMIT_STORAGE_URI": f"redis://:{PASSWORD}@127.0.0.1:6379"}, lines.append)
    [failure] = lines
    assert failure.startswith("FAIL") and "RATE_LIMIT_STORAGE_URI" in failure
    assert "pa55" not in failure and "w0rd" not in failure


# -- every URL setting checked at start by the parser that will use it (issue 22) ----------------------

# The operator's forms: a port out of range, a password with an unencoded "/", "#" or "?", a doubled port.
FORMS = [
    "http://user:PWSECRET@127.0.0.1:99999",
    "http://user:PW/SECRET@127.0.0.1:8080",
    "http://user:PW#SECRET@127.0.0.1:8080",
    "http://user:PW?SECRET@127.0.0.1:8080",
    "http://user:PWSECRET@127.0.0.1:8080:8080",
]


def check_output(**settings: str) -> list[str]:
    lines: list[str] = []
    assert check.report({**BASE_CONFIG, **settings}, lines.append) is False
    return lines


@pytest.mark.parametrize("url", FORMS)
def test_each_form_stops_check_naming_the_variable_and_no_credential(url):
    [line] = check_output(SPOTIFY_ACCOUNTS_URL=url)
    assert line.startswith("FAIL configuration: SPOTIFY_ACCOUNTS_URL=") and "cannot be used" in line
    assert "PW" not in line and "SECRET" not in line


@pytest.mark.parametrize("name, value", [
    ("SPOTIFY_API_URL", "https://user:PWSECRET@api.example:8443:8443"),
    ("HTTPS_PROXY", "http://user:PW/SECRET@127.0.0.1:3128"),
    ("http_proxy", "user:PWSECRET@127.0.0.1:99999"),  # no scheme: requests reads it as http://
    ("ALL_PROXY", "ftp://user:PWSECRET@127.0.0.1:21"),
    ("RATE_LIMIT_STORAGE_URI", "redis://:PWSECRET@127.0.0.1:6379:6379/0"),
    ("CORS_ORIGINS", "https://user:PWSECRET@app.example"),
    ("SPOTIFY_CLIENT_CALLBACK_URL", "https://user:PWSECRET@app.example/callback"),
    ("SPOTIFY_CLIENT_CALLBACK_URL", "https://app.example:99999/callback"),
])
def test_every_url_setting_is_checked_as_it_will_be_used(name, value):
    [line] = check_output(**{name: value})
    assert line.startswith(f"FAIL configuration: {name}") and "SECRET" not in line, line


def test_urls_the_parsers_accept_pass():
    config = load_config({
        **BASE_CONFIG, "SPOTIFY_ACCOUNTS_URL": "http://user:pa%2Fss@127.0.0.1:8080", "HTTPS_PROXY": "127.0.0.1:3128",
        "CORS_ORIGINS": "https://app.example,http://127.0.0.1:8080", "RATE_LIMIT_STORAGE_URI": "redis://:p%23w@h:6379/1",
    })
    assert config.cors_origins == ("https://app.example", "http://127.0.0.1:8080")


@pytest.mark.e2e
def test_a_real_start_with_a_bad_url_stops_with_one_json_line_naming_it_and_no_credential():
    code, output = run_until_exit(server_env("http://user:PWSECRET@127.0.0.1:99999", LOG_FORMAT="json"))
    assert code != 0 and "PWSECRET" not in output, output
    [line] = [json.loads(line) for line in output.splitlines() if line.strip()]  # one line, and JSON
    assert line["level"] == "ERROR" and "SPOTIFY_ACCOUNTS_URL" in line["message"]
    assert line["message"].endswith("The service did not start.")


@pytest.mark.e2e
def test_check_names_a_redis_authentication_failure_as_such():
    require("redis-server")
    with RedisServer("--requirepass", "right-PWSECRET") as server:
        for given in (f"redis://:wrong-PWSECRET@127.0.0.1:{server.port}/0", server.url):  # wrong, and none
            lines: list[str] = []
            check.report({**BASE_CONFIG, "RATE_LIMIT_STORAGE_URI": given}, lines.append)
            [line] = [line for line in lines if line[5:].startswith("rate-limit storage")]
            assert line.startswith("FAIL") and "Redis authentication failed" in line and "RATE_LIMIT_STORAGE_URI" in line
            assert "PWSECRET" not in line
