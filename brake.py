"""The brake on calls to Spotify: when Spotify says wait, or answers badly, no call goes to it until then.

Spotify counts an app's calls together, whatever their grant, so one brake holds them all. It engages
- at once, for as long as Spotify says, on a 429 or 503 with Retry-After (a 429 without one: as below);
- after BAD_IN_A_ROW bad answers in a row (5xx, an answer that cannot be read, Spotify refusing the
  service's own credentials or an app-only token), for FIRST_PAUSE seconds, doubled for each further bad
  answer up to LONGEST_PAUSE; one good answer ends the series.
Once its time has passed, one call goes to see whether Spotify is back (the others are held for a second
meanwhile): a good answer releases the brake, a bad one engages it again. With a shared storage (Redis)
the time is shared with every instance; each process still sends its own call to see.
Clients are told `spotify.Braked` (429 or 503 with the seconds left); docs/operations.md says it for
operators. It knows nothing of Flask but `init_app`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from flask import Flask
from limits.storage import Storage

import spotify
from config import Config
from limitstore import storage_for
from logs import Throttle

BAD_IN_A_ROW = 2
FIRST_PAUSE = 2.0
LONGEST_PAUSE = 60.0
# The longest Retry-After obeyed: a day (a value beyond is a mistake, not a plan).
LONGEST_WAIT = 24 * 3600
# The key in the shared storage: its count is the status clients get, its expiry the brake's end.
SHARED_KEY = "tokenswap-brake"
# How long a read of the shared storage is trusted: one read serves a burst of calls.
SHARED_READ_SECONDS = 0.05
# What is said while the first call after a pause is out to see whether Spotify is back.
PROBE_WAIT = 1


class Brake:
    """The spotify.Gate every call to Spotify passes (see the module's docstring). `clock` is the wall
    clock (a shared storage's expiry is one); `storage`, when given, is shared with other instances."""

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
        throttle: Throttle | None = None,
    ):
        self._storage = storage
        self._clock = clock
        self._log = logger
        self._throttle = throttle or Throttle()
        self._lock = threading.Lock()
        self._until = 0.0  # no call before this time
        self._status = 503
        self._cause: spotify.SpotifyError | None = None  # the answer that engaged it, in this process
        self._engaged = False  # until a good answer releases it
        self._bad = 0  # bad answers in a row, in this process
        self._probing = False  # the one call out to see whether Spotify is back
        self._read_at = -math.inf
        self._shared: tuple[float, int] = (0.0, 503)

    def check(self) -> None:
        """Raise spotify.Braked when no call may go to Spotify now."""
        now = self._clock()
        with self._lock:
            local = now < self._until
        if not local:
            until, status = self._read_shared(now)
            with self._lock:
                if until > self._until:
                    self._until, self._status, self._engaged, self._cause = until, status, True, None
        with self._lock:
            if now < self._until:
                raise spotify.Braked(math.ceil(self._until - now), self._status, self._cause)
            if self._engaged:
                if self._probing:
                    raise spotify.Braked(PROBE_WAIT, self._status, self._cause)
                self._probing = True

    def answered(self, grant: str, err: spotify.SpotifyError | None) -> None:
        """What Spotify answered to a call this brake let go."""
        now = self._clock()
        wait = _wait_said(err)
        if wait is not None:
            self._engage(now, *wait, err, "Spotify said to wait")
            return
        if _bad(grant, err):
            with self._lock:
                self._probing = False
                self._bad += 1
                bad, engaged = self._bad, self._engaged
            if bad >= BAD_IN_A_ROW or engaged:
                pause = min(LONGEST_PAUSE, FIRST_PAUSE * 2 ** max(0, bad - BAD_IN_A_ROW))
                status = 429 if isinstance(err, spotify.RateLimited) else 503
                self._engage(now, pause, status, err, f"{bad} bad answers in a row (the last: {err})")
            return
        with self._lock:
            self._probing = False
            if isinstance(err, (spotify.Unreachable, spotify.TimedOut)):
                return  # no answer at all: neither good nor bad (the log says why)
            self._bad = 0
            released = self._engaged and now >= self._until
            if released:
                self._engaged = False
        if released and self._log is not None and self._throttle.allows("released"):
            self._log.warning(
                "Spotify answers again: the brake on calls to it is released "
                "(logged at most once a minute per worker)"
            )

    def abandoned(self) -> None:
        """A call let go was not sent after all: another may go to see."""
        with self._lock:
            self._probing = False

    def _engage(self, now: float, seconds: float, status: int, cause: spotify.SpotifyError | None, why: str) -> None:
        seconds = min(seconds, LONGEST_WAIT)
        with self._lock:
            self._probing = False
            self._engaged = True
            if now + seconds <= self._until:
                return
            self._until, self._status, self._cause = now + seconds, status, cause
        self._write_shared(math.ceil(seconds), status)
        if self._log is not None and self._throttle.allows("engaged"):
            self._log.warning(
                "Brake on calls to Spotify engaged for %g s (%s): clients get %d with Retry-After "
                "meanwhile%s (logged at most once a minute per worker)",
                seconds, why, status, ", on every instance sharing RATE_LIMIT_STORAGE_URI" if self._storage else "",
            )

    def _read_shared(self, now: float) -> tuple[float, int]:
        if self._storage is None:
            return 0.0, 503
        with self._lock:
            if now - self._read_at < SHARED_READ_SECONDS:
                return self._shared
            self._read_at = now
        try:
            status = self._storage.get(SHARED_KEY)
            shared = (self._storage.get_expiry(SHARED_KEY), status) if status in (429, 503) else (0.0, 503)
        except Exception:  # the storage is down: this process's own brake still holds (ratelimit logs it)
            shared = (0.0, 503)
        with self._lock:
            self._shared = shared
        return shared

    def _write_shared(self, seconds: int, status: int) -> None:
        if self._storage is None:
            return
        try:
            self._storage.clear(SHARED_KEY)
            self._storage.incr(SHARED_KEY, seconds, amount=status)
        except Exception:  # as above
            pass


def _wait_said(err: spotify.SpotifyError | None) -> tuple[float, int] | None:
    """(seconds, status) when Spotify said how long to wait: a 429, or a 503, with Retry-After."""
    if isinstance(err, spotify.RateLimited) and err.retry_after is not None:
        return float(err.retry_after), 429
    if isinstance(err, spotify.BadAnswer) and err.status == 503 and err.retry_after is not None:
        return float(err.retry_after), 503
    return None


def _bad(grant: str, err: spotify.SpotifyError | None) -> bool:
    """An answer that says Spotify cannot serve this app now, whoever asks."""
    if isinstance(err, (spotify.BadAnswer, spotify.RateLimited, spotify.CredentialsRefused)):
        return True
    # An app-only token involves no client's code or token: a refusal is about the app.
    return isinstance(err, spotify.Denied) and grant == "client_credentials"


def init_app(app: Flask, config: Config) -> Brake:
    """The brake for this app's calls to Spotify (service.init_app hands it to the Spotify client)."""
    shared = not config.rate_limit_storage_uri.startswith("memory://")
    brake = Brake(storage_for(config.rate_limit_storage_uri) if shared else None, logger=app.logger)
    app.extensions["brake"] = brake
    return brake
