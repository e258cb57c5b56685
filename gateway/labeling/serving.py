"""Serving for the labeling task API: hand a labeler the next task, take its answer, skip it.

A task is made on demand: a prompt this labeler has not seen in this mode (from the uploaded prompt set
or, unless an admin turned it off, from live traffic), answered by the policy through the gateway's
backend with the one-version rule of ``/v1/completions`` (K choices from one policy version; in compare
mode one choice from each of two versions, named with TGI's ``adapter_id``). The completions are stored
like any served completion, so an answer is posted through ``FeedbackServing`` /
``DemonstrationServing``: the same validation, idempotency and durability as ``/v1/feedback`` and
``/v1/demonstrations``.

Ranking tasks are now and then (``label_overlap_rate``) offered to a second labeler with the same
responses in a new random order; when the second ranking arrives both labelers' agreement counters move.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Any

from gateway.auth import Principal
from gateway.backend import Backend, BackendError, Generation
from gateway.labeling.protocol import (
    CompareSubmission,
    DemonstrationSubmission,
    LabelerCounts,
    Mode,
    RankSubmission,
    Submitted,
    Task,
    TaskResponseItem,
    Whoami,
)
from gateway.labeling.quality import pair_agreement
from gateway.labeling.store import LABELING_SOURCE, LabelingStore
from gateway.protocol import (
    ABChoiceRef,
    ABFeedback,
    APIError,
    CompletionRequest,
    DemonstrationRequest,
    FeedbackAccepted,
    RankingFeedback,
    new_completion_id,
)
from gateway.serving_feedback import DemonstrationServing, FeedbackServing, labeler_excluded
from gateway.settings import Settings
from gateway.store import Store, StoredChoice, StoredCompletion, StoreUnavailable
from instructloop.events import OUTPUT_FLAGS, Choice, CompletionEvent, PolicyStatus
from instructloop.registry import Registry
from instructloop.wire import BASE_VERSION

log = logging.getLogger(__name__)


def storage_unavailable(settings: Settings, reason: StoreUnavailable | None = None) -> APIError:
    """503 + Retry-After: Redis is down or full (a NOPERM is no outage: ``StorePermissionDenied``, 500)."""
    return APIError(
        503,
        f"labeling storage is unavailable ({reason or 'redis unavailable'}); retry later",
        "server_error",
        code="storage_unavailable",
        headers={"Retry-After": str(settings.retry_after_s)},
    )


class LabelingServing:
    def __init__(
        self,
        settings: Settings,
        store: LabelingStore,
        backend: Backend,
        completion_store: Store,
        tokenizer: Any,
        feedback: FeedbackServing,
        demonstrations: DemonstrationServing,
        registry: Registry,
        tasks_counter: Any = None,
    ):
        self.settings = settings
        self.tasks_counter = tasks_counter
        self.store = store
        self.backend = backend
        self.completion_store = completion_store
        self.tokenizer = tokenizer
        self.feedback = feedback
        self.demonstrations = demonstrations
        self.registry = registry
        self.random = random.SystemRandom()

    def _unavailable(self, reason: StoreUnavailable | None = None) -> APIError:
        return storage_unavailable(self.settings, reason)

    async def whoami(self, principal: Principal) -> Whoami | APIError:
        """Who this key is, the task settings, the admin's guidelines, this labeler's own counts, and
        whether an admin excluded them."""
        try:
            counts = await self.store.labeler(principal.key_id)
            guidelines = await self.store.guidelines()
            excluded = await self.store.is_excluded(principal.key_id)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        return Whoami(
            key_id=principal.key_id,
            name=principal.name,
            role=principal.role.value,
            k=self.settings.label_k,
            flags=list(OUTPUT_FLAGS),
            guidelines=guidelines,
            counts=LabelerCounts(**{k: int(v) for k, v in counts.items() if k in LabelerCounts.model_fields}),
            excluded=excluded,
        )

    # ---- choosing a prompt --------------------------------------------------------------------------
    async def _prompt(
        self, mode: str, principal: Principal
    ) -> tuple[str, str, list[dict[str, str]] | None] | APIError:
        """(prompt, source, messages): a random prompt this labeler has not seen in this mode; ``messages``
        are the chat turns a live chat prompt was rendered from (None for raw text)."""
        config = await self.store.config()
        sources: list[tuple[str, dict[str, list[dict[str, str]] | None]]] = [
            ("uploaded", dict.fromkeys(await self.store.uploaded_prompts()))
        ]
        if config.live_prompts:
            sources.append(("live", await self.store.live_prompts()))
        candidates = []
        for source, prompts in sources:
            fit = [p for p in prompts if len(p) <= self.settings.max_prompt_chars]
            candidates += [
                (p, source, prompts[p]) for p in await self.store.unseen(mode, principal.key_id, fit)
            ]
        if not candidates:
            where = "the uploaded prompt set" + (
                " or live traffic" if config.live_prompts else " (live prompts are turned off)"
            )
            return APIError(
                404,
                f"no prompt left to label: you have seen every prompt of {where}; an admin can upload "
                "more on /label/admin",
                code="no_prompts_left",
            )
        return self.random.choice(candidates)

    # ---- generating ---------------------------------------------------------------------------------
    async def _generate(
        self, prompt: str, n: int, version: str | None, principal: Principal
    ) -> StoredCompletion | APIError:
        """n choices from one policy version (``version``: that one, via ``adapter_id``; None: the current
        one), stored like a served completion (caller = the labeler, marked as the labeling queue's)."""
        s = self.settings
        request = CompletionRequest(
            model=s.served_model_name,
            prompt=prompt,
            n=n,
            max_tokens=s.label_max_tokens,
            temperature=s.label_temperature,
        )
        params = [request.to_generate_params(i) for i in range(n)]
        if version is not None:
            for choice_params in params:
                choice_params["adapter_id"] = version
        generations = await self._choices(prompt, params)
        if isinstance(generations, APIError):
            return generations
        served = generations[0].policy_version
        if version is not None and served != version:
            return APIError(
                503,
                f"serve answered with version {served!r} when asked for {version!r}: it does not hold "
                "that version (adapter_id)",
                "server_error",
                code="version_not_served",
                headers={"Retry-After": str(s.retry_after_s)},
            )
        completion = StoredCompletion(
            id=new_completion_id("label"),
            caller=principal.key_id,
            prompts=[prompt],
            choices=[
                StoredChoice(
                    i, g.text, "length" if g.finish_reason == "length" else "stop", 0, g.generated_tokens
                )
                for i, g in enumerate(generations)
            ],
            policy_version=served,
            chat=False,
        )
        prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        sampling = {**request.sampling(), "source": LABELING_SOURCE}
        if version is not None:
            sampling["adapter_id"] = version
        event = CompletionEvent(
            completion_id=completion.id,
            prompt=prompt,
            policy_version=served,
            sampling=sampling,
            caller=principal.key_id,
            chat=False,
            choices=[
                Choice(
                    index=c.index,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=c.completion_tokens,
                )
                for c in completion.choices
            ],
        )
        await self.completion_store.save_completion(completion, [event], required=True)
        return completion

    async def _choices(self, prompt: str, params: list[dict[str, Any]]) -> list[Generation] | APIError:
        """One generation per ``params``, all from one policy version, by the rule of ``/v1/completions``:
        the version of the choice that finished last; the others are regenerated on the replicas that
        reported it, at most ``version_retry_rounds`` times (a named version, ``adapter_id``, is one
        anyway)."""
        results: list[Generation | None] = [None] * len(params)
        pending, prefer = list(range(len(params))), None
        for _ in range(self.settings.version_retry_rounds + 1):
            finished: list[int] = []

            async def one(i: int, prefer=prefer, finished=finished) -> None:
                results[i] = await self.backend.generate(prompt, params[i], prefer)
                finished.append(i)

            tasks = [asyncio.ensure_future(one(i)) for i in pending]
            try:
                await asyncio.gather(*tasks)
            except BackendError as exc:
                return APIError(
                    exc.status,
                    exc.message,
                    "server_error" if exc.status >= 500 else "invalid_request_error",
                    code=exc.code,
                    headers={"Retry-After": str(self.settings.retry_after_s)} if exc.status == 503 else {},
                )
            finally:
                for task in tasks:
                    task.cancel()
            target = results[finished[-1]].policy_version
            pending = [i for i, g in enumerate(results) if g.policy_version != target]
            if not pending:
                return results  # type: ignore[return-value]
            prefer = {g.backend for g in results if g.policy_version == target}
        return APIError(
            503,
            "the policy version changed while the task's responses were generated; ask again",
            "server_error",
            code="policy_version_changed",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    async def compare_versions(self) -> tuple[str, str] | None:
        """The two versions compare mode shows: the admin's choice, else the current version and the newest
        candidate (else the newest other version that was not rejected)."""
        config = await self.store.config()
        if config.compare_versions:
            return config.compare_versions[0], config.compare_versions[1]

        def pick() -> tuple[str, str] | None:
            current = self.registry.current() or BASE_VERSION
            others = sorted(
                (m for m in self.registry.list_versions() if m.version != current),
                key=lambda m: m.created_at,
                reverse=True,
            )
            candidates = [m for m in others if m.status == PolicyStatus.candidate]
            fallback = [m for m in others if m.status != PolicyStatus.rejected]
            chosen = (candidates or fallback or [None])[0]
            return (current, chosen.version) if chosen is not None else None

        return await asyncio.to_thread(pick)

    # ---- tasks --------------------------------------------------------------------------------------
    def _count(self, mode: str, result: Any, ok: str) -> Any:
        if self.tasks_counter is not None:
            self.tasks_counter.labels(
                mode, f"refused_{result.status}" if isinstance(result, APIError) else ok
            ).inc()
        return result

    async def next_task(self, mode: Mode, principal: Principal) -> Task | APIError:
        try:
            result = await self._next_task(mode, principal)
        except StoreUnavailable as exc:
            result = self._unavailable(exc)
        return self._count(mode, result, "created")

    async def _next_task(self, mode: Mode, principal: Principal) -> Task | APIError:
        if await self.store.is_excluded(principal.key_id):
            return labeler_excluded(principal)
        task: dict[str, Any] = {
            "task_id": uuid.uuid4().hex,
            "mode": mode,
            "labeler": principal.key_id,
            "created": time.time(),
            "slots": [],
            "overlap_of": None,
        }
        overlap = await self.store.take_overlap(principal.key_id) if mode == "rank" else None
        if overlap is not None:
            completion = await self.completion_store.get_completion(overlap["completion_id"])
            if completion is None:  # expired while waiting
                overlap = None
        if overlap is not None:
            prompt, source, messages = overlap["prompt"], overlap["source"], overlap.get("messages")
            task["overlap_of"] = overlap["labeler"]
        else:
            chosen = await self._prompt(mode, principal)
            if isinstance(chosen, APIError):
                return chosen
            prompt, source, messages = chosen
        task.update(prompt=prompt, source=source, messages=messages)
        if mode == "rank":
            if overlap is None:
                completion = await self._generate(prompt, self.settings.label_k, None, principal)
                if isinstance(completion, APIError):
                    return completion
            task["slots"] = [[completion.id, c.index] for c in completion.choices]
        elif mode == "compare":
            versions = await self.compare_versions()
            if versions is None or versions[0] == versions[1]:
                return APIError(
                    409,
                    "compare mode needs two policy versions: the registry has no version besides the "
                    "current one (an admin can name two on /label/admin)",
                    code="no_versions_to_compare",
                )
            results = await asyncio.gather(*(self._generate(prompt, 1, v, principal) for v in versions))
            error = next((r for r in results if isinstance(r, APIError)), None)
            if error is not None:
                return error
            task["slots"] = [[c.id, 0] for c in results]
            task["versions"] = list(versions)
        self.random.shuffle(task["slots"])
        await self.store.mark_seen(mode, principal.key_id, prompt)
        await self.store.save_task(task)
        texts = {}
        if task["slots"]:
            for completion_id in {cid for cid, _ in task["slots"]}:
                stored = await self.completion_store.get_completion(completion_id)
                texts.update({(completion_id, c.index): c.text for c in stored.choices})
        log.info(
            "labeling task",
            extra={
                "task_id": task["task_id"],
                "mode": mode,
                "labeler": principal.key_id,
                "source": source,
                "overlap": overlap is not None,
            },
        )
        return Task(
            task_id=task["task_id"],
            mode=mode,
            prompt=prompt,
            messages=messages,
            source=source,
            overlap=overlap is not None,
            responses=[
                TaskResponseItem(slot=i, text=texts[(cid, index)])
                for i, (cid, index) in enumerate(task["slots"])
            ],
        )

    async def _own_task(
        self, task_id: str, mode: Mode, principal: Principal, idempotency_key: str | None
    ) -> dict[str, Any] | APIError:
        """The labeler's open task. An answered one only under the Idempotency-Key of its answer, so a retry
        reaches the feedback path (which returns the first event) and a second, different answer is
        refused."""
        task = await self.store.task(task_id)
        if task is None or task["labeler"] != principal.key_id:
            return APIError(
                404,
                f"task {task_id!r} is unknown, expired or not yours; ask for a new one",
                param="task_id",
                code="task_not_found",
            )
        if task["mode"] != mode:
            return APIError(
                422, f"task {task_id!r} is a {task['mode']} task", param="task_id", code="wrong_task_mode"
            )
        if task.get("answered") and (idempotency_key is None or idempotency_key != task["answered"]):
            return APIError(
                409,
                f"task {task_id!r} is already answered; ask for a new one",
                param="task_id",
                code="task_already_answered",
            )
        return task

    async def _answered(self, task: dict[str, Any], idempotency_key: str | None) -> None:
        task["answered"] = idempotency_key or "-"
        await self.store.save_task(task)

    async def _submit_rank(
        self, task_id: str, body: RankSubmission, principal: Principal, idempotency_key: str | None
    ) -> Submitted | APIError:
        try:
            task = await self._own_task(task_id, "rank", principal, idempotency_key)
            if isinstance(task, APIError):
                return task
            slots = task["slots"]
            for slot in [s for group in body.ranking for s in group] + list(body.flags):
                if not 0 <= slot < len(slots):
                    return APIError(
                        422,
                        f"slot {slot} is out of range: the task shows {len(slots)} responses",
                        param="ranking",
                        code="invalid_feedback",
                    )
            completion_id = slots[0][0]
            ranking = [[slots[s][1] for s in group] for group in body.ranking]
            flags = {slots[s][1]: names for s, names in body.flags.items() if names}
            accepted = await self.feedback.submit(
                RankingFeedback(
                    type="ranking",
                    completion_id=completion_id,
                    ranking=ranking,
                    rationale=body.rationale,
                    flags=flags or None,
                ),
                principal,
                idempotency_key,
            )
            if isinstance(accepted, APIError):
                return accepted
            agreement = None
            if not accepted.duplicate:
                await self._answered(task, idempotency_key)
                agreement = await self._after_ranking(task, completion_id, ranking, principal, bool(flags))
            return Submitted(id=accepted.id, duplicate=accepted.duplicate, agreement=agreement)
        except StoreUnavailable as exc:
            return self._unavailable(exc)

    async def _after_ranking(
        self,
        task: dict[str, Any],
        completion_id: str,
        ranking: list[list[int]],
        principal: Principal,
        flagged: bool,
    ) -> float | None:
        """Counters, the agreement of an overlap task, and now and then an offer to a second labeler."""
        answers = await self.store.record_answer(completion_id, principal.key_id, ranking)
        await self.store.count(principal.key_id, principal.name, rankings=1, flagged=int(flagged))
        agreement = None
        other = task.get("overlap_of")
        if other and other in answers:
            agree, pairs = pair_agreement(answers[other], ranking)
            agreement = agree / pairs if pairs else None
            for labeler in (principal.key_id, other):
                name = (
                    principal.name
                    if labeler == principal.key_id
                    else (await self.store.labelers()).get(other, {}).get("name", "")
                )
                await self.store.count(labeler, name, overlaps=1, agree=agree, pairs=pairs)
        elif not other and self.random.random() < self.settings.label_overlap_rate:
            await self.store.offer_overlap(
                {
                    "completion_id": completion_id,
                    "prompt": task["prompt"],
                    "messages": task.get("messages"),
                    "source": task["source"],
                    "labeler": principal.key_id,
                }
            )
        return agreement

    async def _submit_compare(
        self, task_id: str, body: CompareSubmission, principal: Principal, idempotency_key: str | None
    ) -> Submitted | APIError:
        try:
            task = await self._own_task(task_id, "compare", principal, idempotency_key)
            if isinstance(task, APIError):
                return task
            (left_id, left_index), (right_id, right_index) = task["slots"]
            preferred = {"left": "a", "right": "b", "tie": "tie"}[body.preferred]
            accepted = await self.feedback.submit(
                ABFeedback(
                    type="ab",
                    a=ABChoiceRef(completion_id=left_id, index=left_index),
                    b=ABChoiceRef(completion_id=right_id, index=right_index),
                    preferred=preferred,
                    rationale=body.rationale,
                ),
                principal,
                idempotency_key,
            )
            if isinstance(accepted, APIError):
                return accepted
            if not accepted.duplicate:
                await self._answered(task, idempotency_key)
                await self.store.count(principal.key_id, principal.name, comparisons=1)
            return Submitted(id=accepted.id, duplicate=accepted.duplicate)
        except StoreUnavailable as exc:
            return self._unavailable(exc)

    async def _submit_demonstration(
        self, task_id: str, body: DemonstrationSubmission, principal: Principal, idempotency_key: str | None
    ) -> Submitted | APIError:
        try:
            task = await self._own_task(task_id, "demonstration", principal, idempotency_key)
            if isinstance(task, APIError):
                return task
            accepted = await self.demonstrations.submit(
                DemonstrationRequest(prompt=task["prompt"], response=body.response),
                principal,
                idempotency_key,
            )
            if isinstance(accepted, APIError):
                return accepted
            if not accepted.duplicate:
                await self._answered(task, idempotency_key)
                await self.store.count(principal.key_id, principal.name, demonstrations=1)
            return Submitted(id=accepted.id, duplicate=accepted.duplicate)
        except StoreUnavailable as exc:
            return self._unavailable(exc)

    async def submit_rank(
        self, task_id: str, body: RankSubmission, principal: Principal, idempotency_key: str | None
    ) -> Submitted | APIError:
        return self._count(
            "rank", await self._submit_rank(task_id, body, principal, idempotency_key), "answered"
        )

    async def submit_compare(
        self, task_id: str, body: CompareSubmission, principal: Principal, idempotency_key: str | None
    ) -> Submitted | APIError:
        return self._count(
            "compare", await self._submit_compare(task_id, body, principal, idempotency_key), "answered"
        )

    async def submit_demonstration(
        self, task_id: str, body: DemonstrationSubmission, principal: Principal, idempotency_key: str | None
    ) -> Submitted | APIError:
        result = await self._submit_demonstration(task_id, body, principal, idempotency_key)
        return self._count("demonstration", result, "answered")

    async def skip(self, task_id: str, principal: Principal) -> FeedbackAccepted | APIError:
        try:
            task = await self.store.task(task_id)
            if task is None or task["labeler"] != principal.key_id:
                return APIError(
                    404,
                    f"task {task_id!r} is unknown, expired or not yours",
                    param="task_id",
                    code="task_not_found",
                )
            await self.store.delete_task(task_id)
            await self.store.count(principal.key_id, principal.name, skips=1)
            return self._count(task["mode"], FeedbackAccepted(id=task_id), "skipped")
        except StoreUnavailable as exc:
            return self._unavailable(exc)
