"""A scripted labeler: an HTTP client of the gateway API that ranks completions with a preference function.

``instructloop labeler simulate`` asks the gateway for K completions per prompt (``/v1/completions`` with
``n=K``, or ``/v1/chat/completions`` with the prompt as one user message when ``chat``), ranks them
with a *preference function* (``text -> float``, higher is better; best first, equal scores tied in one
group) and posts the ranking to ``/v1/feedback`` with a labeler key, round after round. With ``flip`` p > 0
it is a noisy labeler: each pair of the ranking is flipped with probability p before it is posted
(``labeler.preferences.noisy_ranking``).
It stands in for human labelers in tests, benchmarks and demos. It talks HTTP only and imports nothing of
the learner, so what it proves about the loop is what a real client would see.

``instructloop labeler record`` stores the current served version's responses on held-out prompts;
``instructloop labeler winrate`` samples the version served now on the same prompts and reports the
preference function's win-rate of the new responses against the recorded ones (every new response
against every recorded response of the same prompt; a tie counts half).
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructloop.wire import POLICY_VERSION_HEADER, SERVED_MODEL_NAME, UNKNOWN_VERSION
from labeler.preferences import PreferenceFunction, noisy_ranking, rank, reversed_pairs, score_texts

DEFAULT_MODEL_NAME = SERVED_MODEL_NAME


class LabelerError(RuntimeError):
    """The gateway refused or failed a call; the message carries its status and error body."""


# ---- the gateway client ---------------------------------------------------------------------------


@dataclass
class Completion:
    """What the labeler needs of one ``/v1/completions`` answer."""

    id: str
    texts: list[str]
    policy_version: str


class GatewayClient:
    """The few gateway calls the labeler makes (httpx, bearer key, OpenAI error JSON surfaced)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = 120.0,
        model: str = DEFAULT_MODEL_NAME,
        retries: int = 2,
        rate_limit_wait_s: float = 180.0,
        chat: bool = False,
    ):
        import httpx

        self.chat = chat
        """Ask ``/v1/chat/completions`` (the prompt as one user message) instead of ``/v1/completions``."""
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.retries = retries
        self.rate_limit_wait_s = rate_limit_wait_s
        self._http = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        """POST with up to ``retries`` retries on transport errors (e.g. a keep-alive connection the server
        closed just as it was reused) and on 502/503 (after the gateway's Retry-After, at most 5 s). A 429
        (the key's rate limit) waits the full Retry-After (at most 60 s a time) and is retried until
        ``rate_limit_wait_s`` of waiting is spent: a labeler that outpaces its limit slows down, it does not
        drop rankings. Both calls are safe to retry: a completion is simply asked again, feedback carries an
        ``Idempotency-Key`` so a retried ranking is stored once."""
        import httpx

        attempt = 0
        rate_limited_s = 0.0
        while True:
            try:
                response = self._http.post(path, json=payload, headers=headers)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise LabelerError(
                        f"cannot reach the gateway at {self.base_url} ({exc!r}): is it running?"
                    ) from exc
                attempt += 1
                continue
            if response.status_code == 429:
                wait = min(max(float(response.headers.get("retry-after", "1") or 1), 0.5), 60.0)
                if rate_limited_s + wait <= self.rate_limit_wait_s:
                    rate_limited_s += wait
                    time.sleep(wait)
                    continue
                break
            if response.status_code in (502, 503) and attempt < self.retries:
                attempt += 1
                # overloaded, a backend failed, or serve swapped versions mid-request: back off as the
                # gateway asks (capped)
                time.sleep(min(float(response.headers.get("retry-after", "1") or 1), 5.0))
                continue
            break
        if response.status_code >= 400:
            raise LabelerError(f"POST {self.base_url}{path} -> {response.status_code}: {response.text[:500]}")
        return response

    def complete(
        self,
        prompt: str,
        n: int,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        store: bool = True,
    ) -> Completion:
        """One completion (chat or raw); ``store=False`` keeps it out of the learner's data (evaluation)."""
        payload: dict[str, Any] = {
            "model": self.model,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if not store:
            payload["store"] = False
        if self.chat:
            payload["messages"] = [{"role": "user", "content": prompt}]
        else:
            payload["prompt"] = prompt
        if seed is not None:
            payload["seed"] = seed
        response = self._post("/v1/chat/completions" if self.chat else "/v1/completions", payload)
        body = response.json()
        choices = sorted(body["choices"], key=lambda c: c["index"])
        texts = [c["message"]["content"] for c in choices] if self.chat else [c["text"] for c in choices]
        version = body.get("policy_version") or response.headers.get(POLICY_VERSION_HEADER) or UNKNOWN_VERSION
        return Completion(id=body["id"], texts=texts, policy_version=version)

    def feedback(self, completion: Completion, ranking: list[list[int]], rationale: str | None = None) -> Any:
        payload: dict[str, Any] = {"type": "ranking", "completion_id": completion.id, "ranking": ranking}
        if rationale:
            payload["rationale"] = rationale
        return self._post("/v1/feedback", payload, headers={"Idempotency-Key": uuid.uuid4().hex}).json()


# ---- simulate / record ----------------------------------------------------------------------------


@dataclass
class SimulationSummary:
    rounds: int = 0
    rankings_posted: int = 0
    all_tied: int = 0  # completions whose ranking is all one tie group: nothing to post
    pairs_posted: int = 0  # (winner, loser) pairs the posted rankings state, of answers the preference orders
    pairs_reversed: int = 0  # of those, pairs in the reverse order of the preference (a noisy labeler's)
    errors: int = 0
    seconds: float = 0.0
    versions: list[str] = field(default_factory=list)  # policy versions in the order first seen
    score_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    score_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def mean_score(self, version: str) -> float:
        count = self.score_count.get(version, 0)
        return self.score_sum[version] / count if count else float("nan")

    @property
    def flipped_pair_share(self) -> float:
        """Share of the posted pairs that disagree with the preference (0 without ``flip``)."""
        return self.pairs_reversed / self.pairs_posted if self.pairs_posted else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "rankings_posted": self.rankings_posted,
            "all_tied": self.all_tied,
            "pairs_posted": self.pairs_posted,
            "pairs_reversed": self.pairs_reversed,
            "flipped_pair_share": self.flipped_pair_share,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "versions": self.versions,
            "mean_score_by_version": {v: self.mean_score(v) for v in self.versions},
        }


