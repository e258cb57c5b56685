"""A scripted labeler: an HTTP client of the gateway API that ranks completions with a preference function.

``instructloop labeler simulate`` asks the gateway for K completions per prompt (``/v1/completions`` with
``n=K``), ranks them with a *preference function* (``text -> float``, higher is better; best first, equal
scores tied in one group) and posts the ranking to ``/v1/feedback`` with a labeler key, round after round.
It stands in for human labelers in tests, benchmarks and demos. It talks HTTP only and imports nothing of
the learner, so what it proves about the loop is what a real client would see.

``instructloop labeler record`` stores the current served version's responses on held-out prompts;
``instructloop labeler winrate`` samples the version served now on the same prompts and reports the
preference function's win-rate of the new responses against the recorded ones (every new response
against every recorded response of the same prompt; a tie counts half).

Preference functions (``--preference``):

==================  ========================================================================
``shorter``         fewer characters is better (score = -len(text))
``without:WORD``    fewer occurrences of WORD is better (score = -count; whole word, any case)
``with:WORD``       answers containing WORD are better (score = 1 if present else 0)
``module:function``  your own: an importable function ``text -> float`` (higher is better)
==================  ========================================================================
"""

from __future__ import annotations

import importlib
import json
import math
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

PreferenceFunction = Callable[[str], float]
"""Scores one response text; higher is better. Equal scores are ties."""

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "labeler_prompts.txt"
DEFAULT_HELDOUT_PROMPTS = DATA_DIR / "labeler_heldout_prompts.txt"
API_KEY_ENV = "INSTRUCTLOOP_API_KEY"
GATEWAY_URL_ENV = "INSTRUCTLOOP_GATEWAY_URL"
DEFAULT_MODEL_NAME = "instructloop"
"""The gateway's default served model name (its ``served_model_name`` setting)."""


class PreferenceError(ValueError):
    """A ``--preference`` that cannot be used; the message says which forms are accepted."""


class LabelerError(RuntimeError):
    """The gateway refused or failed a call; the message carries its status and error body."""


# ---- preference functions -------------------------------------------------------------------------


def _word_pattern(word: str) -> re.Pattern[str]:
    word = word.strip()
    if not word:
        raise PreferenceError("the word in without:WORD / with:WORD must not be empty")
    # \b only makes sense next to word characters; punctuation "words" match as plain substrings.
    left = r"\b" if re.match(r"\w", word[0]) else ""
    right = r"\b" if re.match(r"\w", word[-1]) else ""
    return re.compile(left + re.escape(word) + right, re.IGNORECASE)


def shorter(text: str) -> float:
    """Fewer characters is better."""
    return -float(len(text))


def without_word(word: str) -> PreferenceFunction:
    """Fewer occurrences of ``word`` (whole word, case-insensitive) is better: score = -count."""
    pattern = _word_pattern(word)

    def score(text: str) -> float:
        return -float(len(pattern.findall(text)))

    score.__name__ = f"without:{word}"
    return score


def with_word(word: str) -> PreferenceFunction:
    """Answers that contain ``word`` (whole word, case-insensitive) are better: score = 1 or 0."""
    pattern = _word_pattern(word)

    def score(text: str) -> float:
        return 1.0 if pattern.search(text) else 0.0

    score.__name__ = f"with:{word}"
    return score


BUILTIN_PREFERENCES: dict[str, str] = {
    "shorter": "fewer characters is better",
    "without:WORD": "fewer occurrences of WORD is better",
    "with:WORD": "answers containing WORD are better",
}
_ACCEPTED = "use shorter, without:WORD, with:WORD, or module:function (an importable function text -> float)"


def load_preference(spec: str) -> PreferenceFunction:
    """Turn a ``--preference`` value into a function. Raises ``PreferenceError`` with the fix."""
    spec = spec.strip()
    if spec == "shorter":
        return shorter
    head, sep, tail = spec.partition(":")
    if sep and head == "without":
        return without_word(tail)
    if sep and head == "with":
        return with_word(tail)
    if not sep or not head or not tail:
        raise PreferenceError(f"unknown preference {spec!r}: {_ACCEPTED}")
    try:
        module = importlib.import_module(head)
    except ImportError as exc:
        raise PreferenceError(
            f"cannot import module {head!r} for preference {spec!r} ({exc}); make it importable "
            f"(PYTHONPATH) or {_ACCEPTED}"
        ) from exc
    function = getattr(module, tail, None)
    if function is None:
        raise PreferenceError(f"module {head!r} has no attribute {tail!r} (preference {spec!r}); {_ACCEPTED}")
    if not callable(function):
        raise PreferenceError(f"{spec!r} is not callable: a preference must be a function text -> float")
    return function


