"""Configuration: read the environment once, check every value, freeze the result."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from urllib.parse import urlsplit

from limits import parse_many

from logs import redacted_url

# Every variable the service reads, with a one-line description. Deploy descriptors
# (app.json, render.yaml, .env.example, the README table) are tested against this.
VARIABLES: dict[str, str] = {
    "SPOTIFY_CLIENT_ID": "Client ID of your Spotify app (required)",
    "SPOTIFY_CLIENT_SECRET": "Client secret of your Spotify app (required)",
    "SPOTIFY_CLIENT_CALLBACK_URL": "Redirect URI(s) registered with Spotify, comma-separated; the first is the default (required)",
    "ENCRYPTION_SECRET": "Secret(s) sealing refresh tokens, comma-separated, newest first; each at least 16 characters (required)",
    "LEGACY_ENCRYPTION_SECRET": "ENCRYPTION_SECRET of a legacy Ruby/Sinatra token swap service whose tokens should still refresh (optional)",
    "SPOTIFYAPISERVER_SECRET_KEY": "SECRET_KEY of a SpotifyAPIServer (Swift/Vapor) whose tokens should still refresh (optional)",
    "UNSEALED_TOKENS_UNTIL": "Accept raw Spotify refresh tokens at the refresh paths through this day, YYYY-MM-DD UTC, answering sealed ones (default: never)",
    "REFRESH_TOKEN_LIFETIME": "How long a sign-in lasts: seconds, or with a unit s/h/d, e.g. 12h or 183d (default 184d, never shorter than Spotify's 6 months)",
    "SPOTIFY_ACCOUNTS_URL": "Base URL of Spotify's accounts service (default https://accounts.spotify.com)",
    "SPOTIFY_API_URL": "Base URL of Spotify's Web API, which the landing page's login test calls (default https://api.spotify.com)",
    "SPOTIFY_TIMEOUT": "Seconds to wait for Spotify on each call (default 10)",
    "CORS_ORIGINS": "Browser origins allowed to call the service, comma-separated, or * (default: none)",
    "TRUSTED_PROXIES": "How many proxies in front of the service set X-Forwarded-For/-Proto (default 0)",
    "RATE_LIMIT_FAILURES": "Failed (4xx) requests allowed per client address, e.g. 60/minute; 0 or off disables (default 60/minute)",
    "RATE_LIMIT_PER_TOKEN": "Refreshes allowed per refresh token, e.g. 5/minute; 0 or off disables (default 5/minute)",
    "SPOTIFY_MAX_RATE": "Ceiling on calls forwarded to Spotify by this deployment, e.g. 50/second (default: none)",
    "RATE_LIMIT_STORAGE_URI": "Where rate-limit counts live: memory:// or redis://host:port (default memory://)",
    "CLIENT_CREDENTIALS": "App-only tokens (grant_type=client_credentials) for anyone who asks: on or off (default off)",
    "METRICS_TOKEN": "Bearer token that GET /metrics (Prometheus) requires, at least 16 characters; unset turns metrics off (default: off)",
    "LOG_FORMAT": "text (readable lines) or json (one JSON object per line) (default text)",
    "STOP_DELAY": "Seconds a stopping instance goes on serving, GET /readyz answering 503, before it closes its port, so that a load balancer's health check takes it out first; 0 for none (default 5)",
}

# Read by gunicorn.conf.py, not by the application.
SERVER_VARIABLES: dict[str, str] = {
    "PORT": "Port gunicorn listens on (default 8000)",
    "WEB_CONCURRENCY": "Number of gunicorn worker processes (default 2)",
}

# Set by the service's own tooling (`make run`, devtools/run.py; the gunicorn master), never by an operator: not in
# the deploy descriptors.
DEV_VARIABLES: dict[str, str] = {
    "TOKENSWAP_CREDENTIALS_CHECKED": "What make run found: accepted or failed (its check of the Spotify credentials), "
                                     "or stand-in (none in .env: it started the stand-in for Spotify)",
    "TOKENSWAP_CHECK_FAILED": "The lines of make run's check that failed, one per line, each naming what to change",
    "TOKENSWAP_REVOCATIONS_DIR": "Set by the gunicorn master for its workers: the directory of the sign-out file they share",
}

MIN_SECRET_LENGTH = 16

# Spotify ends a refresh token six months after the sign-in. Six calendar months are 181 to 184 days: the
# default lifetime is the longest of them, so the service never refuses a sign-in Spotify still honours
# (docs/operations.md, "Refresh token lifetime").
DEFAULT_REFRESH_TOKEN_LIFETIME = 184 * 86400
# The shortest six calendar months: a sign-in older than this may have been ended by Spotify.
SPOTIFY_SHORTEST_LIFETIME = 181 * 86400
_LIFETIME_UNITS = {"": 1, "s": 1, "h": 3600, "d": 86400}

# How long a request may take to send its body once its headers have arrived (api.py's 408).
BODY_TIMEOUT = 10
# The largest request body read: a token request is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
# What a stop allows beyond the longest request: the worker's once-a-second check that its
# requests are done, the answer's write, and scheduling under load.
STOP_MARGIN = 5
# The longest STOP_DELAY: a balancer's health check notices within seconds.
MAX_STOP_DELAY = 120
# Where the service is installed, `flask` is on PATH (Heroku, Render, the image); in a checkout it is the venv's.
GEN_SECRET_HINT = "generate one with: flask --app app gen-secret (in a checkout: .venv/bin/flask --app app gen-secret)"


class ConfigError(Exception):
    """One or more configuration values are missing or invalid."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "Invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass(frozen=True)
