"""A thin client of Spotify's accounts service (POST /api/token), and what its answers mean.

It knows nothing of HTTP on our side: it returns Spotify's tokens or raises a SpotifyError saying
why there are none, and the app decides what its own client is told.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlencode

import gevent
import gevent.monkey
import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from logs import Throttle, redacted_url


class SpotifyError(Exception):
    """Spotify gave no tokens."""


class Denied(SpotifyError):
    """Spotify refused the request with an OAuth error: a 4xx whose JSON body has an `error`."""

    def __init__(self, status: int, answer: dict[str, Any]):
        self.status = status
        self.answer = answer
        super().__init__(f"{status} {answer.get('error')}")

    @property
    def description(self) -> str:
        description = self.answer.get("error_description")
        return description if isinstance(description, str) else ""


class CredentialsRefused(Denied):
    """Spotify refused this service's own client id or secret (invalid_client, unauthorized_client)."""

    ERRORS = ("invalid_client", "unauthorized_client")

    @property
    def blames_secret(self) -> bool:
        """Spotify said the secret is wrong (not the client id)."""
        return "secret" in self.description.lower()


class RateLimited(SpotifyError):
    """Spotify answered 429: `retry_after` in whole seconds when it said, `answer` its JSON error if any."""

    def __init__(self, retry_after: str | None, answer: dict[str, Any] | None):
        self.retry_after = retry_after
        self.answer = answer
        super().__init__("429")


class Braked(SpotifyError):
    """Not sent: Spotify asked the service to wait, or answers badly, and the brake holds every call until
    then. `retry_after` in whole seconds; `status` what the client is told, 429 (Spotify rate-limits the
    app) or 503; `cause` the answer that engaged the brake, when this process saw it."""

    def __init__(self, retry_after: int, status: int, cause: SpotifyError | None = None):
        self.retry_after = retry_after
        self.status = status
        self.cause = cause
        super().__init__(f"held for {retry_after} s")


# Why Spotify could not be reached, as the log and `flask --app app check` say it.
NOT_RESOLVED, REFUSED, NOT_TRUSTED, TLS_FAILED, PROXY_FAILED, FAILED, TIMED_OUT = (
    "name not resolved", "connection refused", "TLS certificate not trusted", "TLS handshake failed",
    "proxy failed", "connection failed", "timed out",
)
# What to check, for each cause.
HINTS = {
    NOT_RESOLVED: "check the host name in SPOTIFY_ACCOUNTS_URL and the DNS",
    REFUSED: "nothing listens at that address and port: check SPOTIFY_ACCOUNTS_URL",
    NOT_TRUSTED: "if a proxy or a private CA signs that certificate, set REQUESTS_CA_BUNDLE to the CA "
                 "certificate file; otherwise check SPOTIFY_ACCOUNTS_URL",
    TLS_FAILED: "check SPOTIFY_ACCOUNTS_URL and any proxy in between",
    PROXY_FAILED: "the proxy in HTTPS_PROXY (or HTTP_PROXY) could not be used: check it, or NO_PROXY",
    FAILED: "check SPOTIFY_ACCOUNTS_URL and the network",
    TIMED_OUT: "Spotify or the network is slow: check the network, or raise SPOTIFY_TIMEOUT",
}


class Unreachable(SpotifyError):
    """No connection to Spotify: `cause` says why (NOT_RESOLVED, REFUSED, NOT_TRUSTED, ...)."""

    def __init__(self, cause: str = FAILED):
        self.cause = cause
        super().__init__(cause)


class TimedOut(SpotifyError):
    """Spotify took longer than the timeout, over the whole call."""

    cause = TIMED_OUT


class Observer(Protocol):
    """Told of each call to Spotify (metrics.Metrics is one)."""

    def started(self, grant: str) -> None: ...

    def finished(self, grant: str, outcome: str, seconds: float) -> None: ...


