"""The scripted labeler's pure logic: preference functions, rankings with ties, plug-ins, win-rate."""

from __future__ import annotations

import random
import textwrap

import pytest
from typer.testing import CliRunner

from labeler.cli import app
from labeler.client import Completion, GatewayClient, LabelerError, record, simulate
from labeler.preferences import (
    DEFAULT_HELDOUT_PROMPTS,
    DEFAULT_PROMPTS,
    PreferenceError,
    load_preference,
    noisy_ranking,
    rank,
    rank_texts,
    read_prompts,
    reversed_pairs,
    score_texts,
    win_rate,
)


def test_rank_is_best_first_and_groups_ties():
    assert rank([0.0, 2.0, 0.0, 1.0]) == [[1], [3], [0, 2]]
    assert rank([5.0, 5.0, 5.0]) == [[0, 1, 2]]
    assert rank([-3.0, -1.0]) == [[1], [0]]
    assert rank([1.0, 2.0, 1.0, 2.0]) == [[1, 3], [0, 2]]


def test_rank_covers_every_index_once():
    scores = [0.5, -1.0, 0.5, 3.0, -1.0, 0.0]
    ranking = rank(scores)
    assert sorted(i for group in ranking for i in group) == list(range(len(scores)))
    group_scores = [scores[group[0]] for group in ranking]
    assert group_scores == sorted(set(scores), reverse=True)


@pytest.mark.parametrize(
    "scores",
    [[0.0, 2.0, 0.0, 1.0], [5.0, 5.0, 5.0], [-3.0, -1.0], [1.0, 2.0, 1.0, 2.0], [3.0, 1.0, 2.0, 0.0]],
)
def test_noisy_ranking_without_flips_is_the_ranking_and_with_all_flips_its_reverse(scores):
    rng = random.Random(0)
    assert noisy_ranking(scores, 0.0, rng) == rank(scores)
    assert noisy_ranking(scores, 1.0, rng) == rank([-s for s in scores])


