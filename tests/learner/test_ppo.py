"""PPO-ptx learns: the core proof of the learning loop, on tiny models, seeded.

The experiment (one module fixture, shared by the tests):

1. pretrain a tiny random-init Llama on a synthetic "pretraining" corpus: chat-formatted prompts answered
   by 3-6 random words, where the word " wonderful" appears in 30% of the answers — so the policy emits
   short word sequences ending in EOS, like an SFT model would;
2. train a tiny reward model (K-wise, as in production) on a synthetic preference: more " wonderful"
   wins (tests/learner/test_reward.py);
3. run the same seeded PPO rounds twice from the same policy: γ_ptx = 1 (PPO-ptx) and γ_ptx = 0 (plain PPO),
   with the pretraining corpus of step 1 as the ptx data;
4. evaluate with ``evaluate_policy`` before and after, count the " wonderful"s actually generated, and
   measure the pretraining NLL on fixed corpus windows.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from learner.config import EvalConfig, PPOConfig, RewardConfig
from learner.evaluate import evaluate_policy
from learner.losses import ptx_loss
from learner.ppo import PPOPtxTrainer, response_logprobs, round_prompt_indices
from learner.ptx import PtxSource
from learner.reward import build_reward_model, train_reward_model
from learner.rollout import generate_rollouts
from tests.conftest import build_tiny_model_dir
from tests.learner.test_reward import PROMPTS, TARGET, WORDS, synthetic_comparison

ROUNDS = 6


def ppo_config(ptx_coef: float) -> PPOConfig:
    return PPOConfig(
        rollout_batch_size=16,
        mini_batch_size=4,
        ppo_epochs=2,
        lr=1e-3,
        kl_coef=0.05,
        ptx_coef=ptx_coef,
        ptx_batch_size=4,
        ptx_seq_len=32,
        temperature=1.0,
        max_new_tokens=16,
        max_prompt_tokens=64,
        seed=0,
    )


def target_count(policy, tokenizer, prompts: list[str]) -> float:
    """Mean number of " wonderful" tokens per sampled response (the ground truth the RM learned)."""
    target_id = tokenizer(TARGET, add_special_tokens=False).input_ids[0]
    torch.manual_seed(0)
    rollouts = generate_rollouts(policy, tokenizer, prompts, 64, 16, do_sample=True, temperature=1.0)
    return ((rollouts.responses == target_id) & rollouts.response_mask).sum().item() / len(prompts)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tokenizer):
    """Trains a policy and an RM (minutes on 2 cores): every test using it is marked slow."""
    return run_experiment(tmp_path_factory, tokenizer)


def run_experiment(tmp_path_factory, tokenizer) -> dict:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ppo")
    rng = random.Random(0)
    documents = []
    for _ in range(400):
        words = [" " + rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), TARGET)
        # the prompt is the model input itself (the prompt contract): the response continues it
        documents.append(rng.choice(PROMPTS) + "".join(words) + tokenizer.eos_token)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(documents))

    # 1. pretrain
    policy = AutoModelForCausalLM.from_pretrained(build_tiny_model_dir(root / "policy", tokenizer, seed=0))
    pretrain = PtxSource(tokenizer, corpus, seq_len=48, batch_size=8, seed=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-3)
    for _ in range(60):
        input_ids, attention_mask = pretrain.next_batch()
        loss, _ = ptx_loss(
            policy(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids, attention_mask, 1.0
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()

    # 2. reward model on the synthetic preference
    reward_model = build_reward_model(str(build_tiny_model_dir(root / "rm", tokenizer, seed=1)))
    comparisons_rng = random.Random(1)
    rm_stats = train_reward_model(
        reward_model,
        tokenizer,
        [synthetic_comparison(comparisons_rng) for _ in range(192)],
        RewardConfig(lr=2e-3, epochs=2, rankings_per_batch=4, max_length=96, single_pass_above=192),
        heldout=[synthetic_comparison(comparisons_rng) for _ in range(48)],
    )

    heldout_windows = pretrain.fixed_batch(16)

    def pretraining_nll(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=heldout_windows[0], attention_mask=heldout_windows[1]).logits
            return ptx_loss(logits, heldout_windows[0], heldout_windows[1], 1.0)[1].item()

    eval_prompts = PROMPTS * 4
    eval_config = EvalConfig(
        max_new_tokens=16, do_sample=True, temperature=1.0, batch_size=20, max_prompt_tokens=64
    )
    reference = copy.deepcopy(policy)
    result = {
        "rm_stats": rm_stats,
        "before": evaluate_policy(policy, reference, reward_model, tokenizer, eval_prompts, eval_config),
        "before_target": target_count(policy, tokenizer, eval_prompts),
        "before_nll": pretraining_nll(policy),
        "policy": policy,
        "reference": reference,
        "reward_model": reward_model,
        "corpus": corpus,
    }

    # 3. the same seeded rounds with and without the ptx term
    for ptx_coef in (1.0, 0.0):
        trained = copy.deepcopy(policy)
        trainer = PPOPtxTrainer(
            trained,
            reference,
            copy.deepcopy(reward_model),
            reward_model,
            tokenizer,
            ppo_config(ptx_coef),
            PtxSource(tokenizer, corpus, seq_len=32, batch_size=4, seed=1),
        )
        rounds = [trainer.round(PROMPTS) for _ in range(ROUNDS)]
        # 4. evaluate
        result[ptx_coef] = {
            "rounds": rounds,
            "trainer": trainer,
            "after": evaluate_policy(trained, reference, reward_model, tokenizer, eval_prompts, eval_config),
            "after_target": target_count(trained, tokenizer, eval_prompts),
            "after_nll": pretraining_nll(trained),
        }
    return result


@pytest.mark.slow
def test_ppo_ptx_raises_reward_with_bounded_kl(experiment):
    assert experiment["rm_stats"]["heldout_accuracy"] >= 0.9
    before, run = experiment["before"], experiment[1.0]
    after = run["after"]
    assert before["kl"] == 0.0
    # the reward model's score rises, and so does what it stands for: more " wonderful" in the samples
    assert after["reward_mean"] > before["reward_mean"] + 0.5, (before, after)
    assert run["after_target"] > experiment["before_target"] + 0.2
    # β keeps the policy near the reference
    assert 0.0 < after["kl"] < 5.0
    assert max(r["kl"] for r in run["rounds"]) < 5.0
    assert after["eos_rate"] >= 0.7


@pytest.mark.slow
def test_ptx_term_limits_pretraining_drift(experiment):
    base = experiment["before_nll"]
    drift_ptx = experiment[1.0]["after_nll"] - base
    drift_plain = experiment[0.0]["after_nll"] - base
    assert drift_plain > 0.1, "plain PPO should move the policy off the pretraining distribution"
    assert drift_ptx < 0.5 * drift_plain, (drift_ptx, drift_plain)
    assert experiment[0.0]["rounds"][0]["ptx_tokens"] == 0
    # the alignment tax on held-out windows (never trained on) is reported with plain PPO too,
    # and ptx lowers it
    plain, mixed = experiment[0.0]["rounds"][-1], experiment[1.0]["rounds"][-1]
    assert plain["ptx_heldout_nll_ratio"] > mixed["ptx_heldout_nll_ratio"], (plain, mixed)
    assert experiment[1.0]["rounds"][0]["ptx_tokens"] == 2 * 4 * 4 * 32  # epochs × minibatches × ptx batch


@pytest.mark.slow
def test_round_stats_are_complete_and_finite(experiment):
    stats = experiment[1.0]["rounds"][-1]
    for key in (
        "reward_mean",
        "score_mean",
        "rm_score_mean",
        "kl",
        "kl_coef",
        "ptx_loss",
        "ptx_nll",
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "value_clip_fraction",
        "approx_kl",
        "entropy",
        "eos_rate",
        "response_length_mean",
        "rollout_s",
        "scoring_s",
        "update_s",
        "ptx_s",
        "round_s",
        "tokens_per_s",
        "rollout_tokens_per_s",
        "baseline_mean",
        "ptx_heldout_nll_ratio",
        "tax_nll",
        "tax_nll_reference",
        "tax_nll_ratio",
    ):
        assert torch.isfinite(torch.tensor(stats[key])), key
    assert stats["round"] == ROUNDS
    assert stats["rollout_s"] > 0 and stats["update_s"] > 0 and stats["ptx_s"] > 0
    assert 0.0 <= stats["clip_fraction"] <= 1.0 and 0.0 <= stats["value_clip_fraction"] <= 1.0
    assert stats["tax_nll"] != stats["ptx_heldout_nll"]  # two texts: the alignment tax is not on ptx's corpus


@pytest.mark.slow
def test_trainer_state_dict_round_trip(experiment, tokenizer):
    trainer = experiment[1.0]["trainer"]
    state = trainer.state_dict()
    fresh = PPOPtxTrainer(
        copy.deepcopy(trainer.policy),
        experiment["reference"],
        copy.deepcopy(trainer.value_model),
        experiment["reward_model"],
        tokenizer,
        ppo_config(1.0),
        PtxSource(tokenizer, experiment["corpus"], seq_len=32, batch_size=4, seed=7),
    )
    fresh.load_state_dict(state)
    assert fresh.rounds_done == ROUNDS
    restored = fresh.policy_optimizer.state_dict()["state"]
    original = trainer.policy_optimizer.state_dict()["state"]
    assert restored.keys() == original.keys()
    assert_close(restored[0]["exp_avg"], original[0]["exp_avg"])
    assert_close(fresh.ptx_source.next_batch()[0], trainer.ptx_source.next_batch()[0])


@pytest.mark.slow
def test_batched_logprobs_match_plain_forward(experiment, tokenizer):
    policy = experiment["policy"]
    torch.manual_seed(3)
    rollouts = generate_rollouts(
        policy,
        tokenizer,
        ["Hi", "A much longer prompt than the first one"],
        64,
        8,
        do_sample=True,
        temperature=0.7,
    )
    ours = response_logprobs(policy, rollouts, temperature=0.7, batch_size=8)  # (2, Tr)
    for row in range(2):
        real = rollouts.attention_mask[row].bool()
        sequence = rollouts.query_responses[row][real].unsqueeze(0)  # unpadded (1, L)
        n = int(rollouts.response_mask[row].sum())
        with torch.no_grad():
            logits = policy(input_ids=sequence).logits[0, -n - 1 : -1] / 0.7
        theirs = torch.log_softmax(logits, -1).gather(1, sequence[0, -n:].unsqueeze(1)).squeeze(1)
        assert_close(ours[row, :n], theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("n_prompts", "n"), [(16, 32), (16, 16), (5, 12), (40, 16)])
def test_round_prompts_cover_each_prompt_equally_when_rollouts_outnumber_them(n_prompts, n):
    picked = round_prompt_indices(n_prompts, n, random.Random(7))
    counts = [picked.count(i) for i in range(n_prompts)]
    assert len(picked) == n
    assert max(counts) - min(counts) <= 1 if n >= n_prompts else max(counts) == 1
    assert picked == round_prompt_indices(n_prompts, n, random.Random(7))  # seeded


@pytest.mark.parametrize(("n_prompts", "n", "k"), [(16, 32, 4), (3, 16, 4), (40, 32, 2)])
def test_round_prompts_answer_each_drawn_prompt_samples_per_prompt_times(n_prompts, n, k):
    picked = round_prompt_indices(n_prompts, n, random.Random(7), samples_per_prompt=k)
    assert len(picked) == n
    blocks = [picked[i : i + k] for i in range(0, n, k)]
    assert all(len(set(block)) == 1 for block in blocks)  # k adjacent samples of one prompt
    counts = [picked.count(i) for i in range(n_prompts)]
    assert all(c % k == 0 for c in counts)
    assert max(counts) - min(counts) <= k if n // k >= n_prompts else max(counts) == k


@pytest.mark.slow
def test_config_and_trainer_refuse_bad_setups(experiment, tokenizer):
    with pytest.raises(ValueError, match="must divide"):
        PPOConfig(rollout_batch_size=10, mini_batch_size=4, samples_per_prompt=1)
    with pytest.raises(ValueError, match="samples_per_prompt=3 must be >= 1 and divide"):
        PPOConfig(rollout_batch_size=16, mini_batch_size=4, samples_per_prompt=3)
    with pytest.raises(ValueError, match="needs a ptx_source"):
        PPOPtxTrainer(
            experiment["policy"],
            experiment["reference"],
            experiment["reward_model"],
            experiment["reward_model"],
            tokenizer,
            ppo_config(1.0),
            ptx_source=None,
        )


def test_ptx_source_reads_file_folder_dataset_and_the_shipped_default(tmp_path, tokenizer):
    import datasets

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(
        "The first document.\n\nThe second one, a little longer than the first."
    )
    (tmp_path / "docs" / "b.txt").write_text("A third document in another file.")
    datasets.Dataset.from_dict({"text": ["One row of text.", "Another row of text here."]}).save_to_disk(
        tmp_path / "hf"
    )
    for path in (tmp_path / "docs" / "a.txt", tmp_path / "docs", tmp_path / "hf"):
        source = PtxSource(tokenizer, path, seq_len=4, batch_size=2, seed=0)
        input_ids, attention_mask = source.next_batch()
        assert input_ids.shape == (2, 4) and attention_mask.all()
    shipped = PtxSource(tokenizer, None, seq_len=128, batch_size=2)
    assert shipped.num_tokens >= 3000
    with pytest.raises(ValueError, match="cannot load the ptx corpus"):
        PtxSource(tokenizer, tmp_path / "missing", seq_len=4)
