"""The token endpoint (swap and refresh, RFC 6749 sections 4.1.3 and 6), sign-out (POST /revoke, RFC 7009) and
the health checks (GET /health, /livez, /readyz), as the `api` blueprint."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import gevent
import gevent.monkey
from flask import Blueprint, Response, current_app, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import metrics
import ratelimit
import revocations
import spotify
from config import BODY_TIMEOUT, MAX_BODY_BYTES, SPOTIFY_SHORTEST_LIFETIME
from crypto import InvalidToken, Opened
from errors import OAuthError, json_response
from resources import Resources, resources

# Each path has the grant it serves when a request names none (RFC 6749 section 4.1.3 or 6). The
# /v1/ paths are those of Spotify's own "Token Swap and Refresh" guide.
# Peter Schorn's SpotifyAPIServer paths (and their -pkce twins), so that apps moving from it keep their URLs.
SWAP_PATHS = (
    "/swap", "/api/token", "/v1/swap",
    "/authorization-code-flow/retrieve-tokens", "/authorization-code-flow-pkce/retrieve-tokens",
)
REFRESH_PATHS = (
    "/refresh", "/api/refresh_token", "/v1/refresh",
    "/authorization-code-flow/refresh-tokens", "/authorization-code-flow-pkce/refresh-tokens",
)
APP_TOKEN_PATHS = ("/client-credentials-tokens",)
SWAP, REFRESH, APP_TOKEN = "authorization_code", "refresh_token", "client_credentials"

# Codes and tokens are opaque but printable; anything else cannot be one, so Spotify is not asked.
_OPAQUE = re.compile(r"[\x21-\x7e]{1,4096}")
# RFC 7636 section 4.1.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")

bp = Blueprint("api", __name__)

# The contract: every path, body, answer, header and error, as OpenAPI 3.1 (the one source; read once).
OPENAPI = Path(__file__).resolve().parent / "openapi.json"
_OPENAPI_DOCUMENT = OPENAPI.read_bytes()


@bp.get("/openapi.json")
def openapi() -> Response:
    """This service's OpenAPI document, as it is in the repository."""
    return Response(_OPENAPI_DOCUMENT, 200, {"Cache-Control": "no-cache"}, mimetype="application/json")


@bp.get("/health")
def health() -> Response:
    """Up and serving, as /livez: what the deploy descriptors' health checks poll (app.json, render.yaml, the
    Dockerfile)."""
    return json_response({"status": "ok"})


@bp.get("/livez")
def livez() -> Response:
    """The process answers: what a supervisor that restarts a hung instance polls (a liveness probe). Nothing
    outside the process is asked, so a Redis outage never restarts every instance."""
    return json_response({"status": "ok"})


# What a readiness check seals and opens: the keys are loaded and work.
_PROBE = "readiness-probe"


@bp.get("/readyz")
def readyz() -> Response:
    """Whether this instance should get requests: it is not stopping, its keys seal and open a token, and its
    Redis (RATE_LIMIT_STORAGE_URI: the rate limits' counts, the sign-outs) answers when one is configured. What a
    load balancer's active health check and a readiness probe poll; 503 from the moment a stop begins
    (STOP_DELAY, docs/operations.md)."""
    svc = resources()
    if svc.stopping:
        raise OAuthError(503, "temporarily_unavailable", "Not ready: this instance is stopping")
    try:
        opens = svc.sealer.open(svc.sealer.seal(_PROBE)).refresh_token == _PROBE
    except InvalidToken:
        opens = False
    if not opens:
        raise OAuthError(503, "temporarily_unavailable", "Not ready: the encryption keys do not open a token")
    if not ratelimit.storage_answers() or not revocations.revocations().store.answers():
        raise OAuthError(503, "temporarily_unavailable", "Not ready: its Redis (RATE_LIMIT_STORAGE_URI) does not answer")
    return json_response({"status": "ready"})


def swap() -> Response:
    """A token request at a swap path: an authorization code unless `grant_type` says otherwise."""
    return _token_endpoint(SWAP)


def refresh() -> Response:
    """A token request at a refresh path: a refresh unless `grant_type` says otherwise."""
    return _token_endpoint(REFRESH)


def app_token() -> Response:
    """A token request at an app-only path: client credentials unless `grant_type` says otherwise."""
    return _token_endpoint(APP_TOKEN)


