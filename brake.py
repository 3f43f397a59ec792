"""The brake on calls to Spotify: when Spotify says wait, or answers badly, no call goes to it until then.

Spotify counts an app's calls together, whatever their grant, so one brake holds them all. It engages
- at once, for as long as Spotify says, on a 429 or 503 with Retry-After (a 429 without one: as below);
- after BAD_IN_A_ROW bad answers in a row (5xx, an answer that cannot be read, Spotify refusing the
  service's own credentials or an app-only token), for FIRST_PAUSE seconds, doubled up to LONGEST_PAUSE each
  time it engages again; one good answer ends the series. Answers to calls sent before it engaged do not count.
Once its time has passed, one call goes to see whether Spotify is back, one for all the processes that share
the time (the others are held for a second meanwhile): a good answer releases the brake, a bad one engages
it again. The time, and that call, are shared: with Redis as the rate limits' storage by every instance
(`StorageTime`), with memory:// by the instance's workers, through files in the directory the gunicorn
master makes for them (`FileTime`). Each process counts its own bad answers in a row.
Clients are told `spotify.Braked` (429 or 503 with the seconds left); docs/operations.md says it for
operators. It knows nothing of Flask but `init_app`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Protocol

from flask import Flask
from limits.storage import Storage

import spotify
from config import Config
from limitstore import storage_for
from logs import Throttle
from revocations import DIRECTORY_VARIABLE

BAD_IN_A_ROW = 2
FIRST_PAUSE = 2.0
LONGEST_PAUSE = 60.0
# The longest Retry-After obeyed: a day (a value beyond is a mistake, not a plan).
LONGEST_WAIT = 24 * 3600
# The key in the shared storage, and the file in the workers' directory: its count (its text) is the
# status clients get, its expiry (its modification time) the brake's end.
SHARED_KEY = "tokenswap-brake"
# The claim of the one call that goes to see, by whichever process makes it; it expires by itself should
# that process die with the call.
PROBE_KEY = "tokenswap-brake-probe"
# How long a read of Redis is trusted: one round trip serves a burst of calls (a file is read every time).
SHARED_READ_SECONDS = 0.05
# What is said while the first call after a pause is out to see whether Spotify is back.
PROBE_WAIT = 1


class SharedTime(Protocol):
    """Where the brake's end is shared with other processes; a read is trusted for `trusted` seconds."""

    trusted: float

    def read(self, now: float) -> tuple[float, int]:
        """(until, status) of a brake engaged elsewhere; (0.0, 503) when there is none."""

    def write(self, until: float, status: int, now: float) -> None:
        """Engage it elsewhere until `until` (wall clock), unless it already holds longer there."""

    def claim(self, now: float, seconds: float) -> bool:
        """Claim the one call that goes to see, for at most `seconds`; False if another process holds it."""

    def unclaim(self) -> None:
        """Give the claim back: its call is answered."""


class StorageTime:
    """The brake's end in the rate limits' storage (Redis): every instance sharing it holds."""

    trusted = SHARED_READ_SECONDS

    def __init__(self, storage: Storage):
        self._storage = storage

    def read(self, now: float) -> tuple[float, int]:
        status = self._storage.get(SHARED_KEY)
        return (self._storage.get_expiry(SHARED_KEY), status) if status in (429, 503) else (0.0, 503)

    def write(self, until: float, status: int, now: float) -> None:
        if self.read(now)[0] >= until:
            return
        self._storage.clear(SHARED_KEY)
        self._storage.incr(SHARED_KEY, math.ceil(until - now), amount=status)

    def claim(self, now: float, seconds: float) -> bool:
        return self._storage.incr(PROBE_KEY, math.ceil(seconds)) == 1

    def unclaim(self) -> None:
        self._storage.clear(PROBE_KEY)


class FileTime:
    """The brake's end as a file's modification time (its text the status), in a directory the workers
    of one instance share: a stat per call to Spotify, no lock (a file is replaced whole)."""

    trusted = 0.0

    def __init__(self, directory: str):
        self._path = os.path.join(directory, SHARED_KEY)
        self._directory = directory

    def read(self, now: float) -> tuple[float, int]:
        try:
            until = os.stat(self._path).st_mtime
            if until <= now:
                return 0.0, 503
            with open(self._path, encoding="ascii") as file:
                status = int(file.read() or 503)
        except (OSError, ValueError):  # none yet, or replaced while read: the next call reads it
            return 0.0, 503
        return until, status if status in (429, 503) else 503

    def write(self, until: float, status: int, now: float) -> None:
        if self.read(now)[0] >= until:
            return
        descriptor, written = tempfile.mkstemp(dir=self._directory)
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(str(status))
        os.utime(written, (until, until))
        os.replace(written, self._path)

    def claim(self, now: float, seconds: float) -> bool:
        probe = os.path.join(self._directory, PROBE_KEY)
        descriptor, written = tempfile.mkstemp(dir=self._directory)
        os.close(descriptor)
        os.utime(written, (now + seconds, now + seconds))  # when the claim expires
        try:
            for _ in range(2):
                try:
                    os.link(written, probe)  # atomic, and only if no claim is there
                    return True
                except FileExistsError:
                    try:
                        if os.stat(probe).st_mtime > now:
                            return False
                        os.unlink(probe)  # expired: its process died with the call
                    except FileNotFoundError:
                        pass
            return False
        finally:
            os.unlink(written)

    def unclaim(self) -> None:
        try:
            os.unlink(os.path.join(self._directory, PROBE_KEY))
        except FileNotFoundError:
            pass