def score_texts(texts: Sequence[str], preference: PreferenceFunction) -> list[float]:
    """Scores of ``texts``; refuses a score that is not a finite real number, naming the function."""
    scores = []
    for text in texts:
        value = preference(text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            name = getattr(preference, "__name__", repr(preference))
            raise PreferenceError(f"preference {name} returned {value!r} for {text[:40]!r}: it must return a finite float")
        scores.append(float(value))
    return scores


def rank(scores: Sequence[float]) -> list[list[int]]:
    """Best-first ranking of indices into ``scores``; equal scores share a group (a tie).

    >>> rank([0.0, 2.0, 0.0, 1.0])
    [[1], [3], [0, 2]]
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and scores[groups[-1][0]] == scores[index]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def rank_texts(texts: Sequence[str], preference: PreferenceFunction) -> list[list[int]]:
    return rank(score_texts(texts, preference))


@dataclass
class WinRate:
    """Pairwise outcome of new responses against recorded ones (same prompt); a tie counts half."""

    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def pairs(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.pairs if self.pairs else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"win_rate": self.rate, "wins": self.wins, "ties": self.ties, "losses": self.losses, "pairs": self.pairs}


def win_rate(
    new: dict[str, list[str]], baseline: dict[str, list[str]], preference: PreferenceFunction
) -> WinRate:
    """Every new response against every baseline response of the same prompt (prompts in both only)."""
    result = WinRate()
    for prompt, new_texts in new.items():
        old_texts = baseline.get(prompt)
        if not old_texts:
            continue
        new_scores = score_texts(new_texts, preference)
        old_scores = score_texts(old_texts, preference)
        for a in new_scores:
            for b in old_scores:
                if a > b:
                    result.wins += 1
                elif a == b:
                    result.ties += 1
                else:
                    result.losses += 1
    return result


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not path.exists():
        raise typer.BadParameter(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise typer.BadParameter(f"prompt file {path} holds no prompts (one per line)")
    return prompts


# ---- the gateway client ---------------------------------------------------------------------------


@dataclass
class Completion:
    """What the labeler needs of one ``/v1/completions`` answer."""

    id: str
    texts: list[str]
    policy_version: str


class GatewayClient:
    """The few gateway calls the labeler makes (httpx, bearer key, OpenAI error JSON surfaced)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 120.0, model: str = DEFAULT_MODEL_NAME,
                 retries: int = 2, rate_limit_wait_s: float = 180.0):
        import httpx

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
                        f"cannot reach the gateway at {self.base_url} ({exc!r}): is it running?") from exc
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

    def complete(self, prompt: str, n: int, max_tokens: int, temperature: float,
                 seed: int | None = None) -> Completion:
        payload: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": n, "max_tokens": max_tokens,
                                   "temperature": temperature}
        if seed is not None:
            payload["seed"] = seed
        response = self._post("/v1/completions", payload)
        body = response.json()
        choices = sorted(body["choices"], key=lambda c: c["index"])
        version = body.get("policy_version") or response.headers.get("x-policy-version") or "unknown"
        return Completion(id=body["id"], texts=[c["text"] for c in choices], policy_version=version)

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
    all_tied: int = 0  # completions whose K responses all scored the same: nothing to post
    errors: int = 0
    seconds: float = 0.0
    versions: list[str] = field(default_factory=list)  # policy versions in the order first seen
    score_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    score_count: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def mean_score(self, version: str) -> float:
        count = self.score_count.get(version, 0)
        return self.score_sum[version] / count if count else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "rankings_posted": self.rankings_posted,
            "all_tied": self.all_tied,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "versions": self.versions,
            "mean_score_by_version": {v: self.mean_score(v) for v in self.versions},
        }


@dataclass
class Labeled:
    """One labeled completion: its responses' scores and the ranking posted (None when all tied)."""

    completion: Completion
    scores: list[float]
    ranking: list[list[int]] | None


