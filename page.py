"""The landing page: what this service is, the URLs to give each client, and a live login test."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, render_template, request
from markupsafe import Markup, escape

from config import Config, token_settings
from logs import redacted_url

# Where a Spotify app's redirect URIs are registered.
DASHBOARD_URL = "https://developer.spotify.com/dashboard"
# What the login test asks for: enough to read the user's display name from the Web API.
SCOPE = "user-read-private"

bp = Blueprint("page", __name__)
# Where a URL or URI may wrap on a narrow screen: after "//", each "/", "?", "&" and ",".
_BREAK_AFTER = re.compile(r"(//|[/?&,])")


def init_app(app: Flask) -> None:
    """Serve the page at / and /callback (its files are the app's static/), with its security headers."""
    app.register_blueprint(bp)
    app.after_request(_secure)


def _config() -> Config:
    return current_app.extensions["tokenswap"].config


def _origin(url: str) -> str:
    parts = urlsplit(redacted_url(url))
    return f"{parts.scheme}://{parts.netloc}"


def spotify_takes(redirect_uri: str) -> bool:
    """Whether Spotify accepts this as a redirect URI of an app: https, or http on a loopback address
    literal (127.0.0.1, [::1]); never http://localhost."""
    parts = urlsplit(redirect_uri)
    if parts.scheme == "https":
        return True
    try:
        return parts.scheme == "http" and ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:  # a name, such as localhost
        return False


def _page() -> str:
    config = _config()
    # As the browser sees it: the Host header (proxies pass it on as they got it) and, when TRUSTED_PROXIES is
    # set, the scheme from X-Forwarded-Proto (ProxyFix). X-Forwarded-Host is never trusted: nothing sets x_host.
    base = request.url_root.rstrip("/")
    callback = base + "/callback"
    # Spotify takes http redirect URIs on loopback addresses only, and not "localhost": the page never advises
    # a redirect URI Spotify refuses. At localhost it points to the same port at 127.0.0.1.
    loopback = base.replace("localhost", "127.0.0.1", 1) if urlsplit(base).hostname == "localhost" else None
    stand_in = config.accounts_url != Config.accounts_url or config.api_url != Config.api_url
    return render_template(
        "page.html",
        base=base,
        callback=callback,
        login_allowed=callback in config.callback_urls,
        spotify_takes_callback=spotify_takes(callback),
        loopback=loopback,
        loopback_allowed=loopback is not None and loopback + "/callback" in config.callback_urls,
        client_id=config.client_id,
        callback_urls=config.callback_urls,
        # Credentials in these URLs (for an egress proxy) are the operator's, never the public's.
        accounts_url=redacted_url(config.accounts_url),
        api_url=redacted_url(config.api_url),
        stand_in=stand_in,
        credentials_checked=config.credentials_checked,
        check_failures=config.check_failures,
        dashboard_url=DASHBOARD_URL,
        scope=SCOPE,
        token_settings=token_settings(config, current_app.extensions["tokenswap"].clock()),
    )


@bp.app_template_filter("breakable")
def _breakable(url: str) -> Markup:
    """The URL, escaped, with <wbr> where it may wrap: at 390 px it breaks there rather than mid-word."""
    return Markup("").join(escape(part) + (Markup("<wbr>") if _BREAK_AFTER.fullmatch(part) else "")
                           for part in _BREAK_AFTER.split(url) if part)


def _favicon() -> Response:
    # Browsers ask for it by themselves, on the API's JSON answers too: a 404 would count against the
    # address's failure budget at every look.
    return current_app.send_static_file("favicon.svg")


bp.add_url_rule("/", "index", _page, methods=["GET"])
bp.add_url_rule("/callback", "callback", _page, methods=["GET"])
bp.add_url_rule("/favicon.ico", "favicon", _favicon, methods=["GET"])


def _secure(response: Response) -> Response:
    if request.blueprint != "page" and request.endpoint != "static":
        return response
    # No inline script or style; the only other origin the page talks to is the Web API (/v1/me).
    # The login button navigates to the accounts service, which needs no directive.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self' {_origin(_config().api_url)}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    # /callback's address holds the authorization code: no request from the page may carry it.
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
