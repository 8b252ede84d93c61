# mailbridge in a container: `mailbridge serve` as an unprivileged user, data in a volume.
#
#   docker build -t mailbridge .
#   docker run --rm -v mailbridge-data:/var/lib/mailbridge \
#       -v "$PWD/config.toml:/etc/mailbridge/config.toml:ro" mailbridge init
#   docker run -d --name mailbridge -p 127.0.0.1:2525:2525 -p 127.0.0.1:8080:8080 \
#       -v mailbridge-data:/var/lib/mailbridge \
#       -v "$PWD/config.toml:/etc/mailbridge/config.toml:ro" mailbridge
#
# Inside the container SMTP intake and the portal listen on all interfaces (the container's
# own network); publish them on loopback, or to the MTA and reverse proxy in front.
#
# Several machines on one PostgreSQL database (see the README, "Several workers and nodes"):
# the same image runs each role, e.g. workers alone, or the portal under gunicorn:
#   docker run -d -e MAILBRIDGE_SERVICE_NODE_ID=worker-1 ... mailbridge worker
#   docker run -d ... --entrypoint gunicorn mailbridge -w 4 -b 0.0.0.0:8080 \
#       mailbridge.web.wsgi:app

# --- build: the wheels of mailbridge and everything it needs -----------------------------------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mailbridge ./mailbridge
COPY templates ./templates
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres,cluster]"

# --- run: only the installed wheels, no compiler, no sources ----------------------------------
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MAILBRIDGE_CONFIG=/etc/mailbridge/config.toml \
    MAILBRIDGE_SERVICE_DATA_DIR=/var/lib/mailbridge \
    MAILBRIDGE_SMTP_HOST=0.0.0.0 \
    MAILBRIDGE_SMTP_PORT=2525 \
    MAILBRIDGE_WEB_HOST=0.0.0.0 \
    MAILBRIDGE_WEB_PORT=8080 \
    MAILBRIDGE_METRICS_HOST=0.0.0.0 \
    MAILBRIDGE_METRICS_PORT=9464
RUN groupadd --system --gid 10001 mailbridge \
 && useradd --system --uid 10001 --gid mailbridge --home-dir /var/lib/mailbridge \
        --shell /usr/sbin/nologin mailbridge \
 && mkdir -p /var/lib/mailbridge /etc/mailbridge \
 && chown mailbridge:mailbridge /var/lib/mailbridge \
 && chmod 0700 /var/lib/mailbridge
COPY --from=build /wheels /wheels
# Only the wheels built above (--no-index): their versions are fixed by the build stage.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links=/wheels "mailbridge[postgres,cluster]" \
 && rm -rf /wheels
# Numeric, so that runtimes can check it is not root without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/mailbridge
VOLUME ["/var/lib/mailbridge"]
# 9464: /metrics, unauthenticated: publish it only to the monitoring network.
EXPOSE 2525 8080 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MAILBRIDGE_WEB_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["mailbridge"]
CMD ["serve"]
