"""LearnerModels: the reference's greedy answers (the RM's bias samples) are generated once per prompt."""

from __future__ import annotations

from learner.config import EvalConfig
from learner.dataset import TrafficPrompt
from learner.evaluate import reference_samples
from learner.models import LearnerModels
from learner.settings import Settings
from learner.state import CheckpointStore


def test_reference_answers_are_generated_once_per_prompt_and_equal_a_fresh_generation(tmp_path, tiny_model_dir):
    settings = Settings(model=str(tiny_model_dir), redis_url="redis://unused", state_dir=tmp_path, training="full")
    models = LearnerModels(settings, CheckpointStore(tmp_path), lambda: None)
    config = EvalConfig(max_new_tokens=6, batch_size=8, max_prompt_tokens=64)
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

