"""The prompt contract: what a model input is, spelled once for every room.

A completion event carries exactly the text serve generated from (``CompletionEvent.prompt``) and the route
that produced it. For ``/v1/completions`` that text is the caller's prompt; for ``/v1/chat/completions`` it is
the messages rendered by the tokenizer's chat template with the assistant header appended (``render_chat``),
and the event carries the messages too. Serve turns the text into token ids with ``encode_prompt``; the
learner (RM training, PPO rollouts, bias normalisation, gate evaluation, SFT) uses the same text and the same
function, and never renders a template over a stored prompt. Demonstrations carry the same two fields.
"""

from __future__ import annotations

from typing import Any, Literal

Route = Literal["completions", "chat.completions"]
"""Which OpenAI route produced a model input: raw text (``/v1/completions``) or rendered chat."""

COMPLETIONS_ROUTE: Route = "completions"
CHAT_ROUTE: Route = "chat.completions"


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The model input of a chat request: the chat template over ``messages`` plus the assistant header.

    Raises whatever the template raises for a message order it refuses (the caller turns it into a 400)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a model input, exactly as serve generates from them (the tokenizer's default special
    tokens, as TGI does). Serve, the gateway's token counts and the learner all call this."""
    return list(tokenizer(text)["input_ids"])
