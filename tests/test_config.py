"""Tests of configuration: what the factory refuses, what it defaults, how it parses lists."""

from __future__ import annotations

import dataclasses
import os
from datetime import date
from unittest import mock

import pytest

from app import create_app
from config import Config, ConfigError, load_config
from tests.helpers import BASE_CONFIG

REQUIRED = (
    "SPOTIFY_CLIENT_ID",
    "SPOTIFY_CLIENT_SECRET",
    "SPOTIFY_CLIENT_CALLBACK_URL",
    "ENCRYPTION_SECRET",
)
MINIMAL = {name: BASE_CONFIG[name] for name in REQUIRED}


def config_error(**environ: str) -> ConfigError:
    """The ConfigError the factory raises for this environment (fails the test if there is none)."""
    with mock.patch.dict(os.environ, environ), pytest.raises(ConfigError) as caught:
        create_app()
    return caught.value


@pytest.mark.parametrize("missing", REQUIRED)
def test_each_required_variable_missing_is_named(missing):
    environ = {name: value for name, value in MINIMAL.items() if name != missing}
    err = config_error(**environ)
    assert missing in str(err)
    assert len(err.problems) == 1
    for present in set(REQUIRED) - {missing}:
        assert present not in str(err)


@pytest.mark.parametrize("missing", REQUIRED)
def test_blank_required_variable_counts_as_missing(missing):
    err = config_error(**{**MINIMAL, missing: "   "})
    assert f"{missing} is not set" in str(err)


@pytest.mark.parametrize("name", ["SPOTIFY_CLIENT_CALLBACK_URL", "ENCRYPTION_SECRET"])
@pytest.mark.parametrize("value", [",", " , ", ",,,"])
def test_list_of_nothing_but_commas_is_refused_by_name(name, value):
    err = config_error(**{**MINIMAL, name: value})
    assert len(err.problems) == 1
    assert err.problems[0].startswith(f"{name} lists no ")


def test_every_missing_variable_is_named_at_once():
    err = config_error()
    message = str(err)
    for name in REQUIRED:
        assert name in message
    assert len(err.problems) == len(REQUIRED)


def test_missing_secret_says_how_to_generate_one():
    environ = {name: value for name, value in MINIMAL.items() if name != "ENCRYPTION_SECRET"}
    assert "flask --app app gen-secret" in str(config_error(**environ))


def test_short_secret_says_run_gen_secret_and_does_not_echo_it():
    err = config_error(**{**MINIMAL, "ENCRYPTION_SECRET": "too-short-123"})
    message = str(err)
    assert "ENCRYPTION_SECRET" in message
    assert "flask --app app gen-secret" in message
    assert "16" in message
    assert "too-short-123" not in message


def test_short_secret_anywhere_in_the_list_is_refused():
    err = config_error(**{**MINIMAL, "ENCRYPTION_SECRET": "a" * 32 + ",short"})
    assert "entry 2" in str(err)
    assert "flask --app app gen-secret" in str(err)


def test_duplicate_secret_is_refused():
    secret = "d" * 32
    err = config_error(**{**MINIMAL, "ENCRYPTION_SECRET": f"{secret},{secret}"})
    assert "ENCRYPTION_SECRET" in str(err)
    assert secret not in str(err)


def test_callback_without_scheme_is_refused():
    err = config_error(**{**MINIMAL, "SPOTIFY_CLIENT_CALLBACK_URL": "myapp://ok,not-a-uri"})
    assert "SPOTIFY_CLIENT_CALLBACK_URL" in str(err)
    assert "not-a-uri" in str(err)


