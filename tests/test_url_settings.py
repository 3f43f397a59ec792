"""URL settings that hold credentials: a storage URI that does not parse stops the start, and no
user name or password of any URL setting is ever shown."""

from __future__ import annotations

import pytest
import responses

import check
from config import ConfigError, load_config
from logs import redacted_url
from tests.helpers import BASE_CONFIG

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
