"""The `flask` commands: `flask --app app gen-secret` and `flask --app app check`."""

from __future__ import annotations

import os

import click
from flask import Flask

import check
from config import generate_secret


@click.command("gen-secret")
def gen_secret() -> None:
    """Print a fresh, strong value for ENCRYPTION_SECRET."""
    click.echo(generate_secret())


@click.command("check")
def check_deployment() -> None:
    """Check this deployment for real: configuration, Spotify credentials, rate-limit storage."""
    if not check.report(os.environ, click.echo):
        raise SystemExit(1)


def init_app(app: Flask) -> None:
    """Add the commands to the app's `flask` command line. Neither needs a valid configuration."""
    app.cli.add_command(gen_secret)
    app.cli.add_command(check_deployment)
