"""The admin dashboard in a real browser, over a history made by the real paths: versions written to the
registry with gate metrics, promoted and rejected as the learner's publish step does it, pinned and rolled
back through the admin API; rankings from two labelers on a shared item; a demonstration. The admin
then changes the labeling settings and uploads prompts from the page."""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.by import By

from gateway.labeling.quality import pair_agreement
from instructloop.events import ComparisonEvent, PolicyStatus
from instructloop.registry import Registry
from instructloop.streams import Stream, stream_key
from tests.gateway.web.conftest import screenshot, sign_in, wait_for, write_adapter_version

pytestmark = pytest.mark.timeout(300)

HISTORY = [  # version, decision, gate metrics
    (
        "v0001",
        "promoted",
        {
            "candidate_reward_mean": 0.31,
            "incumbent_reward_mean": 0.02,
            "candidate_kl": 0.9,
            "rm_heldout_accuracy": 0.61,
        },
    ),
    (
        "v0002",
        "rejected",
        {
            "candidate_reward_mean": 0.22,
            "incumbent_reward_mean": 0.31,
            "candidate_kl": 1.4,
            "rm_heldout_accuracy": 0.66,
            "live_win_rate": 0.42,
            "live_pairs": 24,
        },
    ),
    (
        "v0003",
        "promoted",
        {
            "candidate_reward_mean": 0.47,
            "incumbent_reward_mean": 0.31,
            "candidate_kl": 1.7,
            "rm_heldout_accuracy": 0.71,
            "live_win_rate": 0.63,
            "live_pairs": 30,
        },
    ),
    (
        "v0004",
        "promoted",
        {
            "candidate_reward_mean": 0.55,
            "incumbent_reward_mean": 0.47,
            "candidate_kl": 2.6,
            "rm_heldout_accuracy": 0.73,
            "live_win_rate": 0.55,
            "live_pairs": 22,
        },
    ),
]


def test_dashboard_draws_the_history_and_changes_settings(
    start_gateway, serve, redis_server, tiny_model_dir, tmp_path, page
):
    registry = Registry(tmp_path / "registry", redis=redis_server.client("learner"))
    for seed, (version, decision, metrics) in enumerate(HISTORY):
        write_adapter_version(registry, version, tiny_model_dir, seed, metrics=metrics)
        reason = (
            f"{decision}: reward {metrics['candidate_reward_mean']} vs {metrics['incumbent_reward_mean']}"
        )
        if decision == "promoted":
            registry.set_current(version, status=PolicyStatus.promoted, reason=reason)
        else:
            registry.set_status(version, PolicyStatus.rejected, reason=reason + "; live win-rate 0.420 < 0.5")
    gateway = start_gateway(
        [serve.url],
        redis_server.url_for("gateway"),
        registry_dir=tmp_path / "registry",
        label_k=3,
        label_max_tokens=4,
        label_overlap_rate=1.0,
    )
    with gateway.http("ada") as admin:
        assert (
            admin.post("/v1/admin/policies/rollback", json={"reason": "answers got longer"}).status_code
            == 200
        )
        assert (
            admin.post("/v1/admin/policies/v0003/pin", json={"reason": "freeze for the launch"}).status_code
            == 200
        )
        admin.post("/v1/admin/labeling/prompts", json={"prompts": ["Describe the moon.", "Name a fruit."]})
    with gateway.http("lara") as lara, gateway.http("ada") as ada:  # one shared item: agreement
        for http in (lara, ada):
            task = http.post("/v1/label/tasks", json={"mode": "rank"}).json()
            answer = http.post(f"/v1/label/tasks/{task['task_id']}/ranking", json={"ranking": [[0], [1, 2]]})
            assert answer.status_code == 202, answer.text
        task = lara.post("/v1/label/tasks", json={"mode": "demonstration"}).json()
        assert (
            lara.post(
                f"/v1/label/tasks/{task['task_id']}/demonstration", json={"response": "A fruit: the apple."}
            ).status_code
            == 202
        )

    sign_in(page, f"{gateway.url}/label/admin", gateway.keys["ada"])
    wait_for(lambda: page.find_element(By.ID, "dashboard").is_displayed(), what="the dashboard")
    wait_for(lambda: "v0003" in page.find_element(By.ID, "status").text, what="the current version")
    timeline = page.find_element(By.ID, "panel-versions")
    # three promotions, and the rollback promotes v0003 again
    for status, count in (("promoted", 4), ("rejected", 1), ("rolled_back", 1), ("pinned", 1)):
        assert len(timeline.find_elements(By.CSS_SELECTOR, f"circle.st-{status}")) == count, status
    for panel in ("panel-rm", "panel-reward", "panel-kl", "panel-winrate"):
        assert page.find_elements(By.CSS_SELECTOR, f"#{panel} polyline"), panel
    assert page.find_elements(By.CSS_SELECTOR, "#panel-volume rect.bar0")
    assert page.find_elements(By.CSS_SELECTOR, "#panel-volume rect.bar1")  # the demonstration
    history = page.find_element(By.ID, "panel-history").text
    assert "answers got longer" in history and "freeze for the launch" in history and "rolled back" in history
    labelers = {
        row.find_element(By.CSS_SELECTOR, "td").text: row.text
        for row in page.find_elements(By.CSS_SELECTOR, "#panel-labelers tbody tr")
    }
    first, second = [
        ComparisonEvent.from_fields(f)
        for _, f in redis_server.client().xrange(stream_key(Stream.comparisons))
    ]
    agree, pairs = pair_agreement(first.ranking, second.ranking)  # the slots were shuffled per labeler
    assert pairs == 3 and set(labelers) == {"lara", "ada"}
    assert all(f"{round(100 * agree / pairs)} % (3 pairs)" in row for row in labelers.values())
    assert page.find_element(By.ID, "prompt-count").text == "2 uploaded"
    screenshot(page, "labeling-admin.png")

    # Settings from the page: live prompts off (privacy), a new prompt uploaded.
    assert page.find_element(By.ID, "live-prompts").is_selected()
    page.find_element(By.ID, "live-prompts").click()
    page.find_element(By.ID, "save-config").click()
    wait_for(
        lambda: (
            page.find_element(By.ID, "status").text == "Settings saved."
            or "v0003" in page.find_element(By.ID, "status").text
        ),
        what="the save",
    )
    config = wait_for(
        lambda: (
            (
                c := httpx.get(
                    f"{gateway.url}/v1/admin/labeling/config", headers=gateway.headers("ada")
                ).json()
            )["live_prompts"]
            is False
            and c
        ),
        what="live prompts off",
    )
    assert config == {"live_prompts": False, "compare_versions": None}
    page.find_element(By.ID, "prompts").send_keys("Write a limerick.\nName a fruit.")
    page.find_element(By.ID, "upload-prompts").click()
    wait_for(
        lambda: "1 prompts added (3 in the set)" in page.find_element(By.ID, "status").text, what="the upload"
    )
    assert page.find_element(By.ID, "prompt-count").text == "3 uploaded"

    # A labeler key does not open the dashboard.
    page.find_element(By.ID, "signout").click()
    sign_in(page, f"{gateway.url}/label/admin", gateway.keys["lara"])
    message = wait_for(lambda: page.find_element(By.ID, "signin-error").text, what="an error message")
    assert "not an admin key" in message
