"""LoRA roles over one frozen base (learner/adapters.py), on a tiny model.

- a fresh policy adapter is the reference (B = 0); the reference is exactly the base model;
- a PPO-ptx round trains the policy and value adapters (and the value head) and nothing of the base;
- a role saved in a checkpoint and restored into a new base computes exactly what it computed, its folder
  is a standard PEFT folder (``PeftModel.from_pretrained`` gives the same logits), and the optimizer state
  restores onto the restored parameters;
- the RM (adapter + head + normalisation bias) survives the same round trip.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from learner.adapters import AdapterBase, PolicyAdapter, ReferenceModel, ScoreAdapter
from learner.config import AdapterConfig, PPOConfig
from learner.ppo import PPOPtxTrainer
from learner.reward import normalize_reward, reward_normalisation, sequence_scores, token_scores

PROMPTS = ["Name a color.", "Say hi.", "Count to three.", "What is two plus two?"]


def _inputs(tokenizer):
    encoded = tokenizer(["Hello there, who are you?", "Red"], return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def test_roles_share_one_frozen_base_and_round_trip(tmp_path, tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    base = AdapterBase(str(tiny_model_dir), AdapterConfig(r=4, alpha=8), tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids, attention_mask = _inputs(tokenizer)
    reference = ReferenceModel(base)
    reward = ScoreAdapter.fresh(base, "reward", tokenizer.pad_token_id, seed=0)
    value = reward.copy_as("value")
    base.add("policy")
    policy = PolicyAdapter(base, "policy")
    base_weights = {k: v.clone() for k, v in base.model.state_dict().items() if "lora_" not in k}

    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits
        assert_close(reference(input_ids=input_ids, attention_mask=attention_mask).logits, expected)
        assert_close(policy(input_ids=input_ids, attention_mask=attention_mask).logits, expected)  # B = 0
    assert all(not p.requires_grad for p in reference.parameters())
    assert {n.split(".")[0] for n, _ in policy.named_parameters()} == {"lora"}

    # one PPO round trains the policy and value adapters (and the value head), never the base
    config = PPOConfig(
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        lr=5e-2,
        ptx_coef=0.0,
        max_new_tokens=6,
        max_prompt_tokens=32,
        seed=0,
    )
    normalize_reward(reward, tokenizer, PROMPTS[:2], ["Blue.", "Hi!"])
    trainer = PPOPtxTrainer(policy, reference, value, reward, tokenizer, config)
    value_head = value.score.weight.detach().clone()
    reward_head = reward.score.weight.detach().clone()
    with torch.no_grad():
        reward_before = sequence_scores(reward, input_ids, attention_mask)
    trainer.round(PROMPTS)
    for name, tensor in base.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base_weights[name]), name
    with torch.no_grad():
        trained = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        assert not torch.allclose(trained, expected)
        assert_close(reference(input_ids=input_ids, attention_mask=attention_mask).logits, expected)
        assert_close(sequence_scores(reward, input_ids, attention_mask), reward_before)  # the RM is frozen
        values = token_scores(value, input_ids, attention_mask)
        rewards = sequence_scores(reward, input_ids, attention_mask)
    assert not torch.equal(value.score.weight, value_head) and torch.equal(reward.score.weight, reward_head)

    # checkpoint round trip into a second base: the same numbers, a standard PEFT folder, the optimizer state
    for role, folder in ((policy, "policy"), (value, "value"), (reward, "reward")):
        role.save_pretrained(tmp_path / folder)
    optimizer_state = trainer.state_dict()
    restored_base = AdapterBase(str(tiny_model_dir), AdapterConfig(r=4, alpha=8), tokenizer)
    restored_base.add("policy", restored_base.load_state(tmp_path / "policy"))
    restored_policy = PolicyAdapter(restored_base, "policy")
    restored_value = ScoreAdapter.load(restored_base, "value", tmp_path / "value")
    restored_reward = ScoreAdapter.load(restored_base, "reward", tmp_path / "reward")
    peft_policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "policy"
    ).eval()
    with torch.no_grad():
        assert_close(restored_policy(input_ids=input_ids, attention_mask=attention_mask).logits, trained)
        assert_close(peft_policy(input_ids=input_ids, attention_mask=attention_mask).logits, trained)
        assert_close(token_scores(restored_value, input_ids, attention_mask), values)
        assert_close(sequence_scores(restored_reward, input_ids, attention_mask), rewards)
    assert reward_normalisation(restored_reward) == reward_normalisation(reward) != (1.0, 0.0)
    restored_trainer = PPOPtxTrainer(
        restored_policy, ReferenceModel(restored_base), restored_value, restored_reward, tokenizer, config
    )
    restored_trainer.load_state_dict(optimizer_state)
    saved = optimizer_state["policy_optimizer"]["state"]
    loaded = restored_trainer.policy_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert_close(loaded[key]["exp_avg"], saved[key]["exp_avg"])


def test_an_lm_head_adapter_is_published_and_checkpointed_without_the_base_layer(
    tmp_path, tiny_model_dir, tokenizer
):
    """lm_head among the target modules: peft's default ``save_embedding_layers="auto"`` also writes the
    base lm_head itself (``…lm_head.base_layer.weight``) into the adapter, which serve refuses as "unexpected
    adapter tensor" (an e2e run promoted versions that were never served). Only LoRA tensors are written."""
    from instructloop.registry import Registry

    targets = (*AdapterConfig().target_modules, "lm_head")
    base = AdapterBase(str(tiny_model_dir), AdapterConfig(r=4, alpha=8, target_modules=targets), tokenizer)
    base.add("policy")
    policy = PolicyAdapter(base, "policy")
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.01)
    assert not [k for k in base.state_of("policy") if "base_layer" in k]
    assert any("lm_head.lora_B" in k for k in base.state_of("policy"))

    registry = Registry(tmp_path / "registry")
    policy.write_version(registry, "v0001", base_model=str(tiny_model_dir))
    shapes = {
        name.replace(".base_layer.", "."): tuple(t.shape)
        for name, t in base.model.state_dict().items()
        if "lora_" not in name
    }
    adapter = registry.load_adapter("v0001", base_sha256=base.sha256, base_shapes=shapes)
    lm_head_b = next(k for k in adapter.state if "lm_head.lora_B" in k)
    assert_close(adapter.state[lm_head_b], base.state_of("policy")[lm_head_b])