_TOKEN_VIEWS = ((swap, SWAP_PATHS, SWAP), (refresh, REFRESH_PATHS, REFRESH), (app_token, APP_TOKEN_PATHS, APP_TOKEN))
for _view, _paths, _ in _TOKEN_VIEWS:
    for _path in _paths:
        bp.add_url_rule(_path, view_func=_view, methods=["POST"])  # the endpoint is the view's name
# The token endpoints as request.endpoint names them, and the grant each serves when a request names none.
ENDPOINT_GRANTS = {f"{bp.name}.{view.__name__}": grant for view, _, grant in _TOKEN_VIEWS}


# What a refresh of a signed-out grant is told: the app must discard the token and log the user in again.
SIGNED_OUT = ("The user signed out: this refresh token was revoked (POST /revoke). "
              "Discard it and log the user in again; do not retry")


@bp.post("/revoke")
def revoke() -> Response:
    """Sign out (RFC 7009): the grant of the refresh token sent ends, on every worker. 200 for any token, one
    that does not open included (section 2.2); `token_type_hint` may name anything (only refresh tokens are
    this service's to revoke)."""
    svc = resources()
    data = _body()
    _check_client_id(svc, data)
    token = _opaque(data, "token")
    _field(data, "token_type_hint", required=False)  # read, so that it is checked to be one string
    opened = _open(svc, token)
    if opened is not None:
        revocations.revocations().revoke(opened, revocations.multiprocess())
        metrics.count_revocation()
    return json_response({})


def _token_endpoint(path_grant: str) -> Response:
    """Swap or refresh, as `grant_type` says, or as the path serves when it says nothing."""
    svc = resources()
    data = _body()
    grant = _field(data, "grant_type", required=False)
    grants = (SWAP, REFRESH, APP_TOKEN) if svc.config.client_credentials else (SWAP, REFRESH)
    if grant not in (None, *grants) or (grant is None and path_grant not in grants):
        off = "; app-only tokens are off here (CLIENT_CREDENTIALS=on enables them)" if APP_TOKEN not in grants else ""
        raise OAuthError(400, "unsupported_grant_type", f"grant_type must be {', '.join(grants)}{off}")
    _check_client_id(svc, data)
    metrics.note_grant(grant or path_grant)
    if (grant or path_grant) == SWAP:
        tokens = _swap(svc, data)
    elif (grant or path_grant) == REFRESH:
        tokens = _refresh(svc, data, code_is_token=grant is None)
    else:
        tokens = _app_token(svc)
    return json_response(tokens)


def _check_client_id(svc: Resources, data: Mapping[str, Any]) -> None:
    """OAuth libraries add a client id (in the body, or as the user name of Basic credentials, RFC 6749
    section 2.3.1) and often a client secret: accepted, never forwarded. Another app's id is a setup
    mistake, said as RFC 6749 section 5.2 says; the password part is ignored (libraries send `None`,
    `undefined` or nothing there)."""
    client_id = _field(data, "client_id", required=False)
    if client_id is not None and client_id != svc.config.client_id:
        raise OAuthError(
            400, "invalid_client", "This token service serves another Spotify app: 'client_id' is not its SPOTIFY_CLIENT_ID"
        )
    credentials = request.authorization
    if credentials is not None and credentials.type == "basic" and credentials.username:
        if unquote_plus(credentials.username) != svc.config.client_id:
            raise OAuthError(
                401, "invalid_client",
                "This token service serves another Spotify app: the client ID in the Authorization header is not its "
                "SPOTIFY_CLIENT_ID",
                headers={"WWW-Authenticate": 'Basic realm="token swap"'},
            )


# -- reading a request ---------------------------------------------------------------------------


class _BodyTimedOut(Exception):
    """The body did not all arrive within BODY_TIMEOUT.

    An Exception, not a BaseException like gevent.Timeout: raised inside gunicorn's body reader, it
    marks the body as failed, and gunicorn then closes the connection instead of reading on.
    """


def _body_deadline() -> gevent.Timeout | None:
    """A started timer that interrupts reading the body after BODY_TIMEOUT seconds, or None.

    Only under gevent's patched sockets (the Procfile's workers): elsewhere (flask run, unit
    tests) nothing bounds the time a body takes but that server's own socket timeouts.
    """
    if not gevent.monkey.is_module_patched("socket"):
        return None
    return gevent.Timeout.start_new(BODY_TIMEOUT, _BodyTimedOut)


