"""The token swap service as a WSGI app: `create_app()`, the factory gunicorn and `flask --app app` call."""

from __future__ import annotations

import time
from collections.abc import Callable

import click
from flask import Flask, Response
from werkzeug.middleware.proxy_fix import ProxyFix

import api
import brake
import commands
import cors
import errors
import logs
import metrics
import page
import ratelimit
import resources
import revocations
from config import MAX_BODY_BYTES, Config, ConfigError, load_config


def create_app(config: Config | None = None, *, clock: Callable[[], float] = time.time) -> Flask:
    """The service for `config`, or for the environment's configuration (tests pass a Config and may pass
    the `clock` that tells the time of day)."""
    app = TokenSwap(__name__)
    # Werkzeug would answer /api//token with a 308 redirect and an HTML body; a 404 JSON is clearer.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    commands.init_app(app)
    if config is None:
        try:
            config = load_config()
        except ConfigError as err:
            if _finding_commands():
                return app  # gen-secret and check need no configuration: check reports this one
            if click.get_current_context(silent=True):
                raise click.ClickException(str(err)) from err
            raise
    logs.init_app(app)
    resources.init_app(app, config, observer=metrics.init_app(app, config, api.ENDPOINT_GRANTS),
                       gate=brake.init_app(app, config), clock=clock)
    app.register_blueprint(api.bp)
    page.init_app(app)
    errors.init_app(app)
    if config.trusted_proxies:  # the client's address and scheme from X-Forwarded-For/-Proto, set by those proxies
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]  # werkzeug's documented way to wrap the WSGI app
            app.wsgi_app, x_for=config.trusted_proxies, x_proto=config.trusted_proxies
        )
    cors.init_app(app, config)
    ratelimit.init_app(app, config, clock=clock)
    revocations.init_app(app, config, clock=clock)
    return app


def _finding_commands() -> bool:
    """True while the `flask` command loads the app only to look up one of the app's own commands.

    flask's FlaskGroup loads the app from inside its own group context to find `gen-secret` or
    `check`; `run`, `shell` and `routes` load it from inside their own command's context. Only the
    first may go on without a configuration.
    """
    context = click.get_current_context(silent=True)
    return context is not None and isinstance(context.command, click.Group)


class TokenSwap(Flask):
    """Flask, with preflight (OPTIONS) answers that are an empty 204 rather than an empty text/html 200, and
    told when its process begins to stop."""

    def begin_stop(self) -> None:
        """A stop has begun (server.Worker calls this on SIGTERM): GET /readyz answers 503 from now on."""
        svc = self.extensions.get("tokenswap")
        if svc is not None:
            svc.stopping = True

    def make_default_options_response(self) -> Response:
        response = super().make_default_options_response()
        response.status_code = 204
        response.headers.pop("Content-Type", None)
        return response