def test_generation_with_the_adapter_merged_equals_the_adapter_and_restores_the_base_exactly(
    tiny_model_dir, tokenizer
):
    """``PolicyAdapter.generate`` runs with W + s·B·A merged into the base (no LoRA path per decode step): the
    logits of its steps equal the adapter's own forward, the greedy tokens are the same, and afterwards every
    base weight is bit-for-bit what it was. A tied lm_head among the targets is not merged (it would change
    the input embeddings too)."""
    torch.manual_seed(0)
    base = AdapterBase(str(tiny_model_dir), AdapterConfig(r=4, alpha=8), tokenizer)
    base.add("policy")
    policy = PolicyAdapter(base, "policy")
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # B != 0: the adapter changes the model
    base_weights = {k: v.clone() for k, v in base.model.state_dict().items() if "lora_" not in k}
    input_ids, attention_mask = _inputs(tokenizer)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "max_new_tokens": 8,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": tokenizer.pad_token_id,
    }

    merged = policy.generate(**kwargs)
    base.select("policy")
    unmerged = base.model.generate(**kwargs)  # the LoRA path at every step
    assert torch.equal(merged.sequences, unmerged.sequences)
    assert_close(torch.stack(merged.logits), torch.stack(unmerged.logits), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        policy_logits = base.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).logits  # adapter selected
    for name, tensor in base.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base_weights[name]), name
    with base.merged("policy") as did_merge, torch.no_grad():
        assert did_merge  # adapters off, merged weights: the policy's logits
        assert_close(
            base.model(input_ids=input_ids, attention_mask=attention_mask).logits,
            policy_logits,
            rtol=1e-4,
            atol=1e-4,
        )

    tied = AdapterBase(
        str(tiny_model_dir), AdapterConfig(r=4, alpha=8, target_modules=("q_proj", "lm_head")), tokenizer
    )
    assert (
        tied.model.get_input_embeddings().weight is tied.model.get_output_embeddings().weight
    )  # as SmolLM2's
    tied.add("policy")
    with tied.merged("policy") as did_merge:
        assert not did_merge


def test_top_layers_adapts_only_the_top_layers_and_backward_stops_below_them(tiny_model_dir, tokenizer):
    base = AdapterBase(str(tiny_model_dir), AdapterConfig(r=4, alpha=8, top_layers=1), tokenizer)  # 2 layers
    base.add("policy")
    policy = PolicyAdapter(base, "policy")
    names = [n for n, _ in base.peft.named_parameters() if "lora_" in n]
    assert names and all(".layers.1." in n for n in names)
    needs_grad: dict[int, bool] = {}
    layers = base.model.model.layers
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out, k=k: needs_grad.__setitem__(
                k, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
        for k, layer in enumerate(layers)
    ]
    input_ids, attention_mask = _inputs(tokenizer)
    before = [p.detach().clone() for p in policy.parameters()]
    loss = policy(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert needs_grad == {0: False, 1: True}  # nothing below the adapted layer is in the backward graph
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters(), strict=True))
    with torch.no_grad():
        assert torch.equal(
            ReferenceModel(base)(input_ids=input_ids).logits,
            AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=input_ids).logits,
        )
