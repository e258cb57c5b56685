"""FastAPI dependencies as ``Annotated`` aliases: the app state, the caller (bearer key + role + rate
limit), the serving objects, the Idempotency-Key header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.auth import KeyStore, Principal, Role
from gateway.backend import Backend
from gateway.metrics import GatewayMetrics
from gateway.protocol import APIError
from gateway.serving_admin import PolicyAdminServing
from gateway.serving_chat import ChatServing
from gateway.serving_completions import CompletionServing
from gateway.serving_feedback import DemonstrationServing, FeedbackServing
from gateway.serving_models import ModelCatalog
from gateway.settings import Settings
from gateway.store import Store


@dataclass
class GatewayState:
    settings: Settings
    metrics: GatewayMetrics
    keys: KeyStore
    backend: Backend
    store: Store
    tokenizer: Any
    completions: CompletionServing
    chat: ChatServing
    feedback: FeedbackServing
    demonstrations: DemonstrationServing
    admin: PolicyAdminServing
    started: int
    models: ModelCatalog


async def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]

bearer = HTTPBearer(auto_error=False, description="An API key made with `instructloop gateway keys create`.")


async def authenticate(state: GatewayState, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller behind the bearer key, after the per-key rate limit; raises 401 / 429 as ``APIError``."""
    if credentials is None or not credentials.credentials:
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = state.keys.authenticate(credentials.credentials)
    if principal is None:
        raise APIError(
            401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
    wait = await state.store.hit_rate_limit(principal.key_id, state.settings.rate_limit_per_minute)
    if wait is not None:
        state.metrics.rate_limited.inc()
        state.metrics.rate_limited_budget.labels("requests").inc()
        raise APIError(
            429,
            f"Rate limit reached: {state.settings.rate_limit_per_minute} requests per minute per key; "
            f"retry in {wait} s.",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )
    return principal


def require(role: Role):
    """A dependency: the authenticated caller, with at least ``role`` (one flat function: this runs on
    every request, and each nested FastAPI dependency costs time)."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
    ) -> Principal:
        principal = await authenticate(request.app.state.gateway, credentials)
        if not principal.role.allows(role):
            raise APIError(
                403,
                f"This route needs the {role.value} role; this key has the {principal.role.value} role.",
                "permission_error",
                code="insufficient_role",
            )
        return principal

    dependency.__name__ = f"require_{role.value}"
    return dependency


AnyCaller = Annotated[Principal, Depends(require(Role.user))]
Labeler = Annotated[Principal, Depends(require(Role.labeler))]
Admin = Annotated[Principal, Depends(require(Role.admin))]


async def _completions(request: Request) -> CompletionServing:
    return request.app.state.gateway.completions


async def _chat(request: Request) -> ChatServing:
    return request.app.state.gateway.chat


async def _feedback(request: Request) -> FeedbackServing:
    return request.app.state.gateway.feedback


async def _demonstrations(request: Request) -> DemonstrationServing:
    return request.app.state.gateway.demonstrations


async def _admin(request: Request) -> PolicyAdminServing:
    return request.app.state.gateway.admin


Completions = Annotated[CompletionServing, Depends(_completions)]
Chat = Annotated[ChatServing, Depends(_chat)]
Feedback = Annotated[FeedbackServing, Depends(_feedback)]
Demonstrations = Annotated[DemonstrationServing, Depends(_demonstrations)]
PolicyAdmin = Annotated[PolicyAdminServing, Depends(_admin)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
