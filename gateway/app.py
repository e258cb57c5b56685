"""``create_app(settings)``: the gateway's FastAPI app.

Every error leaves in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): ``APIError``
values from the serving classes, validation errors (422), unknown routes (404), oversized bodies (413),
Redis refusing the gateway's user a command (500 ``redis_permission_denied``, naming the command and the
user) and unexpected failures (500). A pure ASGI middleware limits the body size and records per-route
request counts and latency.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import labeling
from gateway.auth import KeyStore
from gateway.backend import Backend
from gateway.deps import GatewayState
from gateway.discovery import DnsDiscovery
from gateway.metrics import GatewayMetrics
from gateway.protocol import APIError
from gateway.protocol_completions import UNSUPPORTED_PARAMETER
from gateway.request_context import (
    ClientGone,
    log_server_error,
    new_request_id,
    request_id,
    server_error_logged,
)
from gateway.routes import (
    admin,
    chat,
    client_gone,
    completions,
    demonstrations,
    error_response,
    feedback,
    health,
    models,
)
from gateway.serving_admin import PolicyAdminServing
from gateway.serving_chat import ChatServing
from gateway.serving_completions import CompletionServing
from gateway.serving_feedback import DemonstrationServing, FeedbackServing
from gateway.settings import Settings
from gateway.store import Store, StorePermissionDenied
from instructloop.wire import REQUEST_ID_HEADER

log = logging.getLogger(__name__)


def load_tokenizer(model: str) -> Any:
    """The tokenizer for chat templates and token counts (no weights are loaded)."""
    from instructloop.settings import DEFAULT_MODEL

    if model == DEFAULT_MODEL:
        from instructloop.model import load_default_tokenizer

        return load_default_tokenizer()
    from transformers import AutoTokenizer

    from instructloop.model import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


class _BodyTooLarge(Exception):
    pass


class GatewayMiddleware:
    """Body size limit + request metrics, as plain ASGI (no buffering, streaming untouched)."""

    def __init__(self, app, metrics: GatewayMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        limit = self.max_body_bytes
        rid = new_request_id(dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode()))
        request_id.set(rid)
        server_error_logged.set(False)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.lower().encode(), rid.encode())]
            await send(message)

        too_large = APIError(
            413, f"request body is larger than {limit} bytes", param=None, code="body_too_large"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(too_large)(scope, receive, send_wrapper)
        else:
            received = 0

            async def receive_wrapper():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise _BodyTooLarge()
                return message

            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except _BodyTooLarge:
                if not status["sent"]:
                    await error_response(too_large)(scope, receive, send_wrapper)
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        if status["code"] >= 500 and not server_error_logged.get():  # a 5xx that no handler explained
            log_server_error(status["code"], "a 5xx left the app without an error value", path=path)
        self.metrics.requests.labels(path, scope["method"], str(status["code"])).inc()
        self.metrics.latency.labels(path, scope["method"]).observe(time.perf_counter() - started)


OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")
"""Routes whose body errors are 400s, as OpenAI answers (the SDK raises ``BadRequestError``); the gateway's
own routes (feedback, demonstrations, admin, labeling) answer 422 for a body that fails validation."""

_OWN_CODES = {UNSUPPORTED_PARAMETER, "invalid_value"}
"""Validation error types the protocol raises itself; they become the error's ``code``."""


