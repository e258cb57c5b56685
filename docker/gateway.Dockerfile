# syntax=docker/dockerfile:1
# instructloop gateway (OpenAI-compatible API, feedback, admin). Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t instructloop/gateway:0.1.0 .
# No model is baked: the gateway holds no weights. torch is still a dependency of the package, so it
# comes from the CPU index (never the CUDA wheel). Pins as in serve.Dockerfile.
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
RUN pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY . /src
# TGI's client is installed --no-deps after pip check: text-generation 0.7.0 still declares
# huggingface-hub<1.0 (transformers 5 needs >=1) though its runtime needs nothing that moved; its real
# runtime dependencies (aiohttp, pydantic, requests) are the project's own, pinned by the constraints.
RUN pip install --no-cache-dir /src \
 && pip check \
 && pip install --no-cache-dir --no-deps "text-generation==0.7.0"

FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" instructloop \
 && useradd --system --uid "${APP_UID}" --gid instructloop --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin instructloop
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["instructloop"]
CMD ["gateway", "run"]
