"""What the views need, built once per process from the configuration: the config, the token sealer, the Spotify client."""

from __future__ import annotations

from flask import Flask, current_app

import spotify
from config import Config, connections_per_worker
from crypto import TokenSealer


class Service:
    """The configuration and the objects built from it, shared by every request of one process."""

    def __init__(self, config: Config):
        self.config = config
        self.sealer = TokenSealer(config.encryption_secrets, config.client_id, config.legacy_secret)
        self.spotify = spotify.AccountsClient(
            config.client_id,
            config.client_secret,
            config.accounts_url,
            config.timeout,
            # As many as a worker serves at once (gunicorn's worker_connections): every request
            # waiting on Spotify has a pooled connection of its own.
            pool_size=connections_per_worker(),
        )


def init_app(app: Flask, config: Config) -> None:
    """Build the service for this app from `config`."""
    app.extensions["tokenswap"] = Service(config)


def service() -> Service:
    """The current app's service."""
    svc: Service = current_app.extensions["tokenswap"]
    return svc
