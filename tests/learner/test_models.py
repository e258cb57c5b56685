"""LearnerModels: the reference's greedy answers (the RM's bias samples) are generated once per prompt; mixed
precision (Settings.dtype)."""

from __future__ import annotations

import math

import torch

from instructloop.events import ComparisonEvent
from learner.config import EvalConfig, RewardConfig
from learner.dataset import TrafficPrompt
from learner.evaluate import reference_samples
from learner.models import LearnerModels
from learner.reward import reward_scores, train_reward_model
from learner.settings import Settings
from learner.state import CheckpointStore


def test_reference_answers_are_generated_once_per_prompt_and_equal_a_fresh_generation(
    tmp_path, tiny_model_dir
):
    settings = Settings(
        model=str(tiny_model_dir), redis_url="redis://unused", state_dir=tmp_path, training="full"
    )
    models = LearnerModels(settings, CheckpointStore(tmp_path), lambda: None)
    # greedy: a seeded sample depends on which prompts share its batch, a greedy answer does not
    config = EvalConfig(max_new_tokens=6, batch_size=8, max_prompt_tokens=64, do_sample=False)
    generated: list[int] = []
    generate = models.reference.generate
    models.reference.generate = lambda **kw: generated.append(kw["input_ids"].size(0)) or generate(**kw)

    first = [TrafficPrompt("Say hello.", 4), TrafficPrompt("Count to three.")]
    answers = models.reference_answers(first, config)
    new = TrafficPrompt("Name a colour.")
    again = models.reference_answers([new, *first], config)
    assert generated == [2, 1]  # the second call generated for the new prompt only
    assert again[1:] == answers
    assert answers + again[:1] == reference_samples(models.reference, models.tokenizer, [*first, new], config)
    models.reset()
    assert models.reference_answers(first, config) == answers  # after SFT (reset) they are generated again


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert Settings(device="cpu").resolved_dtype() == "float32"
    assert Settings(device="cuda:1").resolved_dtype() == "bfloat16"
    assert Settings(device="cuda", dtype="float32").resolved_dtype() == "float32"


def test_bfloat16_mixed_precision_holds_frozen_weights_in_bf16_and_trains_float32_adapters(
    tmp_path, tiny_model_dir
):
    """Settings.dtype=bfloat16 (what 'auto' picks on CUDA), run here on the CPU: the base is bf16,
    every trained tensor (LoRA, score head) stays float32, and an RM update under the learner's
    autocast changes them."""
    settings = Settings(
        model=str(tiny_model_dir),
        redis_url="redis://unused",
        state_dir=tmp_path,
        device="cpu",
        dtype="bfloat16",
    )
    models = LearnerModels(settings, CheckpointStore(tmp_path), lambda: None)
    reward = models.new_reward_model()
    frozen = {p.dtype for n, p in models.adapter_base.model.named_parameters() if "lora_" not in n}
    assert frozen == {torch.bfloat16}
    trained = [p for p in reward.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    before = [p.detach().clone() for p in trained]
    vote = ComparisonEvent(prompt="Say hi", responses=["hi", "go away"], ranking=[[0], [1]], labeler_id="l")
    with models.autocast():
        stats = train_reward_model(
            reward, models.tokenizer, [vote], RewardConfig(epochs=1, rankings_per_batch=1)
        )
        scores = reward_scores(reward, models.tokenizer, ["Say hi"], ["hi"])
    assert math.isfinite(stats["loss"]) and torch.isfinite(scores).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, trained, strict=True))
    assert {p.dtype for p in trained} == {torch.float32}
    reference = LearnerModels(
        settings.model_copy(update={"training": "full"}), CheckpointStore(tmp_path / "full"), lambda: None
    ).reference
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
