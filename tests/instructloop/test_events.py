import pytest
from pydantic import ValidationError

from instructloop.events import ComparisonEvent, CompletionEvent, PolicyEvent, PolicyStatus, ranking_pairs


def test_ranking_pairs_skip_ties():
    # [[0], [2, 1], [3]]: 0 beats 2, 1, 3; 2 and 1 tie; both beat 3
    assert sorted(ranking_pairs([[0], [2, 1], [3]])) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]


def test_comparison_roundtrip_through_stream_fields():
    event = ComparisonEvent(prompt="p", responses=["a", "b", "c"], ranking=[[2], [0, 1]], labeler_id="lab")
    fields = event.to_fields()
    again = ComparisonEvent.from_fields({k.encode(): v.encode() for k, v in fields.items()})
    assert again == event
    assert again.pairs() == [(2, 0), (2, 1)]


@pytest.mark.parametrize(
    "ranking, message",
    [
        ([[0], [5]], "out of range"),
        ([[0], [0]], "more than once"),
        ([[1]], "at least two"),
        ([[1], []], "at least 1 item"),
    ],
)
def test_bad_rankings_are_refused_with_the_reason(ranking, message):
    with pytest.raises(ValidationError, match=message):
        ComparisonEvent(prompt="p", responses=["a", "b"], ranking=ranking, labeler_id="lab")


def test_from_fields_rejects_entries_without_event():
    with pytest.raises(ValueError, match="no 'event' field"):
        CompletionEvent.from_fields({b"other": b"x"})


def test_policy_version_names_are_checked():
    with pytest.raises(ValidationError, match="invalid policy version"):
        PolicyEvent(version="../etc", status=PolicyStatus.promoted)


def test_a_tie_is_a_valid_comparison_that_implies_no_pair():
    tie = ComparisonEvent(prompt="p", responses=["a", "b"], ranking=[[0, 1]], labeler_id="lab", source="ab")
    assert tie.pairs() == []


def test_per_output_flags_are_optional_and_one_list_per_response():
    old = ComparisonEvent(prompt="p", responses=["a", "b"], ranking=[[0], [1]], labeler_id="x").model_dump()
    del old["flags"]  # an event written before flags existed
    assert ComparisonEvent.model_validate(old).flags == []
    event = ComparisonEvent(
        prompt="p",
        responses=["a", "b"],
        ranking=[[0], [1]],
        labeler_id="x",
        flags=[["harmful", "made_up_facts"], []],
    )
    assert ComparisonEvent.from_fields(event.to_fields()).flags == [["harmful", "made_up_facts"], []]
    with pytest.raises(ValidationError, match="flags has 1 entries for 2 responses"):
        ComparisonEvent(
            prompt="p", responses=["a", "b"], ranking=[[0], [1]], labeler_id="x", flags=[["harmful"]]
        )
    with pytest.raises(ValidationError):
        ComparisonEvent(
            prompt="p", responses=["a", "b"], ranking=[[0], [1]], labeler_id="x", flags=[["rude"], []]
        )
