from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.deps import AnyCaller, Chat
from gateway.protocol import ChatCompletionResponse
from gateway.protocol_chat import ChatCompletionRequest
from gateway.routes import ERRORS, render

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest, caller: AnyCaller, serving: Chat, request: Request
):
    """Chat completions: the messages go through the model's chat template."""
    return render(await serving.create_chat_completion(body, caller, request))
