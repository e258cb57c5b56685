"""Request-size bounds and per-key budgets of a completion (issue 11: one key must not fill Redis or serve).

``check_request_size``: n × prompts (``max_generations``: the choices generated, stored and logged) and
the characters of all prompts together (``max_total_prompt_chars``). ``admit_completion`` charges the
key's per-minute generation and token budgets (``Store.charge``: all or nothing, in Redis, or in process
while Redis fails); tokens are charged at admission as prompt tokens × n + ``max_tokens`` × generations,
the most the request can cost.
"""

from __future__ import annotations

from gateway.auth import Principal
from gateway.metrics import GatewayMetrics
from gateway.protocol import APIError
from gateway.protocol_completions import CompletionRequest
from gateway.settings import Settings
from gateway.store import Store


def check_request_size(request: CompletionRequest, settings: Settings) -> APIError | None:
    generations = request.n * len(request.prompts)
    if generations > settings.max_generations:
        return APIError(
            400,
            f"n × prompts is {generations}; one request may generate at most "
            f"{settings.max_generations} choices (send fewer prompts or a smaller n)",
            param="n",
            code="too_many_generations",
        )
    if sum(len(p) for p in request.prompts) > settings.max_total_prompt_chars:
        return APIError(
            400,
            f"the prompts are longer than {settings.max_total_prompt_chars} characters together",
            param="prompt",
            code="prompt_too_long",
        )
    return None


async def admit_completion(
    store: Store,
    settings: Settings,
    metrics: GatewayMetrics,
    request: CompletionRequest,
    prompt_tokens: int,
    principal: Principal,
) -> APIError | None:
    """Charge the key's generation and token budgets; a 429 + Retry-After when either has no room."""
    generations = request.n * len(request.prompts)
    tokens = prompt_tokens * request.n + request.max_tokens * generations
    refused = await store.charge(
        principal.key_id,
        {
            "generations": (generations, settings.rate_limit_generations_per_minute),
            "tokens": (tokens, settings.rate_limit_tokens_per_minute),
        },
    )
    if refused is None:
        return None
    budget, wait = refused
    limit = (
        settings.rate_limit_generations_per_minute
        if budget == "generations"
        else settings.rate_limit_tokens_per_minute
    )
    metrics.rate_limited.inc()
    metrics.rate_limited_budget.labels(budget).inc()
    cost = generations if budget == "generations" else tokens
    return APIError(
        429,
        f"Rate limit reached: {limit} {budget} per minute per key (this request costs {cost}); "
        f"retry in {wait} s.",
        "rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(wait)},
    )
