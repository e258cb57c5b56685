"""Learning curve of the whole loop on the default model: preference feedback in, preferred answers out.

    PYTHONPATH=. python bench/learning_curve.py [--budget-s 1800] [--preference start:The] [--out docs]
        [--prompts FILE] [--heldout-prompts FILE] [--flip P] [--until-win-rate X]

The end-to-end test (tests/test_loop_e2e.py) on the real SmolLM2-135M-Instruct: ``instructloop up``
starts Redis, serve, the gateway and the learner as real processes (the learner with its shipped
defaults and only the documented threshold knobs set for 16 prompts); the base version's answers on the
held-out prompts (``--heldout-prompts``) are recorded; then the scripted labeler ranks K=4 CHAT completions
per training prompt (``--prompts``; ``/v1/chat/completions``, one pass over the file a round, over HTTP
only) until the time budget is spent, or, with ``--until-win-rate X``, until a served version (not the
base) has been measured at a win-rate >= X (``stopped_early`` and ``stopped_at_s`` in the JSON). The
held-out prompts are never used for feedback. With ``--flip P`` the labeler is noisy: each (winner, loser)
pair of a ranking is flipped with probability P before it is posted (``labeler.preferences.noisy_ranking``,
seeded); the win-rate is always measured with the true preference, and every row records the share of
the posted pairs so far that disagree with it (``flipped_pair_share``). After every round it records the
rankings posted so far, wall time, the learner's Prometheus metrics (reward-model held-out pairwise
accuracy, mean held-out RM reward and KL of the last candidate and incumbent the gate compared, the
held-out pretraining NLL of the working policy against the reference, promotions, rejections, PPO
rounds) and the served version; each time a new version is served it reads that version's KL to the
reference from the gate's metrics (``/v1/admin/policies``, ``served_kl``) and
measures the preference's win-rate of that version against the recorded base answers (every new answer
against every base answer of the same prompt, ties half; the same version has the same win-rate, so
it is measured once per version). The base version's win-rate against its own recording is measured
first: the in-run baseline (≈ 0.5). Each measurement also records the share of answers that satisfy the
preference (score > 0), their mean score and their mean length (characters), base and served, to show the
change is the preference and not length.

Writes ``<out>/<name>.json`` (every row) and ``<out>/<name>.png`` (name: ``learning_curve``) (panels against
rankings posted, with wall time on a secondary axis). The learner settings (the threshold knobs, and any
``--learner-env`` overrides) are printed and stored with the rows. The JSON holds what a summary of the run
needs without the rows' meaning being guessed: the budget, the prompt files and prompts, the flip
probability, ``base_answers`` (share, mean score, mean length), every row (``wall_s``, ``rankings``,
``served_version``, ``win_rate``, ``length_ratio``, ``served_kl``, ``flipped_pair_share``, the learner's
metrics), ``stopped_early``, and ``finished: true`` once the run ended normally (a run cut short keeps its
rows without it).
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
from labeler.client import GatewayClient, LabelerError, record, simulate  # noqa: E402
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
    # the documented threshold knobs (README, "The knobs that matter"), sized for 16 prompts, of which the
    # learner's split keeps at least 4 out (heldout_min_prompts), more when the 10 % hash share holds more
    "INSTRUCTLOOP_LEARNER_MIN_NEW_COMPARISONS": "8",
    "INSTRUCTLOOP_LEARNER_MIN_PROMPTS": "8",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def learner_metrics(url: str) -> dict[str, float]:
    """The learner's gauges and counters we plot, from its /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "learner_rm_heldout_accuracy",
        "learner_reward_mean",
        "learner_kl",
        "learner_promotions_total",
        "learner_rejections_total",
        "learner_ppo_rounds_total",
        "learner_rm_updates_total",
        "learner_ptx_heldout_nll",
    }
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
    if not values.get("learner_rm_updates_total") or not values.get("learner_rm_heldout_accuracy"):
        # an unset gauge reads 0: before the first RM update, or while no held-out comparison existed yet
        values.pop("learner_rm_heldout_accuracy", None)
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
        (f"win-rate of the served version vs base ({preference})", [("win_rate", "served version")]),
        ("reward-model held-out accuracy", [("learner_rm_heldout_accuracy", "pairwise accuracy")]),
        (
            "mean RM reward on held-out prompts (gate)",
            [("learner_reward_mean:candidate", "candidate"), ("learner_reward_mean:incumbent", "incumbent")],
        ),
        (
            "KL to the reference (nats / response)",
            [("learner_kl:candidate", "candidate"), ("learner_kl:incumbent", "incumbent")],
        ),
        (
            "NLL on held-out pretraining text (alignment tax)",
            [
                ("learner_ptx_heldout_nll:policy", "working policy"),
                ("learner_ptx_heldout_nll:reference", "reference"),
            ],
        ),
        (
            "served answers on held-out prompts",
            [
                ("satisfied_share", "share satisfying the preference"),
                ("length_ratio", "mean length / base's"),
            ],
        ),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(11, 11))
    for ax, (title, series) in zip(axes.flat, panels, strict=True):
        drawn = False
        for key, label in series:
            points = [
                (xi, r[key])
                for xi, r in zip(x, rows, strict=True)
                if r.get(key) is not None and not (key == "learner_rm_heldout_accuracy" and r[key] == 0.0)
            ]  # 0.0: not measured yet
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
                drawn = True
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "no value yet in this run\n(the learner had not reached this step)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=9,
                color="grey",
            )
        if title.startswith("win-rate"):
            ax.set_ylim(0.0, 1.0)  # a full scale: noise of a few points must not look like a trend
            ax.axhline(
                baseline_rate, color="grey", linestyle="--", label=f"base vs itself ({baseline_rate:.2f})"
            )
            for r in rows:
                if r.get("new_version"):
                    ax.annotate(
                        r["served_version"],
                        (r["rankings"], r["win_rate"]),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(3, 4),
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rankings posted")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        top = ax.secondary_xaxis(
            "top",
            functions=(
                lambda v: _interp(v, x, [r["wall_s"] for r in rows]),
                lambda v: _interp(v, [r["wall_s"] for r in rows], x),
            ),
        )
        top.set_xlabel("wall time (s)", fontsize=8)
    name = "SmolLM2-135M-Instruct" if model == "default" else Path(model).name
    fig.suptitle(f"instructloop on {name}: scripted feedback over HTTP → served policy", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _interp(values, xs: list[float], ys: list[float]):
    import numpy as np

    return np.interp(values, xs, ys) if len(xs) > 1 else values


def answer_stats(responses: dict[str, list[str]], preference) -> dict[str, float]:
    """Share of answers the preference scores above 0 (for with:WORD: the share containing WORD), their
    mean score and the mean answer length in characters."""
    texts = [t for ts in responses.values() for t in ts]
    scores = [preference(t) for t in texts]
    return {
        "satisfied_share": sum(score > 0 for score in scores) / len(scores),
        "score_mean": sum(scores) / len(scores),
        "length_mean": sum(len(t) for t in texts) / len(texts),
    }


def served_kl(gateway_url: str, admin_key: str, version: str) -> float | None:
    """KL to the reference (nats per response) the gate measured for ``version`` when it was a candidate
    (``candidate_kl`` of its metrics in ``/v1/admin/policies``); 0 for the base; None if not listed."""
    if version == "base":
        return 0.0
    try:
        listing = httpx.get(
            f"{gateway_url.rstrip('/')}/v1/admin/policies",
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=30,
        ).json()
    except (httpx.HTTPError, ValueError):
        return None
    for policy in listing.get("data", []) if isinstance(listing, dict) else []:
        if policy.get("version") == version:
            return policy.get("metrics", {}).get("candidate_kl")
    return None


def reached_target(row: dict, until_win_rate: float | None) -> bool:
    """Whether ``--until-win-rate`` stops the run after ``row``: a served version other than the base,
    measured at a win-rate >= the target."""
    return (
        until_win_rate is not None
        and row["served_version"] != "base"
        and row.get("win_rate") is not None
        and row["win_rate"] >= until_win_rate
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=1800.0, help="Labeling time after the stack is up.")
    parser.add_argument("--preference", default="start:The")
    parser.add_argument(
        "--prompts",
        type=Path,
        default=DEFAULT_PROMPTS,
        help="The scripted labeler's training prompts, one a line (default: labeler/data/prompts.txt).",
    )
    parser.add_argument(
        "--heldout-prompts",
        type=Path,
        default=DEFAULT_HELDOUT_PROMPTS,
        help="Held-out prompts the win-rate is measured on, never labeled (default: "
        "labeler/data/heldout_prompts.txt).",
    )
    parser.add_argument(
        "--flip",
        type=float,
        default=0.0,
        metavar="P",
        help="A noisy labeler: flip each (winner, loser) pair of a ranking with probability P before posting "
        "(ranked by wins, equal wins tied; seeded). The win-rate uses the true preference.",
    )
    parser.add_argument(
        "--until-win-rate",
        type=float,
        default=None,
        metavar="X",
        help="Stop labeling once a served version (not the base) is measured at a win-rate >= X.",
    )
    parser.add_argument(
        "--learner-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Extra INSTRUCTLOOP_LEARNER_* settings (repeatable), stored with the result.",
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--run-dir", type=Path, default=None, help="Default: a temporary folder.")
    parser.add_argument(
        "--name", default="learning_curve", help="Base name of the JSON and PNG written to --out."
    )
    parser.add_argument(
        "--replot", type=Path, default=None, help="Only redraw the PNG from a learning_curve.json."
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.flip <= 1.0:
        parser.error(f"--flip must be a probability in [0, 1], got {args.flip}")
    return args


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        plot(
            saved["rows"],
            saved["baseline_win_rate"],
            _label(saved),
            args.replot.with_suffix(".png"),
            saved.get("model", "default"),
        )
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its stack
    preference = load_preference(args.preference)
    train, heldout = read_prompts(args.prompts), read_prompts(args.heldout_prompts)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="instructloop-bench-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    learner_env = {**LEARNER_ENV, **dict(item.split("=", 1) for item in args.learner_env)}
    # on a loaded machine a K=4 chat completion can wait minutes for serve: the gateway must not give up first
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INSTRUCTLOOP_GATEWAY_BACKEND_TIMEOUT_S": "900",
        **learner_env,
    }
    argv = [
        sys.executable,
        "-m",
        "launcher.cli",
        "up",
        "--run-dir",
        str(run_dir),
        "--model",
        args.model,
        "--port",
        str(free_port()),
        "--stop-timeout",
        "30",
    ]
    print(f"run dir: {run_dir}\nlearner settings: {json.dumps(learner_env, indent=1)}", flush=True)
    started = time.monotonic()
    with open(run_dir / "up.log", "wb") as log_file:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": "PYTHONPATH=. python bench/learning_curve.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "preference": args.preference,
        "budget_s": args.budget_s,
        "prompts_file": _relative(args.prompts),
        "heldout_prompts_file": _relative(args.heldout_prompts),
        "prompts": train,
        "heldout_prompts": heldout,
        "flip": args.flip,
        "until_win_rate": args.until_win_rate,
        "stopped_early": False,
        "k": K,
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "learner_env": learner_env,
        "chat": True,
        "cpus": os.cpu_count(),
        "rows": rows,
    }

    def save() -> None:  # after every round: a run cut short still leaves its rows
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))

    try:
        stack = wait_for_stack(proc, run_dir, 900)
        startup_s = time.monotonic() - started
        keys = json.loads(Path(stack.keys_file).read_text())
        metrics_url = stack.components["learner"].url
        print(f"stack up in {startup_s:.0f}s", flush=True)
        result["startup_s"] = round(startup_s, 1)
        with GatewayClient(stack.gateway_url, keys["labeler"], timeout=600, chat=True) as client:
            base = record(
                client, heldout, n=WINRATE_N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=1
            )
            again = record(
                client, heldout, n=WINRATE_N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=2
            )
            baseline_rate = win_rate(again["responses"], base["responses"], preference).rate
            base_stats = answer_stats(base["responses"], preference)
            print(
                f"baseline: base vs its own recording {baseline_rate:.3f}; base answers {base_stats}",
                flush=True,
            )
            result.update(baseline_win_rate=baseline_rate, base_answers=base_stats)
            t0, rankings, served, current_rate = time.monotonic(), 0, "base", baseline_rate
            current = {**answer_stats(again["responses"], preference), "served_kl": 0.0}
            current["length_ratio"] = current["length_mean"] / base_stats["length_mean"]
            pairs = {"pairs_posted": 0, "pairs_reversed": 0, "flipped_pair_share": None}
            rows.append(
                {
                    "round": 0,
                    "rankings": 0,
                    "wall_s": 0.0,
                    "served_version": "base",
                    "win_rate": baseline_rate,
                    "new_version": False,
                    **pairs,
                    **current,
                    **learner_metrics(metrics_url),
                }
            )
            round_index, ended_by = 0, "budget"
            while time.monotonic() - t0 < args.budget_s:
                round_index += 1
                try:
                    summary = simulate(
                        client,
                        train,
                        preference,
                        rounds=1,
                        k=K,
                        max_tokens=MAX_TOKENS,
                        temperature=TEMPERATURE,
                        seed=round_index * 100_000,  # also seeds the noisy labeler's flips
                        flip=args.flip,
                    )
                except LabelerError as exc:  # serve starved for minutes: note it, keep labeling
                    print(f"round {round_index}: {exc}", flush=True)
                    continue
                rankings += summary.rankings_posted
                pairs["pairs_posted"] += summary.pairs_posted
                pairs["pairs_reversed"] += summary.pairs_reversed
                if pairs["pairs_posted"]:
                    pairs["flipped_pair_share"] = pairs["pairs_reversed"] / pairs["pairs_posted"]
                latest = summary.versions[-1] if summary.versions else served
                new_version = latest != served
                if new_version:
                    served = latest
                    now = record(
                        client,
                        heldout,
                        n=WINRATE_N,
                        max_tokens=MAX_TOKENS,
                        temperature=TEMPERATURE,
                        seed=1000 + round_index,
                    )
                    current_rate = win_rate(now["responses"], base["responses"], preference).rate
                    current = answer_stats(now["responses"], preference)
                    current["length_ratio"] = current["length_mean"] / base_stats["length_mean"]
                    current["served_kl"] = served_kl(stack.gateway_url, keys.get("admin", ""), served)
                row = {
                    "round": round_index,
                    "rankings": rankings,
                    "wall_s": round(time.monotonic() - t0, 1),
                    "served_version": served,
                    "win_rate": current_rate,
                    "new_version": new_version,
                    "labeler_errors": summary.errors,
                    **pairs,
                    **current,
                    **learner_metrics(metrics_url),
                }
                rows.append(row)
                save()
                print(json.dumps(row), flush=True)
                if reached_target(row, args.until_win_rate):
                    result.update(stopped_early=True, stopped_at_s=row["wall_s"])
                    ended_by = "until_win_rate"
                    print(
                        f"stopped early: {served} at win-rate {row['win_rate']:.3f} >= {args.until_win_rate} "
                        f"after {row['wall_s']:.0f}s",
                        flush=True,
                    )
                    break
                if proc.poll() is not None:
                    print(f"instructloop up exited with {proc.returncode}; see {run_dir}/up.log", flush=True)
                    ended_by = "stack_exited"
                    break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    result.update(finished=True, ended_by=ended_by, flipped_pair_share=pairs["flipped_pair_share"])
    save()
    print(
        f"posted pairs that disagree with the preference: {pairs['pairs_reversed']} of "
        f"{pairs['pairs_posted']} (flipped_pair_share {pairs['flipped_pair_share']}, --flip {args.flip})",
        flush=True,
    )
    plot(rows, result["baseline_win_rate"], _label(result), args.out / f"{args.name}.png", args.model)
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")


def _label(result: dict) -> str:
    """The preference as the plot names it: with the flip probability of a noisy labeler."""
    flip = result.get("flip") or 0.0
    return result["preference"] + (f", {flip:g} of pairs flipped" if flip else "")


if __name__ == "__main__":
    main()
