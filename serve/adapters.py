"""Adapter versions over one base model: the base is loaded once; each adapter version's LoRA tensors are
copied into a LoRA *slot* injected into it (peft) and selected per forward.

Decision: one base module with LoRA slots, not a merged copy per version. A version then costs its LoRA
tensors (a few MB) instead of a model, the base stays in memory once, and switching versions between two
forwards is a pointer change. The running batches stay one per version (``serve.engine``): a forward runs
one adapter, so sequences of different versions never share a forward. peft's mixed-adapter batches
(``adapter_names=``) would let them share one, but add hooks on every LoRA layer to every decode step; one
batch per version is simpler and equally correct.

Why slots: peft's ``add_adapter`` (injecting a new named adapter) and ``set_adapter`` both walk the whole
module tree, on the model thread that decodes for everyone (docs/benchmarks.md, hot-swap of an adapter).
So LoRA modules are injected once per slot (named ``slot<i>``; created when no free slot with the same
rank / alpha / target modules exists) and reused: attaching a version is a copy of its tensors into a free
slot's parameters, and selecting one sets each LoRA layer's active adapter (``_active_adapter``,
``_disable_adapters``: peft's ``BaseTunerLayer`` attributes its forward reads; the parity tests against
``PeftModel.from_pretrained`` catch a peft that reads anything else).

Thread rule: only the model thread touches the module (attach, select, detach); the watcher and the HTTP
side only *load and validate* ``AdapterWeights`` (``Registry.load_adapter``), which are plain tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from instructloop.registry import AdapterWeights

log = logging.getLogger(__name__)

_LORA_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "bias",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
)


def _slot_shape(config: dict[str, Any]) -> tuple:
    """What two adapters must share to use the same slot (same LoRA modules, same scaling)."""
    key = []
    for name in _LORA_FIELDS:
        value = config.get(name)
        key.append(tuple(sorted(value)) if isinstance(value, list | set | tuple) else value)
    return (
        *key,
        repr(sorted((config.get("rank_pattern") or {}).items())),
        repr(sorted((config.get("alpha_pattern") or {}).items())),
    )


class SharedBase:
    """The base causal LM plus LoRA slots holding attached adapter versions (model thread only)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        """The HF model. Once the first adapter is attached, peft has injected LoRA layers into it in place;
        calling it then runs the selected slot, or none while adapters are disabled."""
        self.peft: Any | None = None
        self.slot_of: dict[str, str] = {}
        """version -> slot holding its tensors."""
        self._slot_shapes: dict[str, tuple] = {}
        self._slot_params: dict[str, dict[str, torch.nn.Parameter]] = {}
        """slot -> {PEFT state key (as in adapter_model.safetensors) -> its parameter}."""
        self._layers: list[Any] = []
        self._selected: str | None = None
        """The slot the LoRA layers apply now; None = adapters disabled (the base model)."""

    @property
    def attached(self) -> set[str]:
        return set(self.slot_of)

    def module_for(self, adapter: AdapterWeights | None) -> torch.nn.Module:
        """The module to call for ``adapter`` (None = the base), attached and selected."""
        slot = None
        if adapter is not None:
            self.attach(adapter)
            slot = self.slot_of[adapter.version]
        self._select(slot)
        return self.model

    def _select(self, slot: str | None) -> None:
        if slot == self._selected:
            return
        for layer in self._layers:
            if slot is None:
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = [slot]
        self._selected = slot

    def attach(self, adapter: AdapterWeights) -> None:
        """Copy the adapter's LoRA tensors into a free slot of its shape (creating one if none is free)."""
        if adapter.version in self.slot_of:
            return
        shape = _slot_shape(adapter.config)
        used = set(self.slot_of.values())
        slot = next((s for s, sh in self._slot_shapes.items() if sh == shape and s not in used), None)
        if slot is None:
            slot = self._new_slot(adapter.config, shape)
        params = self._slot_params[slot]
        if set(adapter.state) != set(params):  # Registry.load_adapter checked shapes, not coverage
            missing = sorted(set(params) - set(adapter.state))[:3]
            raise ValueError(
                f"adapter {adapter.version}: its tensors do not cover its target modules {missing}"
            )
        with torch.no_grad():
            for key, tensor in adapter.state.items():
                params[key].copy_(tensor)
        self.slot_of[adapter.version] = slot
        log.info(
            "adapter attached",
            extra={"policy_version": adapter.version, "slot": slot, "attached": sorted(self.slot_of)},
        )

    def _new_slot(self, config: dict[str, Any], shape: tuple) -> str:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        slot = f"slot{len(self._slot_shapes)}"
        fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
        lora = LoraConfig(**{**fields, "lora_dropout": 0.0, "inference_mode": True})
        selected = self._selected
        if self.peft is None:
            self.peft = get_peft_model(self.model, lora, adapter_name=slot)
        else:
            self.peft.add_adapter(slot, lora)
        self._layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        marker = f".{slot}."
        self._slot_params[slot] = {
            name.replace(marker, "."): param for name, param in self.peft.named_parameters() if marker in name
        }
        self._slot_shapes[slot] = shape
        self.model.eval()
        self._selected = "\0"  # peft changed which slot is active: select explicitly again
        self._select(selected)
        log.info(
            "adapter slot created",
            extra={"slot": slot, "r": config.get("r"), "slots": len(self._slot_shapes)},
        )
        return slot

    def prune(self, keep: set[str]) -> None:
        """Free the slots of every version not named in ``keep`` (active, running batches, the LRU)."""
        for version in sorted(set(self.slot_of) - keep):
            slot = self.slot_of.pop(version)
            if self._selected == slot:
                self._select(None)
            log.info("adapter detached", extra={"policy_version": version, "slot": slot})
