"""The start-up warning for memory:// storage with several workers: every count it multiplies, with its value."""

from __future__ import annotations

import dataclasses

from config import Config
from ratelimit import memory_storage_warning

CONFIG = Config(
    client_id="id",
    client_secret="secret",
    callback_urls=("myapp://callback",),
    encryption_secrets=("a-secret-0123456789abcdef",),
)


def config(**changes: object) -> Config:
    return dataclasses.replace(CONFIG, **changes)  # type: ignore[arg-type]  # the fields' own types, by name


def test_every_count_memory_storage_multiplies_is_named_with_its_effective_value() -> None:
    warning = memory_storage_warning(config(spotify_max_rate="20/second;600/minute"), 2)
    assert warning == (
        "RATE_LIMIT_STORAGE_URI is memory://: each of the 2 workers counts on its own, so on each instance "
        "a client's failure budget up to 2 x RATE_LIMIT_FAILURES (60 per minute) = 120 per minute, "
        "a token's refreshes up to 2 x RATE_LIMIT_PER_TOKEN (5 per minute) = 10 per minute "
        "and the calls to Spotify up to 2 x SPOTIFY_MAX_RATE (20 per second, 600 per minute) = 40 per second, "
        "1200 per minute. Set RATE_LIMIT_STORAGE_URI to a Redis URL to count them once."
    )
    assert ";" not in warning  # gunicorn's logger would cut the line there


def test_only_the_limits_that_are_on_are_named() -> None:
    warning = memory_storage_warning(config(rate_limit_failures=None), 3)
    assert warning is not None
    assert "RATE_LIMIT_FAILURES" not in warning and "SPOTIFY_MAX_RATE" not in warning
    assert "a token's refreshes up to 3 x RATE_LIMIT_PER_TOKEN (5 per minute) = 15 per minute." in warning
    windows = memory_storage_warning(config(rate_limit_failures="5/second;100 per 2 hours", rate_limit_per_token=None), 3)
    assert windows is not None
    assert "up to 3 x RATE_LIMIT_FAILURES (5 per second, 100 per 2 hours) = 15 per second, 300 per 2 hours." in windows


def test_no_warning_when_counted_once_or_not_at_all() -> None:
    assert memory_storage_warning(CONFIG, 1) is None
    assert memory_storage_warning(config(rate_limit_storage_uri="redis://127.0.0.1:6379"), 4) is None
    assert memory_storage_warning(config(rate_limit_failures=None, rate_limit_per_token=None), 4) is None
