"""The learner's models: which exist, how they are built, restored from a checkpoint and published, for
both training modes (``INSTRUCTLOOP_LEARNER_TRAINING``).

- ``lora`` (default): one frozen base model in memory (``learner.adapters.AdapterBase``); the policy, the
  value model and the RM are LoRA adapters on it (the two score roles with their own small heads), the
  reference policy is the base with adapters off, and the gate's incumbent is one more adapter when it is
  an adapter version. Checkpoint parts and registry versions are PEFT adapter folders (a few MB).
- ``full``: one model per role (policy, reference, value model, RM), every weight trained; checkpoint
  parts and registry versions hold full weights.

The loop (``learner.loop``) asks this object for models and never cares which mode it is in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from instructloop.model import resolve_model
from instructloop.registry import InvalidCheckpoint, Manifest, Registry, VersionKind
from learner.settings import Settings, lora_rates
from learner.state import CheckpointStore

log = logging.getLogger(__name__)


def mixed_precision(device: str, dtype):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or nothing at float32 (``Settings.dtype``)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


class LearnerModels:
    def __init__(self, settings: Settings, store: CheckpointStore, reference_path: Any):
        self.settings = settings
        self.store = store
        self._reference_path = reference_path
        """A callable returning the SFT model's folder once
        SFT ran, else None (it lives in the learner state)."""
        self._base_path: str | None = None
        self._device: str | None = None
        self._tokenizer = None
        self._adapter_base = None
        self._reference = None
        self._reward = None
        self._samples_cache: dict[tuple, tuple[str, Any]] = {}
        """(version, PolicySamples) by (version, reference, prompts, config, max_tokens): the gate's samples
        of the versions a candidate is compared with (see ``version_samples``); a few entries."""
        self._reference_answers: dict[tuple, str] = {}
        """Greedy reference answers by (prompt, max_tokens,
        config): the RM's bias samples (``reference_answers``)."""

    @property
    def lora(self) -> bool:
        return self.settings.training == "lora"

    def reset(self) -> None:
        """Forget every loaded model (after SFT changed the reference, or to reload from a checkpoint)."""
        self._tokenizer = self._adapter_base = self._reference = self._reward = None
        self._samples_cache = {}
        self._reference_answers = {}

    # ---- paths, device, tokenizer ----------------------------------------------------------------
    @property
    def base_path(self) -> str:
        if self._base_path is None:
            self._base_path = resolve_model(self.settings.model)
        return self._base_path

    @property
    def reference_path(self) -> str:
        return self._reference_path() or self.base_path

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = self.settings.resolved_device()
        return self._device

    @property
    def dtype(self):
        """The dtype of frozen weights and of autocast (``Settings.dtype``); trained weights stay float32."""
        import torch

        return getattr(torch, self.settings.resolved_dtype())

    def autocast(self):
        """Mixed precision for the learner's forward passes (``mixed_precision``)."""
        return mixed_precision(self.device, self.dtype)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.reference_path)
            if (
                self._tokenizer.pad_token_id is None
                or self._tokenizer.pad_token_id == self._tokenizer.eos_token_id
            ):
                raise ValueError(
                    f"model {self.settings.model}: the tokenizer needs a pad token distinct from EOS for PPO "
                    "(set one in the model folder's tokenizer_config.json)"
                )
        return self._tokenizer

    @property
    def part_tokenizer(self):
        """The tokenizer saved with each checkpoint part: none for adapter parts (the base folder holds it;
        three copies of a 3.5 MB tokenizer.json were most of an adapter checkpoint's write time)."""
        return None if self.lora else self.tokenizer

    def mode_defaults(self, role: str) -> dict[str, float]:
        """``role``'s learning rate in lora mode (``learner.settings.lora_rates``), else nothing."""
        return lora_rates(self.settings, role)

    def adapter_config(self):
        from learner.config import AdapterConfig

        return AdapterConfig(**self.settings.adapters)

    @property
    def adapter_base(self):
        """lora mode: the one frozen base (the SFT model once SFT ran) that every adapter sits on."""
        if self._adapter_base is None:
            from learner.adapters import AdapterBase

            self._adapter_base = AdapterBase(
                self.reference_path, self.adapter_config(), self.tokenizer, self.device, self.dtype
            )
        return self._adapter_base

    def _causal_lm(self, path: str | Path, frozen: bool = False):
        """A causal LM on the learner's device: float32 when trained, in ``dtype`` when ``frozen``."""
        import torch
        from transformers import AutoModelForCausalLM

        from learner.utils import disable_dropout

        dtype = self.dtype if frozen else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        log.info(
            "model loaded",
            extra={"model": str(path), "device": self.device, "dtype": str(dtype), "frozen": frozen},
        )
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        return disable_dropout(model).to(self.device)

    def _check_part(self, part: str, folder: Path) -> None:
        from learner.adapters import is_adapter_folder

        if is_adapter_folder(folder) != self.lora:
            saved = "LoRA adapters" if is_adapter_folder(folder) else "full weights"
            raise ValueError(
                f"checkpoint part {part} in {folder.parent} holds {saved}, but INSTRUCTLOOP_LEARNER_TRAINING="
                f"{self.settings.training}: set it back, or start from a fresh state_dir"
            )

    # ---- the models ------------------------------------------------------------------------------
    @property
    def reference(self):
        """π_ref, frozen: the base with adapters off (lora) or its own copy of the SFT/base model (full)."""
        if self._reference is None:
            if self.lora:
                from learner.adapters import ReferenceModel

                self._reference = ReferenceModel(self.adapter_base)
            else:
                self._reference = (
                    self._causal_lm(self.reference_path, frozen=True).eval().requires_grad_(False)
                )
        return self._reference

    @property
    def reward_model(self):
        """The RM from the latest checkpoint, or None before the first RM update."""
        if self._reward is None:
            path = self.store.model_dir("reward")
            if path is not None:
                self._check_part("reward", path)
                if self.lora:
                    from learner.adapters import ScoreAdapter

                    self._reward = ScoreAdapter.load(self.adapter_base, "reward", path).eval()
                else:
                    from learner.reward import build_reward_model

                    self._reward = build_reward_model(str(path)).to(self.device).eval()
        return self._reward

    def new_reward_model(self):
        """A fresh RM (its head seeded) for the first update."""
        if self.lora:
            from learner.adapters import ScoreAdapter

            self._reward = ScoreAdapter.fresh(
                self.adapter_base, "reward", self.tokenizer.pad_token_id, seed=self.settings.seed
            )
        else:
            from learner.reward import build_reward_model

            self._reward = build_reward_model(self.reference_path, seed=self.settings.seed).to(self.device)
        return self._reward

    def policy_and_value(self) -> tuple[Any, Any, bool]:
        """(policy, value model, restored): from the latest checkpoint if it has them (restored=True), else
        the policy starts as the reference and the value model as a copy of the RM."""
        policy_dir = self.store.model_dir("policy")
        value_dir = self.store.model_dir("value")
        for part, folder in (("policy", policy_dir), ("value", value_dir)):
            if folder is not None:
                self._check_part(part, folder)
        if self.lora:
            from learner.adapters import PolicyAdapter, ScoreAdapter

            base = self.adapter_base
            base.add("policy", base.load_state(policy_dir) if policy_dir is not None else None)
            policy = PolicyAdapter(base, "policy")
            value = (
                ScoreAdapter.load(base, "value", value_dir)
                if value_dir is not None
                else self.reward_model.copy_as("value")
            )
        else:
            from learner.reward import build_reward_model

            policy = self._causal_lm(policy_dir or self.reference_path)
            value = build_reward_model(str(value_dir or self.store.model_dir("reward"))).to(self.device)
        return policy, value, policy_dir is not None

    def incumbent(self, registry: Registry, version: str):
        """The model of a registry version, for the gate (raises InvalidCheckpoint / OSError / ValueError)."""
        manifest = registry.manifest(version)
        if manifest.kind == VersionKind.adapter:
            if not self.lora or self.reference_path != self.base_path:
                raise InvalidCheckpoint(
                    f"{version} is an adapter version; this learner has no adapter base that "
                    "matches it (training=full, or the base changed by SFT)"
                )
            from learner.adapters import PolicyAdapter

            base = self.adapter_base
            shapes = {
                name: tuple(t.shape) for name, t in base.model.state_dict().items() if "lora_" not in name
            }
            shapes = {name.replace(".base_layer.", "."): shape for name, shape in shapes.items()}
            adapter = registry.load_adapter(version, base_sha256=base.sha256, base_shapes=shapes)
            base.add("incumbent", adapter.state)
            return PolicyAdapter(base, "incumbent").eval()
        registry.verify(version)
        return self._causal_lm(registry.version_dir(version), frozen=True).eval()

    def version_samples(
        self,
        registry: Registry,
        version: str,
        prompts: list[str],
        config: Any,
        max_tokens: list[int | None] | None = None,
    ) -> tuple[str, Any]:
        """(version, ``PolicySamples``) of registry ``version`` on ``prompts`` (the reference as ``base`` for
        ``base``, or when the version cannot be loaded). A version never changes and its samples are seeded,
        so they are kept for the next gate with the same prompts and config (only re-scored, since the RM may
        have changed): a gate then generates for the candidate alone."""
        from instructloop.events import validate_version_name
        from instructloop.wire import BASE_VERSION
        from learner.evaluate import sample_policy

        key = (version, self.reference_path, tuple(prompts), repr(config), repr(max_tokens))
        if key in self._samples_cache:
            return self._samples_cache[key]
        loaded, model = BASE_VERSION, self.reference
        if version != BASE_VERSION:
            try:
                validate_version_name(version)
                loaded, model = version, self.incumbent(registry, version)
            except (InvalidCheckpoint, OSError, ValueError) as exc:
                log.warning(
                    "version not loadable, gating against the reference",
                    extra={"version": version, "error": str(exc)},
                )
        samples = sample_policy(model, self.reference, self.tokenizer, prompts, config, max_tokens)
        self.remember_samples(loaded, prompts, config, samples, max_tokens, key=key)
        return loaded, samples

    def reference_answers(self, queries: list, config: Any) -> list[str]:
        """Answers of the reference to ``queries`` (``TrafficPrompt``s) under ``config`` (greedy, or seeded
        samples), the RM's normalisation samples. The reference never changes (until SFT, which calls
        ``reset``), so each (prompt, config) answer is generated once and kept: an RM update then only
        generates for prompts it has not seen."""
        from learner.evaluate import reference_samples

        def key(query) -> tuple:
            return query.text, query.max_tokens, repr(config)

        missing = list({key(q): q for q in queries if key(q) not in self._reference_answers}.values())
        if (
            len(self._reference_answers) + len(missing) > 4096
        ):  # bounded: a long-running learner sees many prompts
            self._reference_answers.clear()
            missing = list({key(q): q for q in queries}.values())
        if missing:
            answers = reference_samples(self.reference, self.tokenizer, missing, config)
            self._reference_answers.update(zip(map(key, missing), answers, strict=True))
        return [self._reference_answers[key(q)] for q in queries]

    def remember_samples(
        self,
        version: str,
        prompts: list[str],
        config: Any,
        samples: Any,
        max_tokens: list[int | None] | None = None,
        *,
        key: tuple | None = None,
    ) -> None:
        """Keep ``version``'s samples (a promoted candidate's are the next incumbent's); 8 (version, pairs)
        at most: the incumbent, the base and the best version, on the gate's first and extra pairs
        (``GateConfig.max_samples``), and a promoted candidate's."""
        key = key or (version, self.reference_path, tuple(prompts), repr(config), repr(max_tokens))
        self._samples_cache[key] = (version, samples)
        while len(self._samples_cache) > 8:
            del self._samples_cache[next(iter(self._samples_cache))]

    def policy_from_version(self, registry: Registry, version: str):
        """A working policy equal to registry ``version`` (the reference for ``base``), to be saved as the
        checkpoint's policy part: the restart after an admin rollback. None when this learner cannot train
        on from it (a full-weight version while training adapters)."""
        from instructloop.wire import BASE_VERSION

        if not self.lora:
            if version == BASE_VERSION:
                return self._causal_lm(self.reference_path)
            registry.verify(version)
            return self._causal_lm(registry.version_dir(version))
        from learner.adapters import PolicyAdapter

        base = self.adapter_base
        state = None
        if version != BASE_VERSION:
            if registry.manifest(version).kind != VersionKind.adapter:
                log.warning(
                    "cannot restart the adapter policy from a full-weight version; it keeps training",
                    extra={"version": version},
                )
                return None
            self.incumbent(registry, version)  # verified and attached as the "incumbent" adapter
            state = base.state_of("incumbent")
            self._samples_cache = {}
        base.add("policy", state)
        return PolicyAdapter(base, "policy")

    def write_candidate(self, registry: Registry, version: str, policy: Any, **kwargs: Any) -> Manifest:
        """Publish ``policy`` as ``version``: an adapter version (lora, over the served base), else
        full weights (full mode; or lora after SFT changed the base, merged, since serve holds the
        original base)."""
        if self.lora:
            return policy.write_version(
                registry,
                version,
                served_base=self.reference_path == self.base_path,
                tokenizer=self.tokenizer,
                **kwargs,
            )
        return registry.write_pretrained(version, policy, self.tokenizer, **kwargs)
