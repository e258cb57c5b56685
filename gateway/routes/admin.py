from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from gateway.deps import Admin, PolicyAdmin
from gateway.protocol import PolicyAction, PolicyInfo, PolicyList, RollbackRequest
from gateway.routes import ERRORS, render
from instructloop.events import PolicyStatus

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/policies", response_model=PolicyList, responses=ERRORS)
async def list_policies(admin: Admin, serving: PolicyAdmin):
    """Every policy version with its status, gate metrics and whether it is current."""
    return render(await serving.list_policies())


@router.post("/policies/{version}/promote", response_model=PolicyInfo, responses=ERRORS)
async def promote(
    version: str, admin: Admin, serving: PolicyAdmin, body: Annotated[PolicyAction | None, Body()] = None
):
    """Make ``version`` current (serve replicas hot-swap to it)."""
    return render(
        await serving.set_current(version, PolicyStatus.promoted, admin, body.reason if body else None)
    )


@router.post("/policies/{version}/pin", response_model=PolicyInfo, responses=ERRORS)
async def pin(
    version: str, admin: Admin, serving: PolicyAdmin, body: Annotated[PolicyAction | None, Body()] = None
):
    """Make ``version`` current and mark it ``pinned``: while it is current, candidates that pass the
    learner's gate are held back (published as ``held_back``), not promoted over it."""
    return render(
        await serving.set_current(version, PolicyStatus.pinned, admin, body.reason if body else None)
    )


@router.post("/policies/rollback", response_model=PolicyInfo, responses=ERRORS)
async def rollback(
    admin: Admin, serving: PolicyAdmin, body: Annotated[RollbackRequest | None, Body()] = None
):
    """Go back to ``to`` (default: the previous promoted version); the current one is marked rolled_back."""
    body = body or RollbackRequest()
    return render(await serving.rollback(body.to, admin, body.reason))