@dataclass
class Labeled:
    """One labeled completion: its responses' true scores and the ranking posted (None when all tied)."""

    completion: Completion
    scores: list[float]
    ranking: list[list[int]] | None


def label_one(
    client: GatewayClient,
    prompt: str,
    preference: PreferenceFunction,
    *,
    k: int,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    flip: float = 0.0,
) -> Labeled:
    """Ask for ``k`` completions of ``prompt``, rank them, post the ranking (unless all tied).

    ``flip`` > 0: the posted ranking is ``noisy_ranking(scores, flip, rng)``, ``rng`` seeded with ``seed``
    (unseeded when ``seed`` is None), so a seeded run posts the same noisy rankings again."""
    completion = client.complete(prompt, k, max_tokens, temperature, seed)
    scores = score_texts(completion.texts, preference)
    ranking = noisy_ranking(scores, flip, random.Random(seed)) if flip else rank(scores)
    if len(ranking) < 2:  # all tied: nothing the reward model could learn from, so not posted
        return Labeled(completion, scores, None)
    client.feedback(completion, ranking)
    return Labeled(completion, scores, ranking)


def simulate(
    client: GatewayClient,
    prompts: Sequence[str],
    preference: PreferenceFunction,
    *,
    rounds: int,
    k: int = 4,
    max_tokens: int = 32,
    temperature: float = 1.0,
    seed: int | None = None,
    concurrency: int = 4,
    stop_on_new_version: bool = False,
    max_errors: int = 10,
    progress: Callable[[str], None] | None = None,
    flip: float = 0.0,
) -> SimulationSummary:
    """Rank ``k`` completions per prompt for ``rounds`` passes over ``prompts`` and post the rankings.

    ``concurrency`` prompts are in flight at once (like that many labelers; serve batches them). A
    completion whose responses all score the same carries no preference and is not posted (counted in
    ``all_tied``). With ``seed``, request i of round r gets a fixed seed, so a run is repeatable.

    With ``stop_on_new_version`` it stops after the round in which a completion came from a policy
    version other than the first one seen (the loop promoted something). Gateway errors are counted and
    reported; more than ``max_errors`` of them stops the run with ``LabelerError``.

    ``flip`` (0 to 1): a noisy labeler that flips each pair of a ranking with that probability before posting
    it (``noisy_ranking``; seeded per request with ``seed``). The summary counts the posted pairs and those
    that disagree with the preference (``flipped_pair_share``); ``mean_score`` stays the true preference's.
    """
    if not 0.0 <= flip <= 1.0:
        raise ValueError("flip must be a probability in [0, 1]")
    from concurrent.futures import ThreadPoolExecutor

    if k < 2:
        raise ValueError("k must be at least 2: a ranking needs two responses")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    summary = SimulationSummary()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="labeler") as pool:
        for round_index in range(rounds):
            posted_before = summary.rankings_posted
            futures = []
            for prompt_index, prompt in enumerate(prompts):
                # choice i of a request gets seed + i at the gateway: space request seeds k apart
                request_seed = (
                    None if seed is None else seed + (round_index * len(prompts) + prompt_index) * k
                )
                futures.append(
                    pool.submit(
                        label_one,
                        client,
                        prompt,
                        preference,
                        k=k,
                        max_tokens=max_tokens,
                        temperature=temperature,
                        seed=request_seed,
                        flip=flip,
                    )
                )
            for future in futures:  # in prompt order, whatever order they finished in
                try:
                    labeled = future.result()
                except LabelerError as exc:
                    summary.errors += 1
                    if progress:
                        progress(f"error: {exc}")
                    if summary.errors > max_errors:
                        for pending in futures:
                            pending.cancel()
                        raise LabelerError(f"more than {max_errors} gateway errors; last: {exc}") from exc
                    continue
                version = labeled.completion.policy_version
                if version not in summary.versions:
                    summary.versions.append(version)
                summary.score_sum[version] += sum(labeled.scores)
                summary.score_count[version] += len(labeled.scores)
                if labeled.ranking is None:
                    summary.all_tied += 1
                else:
                    summary.rankings_posted += 1
                    reversed_count, pair_count = reversed_pairs(labeled.ranking, labeled.scores)
                    summary.pairs_posted += pair_count
                    summary.pairs_reversed += reversed_count
            summary.rounds = round_index + 1
            summary.seconds = time.monotonic() - started
            if progress:
                means = ", ".join(f"{v}: {summary.mean_score(v):.3g}" for v in summary.versions)
                progress(
                    f"round {summary.rounds}/{rounds}: "
                    f"{summary.rankings_posted - posted_before} rankings posted "
                    f"({summary.rankings_posted} total, {summary.all_tied} all-tied skipped, "
                    f"{summary.errors} errors, "
                    f"{summary.seconds:.1f}s); mean score by version: {means}"
                    + (f"; posted pairs flipped: {summary.flipped_pair_share:.3f}" if flip else "")
                )
            if stop_on_new_version and len(summary.versions) > 1:
                break
    return summary