class Config:
    """The service's settings, parsed and checked."""

    client_id: str
    client_secret: str
    callback_urls: tuple[str, ...]
    encryption_secrets: tuple[str, ...]
    legacy_secret: str | None = None
    spotifyapiserver_secret: str | None = None
    unsealed_until: date | None = None
    refresh_token_lifetime: int = DEFAULT_REFRESH_TOKEN_LIFETIME
    accounts_url: str = "https://accounts.spotify.com"
    api_url: str = "https://api.spotify.com"
    timeout: float = 10.0
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: int = 0
    rate_limit_failures: str | None = "60/minute"
    rate_limit_per_token: str | None = "5/minute"
    spotify_max_rate: str | None = None
    rate_limit_storage_uri: str = "memory://"
    client_credentials: bool = False
    metrics_token: str | None = None
    log_format: str = "text"
    stop_delay: float = 5.0
    # What make run found: "accepted", "failed", "stand-in", or None (not started by make run).
    credentials_checked: str | None = None
    check_failures: tuple[str, ...] = ()  # make run's check's failed lines, each naming what to change
    revocations_dir: str | None = None  # where this instance's workers share sign-outs (revocations.py), set by its master


def generate_secret() -> str:
    """A fresh, strong, URL-safe secret (256 bits of randomness)."""
    return secrets.token_urlsafe(32)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