def _validation_error_detail(exc: RequestValidationError, openai_route: bool) -> tuple[str, str | None, str]:
    """(message, param, code) of the first problem of a body that failed validation; on an OpenAI route an
    unknown field is OpenAI's ``Unrecognized request argument``, and the protocol's own error types are the
    code."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "validation_error"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    # A custom error may name the field itself (the feedback union's `type`, `stream_options` of a request):
    # its loc is the object that holds the field.
    named = (first.get("ctx") or {}).get("param")
    param = ".".join([*loc, named] if named else loc) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    if not openai_route:
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        return (f"{param}: {message}{more}" if param else f"{message}{more}"), param, "validation_error"
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}{more}", param, "unrecognized_argument"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    code = first["type"] if first.get("type") in _OWN_CODES else "validation_error"
    if not param or (code == UNSUPPORTED_PARAMETER and message.startswith(param)):
        return f"{message}{more}", param, code
    return f"{param}: {message}{more}", param, code


def create_app(settings: Settings | None = None, *, tokenizer: Any = None) -> FastAPI:
    settings = settings or Settings()
    metrics = GatewayMetrics()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(settings.model)
    backend = Backend(
        settings.backends,
        metrics,
        timeout_s=settings.backend_timeout_s,
        connect_timeout_s=settings.backend_connect_timeout_s,
        health_interval_s=settings.health_interval_s,
        token=settings.backend_token.get_secret_value() if settings.backend_token else None,
        discovery=(
            DnsDiscovery(settings.backends_dns, settings.backends_dns_refresh_s)
            if settings.backends_dns
            else None
        ),
    )
    store = Store(
        settings.redis_url,
        settings.stream_prefix,
        metrics,
        completion_ttl_s=settings.completion_ttl_s,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        timeout_s=settings.redis_timeout_s,
    )
    completion_serving = CompletionServing(settings, backend, store, tokenizer, metrics)
    state = GatewayState(
        settings=settings,
        metrics=metrics,
        keys=KeyStore(settings.keys_file, dev_key=settings.effective_dev_key),
        backend=backend,
        store=store,
        tokenizer=tokenizer,
        completions=completion_serving,
        chat=ChatServing(completion_serving),
        feedback=FeedbackServing(settings, store, metrics),
        demonstrations=DemonstrationServing(settings, store, metrics, tokenizer),
        admin=PolicyAdminServing(settings),
        started=int(time.time()),
        models=completion_serving.models,
    )
    if settings.dev_mode:
        log.warning("gateway in DEV MODE: the dev admin key is accepted; never expose this gateway")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        metrics_server = None
        if settings.metrics_port:  # /metrics alone, on its own port (the API port does not answer it)
            from prometheus_client import start_http_server

            metrics_server, _ = start_http_server(
                settings.metrics_port, addr=settings.host, registry=metrics.registry
            )
        log.info(
            "gateway started",
            extra={
                "backends": settings.backends_dns or settings.backends,
                "metrics_port": settings.metrics_port or settings.port,
                "redis": bool(settings.redis_url),
                "keys": len(state.keys),
                "dev_mode": settings.dev_mode,
            },
        )
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
            await backend.close()
            await store.close()
            state.admin.close()

    app = FastAPI(
        title="instructloop gateway",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible completions, preference feedback, demonstrations and policy admin.",
    )
    app.state.gateway = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return client_gone()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        openai_route = request.url.path in OPENAI_ROUTES
        message, param, code = _validation_error_detail(exc, openai_route)
        if openai_route and code in (UNSUPPORTED_PARAMETER, "unrecognized_argument"):
            # the field's own name (messages.1.role -> role), never a client's unknown name (cardinality)
            field = param.split(".")[-1] if code == UNSUPPORTED_PARAMETER and param else "unrecognized"
            metrics.refused_fields.labels(field).inc()
            log.info("request refused for a field", extra={"path": request.url.path, "param": param})
        return error_response(APIError(400 if openai_route else 422, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(
            APIError(
                exc.status_code,
                message,
                "invalid_request_error" if exc.status_code < 500 else "server_error",
                code="not_found" if exc.status_code == 404 else None,
                headers=dict(exc.headers or {}),
            )
        )

    @app.exception_handler(StorePermissionDenied)
    async def _redis_denied(request: Request, exc: StorePermissionDenied) -> JSONResponse:
        return error_response(
            APIError(500, exc.message, "server_error", param=None, code="redis_permission_denied")
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", extra={"path": request.url.path, "request_id": request_id.get()})
        return error_response(
            APIError(
                500,
                "The gateway hit an unexpected error; it has been logged.",
                "server_error",
                code="internal_error",
            )
        )

    for module in (completions, chat, models, feedback, demonstrations, admin, health):
        app.include_router(module.router)
    if not settings.metrics_port:
        app.include_router(health.metrics_router)
    labeling.install(app, state)  # /label, /label/admin and the task API (gateway/labeling/)
    app.add_middleware(GatewayMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def create_app_from_env() -> FastAPI:
    """The app factory uvicorn's worker processes call (``gateway run --workers N``)."""
    from instructloop.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.json_logs)
    return create_app(settings)
