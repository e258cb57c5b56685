"""Serving for ``/v1/feedback`` and ``/v1/demonstrations``.

Feedback is validated against the completion the gateway served (kept in Redis with a TTL): it must
exist, the caller must be allowed to rate it (a user only its own completions, a labeler or admin any),
the indices must be in range, distinct, answer one prompt, and give at least one preference. Accepted
feedback becomes one self-contained ``ComparisonEvent`` (prompt + the responses + ranking) and the call
answers 202 only after XADD returned. Redis down or full: 503 + Retry-After, nothing written.

Flooding: each caller may give **one** feedback per completion prompt (for A/B votes: per pair of
completions); the first wins and a second answers 409 ``feedback_already_given`` with the first event's
id (an ``Idempotency-Key`` replay of the first still answers 202 ``duplicate``). Each key also has its own
per-minute feedback budget (``feedback_rate_limit_per_minute``), on top of the request limit.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.auth import Principal, Role
from gateway.metrics import GatewayMetrics
from gateway.protocol import (
    ABFeedback,
    APIError,
    DemonstrationAccepted,
    DemonstrationRequest,
    FeedbackAccepted,
    PairwiseFeedback,
    RankingFeedback,
)
from gateway.settings import Settings
from gateway.store import (
    FeedbackExists,
    IdempotencyConflict,
    Store,
    StoredCompletion,
    StoreUnavailable,
    fingerprint,
)
from instructloop.events import ComparisonEvent, DemonstrationEvent, validate_ranking
from instructloop.prompt import render_chat
from instructloop.streams import Stream

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255


def check_idempotency_key(key: str | None) -> APIError | None:
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        return APIError(
            400,
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return None


class FeedbackServing:
    def __init__(self, settings: Settings, store: Store, metrics: GatewayMetrics):
        self.settings = settings
        self.store = store
        self.metrics = metrics

    def _unavailable(self, reason: str) -> APIError:
        return APIError(
            503,
            f"feedback storage is unavailable ({reason}); retry later",
            "server_error",
            code="storage_unavailable",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    async def _completion(
        self, completion_id: str, principal: Principal, param: str
    ) -> StoredCompletion | APIError:
        completion = await self.store.get_completion(completion_id)
        if completion is None:
            return APIError(
                404,
                f"completion {completion_id!r} is unknown or expired (completions can be rated for "
                f"{self.settings.completion_ttl_s} s; an answer served with store=false is never "
                "kept)",
                param=param,
                code="completion_not_found",
            )
        if principal.role is Role.user and completion.caller != principal.key_id:
            return APIError(
                403,
                f"completion {completion_id!r} was not served to this API key; users may rate only "
                "their own completions (labelers may rate any)",
                "permission_error",
                param=param,
                code="not_your_completion",
            )
        return completion

    @staticmethod
    def _invalid(message: str, param: str, code: str = "invalid_feedback") -> APIError:
        return APIError(422, message, param=param, code=code)

    def _one_prompt(
        self, completion: StoredCompletion, indices: list[int], param: str
    ) -> tuple[list[int], APIError | None]:
        """The choices (global indices) answering the prompt of ``indices``; error if they span prompts."""
        n = len(completion.choices)
        for index in indices:
            if not 0 <= index < n:
                return [], self._invalid(
                    f"index {index} is out of range: completion {completion.id} has {n} choices", param
                )
        prompt_indices = {completion.choices[i].prompt_index for i in indices}
        if len(prompt_indices) > 1:
            return [], self._invalid(
                "the ranked choices answer different prompts; rank choices of one prompt", param
            )
        prompt_index = prompt_indices.pop() if prompt_indices else 0
        return [c.index for c in completion.choices if c.prompt_index == prompt_index], None

    async def _from_completion(
        self, completion: StoredCompletion, ranking: list[list[int]], param: str
    ) -> ComparisonEvent | APIError:
        flat = [i for group in ranking for i in group]
        members, error = self._one_prompt(completion, flat, param)
        if error is not None:
            return error
        try:
            validate_ranking(ranking, len(completion.choices))
        except ValueError as exc:
            return self._invalid(str(exc), param)
        position = {global_index: local for local, global_index in enumerate(members)}
        prompt = completion.prompts[completion.choices[members[0]].prompt_index]
        return ComparisonEvent(
            prompt=prompt,
            responses=[completion.choices[i].text for i in members],
            ranking=[[position[i] for i in group] for group in ranking],
            labeler_id="",  # set by the caller
            completion_ids=[completion.id],
            policy_versions=[completion.policy_version] * len(members),
        )

    async def _build(
        self, feedback: RankingFeedback | PairwiseFeedback | ABFeedback, principal: Principal
    ) -> ComparisonEvent | APIError:
        if isinstance(feedback, ABFeedback):
            if (feedback.a.completion_id, feedback.a.index) == (feedback.b.completion_id, feedback.b.index):
                return self._invalid("a and b are the same response", "b")
            sides = []
            for name, ref in (("a", feedback.a), ("b", feedback.b)):
                completion = await self._completion(ref.completion_id, principal, f"{name}.completion_id")
                if isinstance(completion, APIError):
                    return completion
                if not 0 <= ref.index < len(completion.choices):
                    return self._invalid(
                        f"{name}.index {ref.index} is out of range: completion {completion.id} has "
                        f"{len(completion.choices)} choices",
                        f"{name}.index",
                    )
                sides.append((completion, completion.choices[ref.index]))
            (ca, a), (cb, b) = sides
            prompt_a, prompt_b = ca.prompts[a.prompt_index], cb.prompts[b.prompt_index]
            if prompt_a != prompt_b or ca.chat != cb.chat:
                return self._invalid(
                    "an A/B vote compares two completions of the same prompt; these prompts differ",
                    "b",
                    code="different_prompts",
                )
            if feedback.preferred == "tie":
                ranking = [[0, 1]]  # recorded; it implies no (winner, loser) pair
            else:
                winner = 0 if feedback.preferred == "a" else 1
                ranking = [[winner], [1 - winner]]
            return ComparisonEvent(
                prompt=prompt_a,
                responses=[a.text, b.text],
                ranking=ranking,
                labeler_id="",
                source="ab",
                completion_ids=[ca.id, cb.id],
                policy_versions=[ca.policy_version, cb.policy_version],
            )
        completion = await self._completion(feedback.completion_id, principal, "completion_id")
        if isinstance(completion, APIError):
            return completion
        if isinstance(feedback, PairwiseFeedback):
            if feedback.chosen == feedback.rejected:
                return self._invalid("chosen and rejected must be different choices", "rejected")
            event = await self._from_completion(
                completion, [[feedback.chosen], [feedback.rejected]], "chosen"
            )
            if isinstance(event, ComparisonEvent):
                event.source = "pairwise"
            return event
        event = await self._from_completion(completion, feedback.ranking, "ranking")
        if isinstance(event, ComparisonEvent) and feedback.flags:
            return self._with_flags(event, completion, feedback.ranking[0][0], feedback.flags)
        return event

    def _with_flags(
        self, event: ComparisonEvent, completion: StoredCompletion, ranked: int, flags: dict[int, list[str]]
    ) -> ComparisonEvent | APIError:
        """Per-choice flags re-indexed to the event's responses (the choices of the ranked prompt)."""
        prompt_index = completion.choices[ranked].prompt_index
        members = [c.index for c in completion.choices if c.prompt_index == prompt_index]
        position = {global_index: local for local, global_index in enumerate(members)}
        per_response: list[list[str]] = [[] for _ in event.responses]
        for index, names in flags.items():
            if index not in position:
                return self._invalid(
                    f"flags names choice {index}, which is not a choice of the ranked prompt", "flags"
                )
            per_response[position[index]] = sorted(set(names))
        return event.model_copy(update={"flags": per_response})

    async def submit(
        self,
        feedback: RankingFeedback | PairwiseFeedback | ABFeedback,
        principal: Principal,
        idempotency_key: str | None,
    ) -> FeedbackAccepted | APIError:
        result = await self._submit(feedback, principal, idempotency_key)
        outcome = "accepted" if isinstance(result, FeedbackAccepted) else f"refused_{result.status}"
        if isinstance(result, FeedbackAccepted) and result.duplicate:
            outcome = "duplicate"
        self.metrics.feedback.labels(feedback.type, outcome).inc()
        return result

    async def _submit(
        self, feedback, principal: Principal, idempotency_key: str | None
    ) -> FeedbackAccepted | APIError:
        bad_key = check_idempotency_key(idempotency_key)
        if bad_key is not None:
            return bad_key
        refused = await self.store.charge(
            principal.key_id, {"feedback": (1, self.settings.feedback_rate_limit_per_minute)}
        )
        if refused is not None:
            self.metrics.rate_limited.inc()
            self.metrics.rate_limited_budget.labels("feedback").inc()
            return APIError(
                429,
                f"Rate limit reached: {self.settings.feedback_rate_limit_per_minute} feedback calls "
                f"per minute per key; retry in {refused[1]} s.",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(refused[1])},
            )
        try:
            if await self.store.labeler_excluded(principal.key_id):
                return labeler_excluded(principal)
            event = await self._build(feedback, principal)
            if isinstance(event, APIError):
                return event
            event = event.model_copy(update={"labeler_id": principal.key_id, "rationale": feedback.rationale})
            subject = fingerprint(
                [sorted(event.completion_ids), event.prompt]
            )  # one completion prompt / A-B pair
            event_id, duplicate = await self.store.append_event(
                Stream.comparisons,
                event,
                idempotency_key=idempotency_key,
                caller=principal.key_id,
                request_fingerprint=fingerprint(feedback.model_dump()) if idempotency_key else "",
                subject=subject,
            )
        except StoreUnavailable as exc:
            log.warning("feedback refused: %s", exc, extra={"error": str(exc)})
            return self._unavailable(str(exc))
        except FeedbackExists as exc:
            return APIError(
                409,
                f"this key already gave feedback on this completion (event {exc.event_id}); one "
                "feedback per completion prompt and key, the first one counts",
                param="completion_id",
                code="feedback_already_given",
            )
        except IdempotencyConflict:
            return APIError(
                409,
                "this Idempotency-Key was already used with a different request body",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        log.info(
            "feedback accepted",
            extra={
                "event_id": event_id,
                "kind": feedback.type,
                "labeler": principal.key_id,
                "duplicate": duplicate,
                "responses": len(event.responses),
            },
        )
        return FeedbackAccepted(id=event_id, duplicate=duplicate)


def labeler_excluded(principal: Principal) -> APIError:
    """The answer to feedback from a key an admin excluded (its events no longer train the reward model)."""
    return APIError(
        403,
        f"an admin excluded the key {principal.key_id!r} from giving feedback; its feedback is not recorded "
        "and no longer trains the reward model (ask your admin)",
        "permission_error",
        code="labeler_excluded",
    )


class DemonstrationServing:
    def __init__(self, settings: Settings, store: Store, metrics: GatewayMetrics, tokenizer: Any = None):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.tokenizer = tokenizer

    async def submit(
        self, request: DemonstrationRequest, principal: Principal, idempotency_key: str | None
    ) -> DemonstrationAccepted | APIError:
        bad_key = check_idempotency_key(idempotency_key)
        if bad_key is not None:
            return bad_key
        messages = request.template_messages()
        prompt = request.prompt
        if messages is not None:  # the prompt contract: the event holds the model input itself
            try:
                prompt = render_chat(self.tokenizer, messages)
            except Exception as exc:
                return APIError(
                    400,
                    f"messages cannot be rendered with the model's chat template: {exc}",
                    param="messages",
                    code="invalid_messages",
                )
        limit = self.settings.max_prompt_chars
        for name, text in (
            ("prompt" if messages is None else "messages", prompt),
            ("response", request.response),
        ):
            if len(text) > limit:
                return APIError(400, f"{name} is longer than {limit} characters", param=name, code="too_long")
        event = DemonstrationEvent(
            prompt=prompt,
            response=request.response,
            labeler_id=principal.key_id,
            chat=messages is not None,
            messages=messages,
        )
        try:
            if await self.store.labeler_excluded(principal.key_id):
                self.metrics.demonstrations.labels("excluded").inc()
                return labeler_excluded(principal)
            event_id, duplicate = await self.store.append_event(
                Stream.demonstrations,
                event,
                idempotency_key=idempotency_key,
                caller=principal.key_id,
                request_fingerprint=fingerprint(request.model_dump()) if idempotency_key else "",
            )
        except StoreUnavailable as exc:
            self.metrics.demonstrations.labels("unavailable").inc()
            log.warning("demonstration refused: redis unavailable", extra={"error": str(exc)})
            return APIError(
                503,
                "demonstration storage is unavailable (redis unavailable); retry later",
                "server_error",
                code="storage_unavailable",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        except IdempotencyConflict:
            return APIError(
                409,
                "this Idempotency-Key was already used with a different request body",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        self.metrics.demonstrations.labels("duplicate" if duplicate else "accepted").inc()
        log.info(
            "demonstration accepted",
            extra={"event_id": event_id, "labeler": principal.key_id, "duplicate": duplicate},
        )
        return DemonstrationAccepted(id=event_id, duplicate=duplicate)
