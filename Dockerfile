# The token swap service as a container, for Fly.io, Cloud Run, DigitalOcean App Platform or any VM.
#   docker build -t spotify-token-swap .
#   docker run --rm -p 8080:8080 --env-file .env spotify-token-swap
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080

WORKDIR /app

# Dependencies first, so a code change does not reinstall them. All have wheels: no compiler needed.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The service and nothing else (no tests, no .env): see .dockerignore too.
COPY app.py admission.py api.py brake.py check.py commands.py config.py cors.py crypto.py errors.py limitstore.py logs.py metrics.py page.py ratelimit.py resources.py revocations.py server.py spotify.py gunicorn.conf.py openapi.json ./
# The landing page's template, script and style.
COPY templates ./templates
COPY static ./static

# Root owns the code; the service runs as an unprivileged user that cannot change it.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tokenswap
USER tokenswap

EXPOSE 8080

# slim has no curl: ask /health with the Python that is already here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]

# gunicorn finishes in-flight requests on SIGTERM; SIGINT (Fly's default) would cut them off. A stop may
# take up to graceful_timeout (40 s with SPOTIFY_TIMEOUT=10; docs/operations.md, "Stopping"): give the
# container that long (docker run --stop-timeout 45, compose's stop_grace_period: 45s, Fly's kill_timeout).
STOPSIGNAL SIGTERM

# The Procfile's web command, in exec form: gunicorn is PID 1 and receives the stop signal itself.
# gunicorn.conf.py binds 0.0.0.0:$PORT, so a platform's PORT (Cloud Run sets one) wins over 8080.
CMD ["gunicorn", "--config", "gunicorn.conf.py", "app:create_app()"]
