from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from gateway.deps import AnyCaller, Feedback, IdempotencyKey
from gateway.protocol import FeedbackAccepted, FeedbackRequest
from gateway.routes import ERRORS, render

router = APIRouter(tags=["feedback"])


@router.post("/v1/feedback", status_code=202, response_model=FeedbackAccepted, responses=ERRORS)
async def submit_feedback(
    body: Annotated[FeedbackRequest, Body()],
    caller: AnyCaller,
    serving: Feedback,
    idempotency_key: IdempotencyKey = None,
):
    """A ranking of a completion's choices, a pairwise vote, or an A/B vote between two completions.

    Answers 202 once the comparison is on the comparisons stream; ``Idempotency-Key`` makes retries safe.
    """
    return render(await serving.submit(body, caller, idempotency_key), status_code=202)
