"""The HTTP service: POST /swap and /refresh (and their /api/ aliases), GET /health."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import click
from flask import Flask, Request, Response, current_app, request
from flask.sessions import SessionInterface
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import page
from config import VARIABLES, Config, ConfigError, generate_secret, load_config
from crypto import InvalidToken, TokenSealer
from ratelimit import Limits, Refused
from spotify import AccountsClient, OAuthError

MAX_BODY_BYTES = 64 * 1024
# Per worker: gunicorn.conf.py's worker_connections, so every waiting request has a pooled connection.
UPSTREAM_POOL_SIZE = 1000
SWAP_PATHS = ("/swap", "/api/token")
REFRESH_PATHS = ("/refresh", "/api/refresh_token")
CORS_MAX_AGE = 86400
# Where a request keeps the client address it was admitted under to call Spotify.
_ADMITTED = "tokenswap.admitted"

# RFC 6749 section 5.1: token answers must not be cached.
_NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
# Codes and tokens are opaque but printable; anything else cannot be one, so Spotify is not asked.
_OPAQUE = re.compile(r"[\x21-\x7e]{1,4096}")
# RFC 7636 section 4.1.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


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

    try:
        config = load_config({**os.environ, **environ})
    except ConfigError as err:
        if click.get_current_context(silent=True) is None:
            raise
        # Under the flask command: gen-secret is how an operator fixes a missing secret, so it
        # must work before the configuration does; anything else stops with the message alone.
        if "gen-secret" not in sys.argv[1:]:
            raise click.ClickException(str(err)) from None
        _register_cli(app)
        return app

    app.extensions["tokenswap"] = Service(config)
    _register_routes(app)
    page.init_app(app)
    _register_errors(app)
    _register_cli(app)
    _install_middleware(app, config)
    return app


class _NoSessions(SessionInterface):
    """This service keeps no session: no signed-cookie set-up on every request."""

    def open_session(self, app: Flask, request: Request) -> None:
        return None

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        return None


class TokenSwap(Flask):
    """Flask, with preflight (OPTIONS) answers that are an empty 204 rather than an empty text/html 200."""

    session_interface = _NoSessions()

    def make_default_options_response(self) -> Response:
        response = super().make_default_options_response()
        response.status_code = 204
        response.headers.pop("Content-Type", None)
        return response


class Service:
    """What the routes need, built once per process: config, token sealer, upstream client."""

    def __init__(self, config: Config):
        self.config = config
        self.sealer = TokenSealer(
            config.encryption_secrets, config.client_id, config.legacy_secret
        )
        self.spotify = AccountsClient(
            config.client_id,
            config.client_secret,
            config.accounts_url,
            config.timeout,
            pool_size=UPSTREAM_POOL_SIZE,
        )
        # Failure budgets and the ceiling on calls to Spotify; set by _install_limits when on.
        self.limits: Limits | None = None

    def call_spotify(self, call: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """Make one call to Spotify, within this deployment's limits."""
        if self.limits is None:
            return call(*args)
        address = request.remote_addr or ""
        self.limits.admit(address, wait=self.config.timeout)
        # Released at teardown, once the answer has been counted as a failure or not.
        request.environ[_ADMITTED] = address
        return call(*args)


def _service() -> Service:
    return current_app.extensions["tokenswap"]


def _read_body() -> bytes:
    """The whole body, or a client error: too large, shorter than announced, or unreadable."""
    try:
        data = request.get_data()
        # Without a Content-Length (chunked), reading stops at the limit: is there more?
        if (
            request.content_length is None
            and len(data) >= MAX_BODY_BYTES
            and request.environ["wsgi.input"].read(1)
        ):
            raise RequestEntityTooLarge()
    except HTTPException:
        raise
    except Exception:  # the server's reader refused the body, e.g. a malformed chunk
        raise OAuthError(400, "invalid_request", "The body could not be read") from None
    if request.content_length is not None and len(data) < request.content_length:
        # The client went away mid-body: what arrived may be cut anywhere, even inside the code.
        raise OAuthError(400, "invalid_request", "The body is shorter than its Content-Length")
    return data


def _body() -> Mapping[str, Any]:
    # Read whole first; form parsing would silently stop at the limit or at a broken chunk.
    body = _read_body()
    if request.mimetype == "application/x-www-form-urlencoded":
        # What werkzeug's form parser does for this type, without building the parser each time.
        try:
            return MultiDict(parse_qsl(body.decode(), keep_blank_values=True, errors="werkzeug.url_quote"))
        except ValueError:  # not UTF-8: no fields, as werkzeug would have it
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


