"""Serving for ``/v1/chat/completions``.

The messages go through the model's chat template into one prompt; from there a chat request is the
equivalent completion request (``ChatCompletionRequest.to_completion_request``), checked, generated,
streamed and recorded by ``CompletionServing``, and answered in chat's shape.
"""

from __future__ import annotations

from fastapi import Request

from gateway.auth import Principal
from gateway.backend import Generation
from gateway.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from gateway.protocol_chat import ChatCompletionRequest
from gateway.request_context import until_disconnected
from gateway.serving_completions import CompletionServing
from gateway.serving_stream import ChatChunks, CompletionStream, openai_finish_reason
from instructloop.prompt import render_chat


def chat_logprobs(g: Generation) -> ChatLogprobs:
    """OpenAI chat logprobs of one choice: its content tokens (special tokens such as the end-of-turn
    token are not content) with their top alternatives, as serve reported them."""
    alternatives = g.top_tokens or [[] for _ in g.tokens]

    def entry(token, cls=ChatTopLogprob, **extra):
        return cls(token=token.text, logprob=token.logprob, bytes=list(token.text.encode("utf-8")), **extra)

    return ChatLogprobs(
        content=[
            entry(token, ChatTokenLogprob, top_logprobs=[entry(alt) for alt in alts])
            for token, alts in zip(g.tokens, alternatives, strict=True)
            if not token.special
        ]
    )


class ChatServing:
    def __init__(self, completions: CompletionServing):
        self.completions = completions
        self.settings = completions.settings
        self.tokenizer = completions.tokenizer

    def render_chat(self, request: ChatCompletionRequest) -> str | APIError:
        try:
            return render_chat(self.tokenizer, request.template_messages())
        except Exception as exc:  # the template refuses some message orders
            return APIError(
                400,
                f"messages cannot be rendered with the model's chat template: {exc}",
                param="messages",
                code="invalid_messages",
            )

    async def create_chat_completion(
        self, request: ChatCompletionRequest, principal: Principal, raw_request: Request | None = None
    ) -> ChatCompletionResponse | CompletionStream | APIError:
        """Raises ``ClientGone`` when the client disconnects before the answer is ready."""
        prompt = self.render_chat(request)
        if isinstance(prompt, APIError):
            return prompt
        max_tokens = request.max_completion_tokens or request.max_tokens
        if max_tokens is not None and max_tokens > self.settings.max_tokens_limit:
            return APIError(
                400,
                f"max_tokens must be at most {self.settings.max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )
        completion_request = request.to_completion_request(
            prompt, default_max_tokens=min(256, self.settings.max_tokens_limit)
        )
        checked = await self.completions.check_and_admit(completion_request, principal)
        if isinstance(checked, APIError):
            if checked.param == "prompt":
                checked.param = "messages"
            return checked
        if request.stream:
            return await self.completions.streams.open(
                completion_request, principal, checked, ChatChunks(request.model), request.template_messages()
            )
        result = await until_disconnected(
            raw_request, self.completions.generate(completion_request, checked, "chatcmpl")
        )
        if isinstance(result, APIError):
            return result
        await self.completions._record(
            result, completion_request, principal, chat=True, messages=request.template_messages()
        )
        choices = [
            ChatChoice(
                index=j.index,
                message=ChatResponseMessage(content=g.text),
                logprobs=chat_logprobs(g) if request.logprobs else None,
                finish_reason=openai_finish_reason(g.finish_reason),
            )
            for j, g in zip(result.jobs, result.generations, strict=True)
        ]
        return ChatCompletionResponse(
            id=result.completion_id,
            created=result.created,
            model=request.model,
            choices=choices,
            usage=self.completions.usage(result),
            policy_version=result.policy_version,
        )
