"""bench/learning_panel.py: entries, skipping, and the summary table and plot from synthetic run JSONs
(no subprocess, no stack)."""

from __future__ import annotations

import json

import pytest

import bench.learning_curve as learning_curve
import bench.learning_panel as panel
from labeler.preferences import load_preference


def _row(wall_s, rankings, served="base", win_rate=0.5, new=False, **extra):
    return {
        "round": int(wall_s // 30),
        "rankings": rankings,
        "wall_s": wall_s,
        "served_version": served,
        "win_rate": win_rate,
        "new_version": new,
        "satisfied_share": 0.3,
        "length_ratio": 1.0,
        **extra,
    }


def _result(entry: panel.Entry, rows, **extra) -> dict:
    """A run's JSON as bench/learning_curve.py writes it (the fields the summary reads)."""
    train, heldout = panel.PROMPT_SETS[entry.prompt_set]
    return {
        "preference": entry.preference,
        "budget_s": entry.budget_s,
        "prompts_file": learning_curve._relative(train),
        "heldout_prompts_file": learning_curve._relative(heldout),
        "flip": entry.flip,
        "until_win_rate": None,
        "stopped_early": False,
        "baseline_win_rate": 0.5,
        "base_answers": {"satisfied_share": 0.34, "score_mean": 0.34, "length_mean": 220.0},
        "rows": rows,
        "finished": True,
        "ended_by": "budget",
        **extra,
    }


LEARNED = panel.Entry("start:The", "labeler")
LEARNED_ROWS = [
    _row(0.0, 0, served_kl=0.0),
    _row(300.0, 64, served_kl=0.0),
    _row(600.0, 128, served="v0001", win_rate=0.62, new=True, served_kl=0.4, length_ratio=0.95),
    _row(900.0, 192, served="v0002", win_rate=0.81, new=True, served_kl=0.9, length_ratio=1.04),
    _row(1800.0, 400, served="v0002", win_rate=0.81, served_kl=0.9, length_ratio=1.04),
]
NOISY = panel.Entry(panel.PANEL_PREFERENCE, "b", 0.25)
NOISY_ROWS = [
    _row(0.0, 0, flipped_pair_share=None, served_kl=0.0),
    _row(1805.0, 380, flipped_pair_share=0.19, served_kl=0.0),
]


def _write(out, entry, result):
    (out / f"{entry.name}.json").write_text(json.dumps(result))


def test_default_entries_are_the_four_preferences_on_both_prompt_sets():
    entries = panel.default_entries()
    assert len(entries) == len({e.slug for e in entries}) == 8
    assert {e.prompt_set for e in entries} == {"labeler", "b"}
    assert {(e.preference, e.flip) for e in entries} == {
        ("start:The", 0.0),
        (f"with:{panel.WITH_WORD}", 0.0),
        (panel.PANEL_PREFERENCE, 0.0),
        (panel.PANEL_PREFERENCE, 0.25),
    }
    assert all(e.budget_s == 1800.0 for e in entries)
    assert [e.slug for e in entries][::2] == [
        "start_the_labeler",
        "with_you_labeler",
        "quantity_density_labeler",
        "quantity_density_labeler_flip25",
    ]
    assert NOISY.name == "panel_quantity_density_b_flip25"
    assert callable(load_preference(panel.PANEL_PREFERENCE))  # importable as the runs will import it


def test_entry_command_is_a_learning_curve_command_line(tmp_path):
    argv = panel.entry_argv(NOISY, tmp_path, until_win_rate=0.8)
    assert argv[1].endswith("bench/learning_curve.py")
    args = learning_curve.parse_args(argv[2:])  # the benchmark accepts it as it is
    assert (args.preference, args.flip, args.budget_s, args.until_win_rate) == (
        panel.PANEL_PREFERENCE,
        0.25,
        1800.0,
        0.8,
    )
    assert (args.prompts, args.heldout_prompts) == panel.PROMPT_SETS["b"]
    assert (args.out, args.name) == (tmp_path, "panel_quantity_density_b_flip25")
    assert "--until-win-rate" not in panel.entry_argv(NOISY, tmp_path)


def test_existing_runs_are_skipped_unless_forced_and_failures_reported(tmp_path):
    _write(tmp_path, LEARNED, _result(LEARNED, LEARNED_ROWS))
    ran = []

    def runner(argv):
        ran.append(argv[argv.index("--name") + 1])
        return 0 if "flip" not in ran[-1] else 3

    entries = [LEARNED, NOISY]
    outcome = panel.run_entries(entries, tmp_path, runner=runner)
    assert outcome == {"start_the_labeler": "skipped", "quantity_density_b_flip25": "failed (exit 3)"}
    assert ran == ["panel_quantity_density_b_flip25"]
    outcome = panel.run_entries(entries, tmp_path, force=True, runner=runner)
    assert outcome["start_the_labeler"] == "ran" and len(ran) == 3


def test_summary_of_a_run_that_reached_the_target():
    summary = panel.summarise_run(_result(LEARNED, LEARNED_ROWS))
    assert summary["prompt_set"] == "labeler" and summary["base_share"] == 0.34
    assert (summary["first_promotion_s"], summary["target_s"]) == (600.0, 900.0)
    assert (summary["final_version"], summary["final_win_rate"], summary["kl"]) == ("v0002", 0.81, 0.9)
    assert (summary["length_ratio"], summary["rankings"]) == (1.04, 400)
    cells = panel.table_row(LEARNED.name, summary)
    assert cells[0] == "`start_the_labeler`" and cells[5:] == [
        "600 s",
        "900 s",
        "0.81 (v0002)",
        "1.04",
        "0.90",
        "400",
    ]


def test_summary_of_runs_that_did_not_learn_stopped_early_or_were_cut_short():
    noisy = panel.summarise_run(_result(NOISY, NOISY_ROWS, flipped_pair_share=0.19))
    assert noisy["prompt_set"] == "b" and noisy["first_promotion_s"] is None and noisy["target_s"] is None
    cells = panel.table_row(NOISY.name, noisy)
    assert cells[3] == "0.25 (0.19)" and cells[5] == "none" and cells[6] == "not within budget (1800 s)"
    assert cells[7] == "0.50 (base)" and cells[9] == "0.00"  # the base's KL to itself

    stopped = _result(LEARNED, LEARNED_ROWS[:4], stopped_early=True, stopped_at_s=900.0)
    assert panel.table_row(LEARNED.name, panel.summarise_run(stopped))[6] == "900 s (stopped)"

    cut = _result(LEARNED, LEARNED_ROWS[:3], finished=False)
    assert (
        panel.table_row(LEARNED.name, panel.summarise_run(cut))[6] == "not reached (run incomplete at 600 s)"
    )
    # the win-rate threshold is a parameter: 0.6 was reached by v0001
    assert panel.summarise_run(cut, target=0.6)["target_s"] == 600.0


def test_summary_reads_a_json_from_before_the_panel_options():
    old = {
        "preference": "start:The",
        "base_answers": {"satisfied_share": 0.34375, "length_mean": 224.2},
        "rows": [_row(0.0, 0), _row(1208.4, 273)],
    }
    summary = panel.summarise_run(old)
    assert summary["prompt_set"] == "labeler" and summary["flip"] == 0.0 and summary["finished"]
    assert panel.table_row("panel_old", summary)[6] == "not within budget"


def test_summarise_writes_one_table_and_one_plot(tmp_path, capsys):
    _write(tmp_path, NOISY, _result(NOISY, NOISY_ROWS, flipped_pair_share=0.19))
    _write(tmp_path, LEARNED, _result(LEARNED, LEARNED_ROWS))
    (tmp_path / "learning_curve.json").write_text("{}")  # not a panel run: ignored
    assert panel.main(["--summarise", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "learning_panel.md").read_text()
    assert table in capsys.readouterr().out
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(panel.COLUMNS) + 1
    assert "win-rate ≥ 0.75" in lines[0]
    assert lines[2].startswith("| `start_the_labeler`")  # the default entries' order
    assert lines[3].startswith("| `quantity_density_b_flip25`")
    assert (tmp_path / "learning_panel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_runs_one_entry_then_summarises(tmp_path):
    def runner(argv):  # stands in for the benchmark: writes the JSON it was asked for
        name = argv[argv.index("--name") + 1]
        (tmp_path / f"{name}.json").write_text(json.dumps(_result(NOISY, NOISY_ROWS)))
        return 0

    assert panel.main(["--only", NOISY.slug, "--out", str(tmp_path)], runner=runner) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "learning_panel.md",
        "learning_panel.png",
        "panel_quantity_density_b_flip25.json",
    ]


@pytest.mark.parametrize(("argv", "code"), [(["--only", "nope"], 2), (["--summarise"], 1)])
def test_an_unknown_entry_or_nothing_to_summarise_is_an_error(tmp_path, argv, code, capsys):
    assert panel.main([*argv, "--out", str(tmp_path)]) == code
    assert "start_the_labeler" in capsys.readouterr().err or code == 1