@pytest.mark.parametrize(
    "name, value",
    [
        ("SPOTIFY_TIMEOUT", "ten"),
        ("SPOTIFY_TIMEOUT", "0"),
        ("SPOTIFY_TIMEOUT", "-1"),
        ("SPOTIFY_TIMEOUT", "301"),
        ("SPOTIFY_TIMEOUT", "nan"),
        ("SPOTIFY_TIMEOUT", "inf"),
        ("TRUSTED_PROXIES", "-1"),
        ("TRUSTED_PROXIES", "one"),
        ("TRUSTED_PROXIES", "1.5"),
        ("CORS_ORIGINS", "example.com"),
        ("CORS_ORIGINS", "https://example.com/app"),
        ("CORS_ORIGINS", "https://ok.example,ftp://files.example"),
        ("RATE_LIMIT_FAILURES", "lots"),
        ("RATE_LIMIT_FAILURES", "60/fortnight"),
        ("SPOTIFY_MAX_RATE", "fast"),
        ("SPOTIFY_ACCOUNTS_URL", "accounts.spotify.com"),
        ("SPOTIFY_ACCOUNTS_URL", "ftp://accounts.spotify.com"),
        ("SPOTIFY_ACCOUNTS_URL", "https://"),
        ("SPOTIFY_API_URL", "api.spotify.com"),
        ("SPOTIFY_API_URL", "wss://api.spotify.com"),
        ("RATE_LIMIT_STORAGE_URI", "mysql://db/limits"),
        ("REFRESH_TOKEN_LIFETIME", "0"),
        ("REFRESH_TOKEN_LIFETIME", "6m"),  # months or minutes? neither: a unit nobody can misread
        ("REFRESH_TOKEN_LIFETIME", "1.5d"),
        ("REFRESH_TOKEN_LIFETIME", "-5s"),
        ("REFRESH_TOKEN_LIFETIME", "six months"),
        ("UNSEALED_TOKENS_UNTIL", "2027-02-30"),
        ("UNSEALED_TOKENS_UNTIL", "30/06/2027"),
        ("UNSEALED_TOKENS_UNTIL", "20270630"),
        ("STOP_DELAY", "-1"),
        ("STOP_DELAY", "121"),
        ("STOP_DELAY", "soon"),
        ("STOP_DELAY", "nan"),
    ],
)
def test_invalid_optional_value_is_refused_by_name(name, value):
    err = config_error(**{**MINIMAL, name: value})
    assert len(err.problems) == 1
    assert name in err.problems[0]


def test_every_problem_is_reported_together():
    err = config_error(
        SPOTIFY_CLIENT_SECRET="s",
        SPOTIFY_CLIENT_CALLBACK_URL="myapp://callback",
        ENCRYPTION_SECRET="e" * 32,
        SPOTIFY_TIMEOUT="soon",
        TRUSTED_PROXIES="many",
        CORS_ORIGINS="nowhere",
    )
    message = str(err)
    for name in ("SPOTIFY_CLIENT_ID", "SPOTIFY_TIMEOUT", "TRUSTED_PROXIES", "CORS_ORIGINS"):
        assert name in message
    assert len(err.problems) == 4


def test_factory_reads_the_process_environment(monkeypatch):
    for name, value in MINIMAL.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SPOTIFY_TIMEOUT", "7")
    app = create_app()
    assert app.extensions["tokenswap"].config.timeout == 7.0


def test_a_config_given_to_the_factory_wins_over_the_environment(monkeypatch):
    for name, value in MINIMAL.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SPOTIFY_TIMEOUT", "7")
    app = create_app(load_config({**MINIMAL, "SPOTIFY_TIMEOUT": "3"}))
    assert app.extensions["tokenswap"].config.timeout == 3.0


def test_defaults():
    config = load_config(MINIMAL)
    assert config.accounts_url == "https://accounts.spotify.com"
    assert config.api_url == "https://api.spotify.com"
    assert config.timeout == 10
    assert config.rate_limit_failures == "60/minute"
    assert config.rate_limit_storage_uri == "memory://"
    assert config.spotify_max_rate is None
    assert config.legacy_secret is None
    assert config.cors_origins == ()
    assert config.trusted_proxies == 0
    assert config.refresh_token_lifetime == 184 * 86400  # the longest six calendar months
    assert config.unsealed_until is None and config.spotifyapiserver_secret is None
    assert config.stop_delay == 5


def test_blank_optional_values_mean_their_defaults():
    blank = {
        name: ""
        for name in (
            "LEGACY_ENCRYPTION_SECRET",
            "SPOTIFY_ACCOUNTS_URL",
            "SPOTIFY_API_URL",
            "SPOTIFY_TIMEOUT",
            "CORS_ORIGINS",
            "TRUSTED_PROXIES",
            "RATE_LIMIT_FAILURES",
            "SPOTIFY_MAX_RATE",
            "RATE_LIMIT_STORAGE_URI",
            "SPOTIFYAPISERVER_SECRET_KEY",
            "UNSEALED_TOKENS_UNTIL",
            "REFRESH_TOKEN_LIFETIME",
            "STOP_DELAY",
        )
    }
    assert load_config({**MINIMAL, **blank}) == load_config(MINIMAL)
    assert load_config({**MINIMAL, "LEGACY_ENCRYPTION_SECRET": "  \t "}).legacy_secret is None


