"""Cross-origin access for browser apps (CORS_ORIGINS), with flask-cors."""

from __future__ import annotations

from flask import Flask, Response
from flask_cors import CORS

from config import Config

# How long a browser may keep a preflight's answer.
MAX_AGE = 86400


def init_app(app: Flask, config: Config) -> None:
    """Let the configured origins read every answer; nothing when CORS_ORIGINS is empty."""
    if not config.cors_origins:
        return
    # Every path, so that a browser can read every answer, a 404 or 405 included. Browsers cannot
    # read Retry-After (on 429 and 503) unless it is exposed.
    CORS(
        app,
        resources={r"/.*": {}},
        origins="*" if "*" in config.cors_origins else list(config.cors_origins),
        methods=["GET", "POST"],
        # OAuth libraries in the browser may send their client id as Basic auth.
        allow_headers=["Content-Type", "Authorization"],
        expose_headers=["Retry-After"],
        max_age=MAX_AGE,
        always_send=False,
        vary_header=True,
    )
    app.after_request(_vary_on_origin)


def _vary_on_origin(response: Response) -> Response:
    # flask-cors leaves Vary out when a single origin is allowed; caches need it regardless.
    response.vary.add("Origin")
    return response
