"""Policy versions: loading a registry version beside the served one, and watching the current pointer.

``PolicyLoader.load(version)`` reads either kind of version. A full-weight version is verified through
``Registry.load_state_dict`` (sha256 of every file, finite values, shapes equal to the served architecture),
no weight may be missing (a tied ``lm_head`` may be absent from the file; if present it must equal the
embedding), and a new model is built beside the old one. An adapter version is verified through
``Registry.load_adapter`` (sha256 of every file, the base's sha256 equal to the loaded base's, LoRA shapes
that fit the base's layers, finite values) and becomes a ``PolicyModel`` over the shared base (its tensors
are attached by the model thread at its first forward, ``serve.adapters``). Nothing is switched until all
of that passed, so a bad checkpoint is never served.

``PolicyWatcher`` is a thread that follows the registry's current pointer (the ``CURRENT`` file, the one
source of truth): it reads the file when Redis pub/sub on ``<prefix>:policy:changed`` says it changed, and
polls it every ``poll_interval_s`` in case a message is missed or Redis is down. An unexpected error in
one check (an unreadable manifest, a full disk) is logged and counted
(``instructloop_serve_policy_watcher_errors_total``) and the thread goes on; ``alive()`` is False if the
thread has ended anyway, and serve's ``/health`` then fails so the replica is restarted. A version that
failed to load is not retried until ``retry_after_s`` has passed (doubling each time), and every failure
is counted and logged.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any

import torch

from instructloop.registry import InvalidCheckpoint, Registry, VersionKind, base_weights_sha256
from instructloop.streams import policy_channel
from serve.engine import Engine
from serve.metrics import ServeMetrics
from serve.model import PolicyModel

log = logging.getLogger(__name__)


def _alias_groups(model: torch.nn.Module) -> list[set[str]]:
    """Names in the state dict that share storage (tied weights, e.g. lm_head.weight =
    embed_tokens.weight)."""
    groups: dict[tuple[int, tuple[int, ...]], set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        groups.setdefault((tensor.data_ptr(), tuple(tensor.shape)), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


class PolicyLoader:
    """Builds a ``PolicyModel`` for a registry version from the served model's architecture."""

    def __init__(self, registry: Registry, template: PolicyModel, base_dir: str | None = None):
        self.registry = registry
        self.template = template
        # Taken now, before any adapter injects LoRA layers into the base module (which renames its weights).
        self.expected_shapes = template.expected_shapes()
        self.aliases = _alias_groups(template.model)
        self._reference = {k: (t.device, t.dtype) for k, t in template.model.state_dict().items()}
        self._served_modules = dict(template.model.named_modules())
        self.base_dir = base_dir
        self._base_sha256: str | None = None

    @property
    def base_sha256(self) -> str:
        """sha256 of the served base's weight files (computed once, on the first adapter version)."""
        if self._base_sha256 is None:
            if self.base_dir is None:
                raise InvalidCheckpoint(
                    "adapter versions need the base model's folder (its sha256) to be known"
                )
            self._base_sha256 = base_weights_sha256(self.base_dir)
        return self._base_sha256

    def load(self, version: str) -> PolicyModel:
        if self.registry.manifest(version).kind == VersionKind.adapter:
            return self.load_adapter(version)
        return self.load_full(version)

    def load_adapter(self, version: str) -> PolicyModel:
        if self.template.shared is None:
            raise InvalidCheckpoint(
                f"policy version {version}: this server cannot attach adapters to its base"
            )
        fingerprint = self.fingerprint(version)
        adapter = self.registry.load_adapter(
            version, base_sha256=self.base_sha256, base_shapes=self.expected_shapes, device="cpu"
        )
        policy = PolicyModel(
            version,
            self.template.model,
            self.template.tokenizer,
            self.template.device,
            shared=self.template.shared,
            adapter=adapter,
        )
        policy.fingerprint = fingerprint
        return policy

    def load_full(self, version: str) -> PolicyModel:
        state = self.registry.load_state_dict(version, expected_shapes=self.expected_shapes, device="cpu")
        present = set(state)
        missing = set(self.expected_shapes) - present
        for group in self.aliases:
            in_file = sorted(group & present)
            if in_file and missing & group:
                missing -= group  # the file holds one name of a tied group: the others follow it
            for name in in_file[1:]:
                if not torch.equal(state[name], state[in_file[0]]):
                    raise InvalidCheckpoint(
                        f"policy version {version}: {name} and {in_file[0]} are tied in the "
                        "served architecture but differ in the checkpoint"
                    )
        # Non-persistent buffers (rotary inv_freq) are not in the state dict at all; anything else must be.
        if missing:
            raise InvalidCheckpoint(f"policy version {version}: missing tensors {sorted(missing)[:5]}")
        fingerprint = self.fingerprint(version)
        model = self._build(state)
        policy = PolicyModel(version, model, self.template.tokenizer, self.template.device)
        policy.fingerprint = fingerprint
        return policy

    def fingerprint(self, version: str) -> tuple:
        """Manifest sha256 + (name, size, mtime) of every file: a cheap check that nothing changed on disk
        between a prefetch (full sha256 verification) and the promotion."""
        manifest = self.registry.manifest(version)
        folder = self.registry.version_dir(version)
        stats = []
        for name in sorted(manifest.files):  # manifest.json itself changes on promotion (status)
            try:
                st = (folder / name).stat()
                stats.append((name, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stats.append((name, -1, -1))
        return (manifest.sha256, tuple(stats))

    def _build(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A model of the served architecture holding ``state``, without copying the served weights.

        The skeleton is built on the meta device and the checkpoint tensors are *assigned* (converted to the
        served dtype/device), so a swap costs one read of the checkpoint and no extra copy. Tensors that are
        not in checkpoints (rotary ``inv_freq`` buffers and attributes) come from the served model.
        """
        template = self.template.model
        reference = self._reference
        state = {k: v.to(device=reference[k][0], dtype=reference[k][1]) for k, v in state.items()}
        with torch.device("meta"):
            model = type(template)(copy.deepcopy(template.config))
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        served_modules = self._served_modules
        for name, module in model.named_modules():
            source = served_modules[name]
            for attr, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and value.is_meta:  # plain tensor attributes
                    setattr(module, attr, getattr(source, attr))
            for buffer_name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_meta:
                    module.register_buffer(
                        buffer_name,
                        getattr(source, buffer_name),
                        persistent=buffer_name not in module._non_persistent_buffers_set,
                    )
        leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if leftover:
            raise InvalidCheckpoint(f"tensors not provided by the checkpoint: {leftover[:5]}")
        model.generation_config = copy.deepcopy(template.generation_config)
        return model.eval()


class PolicyWatcher:
    """Follows the registry's current pointer and hot-swaps the engine to each new valid version."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        loader: PolicyLoader,
        *,
        metrics: ServeMetrics,
        poll_interval_s: float = 1.0,
        retry_after_s: float = 60.0,
        redis: Any | None = None,
        prefix: str = "instructloop",
        prefetch_candidates: bool = True,
    ):
        self.registry = registry
        self.engine = engine
        self.loader = loader
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.retry_after_s = retry_after_s
        self.redis = redis
        self.prefix = prefix
        self.failed: dict[str, tuple[float, float]] = {}
        """version -> (retry not before, current backoff) for versions whose load failed."""
        self.last_error: str | None = None
        self.prefetch_candidates = prefetch_candidates
        self.prefetched: PolicyModel | None = None
        """A candidate version loaded and validated ahead of its promotion (swapped in without a load)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_thread: threading.Thread | None = None  # kept after stop(): alive() stays truthful
        self._pubsub: Any | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serve-policy-watcher", daemon=True)
        self._started_thread = self._thread
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close_pubsub()

    # ---- one check -----------------------------------------------------------------------------
    def check(self) -> str | None:
        """Read the current pointer once and swap if it names a new version. Returns the version swapped
        to."""
        try:
            target = self.registry.current()
        except Exception as exc:
            log.warning("reading the current policy failed", extra={"error": str(exc)})
            return None
        if not target or target == self.engine.active_version:
            if self.prefetch_candidates:
                self.prefetch()
            return None
        retry = self.failed.get(target)
        if retry is not None and time.monotonic() < retry[0]:
            return None
        return self.swap_to(target)

    def prefetch(self) -> str | None:
        """Load and validate the newest *candidate* version before it is promoted, so that its promotion is
        a switch, not a load. At most one is held; a candidate that fails is counted like a failed swap and
        is never served."""
        try:
            candidates = [m for m in self.registry.list_versions() if m.status.value == "candidate"]
        except Exception as exc:
            log.warning("listing registry versions failed", extra={"error": str(exc)})
            return None
        if not candidates:
            return None
        newest = candidates[-1].version
        if newest == self.engine.active_version or newest in self.failed:
            return None
        if self.prefetched is not None and self.prefetched.version == newest:
            return None
        self.prefetched = None  # drop an older prefetched candidate first (memory)
        policy = self._load(newest, purpose="prefetch")
        if policy is not None:
            self.prefetched = policy
            self.metrics.policy_prefetches.inc()
            if policy.adapter is not None and self.engine.loaded is not None:
                self.engine.loaded.put(policy)  # kept attached; named requests for the candidate use it
                self.engine.prepare(policy)
        return newest if policy is not None else None

    def _load(self, version: str, purpose: str) -> PolicyModel | None:
        started = time.monotonic()
        log.info(
            "loading policy version",
            extra={"policy_version": version, "purpose": purpose, "serving": self.engine.active_version},
        )
        try:
            policy = self.loader.load(version)
        except Exception as exc:  # InvalidCheckpoint and anything else: the old version keeps serving
            backoff = self.failed.get(version, (0.0, self.retry_after_s / 2))[1] * 2
            self.failed[version] = (time.monotonic() + backoff, backoff)
            self.last_error = f"{version}: {exc}"
            self.metrics.policy_swap_failures.inc()
            log.error(
                "policy version refused; it is never served",
                extra={
                    "policy_version": version,
                    "serving": self.engine.active_version,
                    "error": str(exc),
                    "retry_in_s": backoff,
                    "purpose": purpose,
                },
            )
            return None
        self.failed.pop(version, None)
        self.metrics.policy_swap_duration.observe(time.monotonic() - started)
        return policy

    def swap_to(self, version: str) -> str | None:
        started = time.monotonic()
        prefetched = self.prefetched
        if prefetched is not None and prefetched.version == version:
            # validated when prefetched; the files must still be the ones that were checked
            if self.loader.fingerprint(version) == prefetched.fingerprint:
                policy: PolicyModel | None = prefetched
            else:
                policy = self._load(version, purpose="swap")
            self.prefetched = None
        else:
            policy = self._load(version, purpose="swap")
        if policy is None:
            return None
        self.engine.install(policy)
        self.metrics.policy_swaps.inc()
        log.info(
            "policy version installed",
            extra={
                "policy_version": version,
                "prefetched": policy is prefetched,
                "swap_s": round(time.monotonic() - started, 3),
            },
        )
        return version

    # ---- the thread ----------------------------------------------------------------------------
    def alive(self) -> bool:
        """True while the watcher thread runs (or was never started: a server without a registry)."""
        return self._started_thread is None or self._started_thread.is_alive()

    def safe_check(self) -> None:
        """``check()``, but no error ends the thread: it is logged, counted, and the next poll tries again."""
        try:
            self.check()
        except Exception as exc:
            self.last_error = f"watcher: {type(exc).__name__}: {exc}"
            self.metrics.policy_watcher_errors.inc()
            log.exception(
                "policy watcher check failed; serving %s and trying again at the next poll",
                self.engine.active_version,
                extra={"error": str(exc)},
            )

    def _run(self) -> None:
        if self.loader.base_dir is not None:
            started = time.monotonic()
            try:  # once, now, so that no adapter version's swap pays for hashing the base
                self.loader.base_sha256  # noqa: B018
                log.info(
                    "base model sha256 computed", extra={"seconds": round(time.monotonic() - started, 2)}
                )
            except Exception as exc:
                log.warning(
                    "base model sha256 unavailable: adapter versions will be refused",
                    extra={"error": str(exc)},
                )
        next_poll = 0.0
        while not self._stop.is_set():
            woke_by_message = self._wait_for_message(self.poll_interval_s)
            now = time.monotonic()
            if woke_by_message or now >= next_poll:
                self.safe_check()
                next_poll = time.monotonic() + self.poll_interval_s

    def _wait_for_message(self, timeout: float) -> bool:
        if self.redis is None:
            self._stop.wait(timeout)
            return False
        try:
            if self._pubsub is None:
                self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(policy_channel(self.prefix))
            message = self._pubsub.get_message(timeout=timeout)
            return message is not None and message.get("type") == "message"
        except Exception as exc:  # Redis down: poll (the registry falls back to the CURRENT file)
            log.warning("policy channel unavailable; polling", extra={"error": str(exc)})
            self._close_pubsub()
            self._stop.wait(timeout)
            return False

    def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:
                pass
            self._pubsub = None
