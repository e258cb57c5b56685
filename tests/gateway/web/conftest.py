"""Browser harness: Debian's headless Chromium driven by Selenium through Debian's chromedriver (both
installed by ``make install``), one browser per test module, each test in a fresh page state.

The gateway runs as in tests/gateway (uvicorn thread, real serve on the tiny model, real redis-server).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]
SCREENSHOT_DIR = os.environ.get("INSTRUCTLOOP_SCREENSHOT_DIR")
"""Set (e.g. to docs/) to save the pages' screenshots: docs/labeling.md names the command."""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            "chromium / chromedriver are missing: run `make install` "
            "(or `sudo apt-get install -y chromium chromium-driver`)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="il-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser):
    """The module's browser, with no key left in sessionStorage from an earlier test."""
    browser.get("about:blank")
    browser.delete_all_cookies()
    browser.get_log("browser")  # start each test with an empty console log
    yield browser
    try:
        browser.execute_script("window.sessionStorage && window.sessionStorage.clear()")
    except Exception:
        pass


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy (the page works asynchronously)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the element may not exist yet
            last_error = exc
        time.sleep(0.05)
    raise AssertionError(
        f"timed out waiting for {what}" + (f" (last error: {last_error})" if last_error else "")
    )


def sign_in(driver, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    field = wait_for(lambda: driver.find_element(By.ID, "key"), what="the key field")
    field.send_keys(key, Keys.ENTER)


def press(driver, *keys: str) -> None:
    """Type keys as a person would, to whatever has the focus (the page body when nothing does)."""
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def upload_prompts(gateway, prompts: list[str]) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/admin/labeling/prompts",
        json={"prompts": prompts},
        headers=gateway.headers("ada"),
        timeout=30,
    )
    assert response.status_code == 200, response.text


def task_record(redis_server, task_id: str) -> dict:
    raw = redis_server.client().get(f"instructloop:gateway:labeling:task:{task_id}")
    assert raw is not None, f"task {task_id} is not in Redis"
    return json.loads(raw)


def screenshot(driver, name: str) -> None:
    """Save a screenshot when INSTRUCTLOOP_SCREENSHOT_DIR is set (the committed ones under docs/ come from
    it)."""
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOT_DIR) / name))


def write_adapter_version(registry, version: str, base_dir: Path, seed: int, **kwargs) -> None:
    """A LoRA adapter version over ``base_dir`` (B large enough that its answers differ from the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from instructloop.registry import base_weights_sha256

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj", "down_proj"],
        ),
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    registry.write_adapter(
        version, peft_model, base_sha256=base_weights_sha256(base_dir), base_model=str(base_dir), **kwargs
    )
