"""bench/learning_curve.py's options and the pure parts of a run (no stack, no model, no process)."""

from __future__ import annotations

import pytest

import bench.learning_curve as learning_curve
from labeler.preferences import DEFAULT_HELDOUT_PROMPTS, DEFAULT_PROMPTS, load_preference


def test_defaults_are_the_labelers_prompts_no_noise_and_no_early_stop():
    args = learning_curve.parse_args([])
    assert (args.prompts, args.heldout_prompts) == (DEFAULT_PROMPTS, DEFAULT_HELDOUT_PROMPTS)
    assert args.flip == 0.0 and args.until_win_rate is None and args.budget_s == 1800.0


def test_prompt_files_flip_and_until_win_rate_are_options(tmp_path):
    train, heldout = tmp_path / "train.txt", tmp_path / "heldout.txt"
    args = learning_curve.parse_args(
        [
            "--prompts",
            str(train),
            "--heldout-prompts",
            str(heldout),
            "--flip",
            "0.25",
            "--until-win-rate",
            "0.8",
        ]
    )
    assert (args.prompts, args.heldout_prompts, args.flip, args.until_win_rate) == (train, heldout, 0.25, 0.8)
    assert learning_curve._relative(DEFAULT_PROMPTS) == "labeler/data/prompts.txt"  # as the JSON stores it
    assert learning_curve._relative(train) == str(train.resolve())


@pytest.mark.parametrize("flip", ["-0.1", "1.5"])
def test_a_flip_that_is_not_a_probability_is_refused(flip, capsys):
    with pytest.raises(SystemExit):
        learning_curve.parse_args(["--flip", flip])
    assert "--flip must be a probability" in capsys.readouterr().err


def test_until_win_rate_stops_on_a_served_version_only():
    row = {"served_version": "v0001", "win_rate": 0.8}
    assert learning_curve.reached_target(row, 0.75)
    assert learning_curve.reached_target({**row, "win_rate": 0.75}, 0.75)
    assert not learning_curve.reached_target({**row, "win_rate": 0.7}, 0.75)
    assert not learning_curve.reached_target({"served_version": "base", "win_rate": 0.9}, 0.75)
    assert not learning_curve.reached_target(row, None)


def test_answer_stats_has_share_mean_score_and_length():
    stats = learning_curve.answer_stats(
        {"p": ["The sea.", "A cat"], "q": ["The end"]}, load_preference("start:The")
    )
    assert stats == pytest.approx({"satisfied_share": 2 / 3, "score_mean": 2 / 3, "length_mean": 20 / 3})


def test_served_kl_is_the_gates_candidate_kl_of_that_version(monkeypatch):
    listing = {
        "object": "list",
        "current": "v0002",
        "data": [
            {"version": "v0001", "metrics": {"candidate_kl": 0.5}},
            {"version": "v0002", "metrics": {"candidate_kl": 0.9, "incumbent_kl": 0.5}},
        ],
    }
    calls = []

    class Response:
        def json(self):
            return listing

    def fake_get(url, headers, timeout):
        calls.append((url, headers))
        return Response()

    monkeypatch.setattr(learning_curve.httpx, "get", fake_get)
    assert learning_curve.served_kl("http://gw/", "admin-key", "v0002") == 0.9
    assert calls == [("http://gw/v1/admin/policies", {"Authorization": "Bearer admin-key"})]
    assert learning_curve.served_kl("http://gw", "k", "v0009") is None
    assert learning_curve.served_kl("http://gw", "k", "base") == 0.0 and len(calls) == 2


def test_plot_label_names_the_noise():
    assert learning_curve._label({"preference": "start:The"}) == "start:The"
    assert (
        learning_curve._label({"preference": "start:The", "flip": 0.25}) == "start:The, 0.25 of pairs flipped"
    )
