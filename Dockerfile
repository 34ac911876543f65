# syntax=docker/dockerfile:1
# The driftline worker image.
#
#   docker build -t driftline:0.1.0 .
#   docker run --rm -e DRIFTLINE_KAFKA_BOOTSTRAP=... -e DRIFTLINE_REDIS_URL=... \
#     -v "$PWD/examples:/etc/driftline:ro" driftline:0.1.0
#
# The base image is pinned by tag only. Pin it by digest as well
# (python:3.11-slim-bookworm@sha256:<digest>) when you build: no container registry was
# reachable where this file was written, so no digest could be looked up, and an invented
# one would break the build. CI that can reach a registry should resolve and record it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder: wheel + venv
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Every runtime dependency comes in at the version of the project's lock
# (requirements/constraints.txt); dev-only pins in it constrain nothing that is not installed.
COPY requirements/constraints.txt requirements/constraints.txt
COPY pyproject.toml README.md ./
COPY detectors/ detectors/
COPY stream/ stream/
RUN python -m pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/python -m pip install --no-compile -c requirements/constraints.txt \
        /tmp/wheels/driftline-*.whl \
    && /opt/venv/bin/driftline --help > /dev/null

# ---------------------------------------------------------------- runtime: venv only
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="driftline" \
      org.opencontainers.image.description="Streaming drift detection for production ML: online drift tests over Kafka, state in Redis, alerts and kill switches." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DRIFTLINE_WEB_BIND=0.0.0.0:6066 \
    DRIFTLINE_CONFIG=/etc/driftline/monitors.yaml
RUN groupadd --system --gid 10001 driftline \
    && useradd --system --uid 10001 --gid driftline --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin driftline
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
EXPOSE 6066
# Liveness for plain Docker / compose (Kubernetes uses its own probes): GET /healthz on the
# address the worker binds (DRIFTLINE_WEB_BIND), with the standard library only (no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; h, _, p = os.environ.get('DRIFTLINE_WEB_BIND', '127.0.0.1:6066').rpartition(':'); h = '127.0.0.1' if h in ('', '0.0.0.0', '::', '[::]') else h; sys.exit(0 if urllib.request.urlopen(f'http://{h}:{p}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["driftline"]
CMD ["worker", "--config", "/etc/driftline/monitors.yaml"]
