"""gunicorn settings for the token swap service (read by the Procfile's and the Dockerfile's command)."""

import os
import sys

from config import ConfigError, load_config

# Refuse to start on a bad configuration, before binding a port or forking a worker.
try:
    load_config()
except ConfigError as err:
    print(f"{err}\nThe service did not start.", file=sys.stderr, flush=True)
    sys.exit(1)

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))

# Each request spends almost all its time waiting on Spotify: gevent workers keep up to
# worker_connections of them waiting at once per process, at a few KB each, instead of a thread
# or process apiece. app.UPSTREAM_POOL_SIZE matches it, so each has a pooled upstream connection.
worker_class = "gevent"
worker_connections = 1000

# SPOTIFY_TIMEOUT is at most 300 s, usually 10; a request never outlives graceful_timeout's wait.
timeout = 30
graceful_timeout = 30
# Longer than the idle timeout of the common load balancers (60 s), so they close first.
keepalive = 75

# One line per request: client, method, path (never the query string), status, bytes, milliseconds.
# gunicorn 27's control socket sits at one fixed path per user: two servers on one machine would
# fight over it, and a read-only container home cannot hold it. Nothing here uses it.
control_socket_disable = True

accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
