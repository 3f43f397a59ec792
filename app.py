"""The HTTP service: an OAuth 2.0 token endpoint for swaps and refreshes, GET /health, flask commands."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import click
from flask import Flask, Response, current_app, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import check
import logs
import metrics
import page
import ratelimit
import spotify
from config import VARIABLES, Config, ConfigError, connections_per_worker, generate_secret, load_config
from crypto import InvalidToken, Opened, TokenSealer
from ratelimit import Refused

try:  # the Procfile's workers are gevent's; the service also runs without it (flask run, tests)
    import gevent
    import gevent.monkey
except ImportError:  # pragma: no cover
    gevent = None

MAX_BODY_BYTES = 64 * 1024
# A body not all arrived this many seconds after its headers is answered 408, and its connection closed.
BODY_TIMEOUT = 10
# Per worker, as gunicorn.conf.py's worker_connections: every waiting request has a pooled connection.
UPSTREAM_POOL_SIZE = connections_per_worker()
# Each path has the grant it serves when a request names none (RFC 6749 section 4.1.3 or 6). The
# /v1/ paths are those of Spotify's own "Token Swap and Refresh" guide.
SWAP_PATHS = ("/swap", "/api/token", "/v1/swap")
REFRESH_PATHS = ("/refresh", "/api/refresh_token", "/v1/refresh")
SWAP, REFRESH = "authorization_code", "refresh_token"
CORS_MAX_AGE = 86400
# How often, at most, a worker logs that Spotify refuses the service's own credentials.
MISCONFIGURED_LOG_SECONDS = 60.0

# RFC 6749 section 5.1: token answers must not be cached.
_NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
# Codes and tokens are opaque but printable; anything else cannot be one, so Spotify is not asked.
_OPAQUE = re.compile(r"[\x21-\x7e]{1,4096}")
# RFC 7636 section 4.1.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


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
    """A JSON answer with Content-Type exactly application/json (SpotifyAPI-NET insists)."""
    response = Response(
        json.dumps(payload, separators=(",", ":")), status, _NO_STORE, mimetype="application/json"
    )
    if headers:
        response.headers.update(headers)
    return response


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service from environment variables, overridden by test_config when given."""
    app = TokenSwap(__name__)
    # Werkzeug would answer /api//token with a 308 redirect and an HTML body; a 404 JSON is clearer.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    overrides = dict(test_config or {})
    environ = {name: overrides.pop(name) for name in list(overrides) if name in VARIABLES}
    app.config.update(overrides)
    _register_cli(app)

    try:
        config = load_config({**os.environ, **environ})
    except ConfigError as err:
        # Under the flask command, gen-secret (how an operator fixes a missing secret) and check
        # (which reports the problem itself) must work before the configuration does; anything
        # else stops with the message alone.
        if click.get_current_context(silent=True) is None:
            raise
        if not {"gen-secret", "check"} & set(sys.argv[1:]):
            raise click.ClickException(str(err)) from None
        return app

    logs.init_app(app)  # observe (issue 16): request ids
    # observe (issue 16): metrics first, so that Service's Spotify client reports to them.
    app.extensions["tokenswap"] = Service(config, metrics.init_app(app, config), app.logger)
    _register_routes(app)
    page.init_app(app)
    _register_errors(app)
    _install_cors_and_proxies(app, config)
    ratelimit.init_app(app, config)
    return app


class TokenSwap(Flask):
    """Flask, with preflight (OPTIONS) answers that are an empty 204 rather than an empty text/html 200."""

    def make_default_options_response(self) -> Response:
        response = super().make_default_options_response()
        response.status_code = 204
        response.headers.pop("Content-Type", None)
        return response


class Service:
    """What the routes need, built once per process: config, token sealer, upstream client."""

    def __init__(
        self, config: Config, observer: spotify.Observer | None = None, logger: logging.Logger | None = None
    ):
        self.config = config
        self.sealer = TokenSealer(
            config.encryption_secrets, config.client_id, config.legacy_secret
        )
        self.spotify = spotify.AccountsClient(
            config.client_id,
            config.client_secret,
            config.accounts_url,
            config.timeout,
            pool_size=UPSTREAM_POOL_SIZE,
            observer=observer,  # observe (issue 16)
            logger=logger,  # observe (issue 16): a WARNING naming why Spotify is unreachable
        )
        self.misconfigured_logged_at: float | None = None


