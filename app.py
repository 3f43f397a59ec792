"""The HTTP service: POST /swap and /refresh (and their /api/ aliases), GET /health."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import click
from flask import Flask, Response, current_app, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from config import VARIABLES, Config, ConfigError, generate_secret, load_config
from crypto import InvalidToken, TokenSealer
from spotify import AccountsClient, OAuthError

MAX_BODY_BYTES = 64 * 1024
# Per worker: gunicorn.conf.py's worker_connections, so every waiting request has a pooled connection.
UPSTREAM_POOL_SIZE = 1000
SWAP_PATHS = ("/swap", "/api/token")
REFRESH_PATHS = ("/refresh", "/api/refresh_token")
CORS_MAX_AGE = 86400

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
    _register_errors(app)
    _register_cli(app)
    _install_middleware(app, config)
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
        # Checks to run before each call to Spotify; set by _install_limits when limits are on.
        self.upstream_budget = None


def _service() -> Service:
    return current_app.extensions["tokenswap"]


def _body() -> Mapping[str, Any]:
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


def _spend_upstream_budget(service: Service) -> None:
    if service.upstream_budget is not None:
        service.upstream_budget()


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
        _spend_upstream_budget(service)
        tokens = service.spotify.exchange_code(code, redirect_uri, verifier)
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
        _spend_upstream_budget(service)
        tokens = service.spotify.refresh(opened.refresh_token)
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

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        if err.response is not None:  # already rendered, e.g. the rate limiter's 429
            return err.response
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

        paths = "|".join(re.escape(p) for p in SWAP_PATHS + REFRESH_PATHS)
        CORS(
            app,
            resources={rf"^({paths})$": {}},
            origins="*" if "*" in config.cors_origins else list(config.cors_origins),
            methods=["POST"],
            allow_headers=["Content-Type"],
            max_age=CORS_MAX_AGE,
            always_send=False,
        )
        cors_paths = frozenset(SWAP_PATHS + REFRESH_PATHS)

        @app.after_request
        def vary_on_origin(response: Response) -> Response:
            # flask-cors leaves Vary out when a single origin is allowed; caches need it regardless.
            if request.path in cors_paths:
                response.vary.add("Origin")
            return response

    if config.rate_limit_failures or config.spotify_max_rate:
        _install_limits(app, config)


def _is_failure(response: Response) -> bool:
    # 429 is excluded: being told to wait is not a new failure, and Spotify's 429s are not the client's.
    return 400 <= response.status_code < 500 and response.status_code != 429


def _retry_after(reset_at: float) -> str:
    return str(max(1, math.ceil(reset_at - time.time())))


def _rate_limited(reset_at: float) -> OAuthError:
    retry_after = _retry_after(reset_at)
    return OAuthError(
        429,
        "rate_limited",
        f"Too many failed requests from this address; retry after {retry_after} seconds",
        headers={"Retry-After": retry_after},
    )


def _storage_options(uri: str) -> dict[str, float]:
    # redis-py waits forever by default: a Redis that stops answering would hang every request.
    if uri.startswith(("redis://", "rediss://", "redis+unix://")):
        return {"socket_connect_timeout": 1, "socket_timeout": 1}
    return {}


def _install_limits(app: Flask, config: Config) -> None:
    import threading
    from collections import Counter

    from flask import g
    from flask_limiter import Limiter, RequestLimit
    from flask_limiter.util import get_remote_address
    from limits import parse_many

    def rate_limited(limit: RequestLimit) -> Response:
        err = _rate_limited(limit.reset_at)
        return json_response(err.body, err.status, err.headers)

    limiter = Limiter(
        get_remote_address,
        app=app,
        application_limits=[config.rate_limit_failures] if config.rate_limit_failures else [],
        application_limits_deduct_when=_is_failure,
        application_limits_exempt_when=lambda: request.method == "OPTIONS"
        or request.endpoint == "health",
        # Requests that match no route (404, 405) are failures too, so give them an identity.
        request_identifier=lambda: request.endpoint or "unrouted",
        storage_uri=config.rate_limit_storage_uri,
        storage_options=_storage_options(config.rate_limit_storage_uri),
        strategy="sliding-window-counter",
        key_prefix="tokenswap",
        on_breach=rate_limited,
        headers_enabled=False,
        # A Redis outage must not take the service down: limits fall back to this worker's
        # memory, and an error while counting is logged rather than turned into a 500.
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )

    # Calls to Spotify in progress in this worker, by client address.
    in_progress: Counter[str] = Counter()
    lock = threading.Lock()

    def admit() -> None:
        # flask-limiter counts a failure once its answer is known, so a burst of concurrent junk
        # codes would all reach Spotify before the first one counted. An address that has spent
        # half its failure budget may have only as many calls in progress as it has failures left.
        # Below that it is not held back: thousands of real users can share one address.
        address = get_remote_address()
        budgets = []
        for limit in limiter.current_limits:
            amount = limit.limit.amount
            try:
                budgets.append((amount, amount - limit.remaining, limit.reset_at))
            except Exception:  # storage unreachable: fail open, as flask-limiter does
                app.logger.exception("Rate limit storage unreachable")
        with lock:
            for amount, failures, reset_at in budgets:
                if 2 * failures >= amount and failures + in_progress[address] >= amount:
                    raise _rate_limited(reset_at)
            in_progress[address] += 1
        g.tokenswap_upstream_address = address

    @app.teardown_request
    def release(_: BaseException | None) -> None:
        address = g.pop("tokenswap_upstream_address", None)
        if address is not None:
            with lock:
                in_progress[address] -= 1
                if in_progress[address] <= 0:
                    del in_progress[address]

    ceilings = parse_many(config.spotify_max_rate) if config.spotify_max_rate else []

    def spend() -> None:
        # Test every ceiling before spending any, so a refused call spends none of them.
        upstream = limiter.limiter
        try:
            full = [c for c in ceilings if not upstream.test(c, "spotify-upstream")]
            if not full:
                full = [c for c in ceilings if not upstream.hit(c, "spotify-upstream")]
            if not full:
                return
            reset_at = max(upstream.get_window_stats(c, "spotify-upstream").reset_time for c in full)
        except Exception:  # storage unreachable: fail open
            app.logger.exception("Rate limit storage unreachable")
            return
        raise OAuthError(
            503,
            "temporarily_unavailable",
            "This service is at its ceiling of calls to Spotify; retry shortly",
            headers={"Retry-After": _retry_after(reset_at)},
        )

    def before_upstream() -> None:
        if config.rate_limit_failures:
            admit()
        if ceilings:
            spend()

    app.extensions["tokenswap"].upstream_budget = before_upstream