def cause_of(err: requests.RequestException) -> str:
    """Why a connection to Spotify failed, from the exceptions requests and urllib3 chain together."""
    seen = list(_chain(err))
    if any(isinstance(e, (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)) for e in seen):
        return PROXY_FAILED
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in seen):
        return NOT_TRUSTED
    if any(isinstance(e, (requests.exceptions.SSLError, ssl.SSLError)) for e in seen):
        return TLS_FAILED
    if any(isinstance(e, (urllib3.exceptions.NameResolutionError, socket.gaierror)) for e in seen):
        return NOT_RESOLVED
    if any(isinstance(e, ConnectionRefusedError) for e in seen):
        return REFUSED
    return FAILED


def _chain(err: BaseException) -> Iterator[BaseException]:
    """An exception and those it wraps: its cause, context, urllib3's `reason`, and its arguments."""
    pending: list[BaseException] = [err]
    seen: set[int] = set()
    while pending and len(seen) < 20:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending += [e for e in linked if isinstance(e, BaseException)]


class BadAnswer(SpotifyError):
    """Spotify answered something that is no token answer nor an OAuth error: `status` its HTTP status
    (None: no whole answer), `retry_after` the whole seconds its Retry-After said, if any."""

    def __init__(self, message: str, status: int | None = None, retry_after: str | None = None):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class Gate(Protocol):
    """Asked before every call to Spotify, told of its end (brake.Brake is one)."""

    def check(self) -> None:
        """Raise Braked when no call may go to Spotify now."""

    def confirm(self) -> None:
        """Raise Braked if the brake engaged since check() let this call go (while the app's limits kept it
        waiting for its turn)."""

    def answered(self, grant: str, err: SpotifyError | None) -> None:
        """The call went to Spotify: `err` is what went wrong, None if it gave tokens."""

    def abandoned(self) -> None:
        """The call the gate let through was not sent after all, or its end is unknown."""