def record(
    client: GatewayClient,
    prompts: Iterable[str],
    *,
    n: int = 8,
    max_tokens: int = 32,
    temperature: float = 1.0,
    seed: int | None = None,
    concurrency: int = 4,
    per_request: int = 8,
) -> dict[str, Any]:
    """Responses of the version served now: ``{"policy_versions": [...], "responses": {prompt: [texts]}}``.

    ``n`` responses per prompt, asked ``per_request`` at a time (the gateway caps ``n``: its
    ``INSTRUCTLOOP_GATEWAY_MAX_N``, 9 by default); the request for responses ``j..`` of the ``i``-th prompt
    has seed ``seed + i·n + j``, so one request per prompt (``n`` ≤ ``per_request``) is seeded as before.
    Asked with ``store: false``: evaluation answers never become the learner's prompts or feedback."""
    from concurrent.futures import ThreadPoolExecutor

    if n < 1 or per_request < 1:
        raise ValueError(f"record needs n >= 1 and per_request >= 1, got {n} and {per_request}")
    prompts = list(prompts)
    requests = [
        (i, start, min(per_request, n - start))
        for i in range(len(prompts))
        for start in range(0, n, per_request)
    ]
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="record") as pool:
        completions = list(
            pool.map(
                lambda request: client.complete(
                    prompts[request[0]],
                    request[2],
                    max_tokens,
                    temperature,
                    None if seed is None else seed + request[0] * n + request[1],
                    store=False,
                ),
                requests,
            )
        )
    versions: list[str] = []
    responses: dict[str, list[str]] = {prompt: [] for prompt in prompts}
    for (i, _, _), completion in zip(requests, completions, strict=True):
        if completion.policy_version not in versions:
            versions.append(completion.policy_version)
        responses[prompts[i]] += completion.texts
    return {
        "policy_versions": versions,
        "responses": responses,
        "sampling": {"n": n, "max_tokens": max_tokens, "temperature": temperature, "seed": seed},
    }
