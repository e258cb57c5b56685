"""``create_app(settings)``: the FastAPI app with thin TGI routes over ``GenerateServing`` and the engine.

Routes: ``POST /generate``, ``POST /generate_stream`` (SSE, ``data:{json}`` events, no ``[DONE]``),
``POST /`` (what the ``text-generation`` client posts to: a one-element list, or SSE with ``stream: true``),
``GET /info``, ``GET /health``, ``GET /metrics``. Every generation answer carries ``X-Policy-Version``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import instructloop
from instructloop.wire import BASE_VERSION, POLICY_VERSION_HEADER
from serve.adapters import SharedBase
from serve.auth import BearerTokenAuth
from serve.engine import Engine
from serve.metrics import ServeMetrics
from serve.model import PolicyModel, resolve_device, resolve_dtype
from serve.protocol import ErrorType, GenerateRequest, GenerateResponse, Info
from serve.serving import ClientGone, GenerateServing, TGIError
from serve.settings import Settings
from serve.swap import PolicyLoader, PolicyWatcher
from serve.versions import LoadedVersions, PolicyVersions

log = logging.getLogger(__name__)


@dataclass
class ServeRuntime:
    """Everything one server process holds: the base model, the engine, the policy watcher."""

    settings: Settings
    model_id: str
    base: PolicyModel
    engine: Engine
    metrics: ServeMetrics
    watcher: PolicyWatcher | None
    serving: GenerateServing

    def start(self) -> None:
        if self.watcher is not None:
            self.watcher.check()  # start on the registry's current version if there is a valid one
        self.engine.start()
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.stop()


def load_base_policy(settings: Settings) -> tuple[str, PolicyModel]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instructloop.model import resolve_model

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    path = resolve_model(settings.model)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    log.info("base model loaded", extra={"model": path, "device": str(device), "dtype": str(dtype)})
    return path, PolicyModel(BASE_VERSION, model, tokenizer, device, shared=SharedBase(model))


def build_runtime(settings: Settings) -> ServeRuntime:
    model_id, base = load_base_policy(settings)
    metrics = ServeMetrics()
    loaded = LoadedVersions(settings.max_loaded_versions)
    engine = Engine(
        base,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        metrics=metrics,
        loaded=loaded,
    )
    watcher = None
    loader = None
    if settings.registry_dir is not None:
        from instructloop.registry import Registry

        redis = None
        if settings.redis_url:
            import redis as redis_lib

            redis = redis_lib.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        registry = Registry(settings.registry_dir, redis=redis, prefix=settings.stream_prefix)
        loader = PolicyLoader(registry, base, base_dir=model_id)
        watcher = PolicyWatcher(
            registry,
            engine,
            loader,
            metrics=metrics,
            poll_interval_s=settings.poll_interval_s,
            retry_after_s=settings.swap_retry_s,
            redis=redis,
            prefix=settings.stream_prefix,
            prefetch_candidates=settings.prefetch_candidates,
        )
    versions = PolicyVersions(engine, base, loaded, loader)
    serving = GenerateServing(engine, base.tokenizer, settings, metrics, versions)
    return ServeRuntime(settings, model_id, base, engine, metrics, watcher, serving)


def _error_response(error: TGIError, version: str | None = None) -> JSONResponse:
    headers = {POLICY_VERSION_HEADER: version} if version else None
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = ".".join(p for p in loc if p != "parameters") or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"`{field}`: {msg}")
    return "Input validation error: " + "; ".join(parts)


def create_app(settings: Settings | None = None, runtime: ServeRuntime | None = None) -> FastAPI:
    settings = settings or Settings()
    runtime = runtime or build_runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        metrics_server = None
        if settings.metrics_port:
            from prometheus_client import start_http_server

            metrics_server, _ = start_http_server(
                settings.metrics_port, addr=settings.host, registry=runtime.metrics.registry
            )
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
            runtime.stop()

    app = FastAPI(title="instructloop serve", version=instructloop.__version__, lifespan=lifespan)
    if settings.auth_token is not None:
        app.add_middleware(
            BearerTokenAuth,
            token=settings.auth_token.get_secret_value(),
            on_refused=runtime.metrics.request_failure.labels(err="unauthorized").inc,
        )
    app.state.runtime = runtime
    serving = runtime.serving

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        runtime.metrics.request_failure.labels(err="validation").inc()
        return JSONResponse(
            {"error": _validation_message(exc), "error_type": ErrorType.validation.value}, status_code=422
        )

    @app.exception_handler(TGIError)
    async def _tgi_error(request: Request, exc: TGIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; 499 in the access log

    async def stream(body: GenerateRequest, request: Request) -> Response:
        version, lines = await serving.generate_stream(body, request)
        return StreamingResponse(
            lines,
            media_type="text/event-stream",
            headers={POLICY_VERSION_HEADER: version, "Cache-Control": "no-cache"},
        )

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request) -> Response:
        result = await serving.generate(body, request)
        return JSONResponse(
            result.model_dump(mode="json", exclude_none=False),
            headers={POLICY_VERSION_HEADER: result.policy_version},
        )

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateRequest, request: Request) -> Response:
        return await stream(body, request)

    @app.post("/")
    async def compat_generate(body: GenerateRequest, request: Request) -> Response:
        if body.stream:
            return await stream(body, request)
        result = await serving.generate(body, request)
        return JSONResponse(
            [result.model_dump(mode="json")], headers={POLICY_VERSION_HEADER: result.policy_version}
        )

    @app.get("/info", response_model=Info)
    async def info() -> Info:
        base = runtime.base
        return Info(
            model_id=runtime.model_id,
            model_dtype=str(next(base.model.parameters()).dtype).removeprefix("torch."),
            model_device_type=base.device.type,
            max_concurrent_requests=settings.max_batch_size + settings.max_queue,
            max_stop_sequences=settings.max_stop_sequences,
            max_input_tokens=settings.max_input_tokens,
            max_total_tokens=settings.max_total_tokens,
            max_batch_size=settings.max_batch_size,
            version=instructloop.__version__,
            policy_version=runtime.engine.active_version,
            policy_versions_in_flight=runtime.engine.running_versions,
            policy_versions_loaded=runtime.engine.loaded_versions(),
        )

    @app.get("/health")
    async def health() -> Response:
        version = runtime.engine.active_version
        if not runtime.engine.alive:
            return JSONResponse(
                {"status": "model loop not running", "policy_version": version},
                status_code=503,
                headers={POLICY_VERSION_HEADER: version},
            )
        if runtime.watcher is not None and not runtime.watcher.alive():
            return JSONResponse(
                {
                    "status": "policy watcher not running",
                    "policy_version": version,
                    "error": runtime.watcher.last_error,
                },
                status_code=503,
                headers={POLICY_VERSION_HEADER: version},
            )
        return JSONResponse(
            {"status": "ok", "policy_version": version}, headers={POLICY_VERSION_HEADER: version}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
