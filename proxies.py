"""The client's address and scheme from X-Forwarded-For/-Proto, set by TRUSTED_PROXIES proxies in front."""

from __future__ import annotations

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Config


def init_app(app: Flask, config: Config) -> None:
    """Trust as many proxies as TRUSTED_PROXIES says; none by default."""
    if config.trusted_proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]  # werkzeug's documented way to wrap the WSGI app
            app.wsgi_app, x_for=config.trusted_proxies, x_proto=config.trusted_proxies
        )
