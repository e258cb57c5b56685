"""The policy registry: one folder per version, a manifest with sha256 per file, and the *current* pointer.

Layout (same on a local disk or a Kubernetes PVC)::

    <root>/policies/<version>/      a full-weight version: model *.safetensors, config.json, tokenizer,
                                    manifest.json
                                    or an adapter version: adapter_config.json, adapter_model.safetensors
                                    (a standard PEFT LoRA folder), manifest.json
    <root>/CURRENT                  the current version (written atomically, fsynced)

An adapter version's manifest names the base model and the base's sha256 (``base_sha256``, see
``base_weights_sha256``); ``load_adapter`` refuses it over any other base.

The ``CURRENT`` file is the **one source of truth** for the current version: every reader (serve, the
gateway's admin API, the learner) reads it from the registry volume it already needs for the weights.
Redis only carries *notifications*: changing the pointer publishes the version on ``<prefix>:policy:changed``
(so replicas swap at once instead of at their next poll) and appends a ``PolicyEvent`` to the policies
stream. Both are best effort: with Redis down the pointer still changes (a manual rollback works) and
nothing can undo it when Redis returns, because no reader trusts a Redis copy of the pointer.

A version folder is written under a staging name, its files and folder fsynced, and renamed into place
(the parent folder fsynced after the rename), so a reader never sees half a checkpoint, even after a power
cut. Staging folders left by a writer that died are removed by ``clean_staging``. ``load_state_dict``
refuses anything whose hashes, shapes or values are wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from instructloop.events import PolicyEvent, PolicyStatus, validate_version_name
from instructloop.streams import DEFAULT_PREFIX, Stream, policy_channel, stream_key

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT_FILE = "CURRENT"
STAGING_PREFIX = ".staging-"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class VersionKind(str, Enum):
    full = "full"
    """Every weight of the model (safetensors + config + tokenizer)."""
    adapter = "adapter"
    """A PEFT LoRA adapter over the base model named in the manifest."""


class InvalidCheckpoint(ValueError):
    """A version folder that must not be served: missing, tampered, wrong shapes or non-finite values."""


class Manifest(BaseModel):
    version: str
    parent: str | None = None
    created_at: float = Field(default_factory=time.time)
    status: PolicyStatus = PolicyStatus.candidate
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    sha256: str = Field(default="", description="sha256 over the sorted (name, sha256) pairs of all files")
    metrics: dict[str, float] = Field(default_factory=dict)
    base_model: str | None = None
    reason: str | None = None
    kind: VersionKind = Field(
        default=VersionKind.full, description="full weights or a LoRA adapter over the base"
    )
    base_sha256: str | None = Field(
        default=None,
        description="adapter versions: base_weights_sha256 of the base model the adapter was trained on",
    )


@dataclass
class AdapterWeights:
    """A verified adapter version: its PEFT ``adapter_config.json`` and its LoRA tensors (PEFT key names)."""

    version: str
    config: dict[str, Any]
    state: dict[str, Any]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combined_sha256(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the folder's own metadata is fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder, deepest first (before the folder is renamed)."""
    for dirpath, _dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def base_weights_sha256(model_dir: str | Path) -> str:
    """The identity of a base model: ``combined_sha256`` over its ``*.safetensors`` files. An adapter version
    records it and is only ever applied over a base with the same value."""
    folder = Path(model_dir)
    files = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    if not files:
        raise InvalidCheckpoint(f"base model {folder}: no .safetensors weights to fingerprint")
    return combined_sha256(files)


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file, fsync it, rename it over ``path`` and fsync the folder: after a crash
    ``path`` holds either the old or the new text, never half of either."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Registry:
    def __init__(self, root: str | Path, redis: Any | None = None, prefix: str = DEFAULT_PREFIX):
        self.root = Path(root)
        self.redis = redis
        self.prefix = prefix
        self.policies_dir = self.root / "policies"

    # ---- versions -------------------------------------------------------------------------------
    def version_dir(self, version: str) -> Path:
        validate_version_name(version)
        return self.policies_dir / version

    def exists(self, version: str) -> bool:
        return (self.version_dir(version) / MANIFEST).exists()

    def write_version(
        self,
        version: str,
        save: Any,
        *,
        parent: str | None = None,
        metrics: dict[str, float] | None = None,
        status: PolicyStatus = PolicyStatus.candidate,
        base_model: str | None = None,
        kind: VersionKind = VersionKind.full,
        base_sha256: str | None = None,
    ) -> Manifest:
        """Create a version folder. ``save(folder)`` writes the files (e.g. ``model.save_pretrained``
        then ``tokenizer.save_pretrained``); then the manifest is computed and the folder renamed into
        place. Raises ``FileExistsError`` if the version exists."""
        if kind == VersionKind.adapter and not base_sha256:
            raise ValueError(
                f"version {version}: an adapter version needs the base's sha256 (base_weights_sha256)"
            )
        target = self.version_dir(version)
        if target.exists():
            raise FileExistsError(f"policy version {version} already exists in {self.policies_dir}")
        self.policies_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=self.policies_dir))
        try:
            save(staging)
            files = {
                p.name: sha256_file(p)
                for p in sorted(staging.iterdir())
                if p.is_file() and p.name != MANIFEST
            }
            if not any(name.endswith(".safetensors") for name in files):
                raise InvalidCheckpoint(f"version {version}: save() wrote no .safetensors file")
            if kind == VersionKind.adapter and not {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= set(files):
                raise InvalidCheckpoint(
                    f"version {version}: an adapter version needs {ADAPTER_CONFIG} and "
                    f"{ADAPTER_WEIGHTS}; save() wrote {sorted(files)}"
                )
            manifest = Manifest(
                version=version,
                parent=parent,
                status=status,
                files=files,
                sha256=combined_sha256(files),
                metrics=dict(metrics or {}),
                base_model=base_model,
                kind=kind,
                base_sha256=base_sha256,
            )
            _atomic_write(staging / MANIFEST, manifest.model_dump_json(indent=2))
            fsync_tree(staging)
            os.rename(staging, target)
            fsync_dir(self.policies_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "policy version written",
            extra={"version": version, "sha256": manifest.sha256, "status": status.value},
        )
        self._announce(manifest, status)
        return manifest

    def write_pretrained(self, version: str, model: Any, tokenizer: Any = None, **kwargs: Any) -> Manifest:
        """``write_version`` for a transformers model (+ tokenizer), saved as safetensors."""

        def save(folder: Path) -> None:
            model.save_pretrained(folder, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)

        return self.write_version(version, save, **kwargs)

    def write_adapter(
        self, version: str, peft_model: Any, *, base_sha256: str, adapter_name: str = "default", **kwargs: Any
    ) -> Manifest:
        """``write_version`` for one adapter of a ``peft.PeftModel``: a standard PEFT folder
        (``adapter_config.json`` + ``adapter_model.safetensors``, what ``PeftModel.from_pretrained`` and
        vLLM's runtime LoRA loading read) plus the manifest naming the base and its sha256."""

        def save(folder: Path) -> None:
            # save_embedding_layers=False: with lm_head (or embed_tokens) among the targets peft's default
            # ("auto") also writes the whole *base* layer, which is not an adapter tensor (serve refuses it)
            peft_model.save_pretrained(
                folder, selected_adapters=[adapter_name], safe_serialization=True, save_embedding_layers=False
            )
            nested = folder / adapter_name  # peft puts a non-"default" adapter in a sub-folder
            if adapter_name != "default" and nested.is_dir():
                for path in nested.iterdir():
                    os.replace(path, folder / path.name)
                nested.rmdir()
            stray = [
                p.name
                for p in folder.iterdir()
                if p.is_file() and p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
            ]
            for name in stray:  # peft may add a README.md model card: not part of the version
                (folder / name).unlink()

        return self.write_version(version, save, kind=VersionKind.adapter, base_sha256=base_sha256, **kwargs)

    def manifest(self, version: str) -> Manifest:
        path = self.version_dir(version) / MANIFEST
        if not path.exists():
            raise InvalidCheckpoint(f"policy version {version} not found in {self.policies_dir}")
        try:
            return Manifest.model_validate_json(path.read_text())
        except ValueError as exc:
            raise InvalidCheckpoint(f"policy version {version}: unreadable manifest ({exc})") from exc

    def list_versions(self) -> list[Manifest]:
        if not self.policies_dir.exists():
            return []
        manifests = []
        for folder in self.policies_dir.iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and (folder / MANIFEST).exists():
                try:
                    manifests.append(self.manifest(folder.name))
                except InvalidCheckpoint as exc:
                    log.warning(
                        "skipping unreadable version", extra={"version": folder.name, "error": str(exc)}
                    )
        return sorted(manifests, key=lambda m: (m.created_at, m.version))

    def next_version(self) -> str:
        numbers = [
            int(m.group(1))
            for f in (self.policies_dir.iterdir() if self.policies_dir.exists() else [])
            if (m := re.fullmatch(r"v(\d+)", f.name))
        ]
        return f"v{max(numbers, default=0) + 1:04d}"

    def set_status(
        self,
        version: str,
        status: PolicyStatus,
        *,
        metrics: dict[str, float] | None = None,
        reason: str | None = None,
    ) -> Manifest:
        manifest = self.manifest(version)
        manifest.status = status
        if metrics:
            manifest.metrics.update(metrics)
        if reason:
            manifest.reason = reason
        _atomic_write(self.version_dir(version) / MANIFEST, manifest.model_dump_json(indent=2))
        self._announce(manifest, status, reason=reason)
        return manifest

    # ---- validation -----------------------------------------------------------------------------
    def verify(self, version: str) -> Manifest:
        """Check every file against the manifest's sha256. Returns the manifest or raises
        InvalidCheckpoint."""
        manifest = self.manifest(version)
        folder = self.version_dir(version)
        if combined_sha256(manifest.files) != manifest.sha256:
            raise InvalidCheckpoint(f"policy version {version}: manifest sha256 does not match its file list")
        for name, expected in manifest.files.items():
            path = folder / name
            if not path.exists():
                raise InvalidCheckpoint(f"policy version {version}: {name} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise InvalidCheckpoint(
                    f"policy version {version}: {name} sha256 {actual[:12]}… != manifest {expected[:12]}…"
                )
        return manifest

    def load_state_dict(
        self, version: str, expected_shapes: dict[str, tuple[int, ...]] | None = None, device: str = "cpu"
    ) -> dict[str, Any]:
        """Verified, finite, shape-checked weights of a version (safetensors only, never pickle)."""
        import torch
        from safetensors.torch import load_file

        manifest = self.verify(version)
        if manifest.kind != VersionKind.full:
            raise InvalidCheckpoint(
                f"policy version {version} is a {manifest.kind.value} version, not full weights "
                "(load it with load_adapter)"
            )
        folder = self.version_dir(version)
        state: dict[str, Any] = {}
        for name in sorted(manifest.files):
            if name.endswith(".safetensors"):
                state.update(load_file(folder / name, device=device))
        for key, tensor in state.items():
            if expected_shapes is not None:
                if key not in expected_shapes:
                    raise InvalidCheckpoint(f"policy version {version}: unexpected tensor {key}")
                if tuple(tensor.shape) != tuple(expected_shapes[key]):
                    raise InvalidCheckpoint(
                        f"policy version {version}: {key} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(expected_shapes[key])}"
                    )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InvalidCheckpoint(f"policy version {version}: {key} has non-finite values")
        return state

    def load_adapter(
        self, version: str, *, base_sha256: str, base_shapes: dict[str, tuple[int, ...]], device: str = "cpu"
    ) -> AdapterWeights:
        """A verified adapter version: sha256 of every file, the base it was trained on is the one the caller
        holds (``base_sha256``), plain LoRA on linear layers of the base (``base_shapes`` = the base's state
        dict shapes), A (r, in) and B (out, r) fitting those layers, finite values. Raises
        InvalidCheckpoint."""
        import torch
        from safetensors.torch import load_file

        manifest = self.verify(version)
        if manifest.kind != VersionKind.adapter:
            raise InvalidCheckpoint(
                f"policy version {version} is a {manifest.kind.value} version, not an adapter"
            )
        if manifest.base_sha256 != base_sha256:
            raise InvalidCheckpoint(
                f"policy version {version} was trained on base {manifest.base_model} (sha256 "
                f"{(manifest.base_sha256 or '?')[:12]}…), not on the loaded base (sha256 {base_sha256[:12]}…)"
            )
        folder = self.version_dir(version)
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text())
        except ValueError as exc:
            raise InvalidCheckpoint(f"policy version {version}: unreadable {ADAPTER_CONFIG} ({exc})") from exc
        if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("modules_to_save"):
            raise InvalidCheckpoint(
                f"policy version {version}: only plain LoRA adapters (no DoRA, no "
                f"modules_to_save) are served; got peft_type={config.get('peft_type')!r}"
            )
        state = load_file(folder / ADAPTER_WEIGHTS, device=device)
        ranks: dict[str, dict[str, int]] = {}
        for key, tensor in state.items():
            suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
            if not key.startswith(_PEFT_PREFIX) or suffix is None:
                raise InvalidCheckpoint(f"policy version {version}: unexpected adapter tensor {key}")
            module = key[len(_PEFT_PREFIX) : -len(suffix)]
            base_shape = base_shapes.get(f"{module}.weight")
            if base_shape is None or len(base_shape) != 2 or tensor.dim() != 2:
                raise InvalidCheckpoint(
                    f"policy version {version}: {key} adapts {module}, which is not a linear "
                    "layer of the base model"
                )
            out_features, in_features = base_shape
            side = "A" if suffix == ".lora_A.weight" else "B"
            rank, fits = (
                (tensor.shape[0], tensor.shape[1] == in_features)
                if side == "A"
                else (tensor.shape[1], tensor.shape[0] == out_features)
            )
            if not fits:
                raise InvalidCheckpoint(
                    f"policy version {version}: {key} has shape {tuple(tensor.shape)}, which does "
                    f"not fit {module} ({out_features}x{in_features}) of the base"
                )
            ranks.setdefault(module, {})[side] = rank
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidCheckpoint(f"policy version {version}: {key} has non-finite values")
        for module, sides in ranks.items():
            if set(sides) != {"A", "B"} or sides["A"] != sides["B"]:
                raise InvalidCheckpoint(
                    f"policy version {version}: {module} needs lora_A and lora_B of one rank, got {sides}"
                )
        if not ranks:
            raise InvalidCheckpoint(f"policy version {version}: the adapter holds no LoRA tensors")
        return AdapterWeights(version=version, config=config, state=state)

    # ---- current pointer ------------------------------------------------------------------------
    def current(self) -> str | None:
        """The current version: the ``CURRENT`` file, the only source of truth (never a Redis copy)."""
        path = self.root / CURRENT_FILE
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def set_current(
        self, version: str, *, status: PolicyStatus = PolicyStatus.promoted, reason: str | None = None
    ) -> Manifest:
        """Make ``version`` the served one (after verifying it): the ``CURRENT`` file is replaced atomically
        and fsynced; then (best effort) replicas are notified through Redis. A Redis outage never stops or
        undoes the change: replicas also poll the file."""
        manifest = self.verify(version)
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / CURRENT_FILE, version + "\n")
        manifest = self.set_status(version, status, reason=reason)
        if self.redis is not None:
            try:
                self.redis.publish(policy_channel(self.prefix), version)
            except Exception as exc:
                log.warning(
                    "current policy set but not announced (Redis unavailable); replicas will see it at "
                    "their next poll of CURRENT",
                    extra={"version": version, "error": str(exc)},
                )
        log.info("current policy set", extra={"version": version, "status": status.value, "reason": reason})
        return manifest

    def clean_staging(self) -> list[str]:
        """Remove staging folders and temporary files left by a writer that died mid-write (call at start,
        from the only writer of versions: the learner). Returns the names removed."""
        removed = []
        for folder, pattern in (
            (self.policies_dir, f"{STAGING_PREFIX}*"),
            (self.root, f".{CURRENT_FILE}.*.tmp"),
        ):
            for leftover in sorted(folder.glob(pattern)) if folder.exists() else []:
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover.name)
        if removed:
            log.warning("removed staging leftovers of an interrupted write", extra={"removed": removed})
        return removed

    def _announce(self, manifest: Manifest, status: PolicyStatus, reason: str | None = None) -> None:
        if self.redis is None:
            return
        event = PolicyEvent(
            version=manifest.version,
            parent=manifest.parent,
            path=str(self.version_dir(manifest.version)),
            sha256=manifest.sha256,
            metrics=manifest.metrics,
            status=status,
            reason=reason,
        )
        try:
            self.redis.xadd(stream_key(Stream.policies, self.prefix), event.to_fields())
        except Exception as exc:
            log.warning(
                "policies stream write failed", extra={"version": manifest.version, "error": str(exc)}
            )
