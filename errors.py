"""Errors as JSON: one exception type for OAuth error answers, and the handlers that render every error.

Whatever goes wrong, a client reads `{"error": ..., "error_description": ...}` with the status RFC 6749 section 5.2
gives it: its own mistakes as 4xx, the service's or Spotify's as 5xx, never an HTML page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

import logs
import metrics
import spotify
from config import MAX_BODY_BYTES
from ratelimit import Refused
from revocations import Unavailable

# RFC 6749 section 5.1: token answers must not be cached.
_NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))


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


def json_response(
    payload: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer with Content-Type exactly application/json (SpotifyAPI-NET insists), never cached."""
    response = Response(
        json.dumps(payload, separators=(",", ":")), status, _NO_STORE, mimetype="application/json"
    )
    if headers:
        response.headers.update(headers)
    return response


def init_app(app: Flask) -> None:
    """Render every error of this app as JSON: OAuth errors, Spotify's, refusals, HTTP errors, the unexpected."""
    app.extensions["errors"] = logs.Throttle()  # the lines said at most once a minute per worker
    app.register_error_handler(OAuthError, render)
    app.register_error_handler(spotify.SpotifyError, lambda err: render(from_spotify(err)))
    app.register_error_handler(Refused, _refused)
    app.register_error_handler(Unavailable, _no_sign_outs)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)


def _refused(err: Refused) -> Response:
    metrics.count_refused(err.reason)
    return render(from_limits(err))


def _no_sign_outs(err: Unavailable) -> Response:
    # A store that does not answer is passing (retry); a server that cannot keep sign-outs is not.
    headers = {"Retry-After": "5"} if err.status == 503 else None
    return render(OAuthError(err.status, err.error, err.description, headers=headers))


def render(err: OAuthError) -> Response:
    """The JSON answer for an OAuth error."""
    return json_response(err.body, err.status, err.headers)


def _http_error(err: HTTPException) -> Response:
    # Keep what werkzeug's answer says (status, Allow on a 405), with a JSON body instead of HTML.
    error = "invalid_request" if err.code in (400, 413) else _snake(err.name)
    description = _DESCRIPTIONS.get(err.code or 500, err.name)
    response = json_response({"error": error, "error_description": description}, err.code or 500)
    for name, value in err.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def _unexpected(err: Exception) -> Response:
    # The traceback names code and exception types; no request data is in it.
    current_app.logger.exception("Unhandled error on %s %s", request.method, request.path)
    return json_response({"error": "server_error", "error_description": "Internal server error"}, 500)


def from_spotify(err: spotify.SpotifyError) -> OAuthError:
    """What the client is told when Spotify gave no tokens."""
    if isinstance(err, spotify.CredentialsRefused):
        _log_misconfigured(err)
        # Not the client's mistake, and no setting's name: the operator's log says which.
        return OAuthError(500, "server_error", "The token service is misconfigured; retry later")
    if isinstance(err, spotify.Denied):  # the code or token was refused: the client's to know
        return OAuthError(err.status, body=err.answer)
    if isinstance(err, spotify.Braked):
        if isinstance(err.cause, spotify.CredentialsRefused):  # what it is, and when to ask again
            refused = from_spotify(err.cause)
            return OAuthError(refused.status, body=refused.body, headers={"Retry-After": str(err.retry_after)})
        said = "rate limiting this app" if err.status == 429 else "not answering well"
        return OAuthError(
            err.status, "temporarily_unavailable",
            f"Spotify is {said}: no call goes to it for {err.retry_after} seconds; retry after that",
            headers={"Retry-After": str(err.retry_after)},
        )
    if isinstance(err, spotify.RateLimited):
        headers = {"Retry-After": err.retry_after} if err.retry_after is not None else {}
        if err.answer is not None:
            return OAuthError(429, body=err.answer, headers=headers)
        return OAuthError(429, "temporarily_unavailable", "Spotify is rate limiting this app", headers=headers)
    if isinstance(err, spotify.Unreachable):
        return OAuthError(503, "temporarily_unavailable", "Could not reach Spotify")
    if isinstance(err, spotify.TimedOut):
        return OAuthError(504, "temporarily_unavailable", "Spotify did not answer in time")
    return OAuthError(502, "server_error", str(err) or "Spotify's answer could not be read")


def _log_misconfigured(err: spotify.CredentialsRefused) -> None:
    throttle: logs.Throttle = current_app.extensions["errors"]
    if not throttle.allows("misconfigured"):
        return
    variable = "SPOTIFY_CLIENT_SECRET" if err.blames_secret else "SPOTIFY_CLIENT_ID"
    current_app.logger.error(
        "Spotify refuses this service's credentials (%s: %s): check %s against the app's settings "
        "in the Spotify developer dashboard. Every swap and refresh fails until it is fixed "
        "(logged at most once a minute per worker)",
        ascii(err.answer.get("error"))[1:-1], ascii(err.description[:200]), variable,
    )


def from_limits(err: Refused) -> OAuthError:
    """What the client is told when a limit refuses its request."""
    headers = {"Retry-After": str(err.retry_after)}
    if err.reason == Refused.FAILURES:
        description = f"Too many failed requests from this address; retry after {err.retry_after} seconds"
        return OAuthError(429, "rate_limited", description, headers=headers)
    if err.reason == Refused.TOKEN:
        description = f"This refresh token was refreshed too often; retry after {err.retry_after} seconds"
        return OAuthError(429, "rate_limited", description, headers=headers)
    if err.reason == Refused.CEILING:
        description = "This service is at its ceiling of calls to Spotify; retry shortly"
    else:
        description = "Too many calls to Spotify in progress for this address; retry shortly"
    return OAuthError(503, "temporarily_unavailable", description, headers=headers)


_DESCRIPTIONS = {
    404: "No such endpoint: use POST /swap, POST /refresh, POST /revoke or GET /health",
    405: "Method not allowed here",
    413: f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB",
}


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
