"""gunicorn settings for the token swap service (read by the Procfile's and the Dockerfile's command)."""

import math
import os
import sys

from dotenv import find_dotenv, load_dotenv

import logs
import server
from config import STOP_MARGIN, ConfigError, load_config, longest_request_seconds

# One configuration file for every way of starting: `flask run` reads .env (found from the working
# directory up, by python-dotenv), so this does too, before the configuration is checked. A variable
# already set in the environment, by the platform or the shell, wins over the file; set but empty
# counts as set, as it does for `flask run`.
_DOTENV = find_dotenv(usecwd=True)
if _DOTENV:
    load_dotenv(_DOTENV, override=False)

# Refuse to start on a bad configuration, before binding a port or forking a worker.
try:
    service_config = load_config()
except ConfigError as err:
    print(f"{err}\nThe service did not start.", file=sys.stderr, flush=True)
    sys.exit(1)

# Empty counts as unset, as for every variable the application reads.
bind = f"0.0.0.0:{os.environ.get('PORT', '').strip() or '8000'}"
# One process per core. A process's CPU, not waiting, is the limit, so a worker beyond the cores
# adds only memory (measured in bench/README.md). Platforms size WEB_CONCURRENCY to the instance.
try:
    workers = int(os.environ.get("WEB_CONCURRENCY", "").strip() or "2")
    if workers < 1:
        raise ValueError
except ValueError:
    print(f"WEB_CONCURRENCY={os.environ['WEB_CONCURRENCY']!r} must be a whole number of worker "
          "processes, 1 or more (default 2)\nThe service did not start.", file=sys.stderr, flush=True)
    sys.exit(1)


# Each request spends almost all its time waiting on Spotify: gevent workers keep up to
# worker_connections of them waiting at once per process, at a few KB each, instead of a thread
# or process apiece. The pool of connections to Spotify (resources.py) is as large, so each has one.
# gthread workers pay a thread per waiting request and serve fewer (bench/README.md).
# server.Worker is gunicorn's gevent worker that closes idle connections at once on a stop.
worker_class = "server.Worker"
# Every connection a worker holds is an open file: the soft limit raised to the hard one, in the
# master, before the workers inherit it.
server.raise_open_file_limit()
# A worker whose connections are all taken accepts no more: as many as the open-file limit allows
# (two files each, the client's and its own to Spotify), so that a flood of idle ones leaves room.
worker_connections = server.connections_per_worker()

# A stop waits for the longest request the service may have admitted (config.longest_request_seconds:
# body, queue wait and Spotify call; 30 s with the default SPOTIFY_TIMEOUT of 10) plus a margin, so no
# admitted request is killed by a stop (docs/operations.md, "Stopping"). A gevent worker's heartbeat
# does not wait on requests: `timeout` only catches a worker whose loop is stuck, and is never shorter.
graceful_timeout = math.ceil(longest_request_seconds(service_config) + STOP_MARGIN)
timeout = graceful_timeout
# How long an idle connection is kept, and, the same timer in gunicorn, how long a client may take
# to send a request's headers. Longer than the idle timeout of the load balancers in front of the
# platforms this runs on (Heroku's router 90 s, AWS's 60 s), so they always close first and never
# send a request on a connection gunicorn is closing (docs/deploy-vm.md).
keepalive = 95

# A request's head is bounded: its line, and at most 40 header fields of at most 1.5 KB each, about
# 64 KB in all (gunicorn's defaults let 100 fields of 8 KB, ~800 KB, be read and parsed). Browsers send
# ~20 fields, platform routers add up to ~10, SDKs a handful; no field this service reads is long.
# Past a limit gunicorn answers a JSON 431 (414 for the line) and closes (docs/deploy-vm.md).
limit_request_line = server.LIMIT_REQUEST_LINE
limit_request_fields = server.LIMIT_REQUEST_FIELDS
limit_request_field_size = server.LIMIT_REQUEST_FIELD_SIZE

# gunicorn 27's control socket sits at one fixed path per user: two servers on one machine would
# fight over it, and a read-only container home cannot hold it. Nothing here uses it.
control_socket_disable = True

# One line per request: client, method, path (never the query string), status, bytes, milliseconds,
# request id, to stdout. gunicorn's own messages and tracebacks go to stderr. LOG_FORMAT=json makes
# every line, gunicorn's own included, one JSON object (logs.py).
accesslog = "-"
errorlog = "-"
access_log_format = server.ACCESS_LOG_FORMAT
# Every logged value made safe: no code, token or forged line.
logger_class = "server.Logger"
if service_config.log_format == "json":
    logconfig_dict = logs.json_logconfig()
    # What gevent and Python print rather than log, made JSON lines too, in each worker.
    post_worker_init = server.post_worker_init

# The server hooks: what one instance holds once listening; with METRICS_TOKEN, the directory the
# workers' counts share (made and emptied before any worker starts, removed at exit if made here) and
# a dead worker's gauges dropped.
when_ready = server.when_ready
on_starting = server.on_starting
child_exit = server.child_exit
on_exit = server.on_exit
