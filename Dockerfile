# syntax=docker/dockerfile:1

# Build stage: a venv with the runtime requirements only.
FROM python:3.11.7-slim AS build
RUN python -m venv /venv
COPY requirements.txt /tmp/requirements.txt
RUN /venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt
# Tracing needs requirements-otel.txt as well: docs/deployment.md shows an image that adds it.

# Runtime stage: slim Python, the venv, the service; no compilers, no pip cache, not root.
FROM python:3.11.7-slim
RUN useradd --create-home --uid 10001 runner
COPY --from=build /venv /venv
WORKDIR /app
COPY agent_runner.py agents.py openapi.yaml openapi.json ./
COPY service ./service
# Byte-compiled here: at run time nothing is written (PYTHONDONTWRITEBYTECODE, not root), so otherwise every
# start would compile every module again.
RUN python -m compileall -q .
ENV PATH="/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=:: \
    PORT=8000
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["python", "agent_runner.py"]