class AccountsClient:
    """Exchanges authorization codes and refresh tokens at Spotify's token endpoint."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        accounts_url: str = "https://accounts.spotify.com",
        timeout: float = 10.0,
        pool_size: int = 10,
        *,
        observer: Observer | None = None,
        logger: logging.Logger | None = None,
        throttle: Throttle | None = None,
        gate: Gate | None = None,
    ):
        self.token_url = accounts_url.rstrip("/") + "/api/token"
        self.timeout = timeout
        self.observer = observer
        self.gate = gate  # the brake every call passes first
        # Where a WARNING names why Spotify could not be reached (the app's logger); None: not logged.
        self._logger = logger
        # Each cause of failure is logged at most once a minute (per worker: one client per process).
        self._throttle = throttle or Throttle()
        session = requests.Session()
        # One pool per worker, as large as the worker's concurrency: every waiting request keeps
        # its keep-alive connection instead of paying a new TCP and TLS handshake. No retries:
        # an authorization code is single-use, so a swap must never be sent twice.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.auth = (client_id, client_secret)
        session.headers["Accept"] = "application/json"
        # Compressing a few hundred bytes of JSON saves nothing.
        session.headers.pop("Accept-Encoding", None)
        # Resolve REQUESTS_CA_BUNDLE, HTTPS_PROXY, NO_PROXY and friends once, at start.
        settings = session.merge_environment_settings(self.token_url, {}, None, None, None)
        self._session = session
        # Every call is a POST of a form to one URL with the same headers and auth: prepare those
        # once, and send each call straight through the session's mounted adapter (requests'
        # public Transport Adapter API) rather than redo the merge in Session.request every time.
        try:
            self._headers = session.prepare_request(requests.Request("POST", self.token_url)).headers
        except (requests.RequestException, ValueError):  # config.url_problem refuses such a URL at start
            # Without the URL: its message and traceback would show a password in it.
            raise ValueError("SPOTIFY_ACCOUNTS_URL cannot be used by requests") from None
        self._headers["Content-Type"] = "application/x-www-form-urlencoded"
        self._adapter = session.get_adapter(self.token_url)
        self._send_options: dict[str, Any] = {
            "timeout": timeout, "verify": settings["verify"], "proxies": settings["proxies"],
        }

    # `admit`, where a method takes it, runs once the gate lets the call go and before it is sent: the
    # app's own limits, so that a call the brake holds spends none of a client's budgets.

    def exchange_code(
        self, code: str, redirect_uri: str, code_verifier: str | None = None, *, admit: Admit = None
    ) -> dict[str, Any]:
        """Trade an authorization code for tokens (grant_type=authorization_code)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        return self._post(form, admit)

    def refresh(self, refresh_token: str, *, admit: Admit = None) -> dict[str, Any]:
        """Trade a (raw) Spotify refresh token for a new access token (grant_type=refresh_token)."""
        return self._post({"grant_type": "refresh_token", "refresh_token": refresh_token}, admit)

    def client_credentials(self, *, admit: Admit = None) -> dict[str, Any]:
        """An app-only token (grant_type=client_credentials): proves Spotify accepts the client id and secret."""
        return self._post({"grant_type": "client_credentials"}, admit)

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def _post(self, form: dict[str, str], admit: Admit) -> dict[str, Any]:
        gate = self.gate
        if gate is None:
            if admit is not None:
                admit()
            return self._observed(form)
        gate.check()
        try:
            if admit is not None:
                admit()
                gate.confirm()  # a turn can take seconds: the brake may have engaged meanwhile
            tokens = self._observed(form)
        except Braked:
            gate.abandoned()
            raise
        except SpotifyError as err:
            gate.answered(form["grant_type"], err)
            raise
        except BaseException:  # refused by the app's limits, or the greenlet killed: never answered
            gate.abandoned()
            raise
        gate.answered(form["grant_type"], None)
        return tokens

    def _observed(self, form: dict[str, str]) -> dict[str, Any]:
        grant, observer = form["grant_type"], self.observer
        if observer is None:
            return self._call(form)
        started = time.monotonic()
        observer.started(grant)
        outcome = "bad_answer"
        try:
            tokens = self._call(form)
            outcome = "ok"
            return tokens
        except SpotifyError as err:
            outcome = _outcome(err)
            raise
        finally:
            observer.finished(grant, outcome, time.monotonic() - started)

    def _call(self, form: dict[str, str]) -> dict[str, Any]:
        try:
            return self._send(form)
        except (Unreachable, TimedOut) as err:
            self._warn(err.cause)
            raise
        except RateLimited as err:
            self._say("rate_limited", "Spotify refuses calls with 429 (it rate-limits this app%s) at %s",
                      f"; Retry-After {err.retry_after} s" if err.retry_after is not None else "",
                      redacted_url(self.token_url))
            raise
        except BadAnswer as err:
            cause = "unreadable" if err.status is None or err.status < 500 else "server_error"
            self._say(cause, "%s (at %s)", err, redacted_url(self.token_url))
            raise

    def _say(self, cause: str, message: str, *args: object) -> None:
        if self._logger is not None and self._throttle.allows(cause):
            self._logger.warning(message + " (logged at most once a minute per worker and cause)", *args)

    @property
    def proxy(self) -> str | None:
        """The proxy calls to Spotify go through (HTTPS_PROXY and friends, as requests chose it), shown
        without its user name or password; None when there is none."""
        proxy = requests.utils.select_proxy(self.token_url, self._send_options["proxies"])
        return redacted_url(proxy if "://" in proxy else "http://" + proxy) if proxy else None

    def _warn(self, cause: str) -> None:
        if self._logger is None or not self._throttle.allows(cause):
            return
        if cause == PROXY_FAILED:  # the proxy's fault, not Spotify's
            self._logger.warning(
                "The proxy %s failed on the way to Spotify at %s: %s; %s (logged at most once a minute per "
                "worker and cause)", self.proxy, redacted_url(self.token_url), cause, HINTS[cause],
            )
            return
        what = f"did not answer within {self.timeout:g} s" if cause == TIMED_OUT else "could not be reached"
        self._logger.warning(
            "Spotify %s at %s: %s; %s (logged at most once a minute per worker and cause)",
            what, redacted_url(self.token_url), cause, HINTS[cause],
        )

    def _send(self, form: dict[str, str]) -> dict[str, Any]:
        request = requests.PreparedRequest()
        request.prepare_method("POST")
        request.url = self.token_url
        request.headers = self._headers.copy()
        request.prepare_body(urlencode(form), None)
        try:
            with _whole_call(self.timeout):
                response = self._adapter.send(request, **self._send_options)
                response.content  # noqa: B018  # read the body here, where a broken answer is caught
        except requests.Timeout:
            raise TimedOut() from None
        except requests.ConnectionError as err:
            raise Unreachable(cause_of(err)) from None
        except requests.RequestException:
            raise BadAnswer("Spotify's answer could not be read") from None
        return _read_answer(response)