def test_legacy_secret_is_used_exactly_as_given():
    """It is the old service's secret, surrounding spaces included: not ours to tidy up."""
    assert load_config({**MINIMAL, "LEGACY_ENCRYPTION_SECRET": " old "}).legacy_secret == " old "


def test_comma_separated_lists_are_parsed():
    config = load_config(
        {
            **MINIMAL,
            "SPOTIFY_CLIENT_CALLBACK_URL": " myapp://callback , https://example.com/cb,",
            "ENCRYPTION_SECRET": "new-secret-0123456789, old-secret-0123456789",
            "CORS_ORIGINS": "https://a.example,http://localhost:3000 ",
        }
    )
    assert config.callback_urls == ("myapp://callback", "https://example.com/cb")
    assert config.encryption_secrets == ("new-secret-0123456789", "old-secret-0123456789")
    assert config.cors_origins == ("https://a.example", "http://localhost:3000")


def test_values_are_parsed():
    config = load_config(
        {
            **MINIMAL,
            "SPOTIFY_ACCOUNTS_URL": "http://127.0.0.1:8080/",
            "SPOTIFY_API_URL": "http://127.0.0.1:8081/",
            "SPOTIFY_TIMEOUT": "2.5",
            "TRUSTED_PROXIES": "2",
            "CORS_ORIGINS": "*",
            "RATE_LIMIT_FAILURES": "10 per second",
            "SPOTIFY_MAX_RATE": "50/second",
            "RATE_LIMIT_STORAGE_URI": "redis://127.0.0.1:6379",
            "LEGACY_ENCRYPTION_SECRET": "old",
            "STOP_DELAY": "0",
        }
    )
    assert config.stop_delay == 0
    assert config.accounts_url == "http://127.0.0.1:8080"
    assert config.api_url == "http://127.0.0.1:8081"
    assert config.timeout == 2.5
    assert config.trusted_proxies == 2
    assert config.cors_origins == ("*",)
    assert config.rate_limit_failures == "10 per second"
    assert config.spotify_max_rate == "50/second"
    assert config.rate_limit_storage_uri == "redis://127.0.0.1:6379"
    # The legacy secret is the old service's, whatever its length.
    assert config.legacy_secret == "old"


@pytest.mark.parametrize(
    "value, seconds", [("90", 90), ("90s", 90), ("12h", 43200), ("183d", 183 * 86400), (" 5 S ", 5)]
)
def test_refresh_token_lifetime_takes_seconds_or_a_unit(value, seconds):
    assert load_config({**MINIMAL, "REFRESH_TOKEN_LIFETIME": value}).refresh_token_lifetime == seconds


def test_unsealed_until_and_spotifyapiserver_secret_are_read():
    config = load_config({**MINIMAL, "UNSEALED_TOKENS_UNTIL": "2027-06-30", "SPOTIFYAPISERVER_SECRET_KEY": " k "})
    assert config.unsealed_until == date(2027, 6, 30)
    assert config.spotifyapiserver_secret == " k "  # its SECRET_KEY as the Swift server read it


@pytest.mark.parametrize("value", ["0", "off", "OFF", "none", "false"])
def test_failure_limit_can_be_disabled(value):
    assert load_config({**MINIMAL, "RATE_LIMIT_FAILURES": value}).rate_limit_failures is None


def test_config_is_immutable():
    config = load_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timeout = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.encryption_secrets = ("x" * 32,)
    assert isinstance(config.callback_urls, tuple)
    assert isinstance(config.encryption_secrets, tuple)
    assert isinstance(config, Config)


def test_load_config_defaults_to_the_process_environment(monkeypatch):
    for name, value in MINIMAL.items():
        monkeypatch.setenv(name, value)
    assert load_config().client_id == MINIMAL["SPOTIFY_CLIENT_ID"]
