"""What a labeler sees of the people around the queue, in a real headless Chromium against the stack's
ACL'd Redis (the gateway connects as its own ``gateway`` user): a chat prompt as its messages, the admin's
guidelines, their own counts, and an admin excluding them (refused from then on; the learner's side is
tests/learner/test_exclusion.py)."""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from instructloop.labeling import excluded_labelers_key, guidelines_key
from tests.gateway.conftest import MODEL_NAME
from tests.gateway.web.conftest import press, screenshot, sign_in, upload_prompts, wait_for

pytestmark = pytest.mark.timeout(300)

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour of the sea."},
]
TEMPLATE_MARKUP = "<|im_start|>"
"""The default tokenizer's chat template markup: rendered into the model input, never shown to a labeler."""


@pytest.fixture
def gateway(start_gateway, serve, redis_server):
    return start_gateway(
        [serve.url],
        redis_server.url_for("gateway"),
        label_k=2,
        label_max_tokens=4,
        label_overlap_rate=0.0,
        label_live_prompts=True,
    )


def key_id(gateway, who: str) -> str:
    return gateway.state.keys.authenticate(gateway.keys[who]).key_id


def progress(page) -> str:
    return page.find_element(By.ID, "progress").text


def rank_two(page) -> None:
    wait_for(lambda: len(page.find_elements(By.CSS_SELECTOR, "#responses li.response")) == 2, what="a task")
    press(page, "1", "2", Keys.ENTER)
    wait_for(lambda: "Recorded" in page.find_element(By.ID, "status").text, what="the ranking recorded")


def test_a_chat_prompt_is_shown_as_its_messages_and_the_labeler_sees_their_counts(
    gateway, redis_server, page
):
    chat = gateway.openai("alice").chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3)
    assert chat.choices
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#messages li.message"), what="the messages")
    shown = [
        (m.find_element(By.CLASS_NAME, "role").text.lower(), m.find_element(By.CLASS_NAME, "content").text)
        for m in page.find_elements(By.CSS_SELECTOR, "#messages li.message")
    ]
    assert shown == [(m["role"], m["content"]) for m in CHAT]
    assert not page.find_element(By.ID, "prompt").is_displayed()
    body = page.find_element(By.TAG_NAME, "body").text
    assert TEMPLATE_MARKUP not in body and "im_end" not in body
    assert progress(page) == "Your work: 0 rankings · 0 comparisons · 0 demonstrations"
    screenshot(page, "labeling-chat.png")

    rank_two(page)
    wait_for(lambda: progress(page).startswith("Your work: 1 ranking ·"), what="the count to move")
    press(page, "D")  # write mode: the same chat prompt, then a demonstration
    area = wait_for(lambda: page.find_element(By.ID, "demonstration"), what="the text box")
    wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#messages li.message"), what="the chat prompt")
    area.send_keys("Blue.", Keys.CONTROL, Keys.ENTER)
    wait_for(
        lambda: progress(page) == "Your work: 1 ranking · 0 comparisons · 1 demonstration",
        what="both counts",
    )
    me = httpx.get(f"{gateway.url}/v1/label/me", headers=gateway.headers("lara")).json()
    assert me["counts"] == {"rankings": 1, "comparisons": 0, "demonstrations": 1, "skips": 0}


def test_guidelines_written_on_the_admin_page_are_shown_to_labelers(gateway, redis_server, page):
    upload_prompts(gateway, ["Say something kind."])
    sign_in(page, f"{gateway.url}/label/admin", gateway.keys["ada"])
    box = wait_for(lambda: page.find_element(By.ID, "guidelines"), what="the guidelines box")
    wait_for(lambda: page.find_element(By.ID, "dashboard").is_displayed(), what="the dashboard")
    text = (
        "Prefer the answer that follows the instruction.\nFlag anything harmful, even if it is well written."
    )
    box.send_keys(text)
    page.find_element(By.ID, "save-guidelines").click()
    wait_for(lambda: page.find_element(By.ID, "status").text == "Guidelines saved.", what="saved")
    assert redis_server.client().get(guidelines_key()).decode() == text

    page.execute_script("sessionStorage.clear()")
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    shown = wait_for(lambda: page.find_element(By.ID, "guidelines").text, what="the guidelines")
    assert shown == text and page.find_element(By.ID, "guidelines-box").is_displayed()
    wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#responses li.response"), what="a task")
    screenshot(page, "labeling-guidelines.png")


def test_an_admin_excludes_a_labeler_whose_feedback_is_then_refused(gateway, redis_server, page):
    upload_prompts(gateway, ["First prompt.", "Second prompt.", "Third prompt."])
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    rank_two(page)  # one ranking before the exclusion: it is in the stream, the learner will leave it out
    wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#responses li.response"), what="the next task")
    pending_task = page.find_element(By.ID, "work").get_attribute("data-task-id")

    page.execute_script("sessionStorage.clear()")
    sign_in(page, f"{gateway.url}/label/admin", gateway.keys["ada"])
    row = wait_for(
        lambda: page.find_element(By.CSS_SELECTOR, f"tr[data-key-id='{key_id(gateway, 'lara')}']"),
        what="lara's row",
    )
    assert row.find_element(By.CLASS_NAME, "exclusion").text == "Exclude"
    row.find_element(By.CLASS_NAME, "exclusion").click()
    page.switch_to.alert.accept()  # "Exclude lara? ..."
    wait_for(lambda: "is excluded" in page.find_element(By.ID, "status").text, what="the exclusion")
    row = page.find_element(By.CSS_SELECTOR, f"tr[data-key-id='{key_id(gateway, 'lara')}']")
    assert "excluded" in row.text and row.find_element(By.CLASS_NAME, "exclusion").text == "Include again"
    screenshot(page, "labeling-admin-exclude.png")
    assert redis_server.client().hexists(excluded_labelers_key(), key_id(gateway, "lara"))

    # the open task cannot be answered, no new task is handed out, and /v1/feedback refuses the key too
    refused = httpx.post(
        f"{gateway.url}/v1/label/tasks/{pending_task}/ranking",
        json={"ranking": [[0], [1]]},
        headers=gateway.headers("lara"),
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "labeler_excluded"
    demo = httpx.post(
        f"{gateway.url}/v1/demonstrations",
        json={"prompt": "p", "response": "r"},
        headers=gateway.headers("lara"),
    )
    assert demo.status_code == 403 and demo.json()["error"]["code"] == "labeler_excluded"
    page.execute_script("sessionStorage.clear()")
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    wait_for(lambda: page.find_element(By.ID, "excluded").is_displayed(), what="the exclusion notice")
    error = wait_for(lambda: page.find_element(By.ID, "error").text, what="the refused task")
    assert "excluded" in error
    assert not page.find_elements(By.CSS_SELECTOR, "#responses li.response")
    screenshot(page, "labeling-excluded.png")

    # included again: tasks flow
    back = httpx.delete(
        f"{gateway.url}/v1/admin/labeling/labelers/{key_id(gateway, 'lara')}/exclusion",
        headers=gateway.headers("ada"),
    )
    assert back.status_code == 200 and back.json()["excluded"] is False
    task = httpx.post(f"{gateway.url}/v1/label/tasks", headers=gateway.headers("lara"), timeout=60)
    assert task.status_code == 200, task.text