def _outcome(err: SpotifyError) -> str:
    """A failed call's outcome: Spotify's error code as it sent it for a 4xx (an observer that makes labels of it
    checks it, as metrics.label does), or what went wrong."""
    if isinstance(err, Denied):
        return str(err.answer.get("error"))
    if isinstance(err, RateLimited):
        return "rate_limited"  # whatever its body says: the alert rules match this one value
    if isinstance(err, Unreachable):
        return "unreachable"
    if isinstance(err, TimedOut):
        return "timeout"
    return "bad_answer"


Admit = Callable[[], None] | None


class _WholeCallTimeout(Exception):
    pass


@contextmanager
def _whole_call(seconds: float) -> Iterator[None]:
    """Under gevent, bound the whole call by `seconds`, not only each wait for data.

    requests' timeout applies to each wait, so an answer that trickles in a few bytes at a time
    could hold a request far longer. Without gevent (flask run, unit tests) the per-wait timeout
    is all there is.
    """
    if not gevent.monkey.is_module_patched("socket"):
        yield
        return
    try:
        with gevent.Timeout(seconds, _WholeCallTimeout):
            yield
    except _WholeCallTimeout:
        raise TimedOut() from None


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


# NaN and Infinity are not JSON: passed on, they would make our own answer unreadable.
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        body = _DECODER.decode(content.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return body if isinstance(body, dict) else None


def _seconds(value: Any) -> int | None:
    """A whole number of seconds from a JSON number or numeric string; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value)
        return int(number) if math.isfinite(number) else None
    except (TypeError, ValueError):
        return None


def _retry_after(value: str | None) -> str | None:
    """Retry-After as whole seconds (RFC 9110 allows seconds or an HTTP date); None if unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    whole = _seconds(value)
    if whole is None:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        whole = math.ceil((when - datetime.now(UTC)).total_seconds())
    elif float(value) > whole:
        whole += 1  # 1.5 means wait at least 1.5 seconds: 2
    return str(max(0, whole))


def _read_answer(response: requests.Response) -> dict[str, Any]:
    status = response.status_code
    body = _json_object(response.content)

    if status == 200:
        if body is None or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise BadAnswer("Spotify's answer had no access token", status)
        if "expires_in" in body:
            expires_in = _seconds(body["expires_in"])
            if expires_in is None:
                raise BadAnswer("Spotify's answer had no valid expires_in", status)
            body["expires_in"] = expires_in
        return body
    error = body if body is not None and isinstance(body.get("error"), str) else None
    if status == 429:
        raise RateLimited(_retry_after(response.headers.get("Retry-After")), error)
    if 400 <= status < 500 and error is not None:
        if error["error"] in CredentialsRefused.ERRORS:
            raise CredentialsRefused(status, error)
        raise Denied(status, error)
    raise BadAnswer(f"Spotify answered with HTTP {status}", status, _retry_after(response.headers.get("Retry-After")))