def label_one(client: GatewayClient, prompt: str, preference: PreferenceFunction, *, k: int, max_tokens: int,
              temperature: float, seed: int | None) -> Labeled:
    """Ask for ``k`` completions of ``prompt``, rank them, post the ranking (unless all tied)."""
    completion = client.complete(prompt, k, max_tokens, temperature, seed)
    scores = score_texts(completion.texts, preference)
    ranking = rank(scores)
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
) -> SimulationSummary:
    """Rank ``k`` completions per prompt for ``rounds`` passes over ``prompts`` and post the rankings.

    ``concurrency`` prompts are in flight at once (like that many labelers; serve batches them). A
    completion whose responses all score the same carries no preference and is not posted (counted in
    ``all_tied``). With ``seed``, request i of round r gets a fixed seed, so a run is repeatable.

    With ``stop_on_new_version`` it stops after the round in which a completion came from a policy
    version other than the first one seen (the loop promoted something). Gateway errors are counted and
    reported; more than ``max_errors`` of them stops the run with ``LabelerError``.
    """
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
                request_seed = None if seed is None else seed + (round_index * len(prompts) + prompt_index) * k
                futures.append(pool.submit(label_one, client, prompt, preference, k=k, max_tokens=max_tokens,
                                           temperature=temperature, seed=request_seed))
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
            summary.rounds = round_index + 1
            summary.seconds = time.monotonic() - started
            if progress:
                means = ", ".join(f"{v}: {summary.mean_score(v):.3g}" for v in summary.versions)
                progress(
                    f"round {summary.rounds}/{rounds}: {summary.rankings_posted - posted_before} rankings posted "
                    f"({summary.rankings_posted} total, {summary.all_tied} all-tied skipped, {summary.errors} errors, "
                    f"{summary.seconds:.1f}s); mean score by version: {means}"
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
) -> dict[str, Any]:
    """Responses of the version served now: ``{"policy_versions": [...], "responses": {prompt: [texts]}}``."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = list(prompts)
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="record") as pool:
        completions = list(pool.map(
            lambda item: client.complete(item[1], n, max_tokens, temperature,
                                         None if seed is None else seed + item[0] * n),
            enumerate(prompts),
        ))
    versions: list[str] = []
    for completion in completions:
        if completion.policy_version not in versions:
            versions.append(completion.policy_version)
    return {"policy_versions": versions,
            "responses": {prompt: c.texts for prompt, c in zip(prompts, completions, strict=True)},
            "sampling": {"n": n, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}}


# ---- CLI ------------------------------------------------------------------------------------------

app = typer.Typer(help="A scripted labeler for the gateway API (simulate feedback, measure win-rate).",
                  no_args_is_help=True)

_RUN_DIR_HELP = "Read the gateway URL and the API key from the stack.json and key file `instructloop up` wrote here."


def _connection(gateway_url: str | None, api_key: str | None, run_dir: Path | None, role: str) -> tuple[str, str]:
    """Gateway URL and key from the options, else the environment, else ``<run_dir>/stack.json``."""
    import os

    gateway_url = gateway_url or os.environ.get(GATEWAY_URL_ENV)
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if (gateway_url is None or api_key is None) and run_dir is not None:
        stack_file = run_dir / "stack.json"
        if not stack_file.exists():
            raise typer.BadParameter(f"{stack_file} not found: start the stack with `instructloop up --run-dir {run_dir}`")
        stack = json.loads(stack_file.read_text())
        gateway_url = gateway_url or stack["gateway_url"]
        if api_key is None:
            keys = json.loads(Path(stack["keys_file"]).read_text())
            api_key = keys[role]
    if not gateway_url:
        raise typer.BadParameter(f"no gateway URL: pass --gateway-url, set {GATEWAY_URL_ENV}, or --run-dir")
    if not api_key:
        raise typer.BadParameter(f"no API key: pass --api-key, set {API_KEY_ENV}, or --run-dir (a {role} key)")
    return gateway_url, api_key


def _preference_option(spec: str) -> PreferenceFunction:
    try:
        return load_preference(spec)
    except PreferenceError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preference") from exc


@app.command("simulate")
def simulate_command(
    preference: str = typer.Option("shorter", help="shorter | without:WORD | with:WORD | module:function"),
    prompts: Path = typer.Option(DEFAULT_PROMPTS, help="Prompt file, one prompt per line."),
    rounds: int = typer.Option(5, min=1, help="Passes over the prompt file."),
    k: int = typer.Option(4, min=2, help="Completions per prompt (the gateway's n), ranked together."),
    max_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int | None = typer.Option(None, help="Base sampling seed (one per request) for repeatable runs."),
    concurrency: int = typer.Option(4, min=1, help="Prompts in flight at once (like that many labelers)."),
    stop_on_new_version: bool = typer.Option(False, help="Stop once a newly promoted version answers."),
    gateway_url: str | None = typer.Option(None, help=f"Gateway base URL (or {GATEWAY_URL_ENV})."),
    api_key: str | None = typer.Option(None, help=f"A labeler API key (or {API_KEY_ENV})."),
    run_dir: Path | None = typer.Option(Path("run"), help=_RUN_DIR_HELP),
    model: str = typer.Option(DEFAULT_MODEL_NAME, help="The `model` field sent with each completion request."),
) -> None:
    """Ask for K completions per prompt, rank them with the preference, post the rankings as feedback."""
    preference_fn = _preference_option(preference)
    prompt_list = read_prompts(prompts)
    url, key = _connection(gateway_url, api_key, run_dir, role="labeler")
    typer.echo(f"labeling {len(prompt_list)} prompts x {rounds} rounds (k={k}) on {url} with preference {preference}")
    with GatewayClient(url, key, model=model) as client:
        try:
            summary = simulate(client, prompt_list, preference_fn, rounds=rounds, k=k, max_tokens=max_tokens,
                               temperature=temperature, seed=seed, concurrency=concurrency,
                               stop_on_new_version=stop_on_new_version,
                               progress=typer.echo)
        except LabelerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
    typer.echo(json.dumps(summary.as_dict(), indent=2))


@app.command("record")
def record_command(
    out: Path = typer.Option(..., help="Where to write the responses (JSON)."),
    prompts: Path = typer.Option(DEFAULT_HELDOUT_PROMPTS, help="Held-out prompt file, one prompt per line."),
    n: int = typer.Option(8, min=1, help="Responses per prompt."),
    max_tokens: int = typer.Option(32, min=1),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int | None = typer.Option(None),
    gateway_url: str | None = typer.Option(None),
    api_key: str | None = typer.Option(None),
    run_dir: Path | None = typer.Option(Path("run"), help=_RUN_DIR_HELP),
    model: str = typer.Option(DEFAULT_MODEL_NAME),
) -> None:
    """Record the served version's responses on held-out prompts (the baseline of `winrate`)."""
    prompt_list = read_prompts(prompts)
    url, key = _connection(gateway_url, api_key, run_dir, role="user")
    with GatewayClient(url, key, model=model) as client:
        recorded = record(client, prompt_list, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)
    out.write_text(json.dumps(recorded, indent=2))
    typer.echo(f"recorded {n} responses x {len(prompt_list)} prompts of {recorded['policy_versions']} to {out}")


