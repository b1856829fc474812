# syntax=docker/dockerfile:1
#
# tome-serve container image.
#
#   CPU (default):  docker build -t tome-serve:cpu .
#   CUDA:           docker build -t tome-serve:cuda --build-arg TORCH_INDEX_URL= .
#
# PyPI's Linux torch wheels are the CUDA build and bring their own CUDA runtime libraries (as pip
# packages), so both variants share the slim Python base; the host only needs the NVIDIA driver and the
# NVIDIA Container Toolkit (`docker run --gpus all`).
# Configuration is by the server's TOME_* environment variables; weights are cached under HF_HOME on
# the /cache volume so that a restarted container does not download them again. /state is there for
# TOME_STATE_DIR (owned by the server's user, so a fresh named volume mounted there is writable).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Which PyTorch wheel index to install torch and torchvision from: the CPU-only index keeps the
# multi-gigabyte CUDA libraries out of the image; empty means pip's default index (PyPI's, whose
# Linux wheels are the CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.15.0
ARG TORCHVISION_VERSION=0.29.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# torch first and alone: it is the slowest layer and changes least often, so it stays cached while the
# project's own code changes. torchvision must come from the same index to match torch's build.
RUN python -m venv /opt/venv \
    && if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && pip install \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tome ./tome
COPY runtime ./runtime
COPY server ./server
COPY eval ./eval
COPY bench ./bench
# A non-editable install (pip byte-compiles it, so start-up is fast): the runtime stage gets the venv
# only, not the source tree.
# DL3013 asks to pin PyPI packages; "." is this source tree itself.
# hadolint ignore=DL3013
RUN pip install ".[serve]"

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric UID, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 tome \
    && useradd --system --uid 10001 --gid tome --home-dir /home/tome --create-home tome \
    && mkdir -p /cache/huggingface /cache/torch /state \
    && chown -R tome:tome /cache /state

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    TOME_HOST=0.0.0.0 \
    TOME_PORT=8000 \
    TOME_DEVICE=auto

VOLUME ["/cache"]
EXPOSE 8000
USER 10001:10001
WORKDIR /home/tome

# Liveness only (/healthz answers while the model is still warming up); readiness is /readyz and is
# what load balancers and Kubernetes should route on. urllib keeps curl out of the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TOME_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: tome-serve is PID 1 and receives SIGTERM itself, so in-flight requests can drain.
ENTRYPOINT ["tome-serve"]
