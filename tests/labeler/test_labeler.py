"""The scripted labeler's pure logic: preference functions, rankings with ties, plug-ins, win-rate."""

from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from labeler.cli import app
from labeler.client import GatewayClient, LabelerError
from labeler.preferences import (
    DEFAULT_HELDOUT_PROMPTS,
    DEFAULT_PROMPTS,
    PreferenceError,
    load_preference,
    rank,
    rank_texts,
    read_prompts,
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
