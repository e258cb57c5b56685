"""Learning curve of the whole loop on the default model: preference feedback in, preferred answers out.

    PYTHONPATH=. python bench/learning_curve.py [--budget-s 600] [--preference shorter] [--out docs]

The end-to-end test (tests/test_loop_e2e.py) on the real SmolLM2-135M-Instruct: ``instructloop up``
starts Redis, serve, the gateway and the learner as real processes; the base version's answers on the
held-out prompts are recorded; then the scripted labeler ranks K=4 completions per training prompt
(16 prompts a round, over HTTP only) until the time budget is spent. After every round it records the
rankings posted so far, wall time, the learner's Prometheus metrics (reward-model held-out pairwise
accuracy, mean held-out RM reward and KL of the last candidate and incumbent the gate compared,
promotions, rejections, PPO rounds) and the served version; each time a new version is served it
measures the preference's win-rate of that version against the recorded base answers (every new answer
against every base answer of the same prompt, ties half; the same version has the same win-rate, so
it is measured once per version). The base version's win-rate against its own recording is measured
first: the in-run baseline (≈ 0.5).

Writes ``<out>/<name>.json`` (every row) and ``<out>/<name>.png`` (name: ``learning_curve``) (four panels against
rankings posted, with wall time on a secondary axis). Learner settings are small so that several RM
updates and PPO-ptx rounds fit in ~10 minutes on 2 CPU cores; they are printed and stored with the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from instructloop.stackfile import StackFile  # noqa: E402
from labeler.client import GatewayClient, record, simulate  # noqa: E402
from labeler.preferences import (  # noqa: E402
    DEFAULT_HELDOUT_PROMPTS,
    DEFAULT_PROMPTS,
    load_preference,
    read_prompts,
    win_rate,
)

K = 4
MAX_TOKENS = 48
TEMPERATURE = 0.7
WINRATE_N = 4

LEARNER_ENV = {
    "INSTRUCTLOOP_LEARNER_SEED": "0",
    "INSTRUCTLOOP_LEARNER_MIN_NEW_COMPARISONS": "16",
    "INSTRUCTLOOP_LEARNER_MIN_PROMPTS": "16",
    "INSTRUCTLOOP_LEARNER_PROMPTS_PER_ROUND": "16",
    "INSTRUCTLOOP_LEARNER_EVAL_PROMPTS": "8",
    "INSTRUCTLOOP_LEARNER_HELDOUT_FRACTION": "0.2",
    "INSTRUCTLOOP_LEARNER_POLL_INTERVAL_S": "1",
    "INSTRUCTLOOP_LEARNER_KL_COEF": "0.02",
    "INSTRUCTLOOP_LEARNER_PTX_COEF": "1.0",
    "INSTRUCTLOOP_LEARNER_REWARD": json.dumps({"lr": 2e-5, "epochs": 1, "rankings_per_batch": 4, "max_length": 160}),
    "INSTRUCTLOOP_LEARNER_PPO": json.dumps({
        "lr": 1e-5, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE, "ptx_batch_size": 2, "ptx_seq_len": 64, "forward_batch_size": 8,
    }),
    "INSTRUCTLOOP_LEARNER_EVALUATION": json.dumps({
        "do_sample": True, "temperature": TEMPERATURE, "max_new_tokens": MAX_TOKENS, "batch_size": 8,
    }),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def learner_metrics(url: str) -> dict[str, float]:
    """The learner's gauges and counters we plot, from its /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"learner_rm_heldout_accuracy", "learner_reward_mean", "learner_kl", "learner_promotions_total",
              "learner_rejections_total", "learner_ppo_rounds_total", "learner_rm_updates_total"}
    values: dict[str, float] = {}
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return values
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                policy = sample.labels.get("policy")
                values[f"{sample.name}:{policy}" if policy else sample.name] = sample.value
    if not values.get("learner_rm_updates_total"):
        values.pop("learner_rm_heldout_accuracy", None)  # an unset gauge reads 0 before the first RM update
    return values


def wait_for_stack(proc: subprocess.Popen, run_dir: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"instructloop up exited with {proc.returncode}; see {run_dir}/up.log")
        stack_file = StackFile.path(run_dir)
        if stack_file.exists():
            return StackFile.read(run_dir)
        time.sleep(0.5)
    raise SystemExit(f"the stack was not up within {timeout_s}s; see {run_dir}/up.log")