STORAGE_URI_ENCODING_HINT = (
    "if its user name or password holds any of / # ? @ : % or a space, percent-encode each "
    "(/ as %2F, # as %23, ? as %3F, @ as %40, : as %3A, % as %25, a space as %20), e.g. with "
    "python3 -c \"import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=''))\" 'the-password'"
)
# The proxy variables requests reads (through urllib's getproxies), lower-case spelling first as it does.
PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def url_problem(url: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """Why requests cannot use `url` as it was meant (None if it can), in words that show no part of it.

    requests prepares each request with urllib3's parse_url: a port that is no number from 0 to 65535, or
    given twice, fails every call. A password holding an unencoded "/", "?" or "#" may even parse, as
    another host: everything after that character is no longer the host.
    """
    import requests  # here: see load_config
    import urllib3.util

    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in schemes:
        return f"it is not a URL starting with {' or '.join(s + '://' for s in schemes)}"
    if re.search(r"[/?#]", rest.rpartition("@")[0]):
        return f"its user name or password holds an unencoded / ? or #: {STORAGE_URI_ENCODING_HINT}"
    try:
        if not urllib3.util.parse_url(url).host:
            return "it names no host"
        requests.Request("GET", url).prepare()  # the whole preparation: the host's IDNA encoding too
    except (requests.RequestException, ValueError):  # urllib3's LocationParseError is a ValueError
        return (
            "requests cannot parse it: the port must be a number from 1 to 65535, once, after the host; "
            + STORAGE_URI_ENCODING_HINT
        )
    return None


def _base_url(name: str, value: str, problems: list[str], parse: bool) -> str:
    problem = url_problem(value) if parse else None
    if problem is not None:
        problems.append(f"{name}={redacted_url(value)!r} cannot be used: {problem}; leave it unset for Spotify")
    return value.rstrip("/")


def _check_proxies(env: Mapping[str, str], problems: list[str]) -> None:
    # SOCKS proxies only work with PySocks installed, as requests says.
    schemes: tuple[str, ...] = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
    if importlib.util.find_spec("socks") is None:
        schemes = schemes[:2]
    for name in PROXY_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            # A proxy without a scheme is an http:// one to requests (its prepend_scheme_if_needed).
            problem = url_problem(value if "://" in value else "http://" + value, schemes)
            if problem is not None and value.lower().startswith("socks") and len(schemes) == 2:
                problem = "a SOCKS proxy needs the PySocks package, which is not installed here"
            if problem is not None:
                problems.append(f"{name} (a proxy, {redacted_url(value)!r}) cannot be used: {problem}")


def _storage_uri_parses(uri: str) -> bool:
    # What redis-py and limits will make of it: one host (or several, for sentinels and clusters)
    # with numeric ports after the credentials, a database number or a service name as the path.
    scheme = uri.partition("://")[0]
    if "#" in uri:  # no storage URI has a fragment: a "#" is a password's, cut short
        return False
    try:
        parts = urlsplit(uri)
        hosts = parts.netloc.rpartition("@")[2]
        if scheme == "redis+unix":
            return not hosts and parts.path.startswith("/") and "@" not in parts.path
        if not hosts:
            return False
        for location in hosts.split(","):
            sub = urlsplit(f"//{location.strip()}")
            if not sub.hostname or (sub.port is None and scheme != "redis" and scheme != "rediss"):
                return False
    except ValueError:  # a port that is no number: the first part of a password, as a rule
        return False
    if scheme in ("redis", "rediss"):
        return "," not in hosts and re.fullmatch(r"/?\d*", parts.path) is not None
    if scheme == "redis+sentinel":
        return re.fullmatch(r"/[^/@]+/?", parts.path) is not None
    return parts.path in ("", "/")


def _redirect_uri_problem(url: str) -> str | None:
    # The page builds Spotify's authorize URL from it, Spotify compares it: RFC 6749 section 3.1.2 allows
    # no fragment, and a user name or password in it would be shown on the page.
    scheme, _, rest = url.partition(":")
    import urllib3.util  # here: see load_config

    if "#" in url:
        return "holds a fragment (#), which a redirect URI must not (RFC 6749 section 3.1.2)"
    if "@" in rest.lstrip("/").split("/", 1)[0]:
        return "holds a user name or password: a redirect URI is shown on the page and sent to Spotify"
    try:
        urllib3.util.parse_url(url)
    except ValueError:
        return "does not parse: a port must be a number from 1 to 65535, once, after the host"
    return None


def _redis_parses(uri: str) -> bool:
    # redis-py's own parser, which limits hands redis://, rediss:// and redis+unix:// URIs to (as unix://).
    import redis.connection  # here: see load_config

    scheme = uri.partition("://")[0]
    if scheme not in ("redis", "rediss", "redis+unix"):
        return True  # sentinel and cluster URIs: limits splits their hosts itself, as _storage_uri_parses does
    try:
        redis.connection.parse_url(uri.replace("redis+unix://", "unix://", 1))
    except ValueError:
        return False
    return True


def _check_rate(name: str, value: str, problems: list[str]) -> str | None:
    if value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    try:
        parse_many(value)
    except ValueError:
        problems.append(
            f"{name}={value!r} is not a rate limit: write it like 60/minute or 10 per second"
        )
    return value.strip()


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from environment variables; raise ConfigError naming every bad one."""
    env = os.environ if environ is None else environ
    # URL settings are parsed by requests (urllib3) and redis-py, which import names from ssl. In gunicorn's
    # master they must not be imported: its gevent workers patch ssl after the fork, and a name imported
    # before stays unpatched (gevent warns). There, a child process parses them and says what it found.
    if not ({"urllib3", "redis"} & set(sys.modules)) and hasattr(os, "fork"):
        # Once per process for the same values: the master's hooks read the configuration again while
        # gunicorn reaps its children, and a child of ours must not meet that.
        values = tuple((name, env.get(name)) for name in (*VARIABLES, *DEV_VARIABLES, *PROXY_VARIABLES))
        if values not in _PARSED_IN_CHILD:
            _PARSED_IN_CHILD[values] = _problems_in_child(env)
        problems = _PARSED_IN_CHILD[values]
        if problems:
            raise ConfigError(problems)
        return _load(env, parse=False)
    return _load(env, parse=True)


# What a child process found wrong with each set of values of the variables (load_config).
_PARSED_IN_CHILD: dict[tuple[tuple[str, str | None], ...], list[str]] = {}


def _problems_in_child(env: Mapping[str, str]) -> list[str]:
    """What _load finds wrong with `env`, found by a forked child process (see load_config)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: parse, write the problems, and leave without running any cleanup
        try:
            os.close(read)
            try:
                _load(env, parse=True)
                found: list[str] = []
            except ConfigError as err:
                found = err.problems
            with os.fdopen(write, "wb") as pipe:
                pipe.write(json.dumps(found).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read()
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # reaped already (gunicorn's master reaps every child it is told of)
        pass
    # A child that died saying nothing: the workers parse the URLs again, and refuse to start.
    return list(json.loads(said)) if said else []


def _load(env: Mapping[str, str], parse: bool) -> Config:
    problems: list[str] = []

    def get(name: str) -> str:
        return env.get(name, "").strip()

    def required(name: str, hint: str) -> str:
        value = get(name)
        if not value:
            problems.append(f"{name} is not set: {hint}")
        return value

    client_id = required(
        "SPOTIFY_CLIENT_ID", "copy it from your app in the Spotify developer dashboard"
    )
    client_secret = required(
        "SPOTIFY_CLIENT_SECRET", "copy it from your app in the Spotify developer dashboard"
    )

    callback_hint = "set it to the redirect URI your app registered with Spotify, e.g. myapp://callback"
    callback_urls = _split(required("SPOTIFY_CLIENT_CALLBACK_URL", callback_hint))
    if get("SPOTIFY_CLIENT_CALLBACK_URL") and not callback_urls:
        problems.append(f"SPOTIFY_CLIENT_CALLBACK_URL lists no URI: {callback_hint}")
    for position, url in enumerate(callback_urls, 1):
        if ":" not in url:
            problems.append(
                f"SPOTIFY_CLIENT_CALLBACK_URL entry {url!r} is not a URI: it needs a scheme, e.g. myapp://callback"
            )
        elif parse and (problem := _redirect_uri_problem(url)):
            problems.append(f"SPOTIFY_CLIENT_CALLBACK_URL entry {position} ({redacted_url(url)!r}) {problem}")

    encryption_secrets = _split(required("ENCRYPTION_SECRET", GEN_SECRET_HINT))
    if get("ENCRYPTION_SECRET") and not encryption_secrets:
        problems.append(f"ENCRYPTION_SECRET lists no secret: {GEN_SECRET_HINT}")
    for position, secret in enumerate(encryption_secrets, 1):
        if len(secret) < MIN_SECRET_LENGTH:
            problems.append(
                f"ENCRYPTION_SECRET entry {position} is {len(secret)} characters; "
                f"it must be at least {MIN_SECRET_LENGTH}: {GEN_SECRET_HINT}"
            )
    if len(set(encryption_secrets)) != len(encryption_secrets):
        problems.append("ENCRYPTION_SECRET lists the same secret twice: remove the duplicate")

    # The legacy secret is whatever the old service used, spaces included; it is not ours to
    # strengthen. Only a value that is nothing but white space counts as unset.
    legacy_secret = env.get("LEGACY_ENCRYPTION_SECRET") if get("LEGACY_ENCRYPTION_SECRET") else None

    # Like the legacy secret, SpotifyAPIServer's SECRET_KEY is whatever it was: not ours to check.
    spotifyapiserver_secret = (
        env.get("SPOTIFYAPISERVER_SECRET_KEY") if get("SPOTIFYAPISERVER_SECRET_KEY") else None
    )
    unsealed_until = None
    if get("UNSEALED_TOKENS_UNTIL"):
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", get("UNSEALED_TOKENS_UNTIL")):
                raise ValueError
            unsealed_until = date.fromisoformat(get("UNSEALED_TOKENS_UNTIL"))
        except ValueError:
            problems.append(
                f"UNSEALED_TOKENS_UNTIL={get('UNSEALED_TOKENS_UNTIL')!r} must be a date, YYYY-MM-DD (UTC), "
                "e.g. 2027-06-30: raw tokens are accepted through that day"
            )
    refresh_token_lifetime = Config.refresh_token_lifetime
    if get("REFRESH_TOKEN_LIFETIME"):
        lifetime = re.fullmatch(r"(\d{1,9})\s*([a-z]?)", get("REFRESH_TOKEN_LIFETIME").lower())
        if lifetime and lifetime.group(2) in _LIFETIME_UNITS and int(lifetime.group(1)) > 0:
            refresh_token_lifetime = int(lifetime.group(1)) * _LIFETIME_UNITS[lifetime.group(2)]
        else:
            problems.append(
                f"REFRESH_TOKEN_LIFETIME={get('REFRESH_TOKEN_LIFETIME')!r} must be a number of seconds, or of "
                "s, h or d (e.g. 90s, 12h, 184d), above 0; months and minutes are not units here"
            )

    accounts_url = _base_url(
        "SPOTIFY_ACCOUNTS_URL", get("SPOTIFY_ACCOUNTS_URL") or Config.accounts_url, problems, parse)
    api_url = _base_url("SPOTIFY_API_URL", get("SPOTIFY_API_URL") or Config.api_url, problems, parse)

    timeout = Config.timeout
    if get("SPOTIFY_TIMEOUT"):
        try:
            timeout = float(get("SPOTIFY_TIMEOUT"))
            if not 0 < timeout <= 300:
                raise ValueError
        except ValueError:
            problems.append(
                f"SPOTIFY_TIMEOUT={get('SPOTIFY_TIMEOUT')!r} must be a number of seconds between 0 and 300"
            )

    cors_origins = _split(get("CORS_ORIGINS"))
    for position, origin in enumerate(cors_origins, 1):
        if origin == "*":
            continue
        if "@" in origin or (parse and url_problem(origin) is not None):
            # What a browser sends as Origin never holds a user name or password: never show one.
            problems.append(
                f"CORS_ORIGINS entry {position} ({redacted_url(origin)!r}) is not an origin: write it as a "
                "browser sends it, like https://example.com or http://127.0.0.1:8080 (no path, no user name), or *"
            )
        elif not re.fullmatch(r"https?://[^/\s?#]+", origin):
            problems.append(
                f"CORS_ORIGINS entry {origin!r} is not an origin: write it like https://example.com (no path), or *"
            )

    trusted_proxies = 0
    if get("TRUSTED_PROXIES"):
        try:
            trusted_proxies = int(get("TRUSTED_PROXIES"))
            if trusted_proxies < 0:
                raise ValueError
        except ValueError:
            problems.append(
                f"TRUSTED_PROXIES={get('TRUSTED_PROXIES')!r} must be a whole number of proxies (0 or more)"
            )

    def rate_or_default(name: str, default: str | None) -> str | None:
        # Blank means unset, as for every other variable: only an explicit 0 or off turns it off.
        return _check_rate(name, get(name), problems) if get(name) else default

    rate_limit_failures = rate_or_default("RATE_LIMIT_FAILURES", Config.rate_limit_failures)
    rate_limit_per_token = rate_or_default("RATE_LIMIT_PER_TOKEN", Config.rate_limit_per_token)
    spotify_max_rate = _check_rate("SPOTIFY_MAX_RATE", get("SPOTIFY_MAX_RATE"), problems)

    storage_uri = get("RATE_LIMIT_STORAGE_URI") or Config.rate_limit_storage_uri
    if not re.match(r"^(memory|redis|rediss|redis\+unix|redis\+sentinel|redis\+cluster)://", storage_uri):
        problems.append(
            "RATE_LIMIT_STORAGE_URI must start with memory:// or redis:// (got a value with another scheme)"
        )
    elif not storage_uri.startswith("memory://") and not (
            _storage_uri_parses(storage_uri) and (not parse or _redis_parses(storage_uri))):
        # Never the value: what does not parse is most likely a password.
        problems.append(
            f"RATE_LIMIT_STORAGE_URI does not parse as a {storage_uri.partition('://')[0]}:// URL "
            f"(e.g. redis://:password@host:6379/0): {STORAGE_URI_ENCODING_HINT}"
        )

    client_credentials = Config.client_credentials
    if get("CLIENT_CREDENTIALS"):
        switch = get("CLIENT_CREDENTIALS").lower()
        if switch not in ("on", "off"):
            problems.append(f"CLIENT_CREDENTIALS={get('CLIENT_CREDENTIALS')!r} must be on or off (default off)")
        client_credentials = switch == "on"

    # Metrics (issue 16): the token a scraper sends; the log lines' format.
    metrics_token = get("METRICS_TOKEN") or None
    if metrics_token is not None and not re.fullmatch(rf"[\x21-\x7e]{{{MIN_SECRET_LENGTH},}}", metrics_token):
        problems.append(
            f"METRICS_TOKEN must be at least {MIN_SECRET_LENGTH} printable characters without spaces: "
            f"{GEN_SECRET_HINT}"
        )
    if parse:
        _check_proxies(env, problems)
    log_format = get("LOG_FORMAT").lower() or Config.log_format
    if log_format not in ("text", "json"):
        problems.append(f"LOG_FORMAT={get('LOG_FORMAT')!r} must be text or json")

    stop_delay = Config.stop_delay
    if get("STOP_DELAY"):
        try:
            stop_delay = float(get("STOP_DELAY"))
            if not 0 <= stop_delay <= MAX_STOP_DELAY:
                raise ValueError
        except ValueError:
            problems.append(
                f"STOP_DELAY={get('STOP_DELAY')!r} must be a number of seconds between 0 and {MAX_STOP_DELAY} (default 5)"
            )

    if problems:
        raise ConfigError(problems)
    return Config(
        client_id=client_id,
        client_secret=client_secret,
        callback_urls=callback_urls,
        encryption_secrets=encryption_secrets,
        legacy_secret=legacy_secret,
        spotifyapiserver_secret=spotifyapiserver_secret,
        unsealed_until=unsealed_until,
        refresh_token_lifetime=refresh_token_lifetime,
        accounts_url=accounts_url,
        api_url=api_url,
        timeout=timeout,
        cors_origins=cors_origins,
        trusted_proxies=trusted_proxies,
        rate_limit_failures=rate_limit_failures,
        rate_limit_per_token=rate_limit_per_token,
        spotify_max_rate=spotify_max_rate,
        rate_limit_storage_uri=storage_uri,
        client_credentials=client_credentials,
        metrics_token=metrics_token,
        log_format=log_format,
        stop_delay=stop_delay,
        credentials_checked=get("TOKENSWAP_CREDENTIALS_CHECKED") or None,
        check_failures=tuple(line.strip() for line in get("TOKENSWAP_CHECK_FAILED").splitlines() if line.strip()),
        revocations_dir=get("TOKENSWAP_REVOCATIONS_DIR") or None,
    )


def _duration(seconds: int) -> str:
    for unit, size in (("days", 86400), ("hours", 3600)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


def token_settings(config: Config, now: float) -> list[str]:
    """What this deployment does with refresh tokens, one sentence each, as the page, `check` and the
    start-up log say it: the sign-in lifetime and which other servers' tokens migrate."""
    lifetime = config.refresh_token_lifetime
    shorter = " (shorter than Spotify's 6 months)" if lifetime < SPOTIFY_SHORTEST_LIFETIME else ""
    lines = [f"a sign-in lasts {_duration(lifetime)}{shorter} (REFRESH_TOKEN_LIFETIME); refreshing does not extend it"]
    for name, variable, value in (
        ("the legacy Ruby/Sinatra services", "LEGACY_ENCRYPTION_SECRET", config.legacy_secret),
        ("SpotifyAPIServer", "SPOTIFYAPISERVER_SECRET_KEY", config.spotifyapiserver_secret),
    ):
        lines.append(
            f"tokens of {name} are read ({variable} is set) and re-sealed on refresh" if value
            else f"tokens of {name} are not read ({variable} is not set)"
        )
    until = config.unsealed_until
    if until is None:
        lines.append("raw Spotify refresh tokens are refused (UNSEALED_TOKENS_UNTIL is not set)")
    elif datetime.fromtimestamp(now, UTC).date() <= until:
        lines.append(f"raw Spotify refresh tokens are accepted and sealed through {until.isoformat()} UTC "
                     "(UNSEALED_TOKENS_UNTIL)")
    else:
        lines.append(f"raw Spotify refresh tokens are refused: UNSEALED_TOKENS_UNTIL={until.isoformat()} has passed")
    return lines


def longest_request_seconds(config: Config) -> float:
    """The longest a request the service admitted can take, once its headers have arrived: its body
    (BODY_TIMEOUT), then its wait for a turn in its client's queue of calls to Spotify (the rate
    limits wait up to SPOTIFY_TIMEOUT), then the call to Spotify (SPOTIFY_TIMEOUT). gunicorn.conf.py
    gives a stop this long plus STOP_MARGIN (server.stop_seconds), so that no admitted request is killed by a stop."""
    queue_wait = config.timeout
    return BODY_TIMEOUT + queue_wait + config.timeout