def _service() -> Service:
    return current_app.extensions["tokenswap"]


# -- reading a request ---------------------------------------------------------------------------


class _BodyTimedOut(Exception):
    """The body did not all arrive within BODY_TIMEOUT.

    An Exception, not a BaseException like gevent.Timeout: raised inside gunicorn's body reader, it
    marks the body as failed, and gunicorn then closes the connection instead of reading on.
    """


def _body_deadline() -> Any:
    """A started timer that interrupts reading the body after BODY_TIMEOUT seconds, or None.

    Only under gevent's patched sockets (the Procfile's workers): elsewhere (flask run, unit
    tests) nothing bounds the time a body takes but that server's own socket timeouts.
    """
    if gevent is None or not gevent.monkey.is_module_patched("socket"):
        return None
    return gevent.Timeout.start_new(BODY_TIMEOUT, _BodyTimedOut)


def _read_body() -> bytes:
    """The whole body, or a client error: too large, shorter than announced, unreadable, too slow."""
    deadline = _body_deadline()
    try:
        data = request.get_data()
        # Without a Content-Length (chunked), reading stops at the limit: is there more?
        if (
            request.content_length is None
            and len(data) >= MAX_BODY_BYTES
            and request.stream.read(1)
        ):
            raise RequestEntityTooLarge()
    except HTTPException:
        raise
    except _BodyTimedOut:
        raise OAuthError(
            408, "invalid_request", f"The body did not arrive within {BODY_TIMEOUT} seconds of its headers"
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
    if not _OPAQUE.fullmatch(value):
        raise OAuthError(400, "invalid_request", f"'{name}' is malformed")
    return value


# -- the token endpoint --------------------------------------------------------------------------


def _register_routes(app: Flask) -> None:
    def token_endpoint(path_grant: str) -> Response:
        """Swap or refresh, as `grant_type` says, or as the path serves when it says nothing."""
        service = _service()
        data = _body()
        grant = _field(data, "grant_type", required=False)
        if grant not in (None, SWAP, REFRESH):
            raise OAuthError(
                400, "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            )
        # OAuth libraries add client_id (and client_secret, scope, state, an Authorization
        # header): accepted, never forwarded. A client_id of another app is a setup mistake.
        client_id = _field(data, "client_id", required=False)
        if client_id is not None and client_id != service.config.client_id:
            raise OAuthError(
                400, "invalid_client",
                "This token service serves another Spotify app: 'client_id' is not its client ID",
            )
        metrics.note_grant(grant or path_grant)  # observe (issue 16)
        if (grant or path_grant) == SWAP:
            tokens = _swap(service, data)
        else:
            tokens = _refresh(service, data, code_is_token=grant is None)
        return json_response(tokens)

    def swap() -> Response:
        return token_endpoint(SWAP)

    def refresh() -> Response:
        return token_endpoint(REFRESH)

    def health() -> Response:
        return json_response({"status": "ok"})

    for path in SWAP_PATHS:
        app.add_url_rule(path, "swap", swap, methods=["POST"])
    for path in REFRESH_PATHS:
        app.add_url_rule(path, "refresh", refresh, methods=["POST"])
    app.add_url_rule("/health", "health", health, methods=["GET"])


def _swap(service: Service, data: Mapping[str, Any]) -> dict[str, Any]:
    code = _opaque(data, "code")
    callbacks = service.config.callback_urls
    redirect_uri = _field(data, "redirect_uri", required=False) or callbacks[0]
    if redirect_uri not in callbacks:
        raise OAuthError(400, "invalid_request", "'redirect_uri' is not one this service allows")
    verifier = _field(data, "code_verifier", required=False)
    if verifier is not None and not _CODE_VERIFIER.fullmatch(verifier):
        raise OAuthError(400, "invalid_request", "'code_verifier' must be 43-128 characters (RFC 7636)")
    ratelimit.admit()
    try:
        tokens = service.spotify.exchange_code(code, redirect_uri, verifier)
    except spotify.Denied as err:
        if err.answer.get("error") == "invalid_grant" and "redirect uri" in err.description.lower():
            current_app.logger.warning(
                "Spotify refused the redirect URI %s, which SPOTIFY_CLIENT_CALLBACK_URL allows: it "
                "must be registered in the app's settings in the Spotify developer dashboard",
                ascii(redirect_uri),
            )
        raise
    return _sealed(service, tokens)


def _refresh(service: Service, data: Mapping[str, Any], *, code_is_token: bool) -> dict[str, Any]:
    token = _field(data, "refresh_token", required=False)
    if token is None and code_is_token:
        # SpotifyAPI-NET's own guide refreshes with TokenSwapTokenRequest: the sealed token
        # comes as `code`. Only a code that opens is read so.
        code = _field(data, "code", required=False)
        if code is not None and _open(service, code) is not None:
            token = code
    if token is None:
        raise OAuthError(400, "invalid_request", "Missing 'refresh_token'")
    opened = _open(service, token)
    if opened is None:
        raise OAuthError(400, "invalid_grant", "Invalid refresh token")
    metrics.count_opened(opened.key)  # observe (issue 16): key usage, for key rotation
    ratelimit.admit(opened.refresh_token)
    tokens = service.spotify.refresh(opened.refresh_token)
    # Every refresh answer carries a refresh token, so a client that stores what it receives
    # never loses it: Spotify's new one, or the one sent (moved to the newest key if need be).
    kept = service.sealer.seal(opened.refresh_token) if opened.needs_reseal else token
    return _sealed(service, tokens, otherwise=kept)


def _open(service: Service, token: str) -> Opened | None:
    try:
        return service.sealer.open(token)
    except InvalidToken:
        return None


def _sealed(service: Service, tokens: dict[str, Any], otherwise: str | None = None) -> dict[str, Any]:
    """Spotify's answer with its refresh token sealed (the raw one never reaches the client), or
    with `otherwise` when it has none."""
    raw = tokens.pop("refresh_token", None)
    if isinstance(raw, str) and raw:
        tokens["refresh_token"] = service.sealer.seal(raw)
    elif otherwise is not None:
        tokens["refresh_token"] = otherwise
    return tokens


# -- errors --------------------------------------------------------------------------------------


def _register_errors(app: Flask) -> None:
    @app.errorhandler(OAuthError)
    def oauth_error(err: OAuthError) -> Response:
        return json_response(err.body, err.status, err.headers)

    @app.errorhandler(spotify.SpotifyError)
    def spotify_error(err: spotify.SpotifyError) -> Response:
        return oauth_error(_from_spotify(err))

    @app.errorhandler(Refused)
    def refused(err: Refused) -> Response:
        metrics.count_refused(err.reason)  # observe (issue 16)
        return oauth_error(_from_limits(err))

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        error = "invalid_request" if err.code in (400, 413) else _snake(err.name)
        description = _DESCRIPTIONS.get(err.code, err.name)
        response = json_response({"error": error, "error_description": description}, err.code or 500)
        for name, value in err.get_headers():
            if name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(err: Exception) -> Response:
        # The traceback names code and exception types; no request data is in it.
        app.logger.exception("Unhandled error on %s %s", request.method, request.path)
        return json_response(
            {"error": "server_error", "error_description": "Internal server error"}, 500
        )


def _from_spotify(err: spotify.SpotifyError) -> OAuthError:
    """What the client is told when Spotify gave no tokens."""
    if isinstance(err, spotify.CredentialsRefused):
        _log_misconfigured(err)
        # Not the client's mistake, and no setting's name: the operator's log says which.
        return OAuthError(
            500, "server_error", "The token service is misconfigured; retry later"
        )
    if isinstance(err, spotify.Denied):  # the code or token was refused: the client's to know
        return OAuthError(err.status, body=err.answer)
    if isinstance(err, spotify.RateLimited):
        headers = {"Retry-After": err.retry_after} if err.retry_after is not None else {}
        if err.answer is not None:
            return OAuthError(429, body=err.answer, headers=headers)
        return OAuthError(
            429, "temporarily_unavailable", "Spotify is rate limiting this app", headers=headers
        )
    if isinstance(err, spotify.Unreachable):
        return OAuthError(503, "temporarily_unavailable", "Could not reach Spotify")
    if isinstance(err, spotify.TimedOut):
        return OAuthError(504, "temporarily_unavailable", "Spotify did not answer in time")
    return OAuthError(502, "server_error", str(err) or "Spotify's answer could not be read")


def _log_misconfigured(err: spotify.CredentialsRefused) -> None:
    service = _service()
    now = time.monotonic()
    if service.misconfigured_logged_at is not None and now - service.misconfigured_logged_at < MISCONFIGURED_LOG_SECONDS:
        return
    service.misconfigured_logged_at = now
    variable = "SPOTIFY_CLIENT_SECRET" if err.blames_secret else "SPOTIFY_CLIENT_ID"
    current_app.logger.error(
        "Spotify refuses this service's credentials (%s: %s): check %s against the app's settings "
        "in the Spotify developer dashboard. Every swap and refresh fails until it is fixed "
        "(logged at most once a minute per worker)",
        ascii(err.answer.get("error"))[1:-1], ascii(err.description[:200]), variable,
    )


def _from_limits(err: Refused) -> OAuthError:
    headers = {"Retry-After": str(err.retry_after)}
    if err.reason == Refused.FAILURES:
        description = (
            f"Too many failed requests from this address; retry after {err.retry_after} seconds"
        )
        return OAuthError(429, "rate_limited", description, headers=headers)
    if err.reason == Refused.TOKEN:
        description = (
            f"This refresh token was refreshed too often; retry after {err.retry_after} seconds"
        )
        return OAuthError(429, "rate_limited", description, headers=headers)
    if err.reason == Refused.CEILING:
        description = "This service is at its ceiling of calls to Spotify; retry shortly"
    else:
        description = "Too many calls to Spotify in progress for this address; retry shortly"
    return OAuthError(503, "temporarily_unavailable", description, headers=headers)


_DESCRIPTIONS = {
    404: "No such endpoint: use POST /swap, POST /refresh or GET /health",
    405: "Method not allowed here",
    413: f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB",
}


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# -- commands and middleware ---------------------------------------------------------------------


def _register_cli(app: Flask) -> None:
    @app.cli.command("gen-secret")
    def gen_secret() -> None:
        """Print a fresh, strong value for ENCRYPTION_SECRET."""
        click.echo(generate_secret())

    @app.cli.command("check")
    def check_deployment() -> None:
        """Check this deployment for real: configuration, Spotify credentials, rate-limit storage."""
        if not check.report(os.environ, click.echo):
            raise SystemExit(1)


def _install_cors_and_proxies(app: Flask, config: Config) -> None:
    if config.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(
            app.wsgi_app, x_for=config.trusted_proxies, x_proto=config.trusted_proxies
        )

    if config.cors_origins:
        from flask_cors import CORS

        # Every path, so that a browser can read every answer, a 404 or 405 included. Browsers
        # cannot read Retry-After (on 429 and 503) unless it is exposed.
        CORS(
            app,
            resources={r"/.*": {}},
            origins="*" if "*" in config.cors_origins else list(config.cors_origins),
            methods=["GET", "POST"],
            # OAuth libraries in the browser may send their client id as Basic auth: accepted, ignored.
            allow_headers=["Content-Type", "Authorization"],
            expose_headers=["Retry-After"],
            max_age=CORS_MAX_AGE,
            always_send=False,
            vary_header=True,
        )

        @app.after_request
        def vary_on_origin(response: Response) -> Response:
            # flask-cors leaves Vary out when a single origin is allowed; caches need it regardless.
            response.vary.add("Origin")
            return response
