"""Policy, value model and reward model as LoRA adapters over one frozen base model (peft).

One ``AdapterBase`` holds the base causal LM once, frozen, dropout off, with named LoRA adapters injected by
peft: ``policy``, ``value``, ``reward`` (and ``incumbent`` while the gate evaluates an adapter version).
The *reference* policy is that base with adapters disabled, so it costs nothing extra.

The roles are small ``nn.Module``s that behave like the models the PPO, RM and gate code already take:

- ``PolicyAdapter``: a causal LM (``forward``, ``generate``); ``parameters()`` are its LoRA tensors only,
  so an optimizer built from it trains the adapter and nothing else;
- ``ReferenceModel``: the base with adapters disabled; ``parameters()`` are the frozen base weights;
- ``ScoreAdapter`` (value model, RM): ``learner.reward.backbone(model)`` runs the base's transformer with
  the role's adapter selected, and ``model.score`` is the role's own ``nn.Linear(hidden, 1)`` head.

Decision (score heads): a scalar head is not a LoRA tensor, and peft's ``modules_to_save`` would give the
causal LM a head it never uses and tie the head's fate to an adapter's save format. So a head is a small
tensor kept beside its adapter, owned and trained by its role, and saved as ``score_head.safetensors`` in
the role's checkpoint folder (the RM's normalisation gain and bias in ``config.json``, as in full mode). Roles
select their adapter before every forward (``AdapterBase.select``): only one adapter is active at a time, and
a backward pass uses the graph of the forward that built it, so selecting another adapter in between is safe.

A role's checkpoint folder is a standard PEFT adapter folder (``adapter_config.json``,
``adapter_model.safetensors``) plus ``config.json`` (and the head for score roles).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from instructloop.registry import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Manifest, Registry, base_weights_sha256
from learner.config import AdapterConfig
from learner.utils import disable_dropout

log = logging.getLogger(__name__)

SCORE_HEAD = "score_head.safetensors"


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).exists()


class AdapterBase:
    """The frozen base causal LM, loaded once, with named LoRA adapters."""

    def __init__(
        self,
        model_path: str,
        config: AdapterConfig,
        tokenizer: Any,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        """The base's weights are held in ``dtype`` (frozen);
        peft keeps every adapter's tensors in float32."""
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.config = config
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        self.model = disable_dropout(model).to(device).eval().requires_grad_(False)
        log.info(
            "adapter base loaded",
            extra={
                "model": model_path,
                "device": str(device),
                "dtype": str(dtype),
                "top_layers": config.top_layers,
            },
        )
        self.peft: Any | None = None
        self._selected: str | None = None
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        """``base_weights_sha256`` of the base folder (what an adapter version records and serve checks)."""
        if self._sha256 is None:
            self._sha256 = base_weights_sha256(self.model_path)
        return self._sha256

    def lora_config(self):
        from peft import LoraConfig

        layers = None
        if self.config.top_layers is not None:
            n = self.model.config.num_hidden_layers
            if self.config.top_layers > n:
                raise ValueError(
                    f"AdapterConfig.top_layers={self.config.top_layers}, but {self.model_path} has {n} layers"
                )
            layers = list(range(n - self.config.top_layers, n))
        return LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=0.0,
            target_modules=list(self.config.target_modules),
            bias="none",
            layers_to_transform=layers,
        )

    def has(self, name: str) -> bool:
        return self.peft is not None and name in self.peft.peft_config

    def add(self, name: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """Add adapter ``name`` (replacing one of that name): fresh (B = 0, so it starts as the base) or with
        ``state`` (PEFT key names, as in ``adapter_model.safetensors``)."""
        from peft import get_peft_model, set_peft_model_state_dict

        config = self.lora_config()
        if self.peft is None:
            self.peft = get_peft_model(self.model, config, adapter_name=name)
        else:
            if name in self.peft.peft_config:
                self.peft.delete_adapter(name)
            self.peft.add_adapter(name, config)
        if state is not None:
            device = next(self.model.parameters()).device
            result = set_peft_model_state_dict(
                self.peft, {k: v.to(device) for k, v in state.items()}, adapter_name=name
            )
            missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
            if missing:
                raise ValueError(f"adapter {name}: tensors missing from the saved state: {missing[:3]}")
        self._selected = "\0"  # peft changed the active adapter: the next select() sets it explicitly

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if "lora_" in n and f".{name}." in n]

    def state_of(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        # only the adapter's tensors: with lm_head among the targets peft would also return the base lm_head
        state = get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def select(self, name: str | None) -> None:
        """Make adapter ``name`` the one the LoRA layers apply (None: adapters off, the base model)."""
        if name == self._selected:
            return
        if name is None:
            if self.peft is not None:
                self.peft.base_model.disable_adapter_layers()
        else:
            if self._selected is None or self._selected == "\0":
                self.peft.base_model.enable_adapter_layers()
            self.peft.base_model.set_adapter(name)
        self._selected = name

    def save(self, name: str, folder: Path) -> None:
        """A standard PEFT adapter folder for adapter ``name``."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_of(name), str(folder / ADAPTER_WEIGHTS))
        config = self.peft.peft_config[name].to_dict()
        config["base_model_name_or_path"] = str(self.model_path)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=list))

    def load_state(self, folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(Path(folder) / ADAPTER_WEIGHTS))

    @contextlib.contextmanager
    def merged(self, name: str) -> Iterator[bool]:
        """Within: the base's own weights are W + s·B·A of adapter ``name`` and adapters are off, so a forward
        runs no LoRA matmul (generation, where the per-layer LoRA path is a large share of a CPU decode step).
        The exact base weights are copied back after (not subtracted: no rounding drift). Yields False,
        merging nothing, when a target's weight is shared with another module (a tied lm_head: merging would
        change the input embeddings too); the adapter is then applied as usual."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        tied = {id(p) for p in self.model.get_input_embeddings().parameters()}
        if any(id(layer.get_base_layer().weight) in tied for layer in layers):
            self.select(name)
            yield False
            return
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for layer in layers:
                    weight = layer.get_base_layer().weight
                    saved.append((weight, weight.detach().clone()))
                    weight.add_(layer.get_delta_weight(name).to(weight.dtype))
            self.select(None)
            yield True
        finally:
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)