def _register_routes(app: Flask) -> None:
    def swap() -> Response:
        service = _service()
        data = _body()
        code = _opaque(data, "code")
        callbacks = service.config.callback_urls
        redirect_uri = _field(data, "redirect_uri", required=False) or callbacks[0]
        if redirect_uri not in callbacks:
            raise OAuthError(400, "invalid_request", "'redirect_uri' is not one this service allows")
        verifier = _field(data, "code_verifier", required=False)
        if verifier is not None and not _CODE_VERIFIER.fullmatch(verifier):
            raise OAuthError(
                400, "invalid_request", "'code_verifier' must be 43-128 characters (RFC 7636)"
            )
        tokens = service.call_spotify(service.spotify.exchange_code, code, redirect_uri, verifier)
        new = tokens.pop("refresh_token", None)
        if isinstance(new, str) and new:
            tokens["refresh_token"] = service.sealer.seal(new)
        return json_response(tokens)

    def refresh() -> Response:
        service = _service()
        token = _field(_body(), "refresh_token")
        try:
            opened = service.sealer.open(token)
        except InvalidToken:
            raise OAuthError(400, "invalid_grant", "Invalid refresh token") from None
        tokens = service.call_spotify(service.spotify.refresh, opened.refresh_token)
        new = tokens.pop("refresh_token", None)
        if isinstance(new, str) and new:
            tokens["refresh_token"] = service.sealer.seal(new)
        elif opened.needs_reseal:
            # Move the client to the current key (or off the legacy format) as it refreshes.
            tokens["refresh_token"] = service.sealer.seal(opened.refresh_token)
        return json_response(tokens)

    def health() -> Response:
        return json_response({"status": "ok"})

    for path in SWAP_PATHS:
        app.add_url_rule(path, "swap", swap, methods=["POST"])
    for path in REFRESH_PATHS:
        app.add_url_rule(path, "refresh", refresh, methods=["POST"])
    app.add_url_rule("/health", "health", health, methods=["GET"])


def _register_errors(app: Flask) -> None:
    @app.errorhandler(OAuthError)
    def oauth_error(err: OAuthError) -> Response:
        return json_response(err.body, err.status, err.headers)

    @app.errorhandler(Refused)
    def refused(err: Refused) -> Response:
        headers = {"Retry-After": str(err.retry_after)}
        if err.reason == Refused.FAILURES:
            description = (
                "Too many failed requests from this address; "
                f"retry after {err.retry_after} seconds"
            )
            return json_response({"error": "rate_limited", "error_description": description}, 429, headers)
        if err.reason == Refused.CEILING:
            description = "This service is at its ceiling of calls to Spotify; retry shortly"
        else:
            description = "Too many calls to Spotify in progress for this address; retry shortly"
        return json_response(
            {"error": "temporarily_unavailable", "error_description": description}, 503, headers
        )

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


_DESCRIPTIONS = {
    404: "No such endpoint: use POST /swap, POST /refresh or GET /health",
    405: "Method not allowed here",
    413: f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB",
}


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _register_cli(app: Flask) -> None:
    @app.cli.command("gen-secret")
    def gen_secret() -> None:
        """Print a fresh, strong value for ENCRYPTION_SECRET."""
        click.echo(generate_secret())


def _install_middleware(app: Flask, config: Config) -> None:
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
            allow_headers=["Content-Type"],
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

    if config.rate_limit_failures or config.spotify_max_rate:
        _install_limits(app, config)


def _is_limited(request: Request) -> bool:
    """/health, preflights and the landing page's GETs are never refused nor counted."""
    return (
        request.method != "OPTIONS"
        and request.endpoint != "health"
        and not page.is_page_request(request)
    )


def _install_limits(app: Flask, config: Config) -> None:
    limits = Limits(
        config.rate_limit_failures,
        config.spotify_max_rate,
        config.rate_limit_storage_uri,
        logger=app.logger,
    )
    service = app.extensions["tokenswap"]
    service.limits = limits
    if not limits.counts_failures:
        return

    @app.before_request
    def refuse_spent_addresses() -> None:
        if _is_limited(request):
            limits.check(request.remote_addr or "")

    @app.teardown_request
    def release(_: BaseException | None) -> None:
        address = request.environ.pop(_ADMITTED, None)
        if address is not None:
            limits.release(address)

    @app.after_request
    def count_failures(response: Response) -> Response:
        # 429 is not a new failure: being told to wait is not the client's mistake, nor is
        # Spotify rate-limiting the app. /health and preflights never count. Successes count
        # only in this process, as a track record that lets more of the address's calls run.
        status = response.status_code
        if _is_limited(request):
            if status < 300:
                limits.count_success(request.remote_addr or "")
            elif 400 <= status < 500 and status != 429:
                limits.count_failure(request.remote_addr or "")
        return response
