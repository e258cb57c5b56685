"""Adapter versions in the registry: a standard PEFT LoRA folder + the manifest naming the base and its
sha256; ``load_adapter`` refuses tampered files, non-finite values, shapes that do not fit the base and an
adapter trained on another base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from instructloop.registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    InvalidCheckpoint,
    Registry,
    VersionKind,
    base_weights_sha256,
)


def _peft_model(model_dir, adapter_name="default", seed=0):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )  # random A and B: the adapter visibly changes the model
    return get_peft_model(base, config, adapter_name=adapter_name)


@pytest.fixture
def base_shapes(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_adapter_version_is_a_standard_peft_folder(tmp_path, tiny_model_dir, base_shapes):
    registry = Registry(tmp_path)
    base_sha = base_weights_sha256(tiny_model_dir)
    peft_model = _peft_model(tiny_model_dir, adapter_name="policy")
    manifest = registry.write_adapter(
        "v0001", peft_model, adapter_name="policy", base_sha256=base_sha, base_model="tiny"
    )
    assert manifest.kind == VersionKind.adapter and manifest.base_sha256 == base_sha
    assert set(manifest.files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    folder = registry.version_dir("v0001")

    # PeftModel.from_pretrained reads the folder as is, and computes what the trained model computes
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model.eval()(ids).logits)

    adapter = registry.load_adapter("v0001", base_sha256=base_sha, base_shapes=base_shapes)
    assert adapter.config["peft_type"] == "LORA" and adapter.config["r"] == 4
    assert set(adapter.state) == set(load_file(folder / ADAPTER_WEIGHTS))
    with pytest.raises(InvalidCheckpoint, match="adapter version"):
        registry.load_state_dict("v0001")  # full-weight readers never take an adapter for weights


def test_bad_adapters_are_refused(tmp_path, tiny_model_dir, base_shapes, tokenizer):
    from tests.conftest import build_tiny_model_dir

    registry = Registry(tmp_path)
    base_sha = base_weights_sha256(tiny_model_dir)
    peft_model = _peft_model(tiny_model_dir)

    def write(version, mutate=None, **kwargs):
        registry.write_adapter(version, peft_model, base_sha256=kwargs.pop("base_sha256", base_sha), **kwargs)
        if mutate is not None:  # edit the files after the manifest was written, then re-seal the manifest
            folder = registry.version_dir(version)
            mutate(folder)
            from instructloop.registry import MANIFEST, combined_sha256, sha256_file

            manifest = registry.manifest(version)
            manifest.files = {name: sha256_file(folder / name) for name in manifest.files}
            manifest.sha256 = combined_sha256(manifest.files)
            (folder / MANIFEST).write_text(manifest.model_dump_json())

    def edit_tensors(edit):
        def mutate(folder):
            state = load_file(folder / ADAPTER_WEIGHTS)
            edit(state)
            save_file(state, str(folder / ADAPTER_WEIGHTS))

        return mutate

    some_a = next(k for k in peft_model.state_dict() if "lora_A" in k).replace(".default", "")

    write("nan", edit_tensors(lambda s: s[some_a].fill_(float("nan"))))
    with pytest.raises(InvalidCheckpoint, match="non-finite"):
        registry.load_adapter("nan", base_sha256=base_sha, base_shapes=base_shapes)

    write("rank", edit_tensors(lambda s: s.__setitem__(some_a, torch.ones(3, s[some_a].shape[1]))))
    with pytest.raises(InvalidCheckpoint, match="one rank"):
        registry.load_adapter("rank", base_sha256=base_sha, base_shapes=base_shapes)

    write("shape", edit_tensors(lambda s: s.__setitem__(some_a, torch.ones(4, 7))))
    with pytest.raises(InvalidCheckpoint, match="does not fit"):
        registry.load_adapter("shape", base_sha256=base_sha, base_shapes=base_shapes)

    def rename(state):
        state["base_model.model.model.layers.0.mlp.nowhere.lora_A.weight"] = state.pop(some_a)

    write("module", edit_tensors(rename))
    with pytest.raises(InvalidCheckpoint, match="not a linear layer"):
        registry.load_adapter("module", base_sha256=base_sha, base_shapes=base_shapes)

    def dora(folder):
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))

    write("dora", dora)
    with pytest.raises(InvalidCheckpoint, match="plain LoRA"):
        registry.load_adapter("dora", base_sha256=base_sha, base_shapes=base_shapes)

    other_base = base_weights_sha256(build_tiny_model_dir(tmp_path / "other", tokenizer, seed=3))
    write("otherbase", base_sha256=other_base)
    with pytest.raises(InvalidCheckpoint, match="not on the loaded base"):
        registry.load_adapter("otherbase", base_sha256=base_sha, base_shapes=base_shapes)

    write("tampered")
    save_file({some_a: torch.zeros(4, 64)}, str(registry.version_dir("tampered") / ADAPTER_WEIGHTS))
    with pytest.raises(InvalidCheckpoint, match="sha256"):
        registry.load_adapter("tampered", base_sha256=base_sha, base_shapes=base_shapes)
    with pytest.raises(InvalidCheckpoint):
        registry.set_current("tampered")

    with pytest.raises(ValueError, match="base's sha256"):
        registry.write_version("nobase", lambda folder: None, kind=VersionKind.adapter)
