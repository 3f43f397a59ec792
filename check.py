"""`flask --app app check`: check a deployment for real, one line per check, and never print a secret."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import revocations
import spotify
from config import Config, ConfigError, load_config, token_settings
from crypto import key_id
from limitstore import storage_for, storage_options
from logs import redacted_url

OK, FAIL, INFO = "ok  ", "FAIL", "info"


def report(environ: Mapping[str, str], echo: Callable[[str], None]) -> bool:
    """Run every check, echo one line each; True when none failed."""
    try:
        config = load_config(environ)
    except ConfigError as err:
        for problem in err.problems:
            echo(f"{FAIL} configuration: {problem}")
        return False
    echo(f"{OK} configuration: every variable is valid")
    passed = [_spotify_credentials(config, echo), _storage(config, echo)]
    _information(config, echo)
    return all(passed)


def _spotify_credentials(config: Config, echo: Callable[[str], None]) -> bool:
    # A client-credentials grant involves no user: it only asks Spotify whether it knows this app.
    client = spotify.AccountsClient(
        config.client_id, config.client_secret, config.accounts_url, config.timeout, pool_size=1
    )
    where = f"at {redacted_url(client.token_url)}"  # an egress proxy's user and password stay unshown
    try:
        client.client_credentials()
    except spotify.CredentialsRefused as err:
        variable = "SPOTIFY_CLIENT_SECRET" if err.blames_secret else "SPOTIFY_CLIENT_ID"
        said = ascii(f"{err.answer.get('error')}: {err.description}"[:200])
        echo(f"{FAIL} Spotify refuses the credentials {where} ({said}): check {variable}")
        return False
    except spotify.Unreachable as err:
        if err.cause == spotify.PROXY_FAILED:  # the proxy's fault, not Spotify's
            echo(f"{FAIL} the proxy {client.proxy} failed on the way to Spotify {where}: {err.cause}; "
                 f"{spotify.HINTS[err.cause]}")
            return False
        echo(f"{FAIL} Spotify could not be reached {where}: {err.cause}; {spotify.HINTS[err.cause]}")
        return False
    except spotify.TimedOut as err:
        echo(f"{FAIL} Spotify did not answer {where} within SPOTIFY_TIMEOUT ({config.timeout:g} s): "
             f"{err.cause}; {spotify.HINTS[err.cause]}")
        return False
    except spotify.SpotifyError as err:
        echo(f"{FAIL} Spotify did not accept a client-credentials request {where}: {type(err).__name__} {err}")
        return False
    finally:
        client.close()
    echo(f"{OK} Spotify accepts SPOTIFY_CLIENT_ID and SPOTIFY_CLIENT_SECRET {where}")
    return True


def _storage(config: Config, echo: Callable[[str], None]) -> bool:
    uri = config.rate_limit_storage_uri
    shown = redacted_url(uri)  # a Redis URL may hold a password
    if _refuses_credentials(uri):
        echo(f"{FAIL} rate-limit storage {shown} refuses the user name or password in RATE_LIMIT_STORAGE_URI "
             "(Redis authentication failed): check them against Redis' requirepass or ACL user")
        return False
    try:
        answered = storage_for(uri).check()
    except Exception as err:  # a storage that cannot even be built from the URL
        answered, shown = False, f"{shown} ({type(err).__name__})"
    if not answered:
        echo(f"{FAIL} rate-limit storage {shown} does not answer: check RATE_LIMIT_STORAGE_URI")
        return False
    echo(f"{OK} rate-limit storage {shown} answers")
    return True


def _refuses_credentials(uri: str) -> bool:
    """Whether the Redis at `uri` answers but refuses its credentials (or wants some). limits' check() says
    only whether it answered; redis-py, which limits hands these URIs to, names the refusal."""
    if not uri.startswith(("redis://", "rediss://", "redis+unix://")):
        return False  # memory://, and sentinels and clusters (limits builds those clients itself)
    import redis

    # limits' options for the URI: its socket timeouts (no sentinel_kwargs for these schemes).
    client = redis.Redis.from_url(uri.replace("redis+unix://", "unix://", 1), **storage_options(uri))
    try:
        client.ping()
    except redis.AuthenticationError:  # WRONGPASS, or NOAUTH when Redis wants a password and none was given
        return True
    except redis.RedisError:  # down, or another failure: limits' check says it
        return False
    finally:
        client.close()
    return False


def _information(config: Config, echo: Callable[[str], None]) -> None:
    echo(f"{INFO} redirect URIs to register in the app's settings in the Spotify dashboard: "
         + ", ".join(config.callback_urls))
    ids = [key_id(secret).hex() for secret in config.encryption_secrets]
    echo(f"{INFO} ENCRYPTION_SECRET key ids: {ids[0]} seals new tokens"
         + (f"; {', '.join(ids[1:])} still open tokens" if ids[1:] else ""))
    for line in token_settings(config, time.time()):
        echo(f"{INFO} {line}")
    echo(f"{INFO} {revocations.kept(config)}")
