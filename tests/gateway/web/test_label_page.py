"""The labeling page in a real headless Chromium, used like a person: keys typed, text read off the screen,
and what lands in the Redis streams checked against it."""

from __future__ import annotations

import json

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from gateway.store import StoredChoice, StoredCompletion
from instructloop.events import ComparisonEvent, DemonstrationEvent
from instructloop.streams import Stream, stream_key
from tests.conftest import save_model_dir, tiny_llama
from tests.gateway.conftest import ServeProcess
from tests.gateway.web.conftest import press, screenshot, sign_in, task_record, upload_prompts, wait_for

pytestmark = pytest.mark.timeout(300)


def events(redis_server, stream: Stream, event_type):
    return [event_type.from_fields(f) for _, f in redis_server.client().xrange(stream_key(stream))]


def key_id(gateway, who: str) -> str:
    return gateway.state.keys.authenticate(gateway.keys[who]).key_id


def shown_task(page, k: int) -> str:
    """Wait until a task with ``k`` responses is on screen; its id."""
    wait_for(
        lambda: len(page.find_elements(By.CSS_SELECTOR, "#responses li.response")) == k, what=f"{k} responses"
    )
    return page.find_element(By.ID, "work").get_attribute("data-task-id")


MARKUP = "<script>alert(1)"


