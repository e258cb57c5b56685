"""The whole loop, end to end: feedback sent over HTTP moves the served policy.

``instructloop up`` runs as a real process and starts a real redis-server, serve, the gateway and the
learner as real processes; everything below talks to them over loopback HTTP only. A scripted labeler
(``labeler``) asks for K=4 completions per prompt and ranks them with the preference "answers
without the word *banana*" (score = minus the number of occurrences); its rankings go to ``/v1/feedback``.
The learner trains its reward model on them, runs PPO-ptx rounds, gates the candidates on held-out
prompts and promotes one; serve hot-swaps to it. The test asserts that a version other than ``base``
answers (``policy_version`` and the ``X-Policy-Version`` header), that the registry has it as promoted,
and that the preference function's win-rate of the new version against responses recorded from the
starting version on held-out prompts is at least 70 % (ties count half).

Why a designed tiny model. A randomly initialised model spreads its probability over 49k tokens: it
almost never emits a given word or EOS, so no ranking would ever carry information and nothing could be
learned in minutes. The model here (``build_concentrated_model``) is a real Llama (2 layers, hidden 64,
the real SmolLM2 tokenizer) whose output distribution is concentrated on 12 common word tokens, the
target word " banana" and EOS:

* every token embedding gets a constant component in hidden dimension 0, so after the final RMSNorm
  that dimension is nearly the same at every position (a built-in "bias" feature);
* the lm_head is untied and zero except for the 14 informative rows, whose weight on dimension 0 gives
  each token its intended log-probability (words ~6 % each, banana ~10 %, EOS ~8 %; all other 49k
  tokens together ~1 %), plus small random weights elsewhere so that outputs vary with context.

So about half of the sampled answers contain "banana" (a real signal for the reward model), answers end
with EOS (PPO scores at EOS), and lowering one lm_head row is enough to serve better answers: learning is
possible in a few PPO rounds on 2 CPU cores, but nothing is pre-learned: the reward model starts from the
same random network and must find "banana" from the rankings alone. Every learner setting (thresholds,
PPO sizes, learning rates, gate) is an ``INSTRUCTLOOP_LEARNER_*`` variable given to ``up`` below; seeds
are fixed (the learner's, the labeler's per-request seeds).

Training mode: the default, LoRA adapters (``INSTRUCTLOOP_LEARNER_TRAINING=lora``). The learning rates below
(PPO 5e-3, RM 3e-3) were tuned for this 2-layer model and are set explicitly, so they are used as given (lora
mode's own defaults, ``AdapterConfig.reward_lr`` / ``ppo_lr``, are for the default model; at PPO 5e-2 the
first round destroyed this policy: approx_kl 16, clip fraction 0.55, entropy 2.8 -> 9.7 nats, EOS rate
0.69 -> 0.06, no promotion in 37 rounds). One adapter setting this designed model needs
(``INSTRUCTLOOP_LEARNER_ADAPTERS``):

* ``lm_head`` among the target modules. Everything this model prefers is in its lm_head (the informative
  rows differ only in their weight on hidden dimension 0); the default targets (attention and MLP
  projections) can only move the hidden state, and lowering " banana" that way lifts the 49k-token tail
  with it. (Not measured here with the default targets: the first run with ``lm_head`` learned, so the
  time went to it.)

Measured (2 shared CPU cores, ``pytest tests/test_loop_e2e.py -x -s``, win-rates over 32 answers per
held-out prompt a side): with the gate's minimum gain at 0.8 normalised units, 0.739 (v0002, 29 rounds), 0.808
(v0003, 31), 0.742 (v0002, 26); at 0.5 the first version through was a smaller step, 0.69–0.76 (v0001 after
16–17 rounds twice). Before the fix in ``learner/adapters.py`` / ``Registry.write_adapter`` an lm_head adapter
version was refused by serve ("unexpected adapter tensor …lm_head.base_layer.weight"): promoted, never served.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from instructloop.registry import Registry
from instructloop.stackfile import StackFile
from labeler.client import GatewayClient, record, simulate
from labeler.preferences import (
    DEFAULT_HELDOUT_PROMPTS,
    DEFAULT_PROMPTS,
    load_preference,
    read_prompts,
    win_rate,
)
from tests.conftest import free_port, save_model_dir, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TARGET_WORD = " banana"
WORDS = [" the", " cat", " sat", " on", " a", " mat", " dog", " ran", " and", " big", " red", "."]
PREFERENCE = "without:banana"
K = 4
MAX_TOKENS = 24
TEMPERATURE = 1.0
STARTUP_TIMEOUT_S = 120
# labeling until a promotion: 26-31 rounds (75-85 s) on a quiet machine; a fresh-clone suite on a busy one
# ran 148 rounds in 240 s with the learner at 2 PPO rounds (the gate's 0.8 minimum gain needs 2-3)
LEARNING_TIMEOUT_S = 480
# answers recorded per held-out prompt (``record`` asks 8 at a time), from the base and from the promoted
# version: with 8 a side the win-rate rests on 64 answers each and moved by several hundredths between
# recordings of one version
ANSWERS_PER_PROMPT = 32


def build_concentrated_model(
    path: Path, tokenizer, seed: int = 0, p_target: float = 0.15, p_eos: float = 0.06, p_rest: float = 0.01
) -> Path:
    """A tiny Llama whose next-token distribution sits on a few tokens (see the module docstring)."""
    import torch

    model = tiny_llama(tokenizer, seed, tie_word_embeddings=False).eval()
    word_ids = [tokenizer.encode(word)[0] for word in WORDS]
    target_id = tokenizer.encode(TARGET_WORD)[0]
    assert (
        tokenizer.decode([target_id]) == TARGET_WORD
        and len({*word_ids, target_id, tokenizer.eos_token_id}) == 14
    )
    others = len(tokenizer) - len(word_ids) - 2
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # shared direction -> ~constant hidden dim 0
        sample = tokenizer("The cat sat on the mat and the dog ran.", return_tensors="pt").input_ids
        h0 = model.model(sample).last_hidden_state[..., 0].mean().item()  # (1, T, H) -> scalar
        lm_head = model.lm_head.weight  # (V, H)
        lm_head.zero_()

        def logit(p: float) -> float:  # relative to the other tokens, which share p_rest at logit 0
            return math.log(p / p_rest * others)

        p_word = (1.0 - p_target - p_eos - p_rest) / len(word_ids)
        for token_id in word_ids:
            lm_head[token_id, 0] = logit(p_word) / h0
            lm_head[token_id, 1:] = torch.randn(lm_head.shape[1] - 1, generator=generator) * 0.05
        lm_head[target_id, 0] = logit(p_target) / h0
        lm_head[tokenizer.eos_token_id, 0] = logit(p_eos) / h0
    return save_model_dir(model, tokenizer, path)


ADAPTER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the default
LEARNER_ENV = {
    "INSTRUCTLOOP_LEARNER_SEED": "0",
    "INSTRUCTLOOP_LEARNER_TRAINING": "lora",  # the default, spelled out: this test is about the default path
    "INSTRUCTLOOP_LEARNER_ADAPTERS": json.dumps({"target_modules": [*ADAPTER_TARGETS, "lm_head"]}),
    "INSTRUCTLOOP_LEARNER_MIN_NEW_COMPARISONS": "32",
    "INSTRUCTLOOP_LEARNER_MIN_PROMPTS": "8",
    "INSTRUCTLOOP_LEARNER_PROMPTS_PER_ROUND": "16",
    "INSTRUCTLOOP_LEARNER_EVAL_PROMPTS": "16",
    "INSTRUCTLOOP_LEARNER_HELDOUT_FRACTION": "0.2",
    "INSTRUCTLOOP_LEARNER_POLL_INTERVAL_S": "0.5",
    "INSTRUCTLOOP_LEARNER_KL_COEF": "0.02",
    "INSTRUCTLOOP_LEARNER_PTX_COEF": "0",
    "INSTRUCTLOOP_LEARNER_GATE_KL_CEILING": "20",
    # the test's claim is about the first version the gate lets through: it must be a clear step (a mean gain
    # of 0.8 of the reference's score spread: RM scores are normalised so its samples score std 1; at 0.5 the
    # gate's second look let through versions at win-rate ~0.69; and a lower bound above 0 rather than the
    # default's -margin)
    "INSTRUCTLOOP_LEARNER_GATE_MIN_REWARD_GAIN": "0.8",
    "INSTRUCTLOOP_LEARNER_GATE_SURE_GAIN_SUFFICES": "false",
    "INSTRUCTLOOP_LEARNER_GATE_MARGIN": "0",
    "INSTRUCTLOOP_LEARNER_REWARD": json.dumps(
        {"lr": 3e-3, "epochs": 2, "rankings_per_batch": 8, "max_length": 96, "single_pass_above": 100_000}
    ),
    "INSTRUCTLOOP_LEARNER_PPO": json.dumps(
        {
            "lr": 5e-3,
            "rollout_batch_size": 16,
            "mini_batch_size": 4,
            "ppo_epochs": 2,
            "temperature": TEMPERATURE,
            "max_new_tokens": MAX_TOKENS,
            "ptx_batch_size": 2,
            "ptx_seq_len": 32,
            "max_prompt_tokens": 64,
        }
    ),
    "INSTRUCTLOOP_LEARNER_EVALUATION": json.dumps(
        {
            "do_sample": True,
            "temperature": TEMPERATURE,
            "max_new_tokens": MAX_TOKENS,
            "batch_size": 16,
        }
    ),
}


def _wait_for_stack(proc: subprocess.Popen, run_dir: Path, log_path: Path) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    stack_file = StackFile.path(run_dir)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`instructloop up` exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if stack_file.exists():
            return StackFile.read(run_dir)
        time.sleep(0.2)
    pytest.fail(f"the stack was not up within {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_feedback_over_http_moves_the_served_policy(tmp_path, tokenizer):
    model_dir = build_concentrated_model(tmp_path / "model", tokenizer)
    run_dir = tmp_path / "run"
    log_path = tmp_path / "up.log"
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "INSTRUCTLOOP_SERVE_TORCH_THREADS": "1",
        "INSTRUCTLOOP_HOME": str(tmp_path / "home"),
        **LEARNER_ENV,
        # this test is about learning, not throttling: on a quiet machine the labeler outpaces the
        # default 600 requests/min per key (it would then wait out the 429s, slowing the test down)
        "INSTRUCTLOOP_GATEWAY_RATE_LIMIT_PER_MINUTE": "100000",
        "INSTRUCTLOOP_GATEWAY_FEEDBACK_RATE_LIMIT_PER_MINUTE": "100000",
        "INSTRUCTLOOP_GATEWAY_RATE_LIMIT_GENERATIONS_PER_MINUTE": "100000",
    }
    argv = [
        sys.executable,
        "-m",
        "launcher.cli",
        "up",
        "--run-dir",
        str(run_dir),
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--startup-timeout",
        str(STARTUP_TIMEOUT_S),
        "--stop-timeout",
        "20",
    ]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        stack = _wait_for_stack(proc, run_dir, log_path)
        keys = json.loads(Path(stack.keys_file).read_text())
        assert (Path(stack.keys_file).stat().st_mode & 0o777) == 0o600
        preference = load_preference(PREFERENCE)
        heldout = read_prompts(DEFAULT_HELDOUT_PROMPTS)
        train = read_prompts(DEFAULT_PROMPTS)

        with (
            GatewayClient(stack.gateway_url, keys["labeler"]) as labeler,
            GatewayClient(stack.gateway_url, keys["user"]) as user,
        ):
            baseline = record(
                user, heldout, n=ANSWERS_PER_PROMPT, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=1000
            )
            assert baseline["policy_versions"] == ["base"]

            # Label until a newly promoted version answers.
            deadline = time.monotonic() + LEARNING_TIMEOUT_S
            versions: list[str] = []
            rounds = 0
            while time.monotonic() < deadline:
                summary = simulate(
                    labeler,
                    train,
                    preference,
                    rounds=1,
                    k=K,
                    max_tokens=MAX_TOKENS,
                    temperature=TEMPERATURE,
                    seed=rounds * 10_000,
                    progress=print,
                )
                rounds += 1
                assert summary.errors == 0 and summary.rankings_posted + summary.all_tied == len(train)
                versions += [v for v in summary.versions if v not in versions]
                if any(v != "base" for v in versions):
                    break
            new_versions = [v for v in versions if v != "base"]
            assert new_versions, (
                f"no version promoted after {rounds} rounds of feedback:\n{_learner_tail(run_dir)}"
            )

            # serve hot-swapped: the answer and its header name the promoted version
            response = httpx.post(
                f"{stack.gateway_url}/v1/completions",
                headers={"Authorization": f"Bearer {keys['user']}"},
                json={"model": "instructloop", "prompt": heldout[0], "max_tokens": 4},
                timeout=60,
            )
            response.raise_for_status()
            served = response.json()["policy_version"]
            assert served != "base"
            assert response.headers["x-policy-version"] == served
            registry = Registry(run_dir / "registry")
            assert registry.manifest(served).status.value == "promoted"

            new = record(
                user, heldout, n=ANSWERS_PER_PROMPT, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=2000
            )
            assert new["policy_versions"] == [served]
        print("base answers:", baseline["responses"][heldout[0]][:4])
        print(f"{served} answers:", new["responses"][heldout[0]][:4])
        result = win_rate(new["responses"], baseline["responses"], preference)
        print(
            f"win-rate of {served} against base after {rounds} rounds ({rounds * len(train)} rankings): "
            f"{result.as_dict()}"
        )
        assert result.rate >= 0.70, result.as_dict()
    finally:
        status = _stop(proc)
    assert status == 0, log_path.read_text()[-4000:]
    pids = [c.pid for c in stack.components.values()]
    assert not any(_pid_alive(pid) for pid in pids)


def _learner_tail(run_dir: Path) -> str:
    path = run_dir / "logs" / "learner" / "learner.log"
    return "\n".join(path.read_text().splitlines()[-30:]) if path.exists() else "(no learner log)"
