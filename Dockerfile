# syntax=docker/dockerfile:1

# Build stage: Debian 12's Python 3.11 at /usr/bin/python3, the interpreter the runtime base has at the same
# path, so the venv's links hold there. The venv gets the runtime requirements only (WITH_TRACING=1: the
# OpenTelemetry ones too; WITH_POSTGRES=1: psycopg, for DATABASE_URL), then loses pip and setuptools, which nothing
# uses at run time: packages are added here, never on top of the image (it has no shell and no pip).
FROM debian:12.8-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/*
ARG WITH_TRACING=""
ARG WITH_POSTGRES=""
RUN python3 -m venv /venv
COPY requirements.txt requirements-otel.txt requirements-postgres.txt /tmp/
RUN /venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
 && if [ -n "$WITH_TRACING" ]; then \
      /venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements-otel.txt; fi \
 && if [ -n "$WITH_POSTGRES" ]; then \
      /venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements-postgres.txt; fi \
 && /venv/bin/pip uninstall --yes --disable-pip-version-check pip setuptools
WORKDIR /app
COPY agent_runner.py agents.py openapi.yaml openapi.json ./
COPY service ./service
# Byte-compiled here: at run time nothing is written (PYTHONDONTWRITEBYTECODE, a read-only root), so otherwise
# every start would compile every module again.
RUN /venv/bin/python -m compileall -q .

# Runtime stage: distroless Python (no shell, no package manager, no pip), the venv and the service, not root.
FROM gcr.io/distroless/python3-debian12:nonroot
COPY --from=build /venv /venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH="/venv/bin:/usr/bin:/bin" \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=:: \
    PORT=8000
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["python", "agent_runner.py"]
