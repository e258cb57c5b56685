"""Preference panel: the whole loop (bench/learning_curve.py) on several preferences, prompt sets and noise.

    PYTHONPATH=. python bench/learning_panel.py [--out docs/panel] [--only SLUG] [--force]
        [--budget-s 1800] [--until-win-rate X] [--model default]
    PYTHONPATH=. python bench/learning_panel.py --summarise [--out docs/panel]

Runs the panel's entries one after the other (each one is a preference, a prompt set, ``labeler`` =
labeler/data or ``b`` = bench/data/*_b.txt, the noisy labeler's flip probability and a labeling budget),
each as ``bench/learning_curve.py --out OUT --name panel_<slug>`` in its own process (its own stack); an
entry whose ``OUT/panel_<slug>.json`` exists is skipped unless ``--force`` (a run cut short leaves a JSON
without ``finished``: the summary marks it, ``--only SLUG --force`` reruns it). ``--only SLUG`` runs one
entry. Then, or alone with ``--summarise``, it reads every ``OUT/panel_*.json`` and writes one markdown
table, one row per run (to stdout and ``OUT/learning_panel.md``), and one plot of every run's win-rate
against wall time (``OUT/learning_panel.png``). The summary is computed from the JSONs alone
(``summarise_run``); what each column means is in docs/benchmarks.md, "Preference panel".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labeler.preferences import DEFAULT_HELDOUT_PROMPTS, DEFAULT_PROMPTS  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPT_SETS: dict[str, tuple[Path, Path]] = {
    "labeler": (DEFAULT_PROMPTS, DEFAULT_HELDOUT_PROMPTS),
    "b": (DATA_DIR / "prompts_b.txt", DATA_DIR / "heldout_prompts_b.txt"),
}
"""Prompt set name -> (training prompts, held-out prompts)."""

TARGET_WIN_RATE = 0.75
DEFAULT_BUDGET_S = 1800.0
DEFAULT_OUT = ROOT / "docs" / "panel"
# A word in about 25 % of the base's answers: "you" is in 26 % of 380 base answers (K = 4, T 0.7, 48 tokens)
# to the labeler's chat prompts; each run's JSON gives its base share on its own held-out prompts.
WITH_WORD = "you"
PANEL_PREFERENCE = "bench.panel_preferences:quantity_density"
NOISY_FLIP = 0.25
_BUILTIN_HEADS = ("start", "with", "without")


@dataclass(frozen=True)
class Entry:
    """One run of the panel: ``bench/learning_curve.py`` with these options."""

    preference: str
    prompt_set: str  # a key of PROMPT_SETS
    flip: float = 0.0
    budget_s: float = DEFAULT_BUDGET_S

    @property
    def slug(self) -> str:
        """``<preference>_<prompt set>[_flip<percent>]``, lower case; a ``module:function`` preference is
        named by its function: ``start_the_labeler``, ``quantity_density_b_flip25``."""
        head, sep, tail = self.preference.partition(":")
        name = tail if sep and head not in _BUILTIN_HEADS else self.preference
        slug = f"{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}_{self.prompt_set}"
        return slug + (f"_flip{round(self.flip * 100):02d}" if self.flip else "")

    @property
    def name(self) -> str:
        return f"panel_{self.slug}"


def default_entries(budget_s: float = DEFAULT_BUDGET_S) -> list[Entry]:
    """start:The, with:WITH_WORD, the panel preference and the panel preference with a noisy labeler
    (NOISY_FLIP), each on both prompt sets."""
    specs = [
        ("start:The", 0.0),
        (f"with:{WITH_WORD}", 0.0),
        (PANEL_PREFERENCE, 0.0),
        (PANEL_PREFERENCE, NOISY_FLIP),
    ]
    return [Entry(spec, prompt_set, flip, budget_s) for spec, flip in specs for prompt_set in PROMPT_SETS]


def entry_argv(
    entry: Entry, out: Path, *, until_win_rate: float | None = None, model: str = "default"
) -> list[str]:
    """The ``bench/learning_curve.py`` command line of one entry."""
    train, heldout = PROMPT_SETS[entry.prompt_set]
    argv = [
        sys.executable,
        str(ROOT / "bench" / "learning_curve.py"),
        "--preference",
        entry.preference,
        "--prompts",
        str(train),
        "--heldout-prompts",
        str(heldout),
        "--flip",
        str(entry.flip),
        "--budget-s",
        str(entry.budget_s),
        "--model",
        model,
        "--out",
        str(out),
        "--name",
        entry.name,
    ]
    if until_win_rate is not None:
        argv += ["--until-win-rate", str(until_win_rate)]
    return argv


def run_entries(
    entries: Sequence[Entry],
    out: Path,
    *,
    force: bool = False,
    until_win_rate: float | None = None,
    model: str = "default",
    runner: Callable[[list[str]], int] | None = None,
) -> dict[str, str]:
    """Run the entries in order; returns slug -> ``"skipped"``, ``"ran"`` or ``"failed (exit N)"``.

    An entry whose JSON exists in ``out`` is skipped unless ``force``. ``runner`` runs one command line and
    returns its exit status (default: a subprocess in the repository root with ``PYTHONPATH`` set); a
    failed entry is reported and the next one runs."""
    runner = runner or _run_subprocess
    out.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}
    for entry in entries:
        path = out / f"{entry.name}.json"
        if path.exists() and not force:
            print(f"[panel] {entry.slug}: {path} exists, skipped (--force to rerun)", flush=True)
            outcome[entry.slug] = "skipped"
            continue
        argv = entry_argv(entry, out, until_win_rate=until_win_rate, model=model)
        print(f"[panel] {entry.slug}: {' '.join(argv[1:])}", flush=True)
        returncode = runner(argv)
        outcome[entry.slug] = "ran" if returncode == 0 else f"failed (exit {returncode})"
        print(f"[panel] {entry.slug}: {outcome[entry.slug]}", flush=True)
    return outcome


def _run_subprocess(argv: list[str]) -> int:
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode


# ---- the summary, from the JSONs alone ----------------------------------------------------------


def prompt_set_name(result: dict) -> str:
    """The PROMPT_SETS name of a run's training prompts; the file name for another file. A JSON without
    ``prompts_file`` was written before the option existed: the labeler's prompts."""
    prompts_file = result.get("prompts_file")
    if prompts_file is None:
        return "labeler"
    for name, (train, _) in PROMPT_SETS.items():
        if Path(prompts_file).name == train.name:
            return name
    return Path(prompts_file).name


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def summarise_run(result: dict, target: float = TARGET_WIN_RATE) -> dict:
    """One run's panel row from its ``learning_curve.py`` JSON.

    Times are ``wall_s`` of the rows: seconds of labeling (after stack start-up and the base recordings)
    at the end of the round in which the labeler first saw that version served. ``first_promotion_s``: the
    first row serving a version other than the base; ``target_s``: the first row whose served version (not
    the base) was measured at a win-rate >= ``target``; None when it did not happen. ``final_*``: the last
    row. ``kl``: the served version's KL to the reference as the gate measured it (``served_kl``; 0 for
    the base; None in JSONs from before it was recorded). ``finished``: False for a run cut short."""
    rows = result.get("rows") or []
    last = rows[-1] if rows else {}
    served_rows = [r for r in rows if r.get("served_version", "base") != "base"]
    reached = [r for r in served_rows if _finite(r.get("win_rate")) and r["win_rate"] >= target]
    base = result.get("base_answers") or {}
    flipped = result.get("flipped_pair_share", last.get("flipped_pair_share"))
    return {
        "preference": result.get("preference"),
        "prompt_set": prompt_set_name(result),
        "flip": result.get("flip", 0.0),
        "flipped_pair_share": flipped,
        "base_share": base.get("satisfied_share"),
        "base_length_mean": base.get("length_mean"),
        "first_promotion_s": served_rows[0]["wall_s"] if served_rows else None,
        "target_s": reached[0]["wall_s"] if reached else None,
        "target": target,
        "final_version": last.get("served_version"),
        "final_win_rate": last.get("win_rate"),
        "final_share": last.get("satisfied_share"),
        "length_ratio": last.get("length_ratio"),
        "kl": 0.0 if last.get("served_version") == "base" else last.get("served_kl"),
        "rankings": last.get("rankings", 0),
        "wall_s": last.get("wall_s", 0.0),
        "budget_s": result.get("budget_s"),
        "stopped_early": bool(result.get("stopped_early")),
        # a JSON from before "stopped_early" existed cannot say whether its run finished: taken as finished
        "finished": bool(result.get("finished")) or "stopped_early" not in result,
    }


