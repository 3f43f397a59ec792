"""gunicorn settings for the token swap service (read by the Procfile's and the Dockerfile's command).

Settings and hook names only: what they are computed with is server.py's (.env loaded and the configuration
checked by server.start_config, which ends the start on a bad one, before a port is bound or a worker forked).
"""

import logs
import server

service_config = server.start_config()

bind = server.bind_address()
# One process per core (server.worker_count); platforms size WEB_CONCURRENCY to the instance.
workers = server.worker_count()

# Each request spends almost all its time waiting on Spotify: gevent workers keep up to
# worker_connections of them waiting at once per process, at a few KB each, instead of a thread
# or process apiece. The pool of connections to Spotify (resources.py) is as large, so each has one.
# gthread workers pay a thread per waiting request and serve fewer (bench/README.md).
# server.Worker is gunicorn's gevent worker whose stop loses no request: for DRAIN_SECONDS (3 s) its answers
# close their connections, then it closes the idle ones; requests in progress finish (docs/operations.md).
worker_class = "server.Worker"
# A worker whose connections are all taken accepts no more: as many as the open-file limit allows
# (two files each, the client's and its own to Spotify), so that a flood of idle ones leaves room. The
# soft limit is raised to the hard one first, in the master, before the workers inherit it.
worker_connections = server.worker_connections()

# A stop goes on serving for STOP_DELAY (5 s by default; GET /readyz answering 503), then waits for the longest
# request the service may have admitted plus a margin (server.stop_seconds: 40 s with the defaults), so no
# admitted request is killed by a stop (docs/operations.md, "Stopping"). A gevent worker's heartbeat does not
# wait on requests: `timeout` only catches a worker whose loop is stuck, and is never shorter.
graceful_timeout = server.stop_seconds(service_config)
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
