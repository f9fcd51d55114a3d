# charnn: the FastAPI service and its numpy model, in one image.
#
#   docker build -t charnn .
#   docker run -p 8000:8000 -v charnn-data:/data charnn
#
# Offline builds: put wheels of every runtime dependency (and of setuptools, the build
# backend) in ./wheels (only the builder stage sees them) and forbid the index:
#   docker build --build-arg PIP_NO_INDEX=1 -t charnn .
# or, with buildah/podman, bind them in instead:
#   buildah bud -v "$PWD/wheels:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels \
#     --build-arg PIP_NO_INDEX=1 --format docker -t charnn .
# .ci/docker-check builds it the second way, with no network at all, on a local Debian base.

# Any image with python3.11 and `python3 -m venv` works; the builder and the runtime stage
# must use the same one, since the venv's interpreter is a symlink into the base.
ARG BASE=python:3.11-slim

FROM ${BASE} AS builder

# Both reach pip through the environment of the RUN below; empty values are ignored by pip.
# PIP_FIND_LINKS defaults to /src/wheels when the build context has a wheels/ directory.
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# .dockerignore lets in only what the install needs: pyproject.toml, README.md (the package's
# long description), app/, model/ and, if present, wheels/.
COPY . /src

# With the `scale` extra: the same image runs `charnn serve` and `charnn worker`
# (docker-compose.yml).
RUN set -eu; \
    if [ -z "${PIP_FIND_LINKS}" ] && [ -d /src/wheels ]; then \
        PIP_FIND_LINKS=/src/wheels; export PIP_FIND_LINKS; \
    fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --no-cache-dir "/src[scale]"; \
    /opt/venv/bin/python -c "import app.cli, app.main, celery, psycopg"

FROM ${BASE} AS runtime

LABEL org.opencontainers.image.title="charnn" \
      org.opencontainers.image.description="Train character-level RNN language models in pure numpy and serve their next-character predictions." \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="0.1.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHARNN_DATA_DIR=/data

# A fixed uid/gid, so a bind-mounted host directory can be chowned to match (10001:10001).
# /data is created and owned here so a new named volume inherits the ownership.
RUN groupadd --gid 10001 charnn \
    && useradd --uid 10001 --gid charnn --no-log-init --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin charnn \
    && mkdir -p /data \
    && chown charnn:charnn /data

# Only the venv: no sources, wheels or build tools. It stays root-owned and read-only to charnn.
COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

# No curl in a slim image: the venv's Python asks the service itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop) makes uvicorn finish in-flight requests and stop the job runner.
STOPSIGNAL SIGTERM
CMD ["charnn", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]
