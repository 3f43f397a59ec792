"""A thin client of Spotify's accounts service (POST /api/token), and the OAuth error type."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

try:  # the Procfile's workers are gevent's; the service also runs without it (flask run, tests)
    import gevent
    import gevent.monkey

    _gevent: Any = gevent
except ImportError:  # pragma: no cover
    _gevent = None


class OAuthError(Exception):
    """An OAuth 2 error answer (RFC 6749 section 5.2): HTTP status, JSON body, extra headers."""

    def __init__(
        self,
        status: int,
        error: str = "server_error",
        description: str | None = None,
        *,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        self.status = status
        if body is None:
            body = {"error": error}
            if description:
                body["error_description"] = description
        self.body = dict(body)
        self.headers = dict(headers or {})
        super().__init__(f"{status} {self.body.get('error')}")


class AccountsClient:
    """Exchanges authorization codes and refresh tokens at Spotify's token endpoint."""

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        accounts_url: str = "https://accounts.spotify.com",
        timeout: float = 10.0,
        pool_size: int = 10,
    ):
        self.token_url = accounts_url.rstrip("/") + "/api/token"
        self.timeout = timeout
        session = requests.Session()
        # One pool per worker, as large as the worker's concurrency: every waiting request keeps
        # its keep-alive connection instead of paying a new TCP and TLS handshake. No retries:
        # an authorization code is single-use, so a swap must never be sent twice.
        adapter = _Adapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.auth = (client_id, client_secret)
        session.headers["Accept"] = "application/json"
        # Each header costs a validation and a copy per call. Keep-alive is HTTP/1.1's default,
        # and compressing a few hundred bytes of JSON saves nothing: send neither.
        del session.headers["Connection"], session.headers["Accept-Encoding"]
        # Resolve REQUESTS_CA_BUNDLE, HTTPS_PROXY, NO_PROXY and friends once, not on every call.
        settings = session.merge_environment_settings(self.token_url, {}, None, None, None)
        session.proxies = settings["proxies"]
        session.verify = settings["verify"]
        session.trust_env = False
        self._session = session
        # Session.request would redo this on every call (merging headers, auth, cookies and
        # proxies; its cost is in bench/README.md): each call copies the prepared headers, sets
        # the body and goes straight to the session's pooled adapter.
        self._headers = session.prepare_request(requests.Request("POST", self.token_url)).headers
        self._headers["Content-Type"] = "application/x-www-form-urlencoded"
        self._adapter = session.get_adapter(self.token_url)
        self._send_options = {
            "stream": False, "timeout": timeout, "verify": session.verify, "cert": None,
            "proxies": session.proxies,
        }

    def exchange_code(
        self, code: str, redirect_uri: str, code_verifier: str | None = None
    ) -> dict[str, Any]:
        """Trade an authorization code for tokens (grant_type=authorization_code)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier is not None:
            form["code_verifier"] = code_verifier
        return self._post(form)

    def refresh(self, refresh_token: str) -> dict[str, Any]:
        """Trade a (raw) Spotify refresh token for a new access token (grant_type=refresh_token)."""
        return self._post({"grant_type": "refresh_token", "refresh_token": refresh_token})

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def _post(self, form: dict[str, str]) -> dict[str, Any]:
        request = PreparedRequest()
        request.method, request.url = "POST", self.token_url
        request.body = urlencode(form)
        request.headers = self._headers.copy()
        request.headers["Content-Length"] = str(len(request.body))
        deadline = _deadline(self.timeout)
        try:
            if deadline is not None:
                deadline.start()
            response = self._adapter.send(request, **self._send_options)
            response.content  # read the body here, where a broken answer is caught
        except (requests.Timeout, _DeadlinePassed):
            raise OAuthError(504, "temporarily_unavailable", "Spotify did not answer in time") from None
        except requests.ConnectionError:
            raise OAuthError(503, "temporarily_unavailable", "Could not reach Spotify") from None
        except requests.RequestException:
            raise OAuthError(502, "server_error", "Spotify's answer could not be read") from None
        finally:
            if deadline is not None:
                deadline.close()
        return _read_answer(response)


class _DeadlinePassed(Exception):
    """The whole call to Spotify took longer than the timeout."""


def _deadline(seconds: float) -> Any:
    """A timer that interrupts the whole call after `seconds`, under gevent's patched sockets.

    requests' timeout applies to each wait for data, so an answer that trickles in a few bytes at
    a time could hold a request for far longer. Without gevent (the flask development server,
    unit tests), the per-wait timeout is all there is.
    """
    if _gevent is None or not _gevent.monkey.is_module_patched("socket"):
        return None
    return _gevent.Timeout(seconds, _DeadlinePassed)


class _OneWrite:
    """Sends a request's head and its body in one write on an open connection.

    http.client writes them separately: two packets, two wakeups of the peer. A wakeup is the
    dearest part of a loopback or VM network send, and each TLS write is a record of its own.
    """

    _hold_head = False
    _held = b""

    def request(self, method, url, body=None, headers=None, **kwargs):  # type: ignore[override]
        self._hold_head = isinstance(body, (str, bytes)) and bool(body)
        try:
            super().request(method, url, body=body, headers=headers, **kwargs)
            if self._held:  # nothing followed the head after all
                super().send(self._held)
        finally:
            self._hold_head, self._held = False, b""

    def send(self, data):  # type: ignore[override]
        if self._hold_head:
            self._hold_head = False
            # Only on a connection already open: opening one may send a proxy CONNECT first.
            if self.sock is not None:
                self._held = data
                return
        elif self._held:
            data, self._held = self._held + data, b""
        super().send(data)


class _HTTPConnection(_OneWrite, HTTPConnection):
    pass


class _HTTPSConnection(_OneWrite, HTTPSConnection):
    pass


class _HTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter for a client that calls one URL with the same settings every time.

    Its connections send each request in one write, and what requests works out anew on every
    call but never changes here is worked out once: which pool (a URL parse and a pool-key
    build), whether the CA bundle exists (a stat), and the response's cookies (never used: the
    session's jar is not consulted, and Spotify's token endpoint sets none that matter).
    """

    _pool_key: tuple | None = None
    _pool: Any = None
    _verified: Any = None

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _HTTPConnectionPool,
            "https": _HTTPSConnectionPool,
        }

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):  # type: ignore[no-untyped-def]
        key = (request.url, verify, cert, tuple(sorted((proxies or {}).items())))
        if key != self._pool_key:
            self._pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pool_key = key
        return self._pool

    def cert_verify(self, conn, url, verify, cert) -> None:  # type: ignore[no-untyped-def]
        if conn is not self._verified:
            super().cert_verify(conn, url, verify, cert)
            self._verified = conn

    def build_response(self, req: PreparedRequest, resp: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


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
    seconds = _seconds(value)
    if seconds is None:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = math.ceil((when - datetime.now(timezone.utc)).total_seconds())
    elif float(value) > seconds:
        seconds += 1  # 1.5 means wait at least 1.5 seconds: 2
    return str(max(0, seconds))


def _read_answer(response: requests.Response) -> dict[str, Any]:
    status = response.status_code
    body = _json_object(response.content)

    if status == 200:
        if body is None or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise OAuthError(502, "server_error", "Spotify's answer had no access token")
        if "expires_in" in body:
            expires_in = _seconds(body["expires_in"])
            if expires_in is None:
                raise OAuthError(502, "server_error", "Spotify's answer had no valid expires_in")
            body["expires_in"] = expires_in
        return body
    if status == 429:
        headers = {}
        retry_after = _retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        if body is not None and isinstance(body.get("error"), str):
            raise OAuthError(429, body=body, headers=headers)
        raise OAuthError(
            429, "temporarily_unavailable", "Spotify is rate limiting this app", headers=headers
        )
    if 400 <= status < 500 and body is not None and isinstance(body.get("error"), str):
        raise OAuthError(status, body=body)
    raise OAuthError(502, "server_error", f"Spotify answered with HTTP {status}")
