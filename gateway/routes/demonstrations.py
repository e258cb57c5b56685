from __future__ import annotations

from fastapi import APIRouter

from gateway.deps import Demonstrations, IdempotencyKey, Labeler
from gateway.protocol import DemonstrationAccepted, DemonstrationRequest
from gateway.routes import ERRORS, render

router = APIRouter(tags=["demonstrations"])


@router.post("/v1/demonstrations", status_code=202, response_model=DemonstrationAccepted, responses=ERRORS)
async def submit_demonstration(
    body: DemonstrationRequest,
    labeler: Labeler,
    serving: Demonstrations,
    idempotency_key: IdempotencyKey = None,
):
    """A human-written response to a prompt (labeler role)."""
    return render(await serving.submit(body, labeler, idempotency_key), status_code=202)