def _read_body() -> bytes:
    """The whole body, or a client error: too large, shorter than announced, unreadable, too slow."""
    deadline = _body_deadline()
    try:
        data = request.get_data()
        # Without a Content-Length (chunked), reading stops at the limit: is there more?
        if request.content_length is None and len(data) >= MAX_BODY_BYTES and request.stream.read(1):
            raise RequestEntityTooLarge()
    except HTTPException:
        raise
    except _BodyTimedOut:
        raise OAuthError(
            408, "invalid_request", f"The body did not arrive within {BODY_TIMEOUT:g} seconds of its headers"
        ) from None
    except Exception:  # the server's reader refused the body, e.g. a malformed chunk
        raise OAuthError(400, "invalid_request", "The body could not be read") from None
    finally:
        if deadline is not None:
            deadline.close()
    if request.content_length is not None and len(data) < request.content_length:
        # The client went away mid-body: what arrived may be cut anywhere, even inside the code.
        raise OAuthError(400, "invalid_request", "The body is shorter than its Content-Length")
    return data


def _body() -> Mapping[str, Any]:
    # Read whole first: form parsing would silently stop at the limit or at a broken chunk. The
    # form and JSON parsers then read the data kept by get_data().
    body = _read_body()
    if request.mimetype == "application/x-www-form-urlencoded":
        # What every SDK sends: the standard library's parser, one layer instead of werkzeug's
        # form-parser set-up per request (multipart and the rest go through request.form).
        try:
            return MultiDict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:  # not UTF-8: no fields, as werkzeug would have it
            return MultiDict()
    if request.is_json:
        try:
            data = request.get_json(silent=True)
        except RecursionError:  # nested deeper than the parser goes: unparseable, like any bad JSON
            data = None
        if not isinstance(data, dict):
            raise OAuthError(400, "invalid_request", "The body is not a JSON object")
        return data
    return request.form