@app.command("winrate")
def winrate_command(
    baseline: Path = typer.Option(..., help="A file written by `instructloop labeler record`."),
    preference: str = typer.Option("shorter", help="shorter | without:WORD | with:WORD | module:function"),
    n: int = typer.Option(8, min=1, help="New responses per prompt."),
    seed: int | None = typer.Option(None),
    gateway_url: str | None = typer.Option(None),
    api_key: str | None = typer.Option(None),
    run_dir: Path | None = typer.Option(Path("run"), help=_RUN_DIR_HELP),
    model: str = typer.Option(DEFAULT_MODEL_NAME),
) -> None:
    """Win-rate of the version served now against the recorded baseline, by the preference (ties = half)."""
    preference_fn = _preference_option(preference)
    if not baseline.exists():
        raise typer.BadParameter(f"{baseline} does not exist: write it first with `instructloop labeler record`")
    recorded = json.loads(baseline.read_text())
    sampling = recorded.get("sampling", {})
    url, key = _connection(gateway_url, api_key, run_dir, role="user")
    with GatewayClient(url, key, model=model) as client:
        current = record(client, list(recorded["responses"]), n=n, max_tokens=sampling.get("max_tokens", 32),
                         temperature=sampling.get("temperature", 1.0), seed=seed)
    result = win_rate(current["responses"], recorded["responses"], preference_fn)
    typer.echo(json.dumps({"new_versions": current["policy_versions"],
                           "baseline_versions": recorded.get("policy_versions"), **result.as_dict()}, indent=2))
