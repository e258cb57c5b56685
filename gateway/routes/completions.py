from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.deps import AnyCaller, Completions
from gateway.protocol import CompletionResponse
from gateway.protocol_completions import CompletionRequest
from gateway.routes import ERRORS, render

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
async def create_completion(
    body: CompletionRequest, caller: AnyCaller, serving: Completions, request: Request
):
    """OpenAI legacy completions; ``stream=true`` answers SSE ending in ``data: [DONE]``."""
    return render(await serving.create_completion(body, caller, request))