def _field(data: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    if isinstance(data, MultiDict):
        values = data.getlist(name)
        if len(values) > 1:
            raise OAuthError(400, "invalid_request", f"'{name}' was given more than once")
        value = values[0] if values else None
    else:
        value = data.get(name)
    if value is None or value == "":
        if required:
            raise OAuthError(400, "invalid_request", f"Missing '{name}'")
        return None
    if not isinstance(value, str):
        raise OAuthError(400, "invalid_request", f"'{name}' must be a string")
    return value


def _opaque(data: Mapping[str, Any], name: str) -> str:
    value = _field(data, name)
    if value is None or not _OPAQUE.fullmatch(value):  # None only in theory: the field is required
        raise OAuthError(400, "invalid_request", f"'{name}' is malformed")
    return value


# -- the grants ----------------------------------------------------------------------------------


def _swap(svc: Resources, data: Mapping[str, Any]) -> dict[str, Any]:
    code = _opaque(data, "code")
    callbacks = svc.config.callback_urls
    redirect_uri = _field(data, "redirect_uri", required=False) or callbacks[0]
    if redirect_uri not in callbacks:
        raise OAuthError(400, "invalid_request", "'redirect_uri' is not one this service allows: add it to SPOTIFY_CLIENT_CALLBACK_URL")
    verifier = _field(data, "code_verifier", required=False)
    if verifier is not None and not _CODE_VERIFIER.fullmatch(verifier):
        raise OAuthError(400, "invalid_request", "'code_verifier' must be 43-128 characters (RFC 7636)")
    try:
        tokens = svc.spotify.exchange_code(code, redirect_uri, verifier, admit=ratelimit.admit)
    except spotify.Denied as err:
        if err.answer.get("error") == "invalid_grant" and "redirect uri" in err.description.lower():
            current_app.logger.warning(
                "Spotify refused the redirect URI %s, which SPOTIFY_CLIENT_CALLBACK_URL allows: it "
                "must be registered in the app's settings in the Spotify developer dashboard",
                ascii(redirect_uri),
            )
        raise
    return _sealed(svc, tokens, Opened("", signed_in_at=svc.now()))  # a new sign-in: a new grant


def _refresh(svc: Resources, data: Mapping[str, Any], *, code_is_token: bool) -> dict[str, Any]:
    token = _field(data, "refresh_token", required=False)
    if token is None and code_is_token:
        # SpotifyAPI-NET's own guide refreshes with TokenSwapTokenRequest: the sealed token
        # comes as `code`. Only a code that opens is read so.
        code = _field(data, "code", required=False)
        if code is not None and _open(svc, code) is not None:
            token = code
    if token is None:
        raise OAuthError(400, "invalid_request", "Missing 'refresh_token'")
    opened = _open(svc, token)
    if opened is None:
        raise OAuthError(400, "invalid_grant", "Invalid refresh token")
    metrics.count_opened(opened.key)  # key usage, for key rotation
    _refuse_ended(svc, opened)
    if revocations.revocations().revoked(opened, revocations.multiprocess()):
        metrics.count_grant_refused("signed_out")
        raise OAuthError(400, "invalid_grant", SIGNED_OUT)
    try:
        tokens = svc.spotify.refresh(opened.refresh_token, admit=lambda: ratelimit.admit(opened.refresh_token))
    except spotify.Denied as err:
        if err.answer.get("error") == "invalid_grant":
            raise OAuthError(err.status, "invalid_grant", _spotify_ended(svc, opened, err)) from None
        raise
    # A refresh answer carries a refresh token, so a client that stores what it receives never
    # loses it: Spotify's new one, or the one sent (moved to the newest key and version if need be).
    kept = _seal(svc, opened.refresh_token, opened) if opened.needs_reseal else token
    return _sealed(svc, tokens, opened, otherwise=kept)


def _app_token(svc: Resources) -> dict[str, Any]:
    """An app-only token: the one this process holds while it is fresh, else a new one from Spotify."""

    def fetch() -> dict[str, Any]:
        try:
            return svc.spotify.client_credentials(admit=ratelimit.admit)
        except spotify.Denied as err:
            if isinstance(err, spotify.CredentialsRefused):
                raise
            # No client's code or token was in it: not the client's mistake, and not charged to it.
            raise spotify.BadAnswer("Spotify refused to issue an app-only token") from None

    return svc.app_tokens.get(fetch)


def _refuse_ended(svc: Resources, opened: Opened) -> None:
    """Refuse a sign-in past REFRESH_TOKEN_LIFETIME here, without asking Spotify; count the age of the others."""
    if opened.signed_in_at is None:
        return
    age = svc.now() - opened.signed_in_at
    if age >= svc.config.refresh_token_lifetime:
        metrics.count_grant_refused("expired")
        raise OAuthError(
            400, "invalid_grant",
            f"The sign-in has expired: it is {_age(age)} old, past this service's refresh token lifetime of "
            f"{_age(svc.config.refresh_token_lifetime)}. The user must log in again; do not retry",
        )
    metrics.observe_token_age(age)


def _spotify_ended(svc: Resources, opened: Opened, err: spotify.Denied) -> str:
    """What a client is told when Spotify refuses a refresh token: whether its sign-in was past Spotify's
    lifetime, and that retrying cannot help."""
    said = f" ({err.description[:200]})" if err.description else ""
    if opened.signed_in_at is None:
        why = "its sign-in time is not known, so it may be past Spotify's six-month lifetime"
    else:
        age = svc.now() - opened.signed_in_at
        why = (
            f"the sign-in is {_age(age)} old, past Spotify's six-month lifetime"
            if age >= SPOTIFY_SHORTEST_LIFETIME
            else f"the sign-in is {_age(age)} old, within its lifetime: the user may have removed the app's access"
        )
    return f"Spotify refused the refresh token{said}; {why}. Discard it and have the user log in again; do not retry"


def _age(seconds: int) -> str:
    return f"{seconds // 86400} days" if seconds >= 2 * 86400 else f"{seconds} seconds"


def _open(svc: Resources, token: str) -> Opened | None:
    try:
        return svc.sealer.open(token)
    except InvalidToken:
        return None


def _seal(svc: Resources, raw: str, grant: Opened) -> str:
    """`raw` sealed as a token of `grant`'s sign-in: its time and grant id kept (a new grant id for a
    token that had none)."""
    return svc.sealer.seal(raw, signed_in_at=grant.signed_in_at, grant_id=grant.grant_id)


def _sealed(svc: Resources, tokens: dict[str, Any], grant: Opened, otherwise: str | None = None) -> dict[str, Any]:
    """Spotify's answer with its refresh token sealed as one of `grant`'s sign-in (the raw one never
    reaches the client), or with `otherwise` when it has none; with `refresh_token_expires_in`, the
    whole seconds the sign-in has left, when its time is known."""
    raw = tokens.pop("refresh_token", None)
    if isinstance(raw, str) and raw:
        tokens["refresh_token"] = _seal(svc, raw, grant)
    elif otherwise is not None:
        tokens["refresh_token"] = otherwise
    ends_at = svc.grant_ends_at(grant)
    if ends_at is not None and "refresh_token" in tokens:
        tokens["refresh_token_expires_in"] = max(0, ends_at - svc.now())
    return tokens