class PolicyAdapter(nn.Module):
    """A causal LM: the base with adapter ``name`` selected. ``parameters()`` = its LoRA tensors."""

    def __init__(self, base: AdapterBase, name: str):
        super().__init__()
        self.__dict__["base"] = base  # shared, not a submodule: parameters() must not reach the base
        self.adapter_name = name
        self.lora = nn.ParameterList(base.parameters_of(name))
        self.config = base.model.config
        self.generation_config = base.model.generation_config

    def forward(self, *args: Any, **kwargs: Any):
        self.base.select(self.adapter_name)
        return self.base.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        """Generation with the adapter merged into the base weights (``AdapterBase.merged``): the same model,
        without the LoRA path in every decode step; logprobs for training come from ``forward``."""
        with self.base.merged(self.adapter_name):
            return self.base.model.generate(*args, **kwargs)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        self.base.save(self.adapter_name, Path(folder))
        self.config.save_pretrained(folder)

    def write_version(self, registry: Registry, version: str, **kwargs: Any) -> Manifest:
        """Publish as a registry adapter version over the base (a merged full-weight version when the base
        is not the served base model, e.g. after SFT: serve could not apply the adapter there)."""
        self.base.select(self.adapter_name)
        tokenizer = kwargs.pop("tokenizer", None)
        if kwargs.pop("served_base", True):
            return registry.write_adapter(
                version,
                self.base.peft,
                adapter_name=self.adapter_name,
                base_sha256=self.base.sha256,
                **kwargs,
            )
        merged = copy.deepcopy(self.base.peft)
        for other in [n for n in merged.peft_config if n != self.adapter_name]:
            merged.delete_adapter(other)
        return registry.write_pretrained(version, merged.merge_and_unload(), tokenizer, **kwargs)


class ReferenceModel(nn.Module):
    """π_ref: the base with adapters disabled. ``parameters()`` = the frozen base weights."""

    def __init__(self, base: AdapterBase):
        super().__init__()
        self.__dict__["base"] = base
        self.frozen = nn.ParameterList([p for n, p in base.model.named_parameters() if "lora_" not in n])
        self.config = base.model.config
        self.generation_config = base.model.generation_config

    def forward(self, *args: Any, **kwargs: Any):
        self.base.select(None)
        return self.base.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        self.base.select(None)
        return self.base.model.generate(*args, **kwargs)


class _SelectedBackbone:
    """The base's transformer (no LM head) called with one adapter selected."""

    def __init__(self, base: AdapterBase, name: str):
        self.base, self.name = base, name

    def __call__(self, *args: Any, **kwargs: Any):
        self.base.select(self.name)
        return getattr(self.base.model, self.base.model.base_model_prefix)(*args, **kwargs)


class ScoreAdapter(nn.Module):
    """The RM or the value model: adapter ``name`` on the base's transformer + an own scalar ``score`` head.
    Works with ``learner.reward`` (``backbone``, ``score_head``, ``token_scores``, ``normalize_reward``)."""

    base_model_prefix = "model"

    def __init__(self, base: AdapterBase, name: str, head: nn.Linear, config: Any):
        super().__init__()
        self.__dict__["base"] = base
        self.adapter_name = name
        self.lora = nn.ParameterList(base.parameters_of(name))
        self.score = head
        self.config = config

    @property
    def model(self) -> _SelectedBackbone:  # what learner.reward.backbone() reaches through base_model_prefix
        return _SelectedBackbone(self.base, self.adapter_name)

    @classmethod
    def fresh(cls, base: AdapterBase, name: str, pad_token_id: int, seed: int = 0) -> ScoreAdapter:
        """A new adapter (starts as the base) and a new head initialised like HF's (normal,
        initializer_range), from ``seed``."""
        config = copy.deepcopy(base.model.config)
        config.num_labels, config.pad_token_id = 1, pad_token_id
        device = next(base.model.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base.add(name)
            head = nn.Linear(config.hidden_size, 1, bias=False, device=device)
            nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
        return cls(base, name, head, config)

    @classmethod
    def load(cls, base: AdapterBase, name: str, folder: str | Path) -> ScoreAdapter:
        """From a checkpoint folder written by ``save_pretrained`` (adapter, head, normalisation)."""
        from transformers import AutoConfig

        folder = Path(folder)
        base.add(name, base.load_state(folder))
        config = AutoConfig.from_pretrained(folder)
        weights = load_file(str(folder / SCORE_HEAD))
        device = next(base.model.parameters()).device
        head = nn.Linear(config.hidden_size, 1, bias=False, device=device)
        with torch.no_grad():
            head.weight.copy_(weights["weight"])
        return cls(base, name, head, config)  # the normalisation (gain, bias) comes with config

    def copy_as(self, name: str) -> ScoreAdapter:
        """Another role starting from this one's adapter and head (the value model starts from the RM)."""
        self.base.add(name, self.base.state_of(self.adapter_name))
        return ScoreAdapter(self.base, name, copy.deepcopy(self.score), copy.deepcopy(self.config))

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        folder = Path(folder)
        self.base.save(self.adapter_name, folder)
        self.config.save_pretrained(folder)
        save_file({"weight": self.score.weight.detach().cpu().contiguous()}, str(folder / SCORE_HEAD))
