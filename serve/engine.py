"""The scheduler: one model thread running continuous batching, bridged to asyncio.

- ``submit`` (event loop side) puts a request in a bounded waiting queue (``Overloaded`` past it) and returns
  a ``RequestHandle`` whose ``events()`` yields the request's ``Generation``s as the model thread makes them.
- The model thread (``torch.inference_mode``) loops: switch to a newly installed policy if any; prefill the
  waiting requests that fit, packed into one forward per version (``serve.batch``: no padding, at most
  ``max_prefill_tokens`` prompt tokens a forward), and concatenate them to that version's running batch;
  one decode step for every running batch; drop finished and cancelled sequences (``Batch.filter``).
- Named versions (``adapter_id``): a request may carry the ``PolicyModel`` it must be answered by
  (``serve.versions``); admitted requests are prefilled in one batch per version, and each version keeps
  its own running batch (a forward runs one version's weights or adapter).
- Hot-swap: ``install(policy)`` (from the watcher thread) makes a loaded, validated version the *active*
  one at the next step. In-flight sequences finish on the weights they started with, in their own batch;
  new requests are prefilled on the active version; an old version is dropped when its batch drains.
  So every response is produced by exactly one version and reports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING

import torch

from serve.batch import Batch, SequenceState
from serve.metrics import ServeMetrics
from serve.model import Generation, PolicyModel
from serve.sampling import NextTokenChooser, SamplingParams, StopSequences

if TYPE_CHECKING:
    from serve.versions import LoadedVersions

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The waiting queue is full (HTTP 429)."""


class GenerationFailed(RuntimeError):
    """The model step failed for this request (HTTP 424)."""


@dataclass
class GenerationRequest:
    """A validated request as the engine sees it (token ids, not text)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    top_n_tokens: int = 0
    policy: PolicyModel | None = None
    """The version that must answer (a named ``adapter_id``); None = the active version at admission."""


class RequestHandle:
    """The asyncio side of one request: its event queue and its cancel switch."""

    def __init__(
        self, engine: Engine, request_id: int, state: SequenceState, loop: asyncio.AbstractEventLoop
    ):
        self.engine = engine
        self.request_id = request_id
        self.state = state
        self.loop = loop
        self.queue: asyncio.Queue[Generation | BaseException] = asyncio.Queue()
        self.enqueued_at = time.monotonic()
        self.admitted_at: float | None = None
        self.policy_version: str | None = None
        self.requested: PolicyModel | None = None
        self.finished = False

    # model thread side
    def deliver(self, item: Generation | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.state.cancelled = True

    # event loop side
    async def events(self) -> AsyncIterator[Generation]:
        """The request's generations in order; raises ``GenerationFailed`` if the model step failed."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            yield item
            if item.finish_reason is not None:
                self.finished = True
                return

    def cancel(self) -> None:
        """The client went away: the sequence leaves the batch at the next step (no-op once finished)."""
        if not self.finished and not self.state.cancelled:
            self.state.cancelled = True
            self.engine.wake()


