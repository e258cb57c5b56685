from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.deps import State
from gateway.request_context import log_server_error

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])
"""``/metrics`` on the API port: mounted only when no separate ``metrics_port`` is set."""


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State):
    """Ready when at least one backend is healthy; Redis is reported (it does not gate completions)."""
    backends = {
        r.url: {"healthy": r.healthy, "outstanding": r.outstanding, "policy_version": r.policy_version}
        for r in state.backend.replicas
    }
    ready = any(r.healthy for r in state.backend.replicas)
    body = {
        "status": "ready" if ready else "not_ready",
        "backends": backends,
        "redis": await state.store.ping(),
    }
    if not ready:
        log_server_error(
            503,
            "not ready: no healthy inference backend",
            "not_ready",
            backends={url: r.last_error for url, r in ((r.url, r) for r in state.backend.replicas)},
        )
    return JSONResponse(body, status_code=200 if ready else 503)


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
