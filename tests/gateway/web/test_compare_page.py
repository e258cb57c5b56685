"""Compare mode in a real browser, against a serve that holds two versions (the base and an adapter
candidate ``v0001``, answered by TGI's ``adapter_id``), and what the votes do: the A/B comparison names
both versions, the learner's dataset turns the votes into the gate's live win-rate, which then decides,
and the admin dashboard shows the votes, the gate's decision and its reason."""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.by import By

from instructloop.events import ComparisonEvent, PolicyEvent
from instructloop.registry import Registry
from instructloop.streams import Stream, stream_key
from tests.gateway.conftest import ServeProcess
from tests.gateway.web.conftest import (
    press,
    screenshot,
    sign_in,
    task_record,
    upload_prompts,
    wait_for,
    write_adapter_version,
)

pytestmark = pytest.mark.timeout(400)
CANDIDATE = "v0001"
VOTES = 20


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, tiny_model_dir):
    """A registry with one adapter candidate over the tiny model."""
    path = tmp_path_factory.mktemp("registry")
    write_adapter_version(Registry(path), CANDIDATE, tiny_model_dir, seed=1)
    return path


@pytest.fixture(scope="module")
def versioned_serve(tiny_model_dir, registry_dir, tmp_path_factory):
    process = ServeProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("serve-log") / "serve.log",
        INSTRUCTLOOP_SERVE_REGISTRY_DIR=str(registry_dir),
    )
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def side_versions(redis_server, task_id: str) -> list[str]:
    """The version behind each side of a compare task (the page never sees it)."""
    client = redis_server.client()
    versions = []
    for completion_id, _ in task_record(redis_server, task_id)["slots"]:
        raw = client.get(f"instructloop:gateway:completion:{completion_id}")
        versions.append(__import__("json").loads(raw)["policy_version"])
    return versions


def test_compare_votes_name_both_versions_and_decide_the_gate(
    start_gateway, versioned_serve, redis_server, registry_dir, page, tmp_path
):
    from learner.dataset import Dataset
    from learner.gate import GateConfig, gate_decision
    from learner.ingest import Ingestor
    from learner.publish import publish_candidate

    gateway = start_gateway(
        [versioned_serve.url], redis_server.url_for("gateway"), registry_dir=registry_dir, label_max_tokens=6
    )
    upload_prompts(gateway, [f"Question {i}: what is {i} plus {i}?" for i in range(VOTES + 2)])

    # 1. In the browser: compare mode (Shift+C), the labeler prefers the candidate's side.
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    wait_for(lambda: page.find_element(By.ID, "modes").is_displayed(), what="sign-in")
    press(page, "C")
    wait_for(
        lambda: (
            page.find_element(By.ID, "compare-view").is_displayed()
            and page.find_element(By.ID, "work").get_attribute("data-task-id")
        ),
        what="a compare task",
    )
    task_id = page.find_element(By.ID, "work").get_attribute("data-task-id")
    versions = side_versions(redis_server, task_id)
    assert sorted(versions) == ["base", CANDIDATE]
    press(page, "1" if versions[0] == CANDIDATE else "2")
    wait_for(lambda: "better" in page.find_element(By.ID, "compare-choice").text, what="the choice")
    screenshot(page, "labeling-compare.png")
    press(page, "\ue007")  # Enter
    wait_for(lambda: "Recorded" in page.find_element(By.ID, "status").text, what="the vote to be recorded")

    [event] = [
        ComparisonEvent.from_fields(f)
        for _, f in redis_server.client().xrange(stream_key(Stream.comparisons))
    ]
    assert event.source == "ab" and sorted(event.policy_versions) == ["base", CANDIDATE]
    assert event.policy_versions[event.ranking[0][0]] == CANDIDATE and len(event.ranking) == 2
    assert event.labeler_id == gateway.state.keys.authenticate(gateway.keys["lara"]).key_id

    # 2. More votes through the same task API the page uses: this time the labeler prefers the base.
    with gateway.http("lara") as http:
        for _ in range(VOTES):
            task = http.post("/v1/label/tasks", json={"mode": "compare"})
            assert task.status_code == 200, task.text
            sides = side_versions(redis_server, task.json()["task_id"])
            answer = http.post(
                f"/v1/label/tasks/{task.json()['task_id']}/comparison",
                json={"preferred": "left" if sides[0] == "base" else "right"},
                headers={"Idempotency-Key": task.json()["task_id"]},
            )
            assert answer.status_code == 202, answer.text

    # 3. The learner ingests the votes; its live win-rate is what the gate checks.
    dataset = Dataset(tmp_path / "dataset.sqlite3")
    ingestor = Ingestor(
        redis_server.client("learner"),
        dataset,
        prefix="instructloop",
        group="learner",
        consumer="test",
    )
    ingestor.ensure_groups()
    ingestor.drain()
    rate, pairs = dataset.live_win_rate(CANDIDATE, "base")
    assert (rate, pairs) == (pytest.approx(1 / (VOTES + 1)), VOTES + 1)
    config = GateConfig(min_live_comparisons=VOTES)
    candidate = {"reward_mean": 1.0, "kl": 0.1, "scores": [1.0] * config.samples}
    incumbent = {"reward_mean": 0.5, "kl": 0.0, "scores": [0.5] * config.samples}
    assert gate_decision(candidate, incumbent, config).promote  # without the votes it would pass
    result = gate_decision(candidate, incumbent, config, live_win_rate=(rate, pairs))
    assert not result.promote
    assert any(r.startswith(f"live win-rate {rate:.3f} < 0.5 over {pairs} pairs") for r in result.reasons)
    registry = Registry(registry_dir, redis=redis_server.client("learner"))
    publish_candidate(registry, CANDIDATE, None, None, result, parent=None)
    [policy] = [
        PolicyEvent.from_fields(f) for _, f in redis_server.client().xrange(stream_key(Stream.policies))
    ]
    assert policy.status.value == "rejected" and "live win-rate" in policy.reason

    # 4. The admin dashboard shows the votes, the decision and its reason (admin key, its own page).
    sign_in(page, f"{gateway.url}/label/admin", gateway.keys["ada"])
    wait_for(
        lambda: "v0001 vs base" in page.find_element(By.ID, "panel-winrate").text,
        what="the live win-rate table",
    )
    assert f"1 / {VOTES} / 0" in page.find_element(By.ID, "panel-winrate").text
    history = page.find_element(By.ID, "panel-history").text
    assert "rejected" in history and "live win-rate" in history
    labelers = page.find_element(By.ID, "panel-labelers").text
    assert "lara" in labelers and str(VOTES + 1) in labelers
    assert page.find_elements(By.CSS_SELECTOR, "#panel-volume svg rect")  # feedback volume drawn
    assert httpx.get(f"{gateway.url}/v1/admin/labeling", headers=gateway.headers("lara")).status_code == 403