def deliver_all(handles: list[RequestHandle], items: list[Generation]) -> None:
    """``handles[i].deliver(items[i])`` for all i, with one wake-up of each event loop instead of one per
    item (fewer GIL hand-offs between the model thread and the HTTP side per step)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Generation]]] = {}
    for handle, item in zip(handles, items, strict=True):
        by_loop.setdefault(handle.loop, []).append((handle, item))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, pairs)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            for handle, _ in pairs:
                handle.state.cancelled = True


def _put_all(pairs: list[tuple[RequestHandle, Generation]]) -> None:
    for handle, item in pairs:
        handle.queue.put_nowait(item)


class Engine:
    def __init__(
        self,
        policy: PolicyModel,
        *,
        max_batch_size: int,
        max_queue: int,
        metrics: ServeMetrics | None = None,
        loaded: LoadedVersions | None = None,
        max_prefill_tokens: int = 4096,
    ):
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        """Prompt tokens packed into one prefill forward (TGI's max_batch_prefill_tokens): bounds how long
        the running sequences wait for a prefill."""
        self.max_queue = max_queue
        self.metrics = metrics or ServeMetrics()
        self.base = policy
        """The policy the engine started with (the base model); adapters attach to its module."""
        self.loaded = loaded
        """Recently used versions kept loaded for named requests (``serve.versions``)."""
        self._active = policy
        self._pending: PolicyModel | None = None
        self._to_attach: deque[PolicyModel] = deque()
        self._policies: dict[str, PolicyModel] = {policy.version: policy}
        self._batches: dict[str, Batch] = {}
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._ids = count(1)
        self._thread: threading.Thread | None = None
        self.metrics.set_version(policy.version)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serve-model-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    # ---- what the HTTP side uses ---------------------------------------------------------------
    @property
    def active_version(self) -> str:
        """The version new requests are admitted to (after a pending install, the new one)."""
        pending = self._pending
        return pending.version if pending is not None else self._active.version

    @property
    def active_policy(self) -> PolicyModel:
        return self._pending or self._active

    @property
    def running_versions(self) -> list[str]:
        return list(self._batches)

    def loaded_versions(self) -> list[str]:
        """Versions answered with nothing left to load or attach: ``base``, the active one, attached adapters
        and the LRU's full-weight versions (an LRU adapter not attached yet is not listed)."""
        attached = set(self.base.shared.slot_of) if self.base.shared is not None else set()
        versions = {self.base.version, self.active_version, *attached}
        for policy in self.loaded.policies() if self.loaded else ():
            if policy.adapter is None:
                versions.add(policy.version)
        return sorted(versions)

    def queue_size(self) -> int:
        return len(self._waiting)

    def batch_size(self) -> int:
        return sum(len(b) for b in list(self._batches.values()))

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestHandle:
        loop = loop or asyncio.get_running_loop()
        request_id = next(self._ids)
        state = SequenceState(
            request_id=request_id,
            prompt_ids=list(request.prompt_ids),
            max_new_tokens=request.max_new_tokens,
            chooser=NextTokenChooser(request.sampling, device=self.active_policy.device),
            stop=StopSequences(request.stop),
            top_n_tokens=request.top_n_tokens,
        )
        handle = RequestHandle(self, request_id, state, loop)
        handle.requested = request.policy
        state.sink = handle
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(
                    f"Model is overloaded: {len(self._waiting)} requests already waiting "
                    f"(max_queue={self.max_queue})"
                )
            self._waiting.append(handle)
            self.metrics.queue_size.set(len(self._waiting))
        self.wake()
        return handle

    def call_on_model_thread(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` on the model thread between two steps (in inference mode), for a forward that must not
        overlap the engine's: an adapter version selects its slot on the module the base shares. Thread-safe;
        ``asyncio.wrap_future`` the result to await it."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.append((fn, future))
        self.wake()
        return future

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller gets it; the loop goes on
                future.set_exception(exc)

    def prepare(self, policy: PolicyModel) -> None:
        """Attach an adapter version to the base at the next step (a prefetched candidate: its promotion then
        is a switch, with nothing left to attach). Keep it in ``loaded`` or it is detached again."""
        if policy.adapter is not None and policy.shared is not None:
            self._to_attach.append(policy)
            self.wake()

    def install(self, policy: PolicyModel) -> None:
        """Make a loaded, validated policy the one new requests go to (thread-safe; applied between steps)."""
        self._pending = policy
        self.wake()

    # ---- the model thread ----------------------------------------------------------------------
    def _run(self) -> None:
        log.info("model loop started", extra={"policy_version": self._active.version})
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._step()
                except Exception:  # never let the loop die: every failure is per batch below
                    log.exception("model loop step failed")
                    time.sleep(0.1)
                if not self._batches and not self._has_waiting():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
        self._fail_all(GenerationFailed("the server is shutting down"))
        log.info("model loop stopped")

    def _has_waiting(self) -> bool:
        return bool(self._waiting)

    def _step(self) -> None:
        self._run_calls()
        while self._to_attach:
            policy = self._to_attach.popleft()
            try:
                policy.shared.attach(policy.adapter)
            except Exception:  # it is attached (or refused) again at its first forward
                log.exception("attaching a prepared adapter failed", extra={"policy_version": policy.version})
        self._switch_policy()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        for version in list(self._batches):
            self._decode(version)
        self._drop_drained_policies()
        self.metrics.batch_current_size.set(self.batch_size())

    def _switch_policy(self) -> None:
        pending = self._pending
        if pending is None:
            return
        previous = self._active
        self._policies[pending.version] = pending
        self._active = pending
        self._pending = None
        if self.loaded is not None and previous.adapter is not None:
            self.loaded.put(previous)  # a named request for the previous adapter version needs no reload
        self.metrics.set_version(pending.version)
        log.info(
            "policy version switched",
            extra={
                "policy_version": pending.version,
                "previous": previous.version,
                "previous_in_flight": len(self._batches[previous.version])
                if previous.version in self._batches
                else 0,
            },
        )

    def _admit(self) -> list[RequestHandle]:
        free = self.max_batch_size - self.batch_size()
        admitted: list[RequestHandle] = []
        with self._lock:
            while self._waiting and len(admitted) < free:
                handle = self._waiting.popleft()
                if handle.state.cancelled:
                    self.metrics.request_cancelled.inc()
                    continue
                admitted.append(handle)
            self.metrics.queue_size.set(len(self._waiting))
        # cancelled requests still waiting behind the admitted ones leave the queue too
        with self._lock:
            if any(h.state.cancelled for h in self._waiting):
                kept = [h for h in self._waiting if not h.state.cancelled]
                self.metrics.request_cancelled.inc(len(self._waiting) - len(kept))
                self._waiting = deque(kept)
        return admitted

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Prefill admitted requests, one new batch per version (named, else the active one)."""
        groups: dict[str, tuple[PolicyModel, list[RequestHandle]]] = {}
        for handle in handles:
            policy = handle.requested or self._active
            groups.setdefault(policy.version, (policy, []))[1].append(handle)
        for version, (policy, group) in groups.items():
            if self._policies.setdefault(version, policy) is not policy:
                policy = self._policies[version]  # the same version loaded twice: one module serves both
            now = time.monotonic()
            for handle in group:
                handle.admitted_at = now
                handle.policy_version = version
                self.metrics.request_queue_duration.observe(now - handle.enqueued_at)
            for chunk in self._prefill_chunks(group):
                batch = Batch.prefill(version, [h.state for h in chunk], policy.device)
                joined = self._run_step(policy, batch, "prefill")
                if joined is not None:
                    running = self._batches.get(version)
                    self._batches[version] = (
                        joined if running is None else Batch.concatenate([running, joined])
                    )

    def _prefill_chunks(self, group: list[RequestHandle]) -> list[list[RequestHandle]]:
        """``group`` in order, cut so that each packed prefill has at most ``max_prefill_tokens`` prompt
        tokens (a longer prompt alone goes in a chunk of its own)."""
        chunks: list[list[RequestHandle]] = [[]]
        tokens = 0
        for handle in group:
            n = len(handle.state.prompt_ids)
            if chunks[-1] and tokens + n > self.max_prefill_tokens:
                chunks.append([])
                tokens = 0
            chunks[-1].append(handle)
            tokens += n
        return chunks

    def _decode(self, version: str) -> None:
        batch: Batch | None = self._batches[version]
        cancelled = [seq for seq in batch.sequences if seq.cancelled]
        if cancelled:
            self.metrics.request_cancelled.inc(len(cancelled))
            log.info(
                "cancelled sequences leave the batch",
                extra={"request_ids": [s.request_id for s in cancelled]},
            )
            batch = batch.filter([seq.request_id for seq in batch.sequences if not seq.cancelled])
        if batch is not None:
            batch = self._run_step(self._policies[version], batch, "decode")
        if batch is None:
            del self._batches[version]
        else:
            self._batches[version] = batch

    def _run_step(self, policy: PolicyModel, batch: Batch, method: str) -> Batch | None:
        """One ``generate_token`` with delivery; returns the batch of still-running sequences."""
        started = time.monotonic()
        try:
            generations, next_batch = policy.generate_token(batch)
        except Exception as exc:
            log.exception(
                "generation step failed",
                extra={"policy_version": policy.version, "method": method, "batch_size": len(batch)},
            )
            for seq in batch.sequences:
                seq.sink.deliver(GenerationFailed(f"generation failed: {exc}"))
                self.metrics.request_failure.labels(err="generation").inc()
            return None
        self.metrics.batch_forward_duration.labels(method=method).observe(time.monotonic() - started)
        self.metrics.batch_size.observe(len(batch))
        by_id = {seq.request_id: seq for seq in batch.sequences}
        handles = [by_id[generation.request_id].sink for generation in generations]
        deliver_all(handles, generations)
        for handle, generation in zip(handles, generations, strict=True):
            if generation.finish_reason is not None:
                self._observe_finished(handle, generation)
        return next_batch

    def _observe_finished(self, handle: RequestHandle, generation: Generation) -> None:
        now = time.monotonic()
        m = self.metrics
        m.request_input_length.observe(len(handle.state.prompt_ids))
        m.request_generated_tokens.observe(generation.generated_tokens)
        if handle.admitted_at is not None:
            inference = now - handle.admitted_at
            m.request_inference_duration.observe(inference)
            m.request_mean_time_per_token.observe(inference / max(1, generation.generated_tokens))

    def _drop_drained_policies(self) -> None:
        drained = [v for v in self._policies if v != self._active.version and v not in self._batches]
        for version in drained:
            del self._policies[version]
            log.info("policy version drained and dropped", extra={"policy_version": version})
        shared = self.base.shared
        if shared is not None and shared.attached:
            keep = {self._active.version, *self._batches, *(self.loaded.versions() if self.loaded else ())}
            if shared.attached - keep:
                shared.prune(keep)
        if drained:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _fail_all(self, error: BaseException) -> None:
        while self._calls:
            _, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for batch in self._batches.values():
            for seq in batch.sequences:
                seq.sink.deliver(error)
        self._batches.clear()
        with self._lock:
            for handle in self._waiting:
                handle.deliver(error)
            self._waiting.clear()