def build_markup_model(path, tokenizer, text: str):
    """A one-layer Llama that writes ``text`` then EOS after any prompt: attention and MLP outputs are zeroed,
    so the logits depend on the current token only; token embeddings are one-hot directions and the untied
    head maps each token of ``text`` to the next (every other token to the first, the last to EOS)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == len(ids), "the chain needs distinct tokens"
    model = tiny_llama(tokenizer, num_hidden_layers=1, tie_word_embeddings=False)
    start = len(ids)  # the direction of every token outside the chain
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
        embeddings.zero_()
        embeddings[:, start] = 1.0
        head.zero_()
        head[ids[0], start] = 10.0
        for k, token in enumerate(ids):
            embeddings[token].zero_()
            embeddings[token, k] = 1.0
            head[ids[k + 1] if k + 1 < len(ids) else tokenizer.eos_token_id, k] = 10.0
    return save_model_dir(model, tokenizer, path)


@pytest.fixture(scope="module")
def markup_serve(tokenizer, tmp_path_factory):
    """serve on a model whose every answer is markup."""
    model_dir = build_markup_model(tmp_path_factory.mktemp("markup-model"), tokenizer, MARKUP)
    process = ServeProcess(model_dir, tmp_path_factory.mktemp("markup-serve") / "serve.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture
def gateway(start_gateway, serve, redis_server):
    return start_gateway(
        [serve.url], redis_server.url_for("gateway"), label_k=4, label_max_tokens=6, label_overlap_rate=0.0
    )


def test_labeler_ranks_four_by_keyboard_with_a_tie_and_the_stream_holds_that_ranking(
    gateway, redis_server, page
):
    upload_prompts(gateway, ["Name three colours of the sea."])
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    task_id = shown_task(page, 4)
    texts = [
        item.get_attribute("textContent")
        for item in page.find_elements(By.CSS_SELECTOR, "#responses li .text")
    ]
    assert page.find_element(By.ID, "prompt").text == "Name three colours of the sea."

    # 2 is best, 4 ties with it; then 1; then 3. Flag response 2 as made-up facts (j moves to it), a
    # rationale.
    press(page, "2", "t", "4", "1", "3", "j", "m", "r")
    page.switch_to.active_element.send_keys("2 and 4 answer; 3 is off topic")
    press(page, Keys.ESCAPE)
    ranking_text = page.find_element(By.ID, "ranking").text
    assert "2\n4\ntied" in ranking_text and "1." in ranking_text and "3." in ranking_text
    screenshot(page, "labeling-rank.png")
    page.set_window_size(420, 1000)  # a phone-sized screen: one column, same keys
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "labeling-rank-narrow.png")
    page.set_window_size(1280, 1000)
    press(page, Keys.ENTER)
    wait_for(
        lambda: "Recorded" in page.find_element(By.ID, "status").text, what="the submission to be recorded"
    )

    [event] = events(redis_server, Stream.comparisons, ComparisonEvent)
    slots = task_record(redis_server, task_id)[
        "slots"
    ]  # slot shown on screen -> [completion id, choice index]
    choice = [index for _, index in slots]
    assert event.ranking == [[choice[1], choice[3]], [choice[0]], [choice[2]]]
    assert [event.responses[choice[s]] for s in range(4)] == texts  # what the labeler read is what was ranked
    assert event.flags[choice[1]] == ["made_up_facts"] and sum(map(len, event.flags)) == 1
    assert event.rationale == "2 and 4 answer; 3 is off topic"
    assert event.source == "ranking" and event.labeler_id == key_id(gateway, "lara")
    assert event.prompt == "Name three colours of the sea."
    assert event.completion_ids == [slots[0][0]]


def test_a_wrong_key_shows_a_clear_error_and_an_admin_key_is_refused(gateway, page):
    sign_in(page, f"{gateway.url}/label", "il-not-a-real-key")
    message = wait_for(lambda: page.find_element(By.ID, "signin-error").text, what="an error message")
    assert "not accepted" in message and "Incorrect API key" in message
    assert page.find_element(By.ID, "work").is_displayed() is False
    assert page.execute_script("return sessionStorage.length") == 0

    sign_in(page, f"{gateway.url}/label", gateway.keys["ada"])
    message = wait_for(lambda: page.find_element(By.ID, "signin-error").text, what="an error message")
    assert "admin key" in message and "/label/admin" in message
    assert page.execute_script("return sessionStorage.length") == 0  # the page never holds an admin key
    screenshot(page, "labeling-signin-error.png")


def test_a_model_answer_with_a_script_tag_is_shown_as_text_and_runs_nothing(
    start_gateway, markup_serve, redis_server, page
):
    gateway = start_gateway(
        [markup_serve.url], redis_server.url_for("gateway"), label_k=2, label_max_tokens=12
    )
    upload_prompts(gateway, ["Say hi"])
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    page.execute_script("window.alert = () => { window.__alerted = true; };")  # before the task renders
    shown_task(page, 2)
    texts = [
        item.get_attribute("textContent")
        for item in page.find_elements(By.CSS_SELECTOR, "#responses li .text")
    ]
    assert texts == [MARKUP, MARKUP]  # what the model wrote, character for character
    assert page.execute_script("return window.__alerted === undefined && document.scripts.length === 2")
    assert [e for e in page.get_log("browser") if e["source"] != "network"] == []


def test_markup_in_model_text_is_shown_as_text_and_runs_nothing(gateway, redis_server, page):
    """A completion whose text is markup: stored like a served completion and offered to the labeler as an
    agreement item (another labeler ranked it), so the page shows exactly this text."""

    hostile = [
        '<script>window.__pwned = "script"</script>',
        '<img src="x" onerror="window.__pwned = \'img\'">',
        "<b>bold?</b> & &amp;",
        '"><svg onload="window.__pwned = \'svg\'">',
    ]
    prompt = "<script>window.__pwned = 'prompt'</script> Say hi"
    completion = StoredCompletion(
        id="label-hostile",
        caller="someone",
        prompts=[prompt],
        policy_version="base",
        chat=False,
        choices=[StoredChoice(i, text, "stop", 0, 5) for i, text in enumerate(hostile)],
    )
    client = redis_server.client()
    client.set(f"instructloop:gateway:completion:{completion.id}", completion.to_json())
    client.rpush(
        "instructloop:gateway:labeling:overlap",
        json.dumps(
            {"completion_id": completion.id, "prompt": prompt, "source": "uploaded", "labeler": "someone"}
        ),
    )
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    shown_task(page, 4)
    shown = sorted(
        item.get_attribute("textContent")
        for item in page.find_elements(By.CSS_SELECTOR, "#responses li .text")
    )
    assert shown == sorted(hostile)
    assert page.find_element(By.ID, "prompt").get_attribute("textContent") == prompt
    assert page.execute_script("return window.__pwned === undefined")
    assert page.execute_script("return document.querySelectorAll('img, svg:not(.chart), b').length") == 0
    assert page.execute_script("return document.scripts.length") == 2  # common.js and label.js, nothing else
    errors = [
        entry for entry in page.get_log("browser") if entry["source"] != "network"
    ]  # JS errors, CSP reports
    assert errors == [], errors


def test_demonstration_mode_posts_a_demonstration(gateway, redis_server, page):
    upload_prompts(gateway, ["Explain rain to a child."])
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    shown_task(page, 4)
    page.find_element(By.CSS_SELECTOR, '#modes button[data-mode="demonstration"]').click()
    wait_for(lambda: page.find_element(By.ID, "demo-view").is_displayed(), what="the demonstration view")
    wait_for(
        lambda: page.switch_to.active_element.get_attribute("id") == "demonstration",
        what="the text box focus",
    )
    page.switch_to.active_element.send_keys(
        "Clouds hold tiny drops of water; when they get heavy, they fall."
    )
    screenshot(page, "labeling-demonstration.png")
    page.switch_to.active_element.send_keys(Keys.CONTROL, Keys.ENTER)
    wait_for(
        lambda: "Recorded" in page.find_element(By.ID, "status").text, what="the demonstration to be recorded"
    )
    [event] = events(redis_server, Stream.demonstrations, DemonstrationEvent)
    assert event.prompt == "Explain rain to a child."
    assert event.response == "Clouds hold tiny drops of water; when they get heavy, they fall."
    assert event.labeler_id == key_id(gateway, "lara")


def test_page_and_assets_ship_with_a_strict_content_security_policy(gateway):
    for path in ("/label", "/label/admin", "/label/assets/label.js"):
        response = httpx.get(f"{gateway.url}{path}")
        assert response.status_code == 200
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "http" not in response.text.split("<body")[0].replace('"/label', "")  # nothing from elsewhere
    assert httpx.get(f"{gateway.url}/label/assets/../settings.py").status_code == 404


def test_ranking_by_drag(gateway, redis_server, page):
    from selenium.webdriver.common.action_chains import ActionChains

    upload_prompts(gateway, ["Give me a tip for sleeping well."])
    sign_in(page, f"{gateway.url}/label", gateway.keys["lara"])
    task_id = shown_task(page, 4)

    def drag(slot: int, drop: str) -> None:
        handle = page.find_element(By.CSS_SELECTOR, f'#responses li[data-slot="{slot}"] .handle')
        target = page.find_element(By.CSS_SELECTOR, f'#ranking [data-drop="{drop}"]')
        ActionChains(page).click_and_hold(handle).move_to_element(target).release().perform()

    drag(2, "insert:0")  # response 3 first
    drag(0, "group:0")  # response 1 ties with it
    drag(3, "insert:1")  # response 4 below them
    drag(1, "insert:0")  # response 2 above everything
    groups = [
        [chip.text for chip in group.find_elements(By.CSS_SELECTOR, ".chip")]
        for group in page.find_elements(By.CSS_SELECTOR, "#ranking li.group")
    ]
    assert groups == [["2"], ["3", "1"], ["4"]]
    press(page, Keys.ENTER)
    wait_for(
        lambda: "Recorded" in page.find_element(By.ID, "status").text, what="the submission to be recorded"
    )
    [event] = events(redis_server, Stream.comparisons, ComparisonEvent)
    choice = [index for _, index in task_record(redis_server, task_id)["slots"]]
    assert event.ranking == [[choice[1]], [choice[2], choice[0]], [choice[3]]]
