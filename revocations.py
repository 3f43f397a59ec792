"""Sign-outs (POST /revoke): the grants and tokens revoked, kept where every worker sees them, until their lifetime ends.

Where they are kept follows RATE_LIMIT_STORAGE_URI. With Redis, in Redis (with a TTL), shared by every instance that
shares it. With memory://, in an SQLite file in a directory the gunicorn master makes for its workers
(`prepare_directory`, passed on as TOKENSWAP_REVOCATIONS_DIR), shared by the instance's workers. Without that
directory (flask run, tests) in this process's memory, which serves only a server of one process: under a server of
several (WSGI's `wsgi.multiprocess`) a sign-out is refused rather than kept by one worker (docs/decisions.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from flask import Flask, current_app, request

from config import Config
from crypto import UNSEALED_KEY, Opened
from limitstore import storage_for
from logs import Throttle

# The variable through which the gunicorn master tells its workers where the shared file is.
DIRECTORY_VARIABLE = "TOKENSWAP_REVOCATIONS_DIR"
FILE_NAME = "revocations.sqlite3"
# Prefix of the keys in a shared storage (Redis), beside the rate limits' counts.
KEY_PREFIX = "tokenswap-revoked"
# How long a worker waits for another's write to the shared file before the request fails.
FILE_TIMEOUT_SECONDS = 2.0
# The setting to change when sign-outs cannot be kept on every worker.
FIX = ("set RATE_LIMIT_STORAGE_URI to a Redis URL (redis://host:6379/0), or start the service with its "
       "gunicorn.conf.py (the Procfile's command), whose workers share a file")

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """Sign-outs cannot be kept here: a configuration that would keep them on one worker only (status 500), or a
    store that does not answer (503). errors.py renders it."""

    def __init__(self, status: int, error: str, description: str):
        self.status, self.error, self.description = status, error, description
        super().__init__(description)


class Store(Protocol):
    """Where revoked keys live until they expire."""

    def add(self, key: str, seconds: int) -> None:
        """Hold `key` for `seconds` from now (never shorter than it is already held)."""

    def holds(self, keys: Sequence[str]) -> bool:
        """Whether any of `keys` is held."""

    def answers(self) -> bool:
        """Whether the store can be used now (GET /readyz)."""


class ProcessMemory:
    """This process's memory: right for a server of one process only (flask run, tests)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._expires: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, key: str, seconds: int) -> None:
        now = self._clock()
        with self._lock:
            for stale in [k for k, expires in self._expires.items() if expires <= now]:
                del self._expires[stale]
            self._expires[key] = max(self._expires.get(key, 0.0), now + seconds)

    def holds(self, keys: Sequence[str]) -> bool:
        now = self._clock()
        return any(self._expires.get(key, 0.0) > now for key in keys)

    def answers(self) -> bool:
        return True


