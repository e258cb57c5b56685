"""Adapter versions over one base model: the base is loaded once; each adapter version's LoRA tensors are
attached to it by name (peft) and selected per forward.

Decision: one base module with named LoRA adapters (``peft``), not a merged copy per version. A version
then costs its LoRA tensors (a few MB) instead of a model, the base stays in memory once, and switching
versions between two forwards is ``set_adapter`` (no weight copy). The running batches stay one per
version (``serve.engine``): a forward runs one adapter, so sequences of different versions never share a
forward. peft's mixed-adapter batches (``adapter_names=``) would let them share one, at the price of
splitting every LoRA matmul per sub-batch; one batch per version is simpler and equally correct.

Thread rule: only the model thread touches the module (attach, select, detach); the watcher and the HTTP
side only *load and validate* ``AdapterWeights`` (``Registry.load_adapter``), which are plain tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from instructloop.registry import AdapterWeights

log = logging.getLogger(__name__)


class SharedBase:
    """The base causal LM plus the LoRA adapters attached to it (model thread only)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        """The HF model. Once the first adapter is attached, peft has injected LoRA layers into it in place;
        calling it then runs the selected adapter, or none while adapters are disabled."""
        self.peft: Any | None = None
        self.attached: set[str] = set()
        self._selected: str | None = None
        """The adapter the LoRA layers apply now; None = adapters disabled (the base model)."""

    def module_for(self, adapter: AdapterWeights | None) -> torch.nn.Module:
        """The module to call for ``adapter`` (None = the base), attached and selected."""
        if adapter is None:
            if self._selected is not None:
                self.peft.base_model.disable_adapter_layers()
                self._selected = None
            return self.model
        if adapter.version not in self.attached:
            self.attach(adapter)
        if self._selected != adapter.version:
            if self._selected is None:
                self.peft.base_model.enable_adapter_layers()
            self.peft.base_model.set_adapter(adapter.version)
            self._selected = adapter.version
        return self.model

    def attach(self, adapter: AdapterWeights) -> None:
        """Inject the adapter's LoRA tensors under its version name (selected afterwards)."""
        if adapter.version in self.attached:
            return
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        fields = {k: v for k, v in adapter.config.items() if k in LoraConfig.__dataclass_fields__}
        config = LoraConfig(**{**fields, "lora_dropout": 0.0, "inference_mode": True})
        if self.peft is None:
            self.peft = get_peft_model(self.model, config, adapter_name=adapter.version)
        else:
            self.peft.add_adapter(adapter.version, config)
        reference = next(self.model.parameters())
        state = {k: v.to(device=reference.device, dtype=reference.dtype) for k, v in adapter.state.items()}
        result = set_peft_model_state_dict(self.peft, state, adapter_name=adapter.version)
        missing = [k for k in result.missing_keys if f".{adapter.version}." in k]
        if missing:  # cannot happen after Registry.load_adapter; refuse rather than serve a half-loaded adapter
            self.peft.delete_adapter(adapter.version)
            raise ValueError(f"adapter {adapter.version}: tensors missing after load: {missing[:3]}")
        self.attached.add(adapter.version)
        self._selected = adapter.version  # add_adapter / get_peft_model leave the new adapter selected
        self.peft.base_model.set_adapter(adapter.version)
        self.peft.base_model.enable_adapter_layers()
        self.model.eval()
        log.info("adapter attached", extra={"policy_version": adapter.version, "attached": sorted(self.attached)})

    def prune(self, keep: set[str]) -> None:
        """Detach every adapter not named in ``keep`` (the active version, running batches, the LRU)."""
        for version in sorted(self.attached - keep):
            if self._selected == version:
                self.peft.base_model.disable_adapter_layers()
                self._selected = None
            self.peft.delete_adapter(version)
            self.attached.discard(version)
            log.info("adapter detached", extra={"policy_version": version})