def load_runs(out: Path) -> dict[str, dict]:
    """Every ``panel_*.json`` in ``out`` by run name (the default entries' order first, then by name)."""
    order = {entry.name: i for i, entry in enumerate(default_entries())}
    paths = sorted(out.glob("panel_*.json"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    return {path.stem: json.loads(path.read_text()) for path in paths}


def _number(value, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def _seconds(value) -> str:
    return f"{value:.0f} s" if _finite(value) else "n/a"


COLUMNS = (
    "run",
    "preference",
    "prompts",
    "flip (realised)",
    "base share",
    "first promotion",
    "win-rate ≥ {target:g}",
    "final served win-rate",
    "length / base",
    "KL (nats)",
    "rankings",
)


def table_row(name: str, summary: dict) -> list[str]:
    """The cells of one run's row, in COLUMNS' order."""
    if summary["target_s"] is not None:
        reached = _seconds(summary["target_s"]) + (" (stopped)" if summary["stopped_early"] else "")
    elif not summary["finished"]:
        reached = f"not reached (run incomplete at {_seconds(summary['wall_s'])})"
    else:
        budget = summary["budget_s"]
        reached = f"not within budget ({_seconds(budget)})" if _finite(budget) else "not within budget"
    flip = summary["flip"] or 0.0
    realised = summary["flipped_pair_share"]
    return [
        f"`{name.removeprefix('panel_')}`",
        f"`{summary['preference']}`",
        summary["prompt_set"],
        f"{flip:g}" + (f" ({_number(realised)})" if _finite(realised) else ""),
        _number(summary["base_share"]),
        _seconds(summary["first_promotion_s"]) if summary["first_promotion_s"] is not None else "none",
        reached,
        f"{_number(summary['final_win_rate'])} ({summary['final_version']})",
        _number(summary["length_ratio"]),
        _number(summary["kl"]),
        str(summary["rankings"]),
    ]


def markdown_table(runs: dict[str, dict], target: float = TARGET_WIN_RATE) -> str:
    """One markdown table, one row per run (COLUMNS)."""
    header = [column.format(target=target) for column in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in runs.items():
        lines.append("| " + " | ".join(table_row(name, summarise_run(result, target))) + " |")
    return "\n".join(lines) + "\n"


def plot_panel(runs: dict[str, dict], path: Path, target: float = TARGET_WIN_RATE) -> None:
    """Every run's served win-rate (true preference, vs the base) against wall time, one line per run;
    noisy-labeler runs dashed, a dot where a new version was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    for name, result in runs.items():
        points = [
            (r["wall_s"], r["win_rate"]) for r in result.get("rows") or [] if _finite(r.get("win_rate"))
        ]
        if not points:
            continue
        flip = result.get("flip") or 0.0
        (line,) = ax.step(
            *zip(*points, strict=True),
            where="post",
            linestyle="--" if flip else "-",
            label=name.removeprefix("panel_"),
        )
        new = [(r["wall_s"], r["win_rate"]) for r in result["rows"] if r.get("new_version")]
        if new:
            ax.plot(*zip(*new, strict=True), "o", color=line.get_color(), markersize=4)
    ax.axhline(target, color="black", linewidth=0.8, linestyle=":", label=f"target {target:g}")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="base (0.5)")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("wall time of labeling (s)")
    ax.set_ylabel("served version's win-rate vs base (true preference)")
    ax.set_title("instructloop preference panel: scripted feedback over HTTP → served policy", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(out: Path, target: float = TARGET_WIN_RATE) -> str:
    """Write ``out/learning_panel.md`` and ``out/learning_panel.png`` from the panel JSONs in ``out``;
    returns the table (empty when there is no run)."""
    runs = load_runs(out)
    if not runs:
        return ""
    table = markdown_table(runs, target)
    (out / "learning_panel.md").write_text(table)
    plot_panel(runs, out / "learning_panel.png", target)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="Where the runs' JSONs and the summary go."
    )
    parser.add_argument("--only", metavar="SLUG", help="Run this entry only (see --list).")
    parser.add_argument("--force", action="store_true", help="Rerun entries whose JSON exists.")
    parser.add_argument("--summarise", action="store_true", help="Only write the table and plot.")
    parser.add_argument("--list", action="store_true", help="Print the entries' slugs and commands.")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="Labeling budget per run.")
    parser.add_argument(
        "--until-win-rate", type=float, default=None, metavar="X", help="Passed to each run (default: none)."
    )
    parser.add_argument("--model", default="default", help="Passed to each run.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, runner: Callable[[list[str]], int] | None = None) -> int:
    args = parse_args(argv)
    entries = default_entries(args.budget_s)
    if args.list:
        for entry in entries:
            print(
                f"{entry.slug}: {' '.join(entry_argv(entry, args.out, until_win_rate=args.until_win_rate))}"
            )
        return 0
    failed = False
    if not args.summarise:
        if args.only is not None:
            entries = [entry for entry in entries if entry.slug == args.only]
            if not entries:
                slugs = ", ".join(entry.slug for entry in default_entries())
                print(f"no panel entry {args.only!r}; the entries are: {slugs}", file=sys.stderr)
                return 2
        outcome = run_entries(
            entries,
            args.out,
            force=args.force,
            until_win_rate=args.until_win_rate,
            model=args.model,
            runner=runner,
        )
        failed = any(value.startswith("failed") for value in outcome.values())
    table = summarise(args.out)
    if not table:
        print(f"no panel_*.json in {args.out}: nothing to summarise", file=sys.stderr)
        return 1
    print(table, end="")
    print(f"wrote {args.out / 'learning_panel.md'} and {args.out / 'learning_panel.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