class Brake:
    """The spotify.Gate every call to Spotify passes (see the module's docstring). `clock` is the wall
    clock (a shared storage's expiry is one); `shared`, when given, is where other processes see it."""

    def __init__(
        self,
        shared: SharedTime | None = None,
        *,
        clock: Callable[[], float] = time.time,
        logger: logging.Logger | None = None,
        throttle: Throttle | None = None,
        probe_seconds: float = 21.0,
    ):
        self._shared_time = shared
        self._probe_seconds = probe_seconds  # the longest the call that looks can take
        self._clock = clock
        self._log = logger
        self._throttle = throttle or Throttle()
        self._lock = threading.Lock()
        self._until = 0.0  # no call before this time
        self._status = 503
        self._cause: spotify.SpotifyError | None = None  # the answer that engaged it, in this process
        self._engaged = False  # until a good answer releases it
        self._bad = 0  # bad answers in a row, in this process
        self._probing = False  # the one call out to see whether Spotify is back, from this process
        self._local = threading.local()  # gevent's under the Procfile's workers: whether this request's call is it
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
            if not self._engaged:
                return
            if self._probing:
                raise spotify.Braked(PROBE_WAIT, self._status, self._cause)
            self._probing = True
        self._local.probe = True
        if not self._claim(now):
            self._local.probe = False
            with self._lock:
                self._probing = False
            raise spotify.Braked(PROBE_WAIT, self._status, self._cause)

    def confirm(self) -> None:
        """Raise spotify.Braked if the brake engaged since check() let this call go."""
        now = self._clock()
        until, status = self._read_shared(now)
        with self._lock:
            if until > self._until:
                self._until, self._status, self._engaged, self._cause = until, status, True, None
            if now < self._until:
                raise spotify.Braked(math.ceil(self._until - now), self._status, self._cause)

    def answered(self, grant: str, err: spotify.SpotifyError | None) -> None:
        """What Spotify answered to a call this brake let go."""
        now = self._clock()
        try:
            self._answered(now, grant, err)
        finally:
            self._end_probe()  # after a new pause is written: no other process looks in between

    def _answered(self, now: float, grant: str, err: spotify.SpotifyError | None) -> None:
        wait = _wait_said(err)
        if wait is not None:
            self._engage(now, *wait, err, "Spotify said to wait")
            return
        if _bad(grant, err):
            with self._lock:
                if now < self._until:
                    # Sent before the brake engaged, answered while it holds: the same outage, not a longer
                    # one (a burst of calls in flight must not stretch the pause).
                    return
                self._bad += 1
                bad, engaged = self._bad, self._engaged
            if bad >= BAD_IN_A_ROW or engaged:
                pause = min(LONGEST_PAUSE, FIRST_PAUSE * 2 ** max(0, bad - BAD_IN_A_ROW))
                status = 429 if isinstance(err, spotify.RateLimited) else 503
                self._engage(now, pause, status, err, f"{bad} bad answers in a row (the last: {err})")
            return
        with self._lock:
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
        self._end_probe()

    def _end_probe(self) -> None:
        # Only the call that looks ends its look: others were sent before the brake engaged.
        if not getattr(self._local, "probe", False):
            return
        self._local.probe = False
        with self._lock:
            self._probing = False
        if self._shared_time is not None:
            try:
                self._shared_time.unclaim()
            except Exception:  # the storage is down: the claim expires by itself
                pass

    def _claim(self, now: float) -> bool:
        if self._shared_time is None:
            return True
        try:
            if not self._shared_time.claim(now, self._probe_seconds):
                return False
            # Read again, past the trusted last read: another process may have just begun a new pause.
            until, status = self._shared_time.read(now)
        except Exception:  # the storage is down: this process looks for itself
            return True
        if until <= now:
            return True
        with self._lock:
            if until > self._until:
                self._until, self._status, self._cause = until, status, None
        self._shared_time.unclaim()
        return False

    def _engage(self, now: float, seconds: float, status: int, cause: spotify.SpotifyError | None, why: str) -> None:
        seconds = min(seconds, LONGEST_WAIT)
        with self._lock:
            self._engaged = True
            if now + seconds <= self._until:
                return
            self._until, self._status, self._cause = now + seconds, status, cause
        self._write_shared(now + seconds, status, now)
        if self._log is not None and self._throttle.allows("engaged"):
            self._log.warning(
                "Brake on calls to Spotify engaged for %g s (%s): clients get %d with Retry-After "
                "meanwhile%s (logged at most once a minute per worker)",
                seconds, why, status, _WHERE.get(type(self._shared_time), ""),
            )

    def _read_shared(self, now: float) -> tuple[float, int]:
        if self._shared_time is None:
            return 0.0, 503
        with self._lock:
            if now - self._read_at < self._shared_time.trusted:
                return self._shared
            self._read_at = now
        try:
            shared = self._shared_time.read(now)
        except Exception:  # the storage is down: this process's own brake still holds (ratelimit logs it)
            shared = (0.0, 503)
        with self._lock:
            self._shared = shared
        return shared

    def _write_shared(self, until: float, status: int, now: float) -> None:
        if self._shared_time is None:
            return
        try:
            self._shared_time.write(until, status, now)
        except Exception:  # as above
            pass


_WHERE = {StorageTime: ", on every instance sharing RATE_LIMIT_STORAGE_URI", FileTime: ", in every worker"}


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
    shared: SharedTime | None = None
    if not config.rate_limit_storage_uri.startswith("memory://"):
        shared = StorageTime(storage_for(config.rate_limit_storage_uri))
    elif os.environ.get(DIRECTORY_VARIABLE):  # under gunicorn: the directory its master made for the workers
        shared = FileTime(os.environ[DIRECTORY_VARIABLE])
    # The call that looks waits for its turn (up to SPOTIFY_TIMEOUT), then for Spotify (as long again).
    brake = Brake(shared, logger=app.logger, probe_seconds=2 * config.timeout + 1)
    app.extensions["brake"] = brake
    return brake