class SharedFile:
    """An SQLite file that every worker of one instance opens (memory:// storage).

    SQLite because the workers are processes: it is the standard library's way for several of them to share a
    small table safely (locking, atomic writes). Write-ahead logging lets a refresh read while a sign-out writes;
    each write also deletes what has expired.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self._clock = clock
        # One connection per worker, used by its greenlets one at a time (the lock). No transaction is held
        # open between statements (isolation_level=None): each statement is its own.
        self._db = sqlite3.connect(path, timeout=FILE_TIMEOUT_SECONDS, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()

    @staticmethod
    def create(path: str) -> None:
        """Make the file and its table (the gunicorn master, before any worker opens it)."""
        with sqlite3.connect(path, isolation_level=None) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS revoked (key TEXT PRIMARY KEY, expires REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS revoked_expires ON revoked (expires)")
        db.close()

    def add(self, key: str, seconds: int) -> None:
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT INTO revoked (key, expires) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET expires = max(expires, excluded.expires)",
                (key, now + seconds),
            )
            self._db.execute("DELETE FROM revoked WHERE expires <= ?", (now,))

    def holds(self, keys: Sequence[str]) -> bool:
        marks = ",".join("?" * len(keys))
        with self._lock:
            row = self._db.execute(
                f"SELECT 1 FROM revoked WHERE key IN ({marks}) AND expires > ? LIMIT 1", (*keys, self._clock())
            ).fetchone()
        return row is not None

    def answers(self) -> bool:
        return True  # a local file: a failure to use it is an error of each request, not a state to wait out


class SharedStorage:
    """The rate limits' storage (Redis, with its socket timeouts): every instance that shares it sees each key
    until its TTL ends, kept by Redis itself."""

    def __init__(self, uri: str):
        self._storage = storage_for(uri)

    def add(self, key: str, seconds: int) -> None:
        # limits' incr sets the TTL when it creates the key. A key already there keeps its TTL, which is never
        # shorter: a grant's end is fixed by its sign-in, and a token of unknown sign-in was revoked for the
        # whole lifetime the first time.
        self._storage.incr(f"{KEY_PREFIX}:{key}", seconds)

    def holds(self, keys: Sequence[str]) -> bool:
        return any(self._storage.get(f"{KEY_PREFIX}:{key}") > 0 for key in keys)

    def answers(self) -> bool:
        try:
            return bool(self._storage.check())  # a PING, bounded by the storage's socket timeouts
        except Exception:
            return False


class Revocations:
    """Which grants and tokens are signed out; each held as long as its grant can live (`lifetime` seconds from
    its sign-in, or from now when the sign-in time is not known), and no longer."""

    def __init__(self, store: Store, lifetime: int, *, single_process: bool = False,
                 clock: Callable[[], float] = time.time, logger: logging.Logger = log):
        self.store = store
        self.single_process = single_process
        self._lifetime = lifetime
        self._clock = clock
        self._log = logger
        self._throttle = Throttle()

    @staticmethod
    def keys(opened: Opened) -> list[str]:
        """What a sign-out of this token holds: its grant (every token of the sign-in, rotated ones included),
        and its Spotify refresh token (every seal of it, also one with no grant id). A digest, never the token."""
        keys = [f"grant:{opened.grant_id}"] if opened.grant_id else []
        return keys + ["token:" + hashlib.sha256(opened.refresh_token.encode("utf-8")).hexdigest()]

    def seconds_left(self, opened: Opened) -> int:
        """How long the token's grant can still live: what a sign-out of it must be held."""
        if opened.signed_in_at is None:
            return self._lifetime
        return math.ceil(opened.signed_in_at + self._lifetime - self._clock())

    def revoke(self, opened: Opened, multiprocess: bool = False) -> None:
        """Sign out the token's grant; raise Unavailable if it cannot be kept on every worker."""
        self._usable(multiprocess)
        seconds = self.seconds_left(opened)
        if seconds <= 0:
            return  # past its lifetime: refused as expired anyway
        if opened.key == UNSEALED_KEY:
            # A raw token (UNSEALED_TOKENS_UNTIL) "opens" whatever its shape allows: keeping each would let anyone
            # fill the store for a lifetime per request. The app holds a sealed token after its first refresh.
            return
        try:
            for key in self.keys(opened):
                self.store.add(key, seconds)
        except Exception as err:
            self._failed(err)
            raise Unavailable(503, "temporarily_unavailable",
                              "The sign-out could not be recorded; retry shortly") from None

    def revoked(self, opened: Opened, multiprocess: bool = False) -> bool:
        """Whether the token's grant (or the token itself) was signed out; raise Unavailable if that cannot be known."""
        if self.single_process and multiprocess:
            return False  # nothing can have been revoked: every worker refuses to (see revoke)
        try:
            return self.store.holds(self.keys(opened))
        except Exception as err:
            self._failed(err)
            raise Unavailable(503, "temporarily_unavailable",
                              "Whether this token was signed out cannot be checked right now; retry shortly") from None

    def _usable(self, multiprocess: bool) -> None:
        if self.single_process and multiprocess:
            raise Unavailable(500, "server_error", f"Sign-out is not available with this server's setup: {FIX}")

    def _failed(self, err: Exception) -> None:
        if not self._throttle.allows():
            return
        # The error's type and text (host and port, never a password), no traceback.
        self._log.error("Sign-out store unreachable (%s: %s): sign-outs and refreshes answer 503 until it "
                        "answers (logged at most once a minute per worker)", type(err).__name__, err)