def test_noisy_ranking_is_seeded_and_refuses_a_non_probability():
    scores = [0.3, 0.1, 0.9, 0.5, 0.7]
    draws = [noisy_ranking(scores, 0.4, random.Random(seed)) for seed in range(20)]
    assert draws == [noisy_ranking(scores, 0.4, random.Random(seed)) for seed in range(20)]
    assert len({str(d) for d in draws}) > 1  # the noise does change rankings
    for ranking in draws:
        assert sorted(i for group in ranking for i in group) == list(range(len(scores)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        noisy_ranking(scores, 1.5, random.Random(0))


def test_noisy_ranking_flips_each_pair_with_probability_p():
    rng = random.Random(7)
    flipped = sum(noisy_ranking([1.0, 0.0], 0.25, rng) == [[1], [0]] for _ in range(4000))
    assert flipped / 4000 == pytest.approx(0.25, abs=0.03)


def test_noisy_ranking_copeland_ties_equal_wins():
    class Script(random.Random):  # flips exactly the pair (0 beats 2): every answer then has one win
        def __init__(self):
            super().__init__(0)
            self.draws = iter([1.0, 0.0, 1.0])  # pairs (0, 1), (0, 2), (1, 2), in that order

        def random(self):
            return next(self.draws)

    assert noisy_ranking([3.0, 2.0, 1.0], 0.5, Script()) == [[0, 1, 2]]


def test_reversed_pairs_counts_posted_pairs_against_the_scores():
    scores = [3.0, 2.0, 1.0, 1.0]
    assert reversed_pairs(rank(scores), scores) == (0, 5)  # 2 and 3 tied: no pair between them
    assert reversed_pairs([[2], [0, 1], [3]], scores) == (2, 4)  # 2 over 0, 2 over 1; 2 over 3: not ordered
    assert reversed_pairs([[0, 1, 2, 3]], scores) == (0, 0)


class _ScriptedGateway:
    """A stand-in for GatewayClient (no server): every completion has the same K texts; records rankings."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.posted: list[list[list[int]]] = []

    def complete(self, prompt, n, max_tokens, temperature, seed=None, store=True):
        return Completion(id=f"cmpl-{seed}", texts=self.texts[:n], policy_version="base")

    def feedback(self, completion, ranking, rationale=None):
        self.posted.append(ranking)


def test_record_asks_per_request_at_a_time_with_distinct_seeds():
    """n above the gateway's cap is asked in several requests; every request has its own seed, and one
    request per prompt keeps the seed ``seed + i·n``."""
    asked: list[tuple[str, int, int]] = []

    class Gateway(_ScriptedGateway):
        def complete(self, prompt, n, max_tokens, temperature, seed=None, store=True):
            assert store is False
            asked.append((prompt, n, seed))
            return Completion(
                id=f"cmpl-{seed}", texts=[f"{prompt}:{seed}:{k}" for k in range(n)], policy_version="base"
            )

    recorded = record(Gateway([]), ["p1", "p2"], n=20, seed=100, per_request=8, concurrency=1)
    assert sorted(asked) == [
        ("p1", 4, 116),
        ("p1", 8, 100),
        ("p1", 8, 108),
        ("p2", 4, 136),
        ("p2", 8, 120),
        ("p2", 8, 128),
    ]
    assert (
        recorded["responses"]["p1"][:2] == ["p1:100:0", "p1:100:1"]
        and recorded["responses"]["p1"][-1] == "p1:116:3"
    )
    assert [len(texts) for texts in recorded["responses"].values()] == [20, 20]
    assert recorded["policy_versions"] == ["base"]
    asked.clear()
    assert record(Gateway([]), ["p1", "p2"], n=8, seed=100)["responses"]["p2"][0] == "p2:108:0"
    assert sorted(asked) == [("p1", 8, 100), ("p2", 8, 108)]
    with pytest.raises(ValueError, match="per_request"):
        record(Gateway([]), ["p1"], n=4, per_request=0)


def _simulate(flip: float, seed: int | None = 1):
    gateway = _ScriptedGateway(["a", "bb", "ccc", "dddd"])
    summary = simulate(
        gateway, ["p1", "p2", "p3"], load_preference("shorter"), rounds=4, k=4, seed=seed, flip=flip
    )
    return gateway.posted, summary


def test_simulate_posts_noisy_rankings_and_counts_the_flipped_pairs():
    posted, summary = _simulate(flip=0.0)
    assert posted == [[[0], [1], [2], [3]]] * 12
    assert (summary.pairs_posted, summary.pairs_reversed, summary.flipped_pair_share) == (72, 0, 0.0)
    posted, summary = _simulate(flip=1.0)
    assert posted == [[[3], [2], [1], [0]]] * 12 and summary.flipped_pair_share == 1.0
    posted, summary = _simulate(flip=0.3)
    assert posted == _simulate(flip=0.3)[0]  # seeded: the same noisy rankings again
    assert 0.0 < summary.flipped_pair_share < 0.5
    assert summary.as_dict()["flipped_pair_share"] == summary.flipped_pair_share
    assert summary.mean_score("base") == -2.5  # the true preference's scores, whatever was posted
    with pytest.raises(ValueError, match="flip"):
        _simulate(flip=-0.1)


def test_simulate_flip_option_on_the_cli():
    result = CliRunner().invoke(app, ["simulate", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--flip" in result.output and "noisy labeler" in result.output
    result = CliRunner().invoke(
        app, ["simulate", "--flip", "1.5", "--gateway-url", "http://127.0.0.1:9", "--api-key", "k"]
    )
    assert result.exit_code == 2 and "--flip" in result.output


def test_builtin_preferences():
    shorter = load_preference("shorter")
    assert rank_texts(["a long answer", "short", "mid answer"], shorter) == [[1], [2], [0]]

    without = load_preference("without:cat")
    assert score_texts(["the cat sat", "Cat and cat", "concatenate", "a dog"], without) == [
        -1.0,
        -2.0,
        0.0,
        0.0,
    ]
    assert rank_texts(["the cat sat", "Cat and cat", "concatenate", "a dog"], without) == [[2, 3], [0], [1]]

    with_word = load_preference("with:sea")
    assert score_texts(["the sea", "SEA sea", "season"], with_word) == [1.0, 1.0, 0.0]

    start = load_preference("start:The")
    assert score_texts(["The sea.", "  The\nend", "the sea", "Then", "", "A The"], start) == [
        1,
        1,
        0,
        0,
        0,
        0,
    ]
    with pytest.raises(PreferenceError, match="one word"):
        load_preference("start:The sea")


def test_punctuation_word_matches_as_substring():
    without_bang = load_preference("without:!")
    assert score_texts(["hi!!", "hi"], without_bang) == [-2.0, 0.0]


def test_plugin_preference_is_loaded_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_prefs.py").write_text(
        textwrap.dedent("""
        def vowels(text):
            return float(sum(c in "aeiou" for c in text))

        NOT_A_FUNCTION = 3

        def broken(text):
            return "high"
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    vowels = load_preference("my_prefs:vowels")
    assert rank_texts(["xyz", "aaa", "ab"], vowels) == [[1], [2], [0]]

    with pytest.raises(PreferenceError, match="not callable"):
        load_preference("my_prefs:NOT_A_FUNCTION")
    with pytest.raises(PreferenceError, match="no attribute 'missing'"):
        load_preference("my_prefs:missing")
    with pytest.raises(PreferenceError, match="finite float"):
        score_texts(["x"], load_preference("my_prefs:broken"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("longest", "unknown preference 'longest'"),
        ("without:", "must not be empty"),
        ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
        (":score", "unknown preference"),
    ],
)
def test_bad_preference_names_the_accepted_forms(spec, message):
    with pytest.raises(PreferenceError, match=message):
        load_preference(spec)


def test_bad_preference_on_the_cli_is_a_clear_usage_error():
    result = CliRunner().invoke(
        app, ["simulate", "--preference", "nope", "--gateway-url", "http://127.0.0.1:9", "--api-key", "k"]
    )
    assert result.exit_code == 2
    assert "unknown preference 'nope'" in result.output
    assert "module:function" in result.output


def test_labeler_is_mounted_on_the_instructloop_cli():
    from launcher.cli import app as root

    result = CliRunner().invoke(root, ["labeler", "--help"])
    assert result.exit_code == 0
    for command in ("simulate", "record", "winrate"):
        assert command in result.output


def test_win_rate_counts_ties_half():
    prefer_short = load_preference("shorter")
    new = {"p1": ["a", "bbb"], "p2": ["cc"], "only-new": ["x"]}
    baseline = {"p1": ["bb"], "p2": ["cc", "d"], "only-old": ["y"]}
    result = win_rate(new, baseline, prefer_short)
    # p1: "a" beats "bb", "bbb" loses to "bb"; p2: "cc" ties "cc", loses to "d"
    assert (result.wins, result.ties, result.losses) == (1, 1, 2)
    assert result.rate == pytest.approx((1 + 0.5) / 4)


def test_shipped_prompt_sets_are_disjoint():
    train, heldout = read_prompts(DEFAULT_PROMPTS), read_prompts(DEFAULT_HELDOUT_PROMPTS)
    assert len(train) >= 8 and len(heldout) >= 4
    assert not set(train) & set(heldout)


class _RateLimitedGateway:
    """A loopback HTTP server that answers 429 (Retry-After: 0) ``limited`` times, then 200."""

    def __init__(self, limited: int):
        import http.server
        import threading

        owner = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests += 1
                if owner.requests <= limited:
                    body, status = (
                        b'{"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}',
                        429,
                    )
                else:
                    body, status = b'{"id": "fb-1", "status": "accepted"}', 202
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_labeler_waits_out_the_rate_limit_instead_of_dropping_rankings():
    with _RateLimitedGateway(limited=3) as gateway, GatewayClient(gateway.url, "key", retries=0) as client:
        response = client._post("/v1/feedback", {"type": "ranking"})
        assert response.status_code == 202 and gateway.requests == 4  # three 429s waited out, not retries


@pytest.mark.slow
def test_labeler_gives_up_on_the_rate_limit_after_its_wait_budget():
    with (
        _RateLimitedGateway(limited=100) as gateway,
        GatewayClient(gateway.url, "key", rate_limit_wait_s=0.6) as client,
    ):
        with pytest.raises(LabelerError, match="429"):
            client._post("/v1/feedback", {"type": "ranking"})
        assert gateway.requests == 2  # one wait of 0.5 s fits the budget, a second does not