def plot(rows: list[dict], baseline_rate: float, preference: str, path: Path, model: str = "default") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["rankings"] for r in rows]
    panels = [
        ("reward-model held-out accuracy", [("learner_rm_heldout_accuracy", "pairwise accuracy")]),
        ("mean RM reward on held-out prompts (gate)",
         [("learner_reward_mean:candidate", "candidate"), ("learner_reward_mean:incumbent", "incumbent")]),
        ("KL to the reference (nats / response)", [("learner_kl:candidate", "candidate"),
                                                   ("learner_kl:incumbent", "incumbent")]),
        (f"win-rate of the served version vs base ({preference})", [("win_rate", "served version")]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, series) in zip(axes.flat, panels, strict=True):
        drawn = False
        for key, label in series:
            points = [(xi, r[key]) for xi, r in zip(x, rows, strict=True) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no value yet in this run\n(the learner had not reached this step)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")
        if title.startswith("win-rate"):
            ax.set_ylim(0.0, 1.0)  # a full scale: noise of a few points must not look like a trend
            ax.axhline(baseline_rate, color="grey", linestyle="--", label=f"base vs itself ({baseline_rate:.2f})")
            for r in rows:
                if r.get("new_version"):
                    ax.annotate(r["served_version"], (r["rankings"], r["win_rate"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 4))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rankings posted")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        top = ax.secondary_xaxis("top", functions=(
            lambda v: _interp(v, x, [r["wall_s"] for r in rows]), lambda v: _interp(v, [r["wall_s"] for r in rows], x)))
        top.set_xlabel("wall time (s)", fontsize=8)
    name = "SmolLM2-135M-Instruct" if model == "default" else Path(model).name
    fig.suptitle(f"instructloop on {name}: scripted feedback over HTTP → served policy", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _interp(values, xs: list[float], ys: list[float]):
    import numpy as np

    return np.interp(values, xs, ys) if len(xs) > 1 else values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=600.0, help="Labeling time after the stack is up.")
    parser.add_argument("--preference", default="shorter")
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--run-dir", type=Path, default=None, help="Default: a temporary folder.")
    parser.add_argument("--name", default="learning_curve", help="Base name of the JSON and PNG written to --out.")
    parser.add_argument("--replot", type=Path, default=None, help="Only redraw the PNG from a learning_curve.json.")
    args = parser.parse_args()
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        plot(saved["rows"], saved["baseline_win_rate"], saved["preference"], args.replot.with_suffix(".png"),
             saved.get("model", "default"))
        return

    preference = load_preference(args.preference)
    train, heldout = read_prompts(DEFAULT_PROMPTS), read_prompts(DEFAULT_HELDOUT_PROMPTS)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="instructloop-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **LEARNER_ENV}
    argv = [sys.executable, "-m", "launcher.cli", "up", "--run-dir", str(run_dir), "--model", args.model,
            "--port", str(free_port()), "--stop-timeout", "30"]
    print(f"run dir: {run_dir}\nlearner settings: {json.dumps(LEARNER_ENV, indent=1)}", flush=True)
    started = time.monotonic()
    with open(run_dir / "up.log", "wb") as log_file:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    rows: list[dict] = []
    try:
        stack = wait_for_stack(proc, run_dir, 900)
        startup_s = time.monotonic() - started
        keys = json.loads(Path(stack.keys_file).read_text())
        metrics_url = stack.components["learner"].url
        print(f"stack up in {startup_s:.0f}s", flush=True)
        with GatewayClient(stack.gateway_url, keys["labeler"], timeout=600) as client:
            base = record(client, heldout, n=WINRATE_N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=1)
            again = record(client, heldout, n=WINRATE_N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=2)
            baseline_rate = win_rate(again["responses"], base["responses"], preference).rate
            print(f"baseline: base vs its own recording {baseline_rate:.3f}", flush=True)
            t0, rankings, served, current_rate = time.monotonic(), 0, "base", baseline_rate
            rows.append({"round": 0, "rankings": 0, "wall_s": 0.0, "served_version": "base", "win_rate": baseline_rate,
                         "new_version": False, **learner_metrics(metrics_url)})
            round_index = 0
            while time.monotonic() - t0 < args.budget_s:
                round_index += 1
                summary = simulate(client, train, preference, rounds=1, k=K, max_tokens=MAX_TOKENS,
                                   temperature=TEMPERATURE, seed=round_index * 100_000)
                rankings += summary.rankings_posted
                latest = summary.versions[-1] if summary.versions else served
                new_version = latest != served
                if new_version:
                    served = latest
                    now = record(client, heldout, n=WINRATE_N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE,
                                 seed=1000 + round_index)
                    current_rate = win_rate(now["responses"], base["responses"], preference).rate
                row = {"round": round_index, "rankings": rankings, "wall_s": round(time.monotonic() - t0, 1),
                       "served_version": served, "win_rate": current_rate, "new_version": new_version,
                       "labeler_errors": summary.errors, **learner_metrics(metrics_url)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if proc.poll() is not None:
                    print(f"instructloop up exited with {proc.returncode}; see {run_dir}/up.log", flush=True)
                    break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": "PYTHONPATH=. python bench/learning_curve.py " + " ".join(sys.argv[1:]),
              "model": args.model, "preference": args.preference, "k": K, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE,
              "startup_s": round(startup_s, 1), "baseline_win_rate": baseline_rate, "learner_env": LEARNER_ENV,
              "cpus": os.cpu_count(), "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(rows, baseline_rate, args.preference, args.out / f"{args.name}.png", args.model)
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")


if __name__ == "__main__":
    main()