def store_for(config: Config, clock: Callable[[], float] = time.time) -> tuple[Store, bool]:
    """The store for this configuration, and whether it serves a server of one process only."""
    if not config.rate_limit_storage_uri.startswith("memory://"):
        return SharedStorage(config.rate_limit_storage_uri), False  # Redis keeps the time itself
    if config.revocations_dir:
        return SharedFile(os.path.join(config.revocations_dir, FILE_NAME), clock), False
    return ProcessMemory(clock), True


def init_app(app: Flask, config: Config, clock: Callable[[], float] = time.time) -> None:
    """Keep this app's sign-outs where the configuration says; `clock` tells the time of day (tests move it)."""
    store, single_process = store_for(config, clock)
    app.extensions["revocations"] = Revocations(
        store, config.refresh_token_lifetime, single_process=single_process, clock=clock, logger=app.logger
    )


def revocations() -> Revocations:
    """The current app's sign-outs."""
    held: Revocations = current_app.extensions["revocations"]
    return held


def multiprocess() -> bool:
    """Whether the server runs this app in several processes (PEP 3333's wsgi.multiprocess)."""
    return bool(request.environ.get("wsgi.multiprocess", False))


# -- the gunicorn master (server.py's hooks) ----------------------------------------------------------


def prepare_directory(config: Config) -> str | None:
    """Before any worker starts, with memory:// storage: a fresh directory holding the shared file, set in
    TOKENSWAP_REVOCATIONS_DIR for the workers; its path (to remove at exit), or None (Redis, or it failed)."""
    os.environ.pop(DIRECTORY_VARIABLE, None)  # an earlier master's (gunicorn's re-exec keeps the environment)
    if not config.rate_limit_storage_uri.startswith("memory://"):
        return None
    directory = None
    try:
        directory = tempfile.mkdtemp(prefix="tokenswap-revocations-")
        SharedFile.create(os.path.join(directory, FILE_NAME))
    except (OSError, sqlite3.Error):  # start_message() says what this means
        remove_directory(directory)
        return None
    os.environ[DIRECTORY_VARIABLE] = directory
    return directory


def kept(config: Config, directory: str | None = None) -> str:
    """Where this configuration keeps sign-outs, as `check` and the start say it (`directory`: the shared one)."""
    if not config.rate_limit_storage_uri.startswith("memory://"):
        return "sign-outs (POST /revoke) are kept in the rate-limit storage, shared by every instance that uses it"
    where = f" (in {directory}, shared by its workers)" if directory else ""
    return (f"sign-outs (POST /revoke) are kept by this instance only{where}, until it stops: for several instances, "
            "or sign-outs that outlast a restart, set RATE_LIMIT_STORAGE_URI to a Redis URL")


def start_message(config: Config, directory: str | None, workers: int) -> tuple[int, str]:
    """What the start says about sign-outs: where they are kept, or why POST /revoke refuses."""
    if config.rate_limit_storage_uri.startswith("memory://") and directory is None and workers > 1:
        return logging.WARNING, (f"Sign-outs (POST /revoke) cannot be kept by all {workers} workers: no directory "
                                 "they share could be made in the temporary directory (TMPDIR), so /revoke answers "
                                 "500; set RATE_LIMIT_STORAGE_URI to a Redis URL, or make TMPDIR writable")
    said = kept(config, directory)
    return logging.INFO, said[0].upper() + said[1:]


def remove_directory(path: str | None) -> None:
    """At the server's exit: remove the directory prepare_directory() made, if it made one."""
    if path:
        shutil.rmtree(path, ignore_errors=True)
