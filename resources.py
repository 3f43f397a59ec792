"""What the views need, built once per process from the configuration: the config, the token sealer, the Spotify client."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app

import spotify
from config import Config
from crypto import LegacyCipher, Opened, Opener, SpotifyAPIServerCipher, TokenSealer, UnsealedTokens
from server import connections_per_worker


class Resources:
    """The configuration and the objects built from it, shared by every request of one process."""

    def __init__(self, config: Config, observer: spotify.Observer | None = None,
                 logger: logging.Logger | None = None, gate: spotify.Gate | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        # The wall clock (seconds since the epoch): sign-in times are stamped and lifetimes counted by it.
        self.clock = clock
        # Other formats open after this service's own, in this order.
        fallbacks: list[Opener] = []
        if config.legacy_secret:
            fallbacks.append(LegacyCipher(config.legacy_secret))
        if config.spotifyapiserver_secret:
            fallbacks.append(SpotifyAPIServerCipher(config.spotifyapiserver_secret))
        if config.unsealed_until is not None:
            fallbacks.append(UnsealedTokens(config.unsealed_until, clock))
        self.sealer = TokenSealer(config.encryption_secrets, config.client_id, fallbacks)
        self.spotify = spotify.AccountsClient(
            config.client_id,
            config.client_secret,
            config.accounts_url,
            config.timeout,
            # As many as a worker serves at once (gunicorn's worker_connections): every request
            # waiting on Spotify has a pooled connection of its own.
            pool_size=connections_per_worker(),
            observer=observer,  # metrics of each call, when they are on
            logger=logger,  # where a WARNING says why Spotify could not be reached
            gate=gate,  # the brake every call passes first
        )
        self.app_tokens = AppTokens()
        # The process's stop has begun (app.TokenSwap.begin_stop): no longer ready for more requests.
        self.stopping = False

    def now(self) -> int:
        """The time, in whole seconds since the epoch (UTC)."""
        return int(self.clock())

    def grant_ends_at(self, opened: Opened) -> int | None:
        """When the sign-in `opened` belongs to ends (seconds since the epoch), or None when its time is not
        known: signed_in_at + REFRESH_TOKEN_LIFETIME."""
        if opened.signed_in_at is None:
            return None
        return opened.signed_in_at + self.config.refresh_token_lifetime


class AppTokens:
    """The app-only token (client credentials grant) this process hands out, fetched once and kept until
    shortly before it expires: every app asking gets the same token, and Spotify is asked once per process
    per token, however many ask at once."""

    # A token with less than this many seconds left is fetched anew: a client then has time to use it.
    RENEW_BEFORE = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()  # gevent's, under the Procfile's workers: waiting requests yield
        self._token: dict[str, Any] | None = None
        self._expires_at = 0.0
        self._failed: tuple[spotify.SpotifyError, float] | None = None  # the last fetch's Spotify error, and when

    def get(self, fetch: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The token with `expires_in` the whole seconds it has left; `fetch` asks Spotify when there is none.

        Requests that waited while a fetch failed at Spotify get that error rather than each asking again.
        Any other failure (the fetching client refused by its own rate limit) is that request's alone: the
        next waiter fetches for itself.
        """
        asked_at = self._clock()
        with self._lock:
            if self._token is None or self._expires_at - self._clock() <= self.RENEW_BEFORE:
                if self._failed is not None and self._failed[1] >= asked_at:
                    raise self._failed[0]
                try:
                    token = fetch()
                except spotify.SpotifyError as err:
                    self._failed = (err, self._clock())
                    raise
                lifetime = token.get("expires_in")
                self._token = {k: v for k, v in token.items() if k != "refresh_token"}
                self._expires_at = self._clock() + (lifetime if isinstance(lifetime, int) else 3600)
            left = int(self._expires_at - self._clock())
            return {**self._token, "expires_in": max(0, left)}


def init_app(
    app: Flask, config: Config, observer: spotify.Observer | None = None, gate: spotify.Gate | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Build the resources of this app from `config`; `observer` sees every call to Spotify, `gate` lets it go;
    `clock` tells the time of day (tests move it)."""
    app.extensions["tokenswap"] = Resources(config, observer, app.logger, gate, clock)


def resources() -> Resources:
    """The current app's resources."""
    held: Resources = current_app.extensions["tokenswap"]
    return held
