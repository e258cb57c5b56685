"""Resumability: atomic checkpoints (unit) and SIGKILL of a running learner (subprocess, real Redis)."""

from __future__ import annotations

import os

import torch

from learner.state import CheckpointStore, LearnerState


def test_checkpoint_is_atomic_carries_parts_over_and_prunes(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None and store.load_state() == LearnerState()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()

    state = LearnerState(rm_updates=1, rm_cursor=7)
    first = store.save(state, models={"policy": (model, tokenizer)}, optimizers={"ppo": optimizer.state_dict()})
    assert state.step == 1 and first.name == "ckpt-000001"

    state.rm_cursor = 9
    second = store.save(state)  # nothing new: weights and optimizer carried over by hard link
    policy_weights = second / "policy" / "model.safetensors"
    assert os.stat(policy_weights).st_ino == os.stat(first / "policy" / "model.safetensors").st_ino
    assert store.load_state().rm_cursor == 9 and store.load_state().step == 2
    restored = torch.optim.AdamW(AutoModelForCausalLM.from_pretrained(store.model_dir("policy")).parameters(), lr=1e-3)
    restored.load_state_dict(store.optimizer_state("ppo"))
    torch.testing.assert_close(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert store.model_dir("reward") is None

    store.save(state)
    assert [p.name for p in store.checkpoints()] == ["ckpt-000002", "ckpt-000003"]
    assert store.model_dir("policy").parent.name == "ckpt-000003"

    # A checkpoint interrupted half-way (left as .tmp-*) is invisible and cleaned on the next start.
    (store.root / ".tmp-000004-123" / "policy").mkdir(parents=True)
    reopened = CheckpointStore(tmp_path, keep=2)
    assert reopened.load_state().step == 3
    assert not list(reopened.root.glob(".tmp-*"))
