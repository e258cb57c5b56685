"""Settings validators, the keys CLI, and a smoke run of `instructloop gateway run`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import ValidationError

from gateway.auth import KeyStore, Role, append_key
from gateway.settings import DEV_API_KEY, Settings
from tests.conftest import free_port
from tests.gateway.conftest import REPO_ROOT


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "gateway", *args],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_keys_outside_dev_mode_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("INSTRUCTLOOP_GATEWAY_KEYS_FILE", raising=False)
    with pytest.raises(ValidationError, match="instructloop gateway keys create"):
        Settings()
    with pytest.raises(ValidationError, match="only accepted with INSTRUCTLOOP_GATEWAY_DEV_MODE=true"):
        Settings(keys_file="/tmp/k.jsonl", dev_api_key="letmein")
    dev = Settings(dev_mode=True)
    assert dev.effective_dev_key == DEV_API_KEY
    assert Settings(keys_file="/tmp/k.jsonl").effective_dev_key is None


def test_backends_from_env(monkeypatch):
    monkeypatch.setenv("INSTRUCTLOOP_GATEWAY_BACKENDS", "http://a:8080/, http://b:8080")
    assert Settings(dev_mode=True).backends == ["http://a:8080", "http://b:8080"]
    monkeypatch.setenv("INSTRUCTLOOP_GATEWAY_BACKENDS", '["http://c:1"]')
    assert Settings(dev_mode=True).backends == ["http://c:1"]
    monkeypatch.setenv("INSTRUCTLOOP_GATEWAY_BACKENDS", "c:1")
    with pytest.raises(ValidationError, match="not an http"):
        Settings(dev_mode=True)


def test_keys_are_stored_hashed_and_compared_by_hash(tmp_path):
    path = tmp_path / "keys.jsonl"
    key, record = append_key(path, name="alice", role=Role.user)
    assert key not in path.read_text() and record.sha256 in path.read_text()
    store = KeyStore(path)
    assert store.authenticate(key).role is Role.user
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.authenticate("") is None
    # a key added later is picked up without a restart
    store.reload_interval_s = 0
    admin_key, _ = append_key(path, name="ada", role=Role.admin)
    assert store.authenticate(admin_key).role is Role.admin
    # dev key only when given (dev mode)
    assert KeyStore(path).authenticate(DEV_API_KEY) is None
    assert KeyStore(path, dev_key=DEV_API_KEY).authenticate(DEV_API_KEY).role is Role.admin


@pytest.mark.slow
def test_keys_create_cli(tmp_path):
    path = tmp_path / "sub" / "keys.jsonl"
    result = cli("keys", "create", "--role", "labeler", "--name", "lara", "--keys-file", str(path))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("il-") and len(key) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    principal = KeyStore(path).authenticate(key)
    assert (principal.name, principal.role) == ("lara", Role.labeler)
    listed = cli("keys", "list", "--keys-file", str(path))
    assert "lara" in listed.stdout and key not in listed.stdout
    bad = cli("keys", "create", "--role", "root", "--name", "x", "--keys-file", str(path))
    assert bad.returncode == 2 and "--role user" in bad.stderr


def test_gateway_run_smoke(tmp_path, serve, tiny_model_dir):
    path = tmp_path / "keys.jsonl"
    key, _ = append_key(path, name="alice", role=Role.user)
    port = free_port()
    refused = cli("run", "--port", str(port), env={"INSTRUCTLOOP_GATEWAY_KEYS_FILE": ""})
    assert refused.returncode == 2 and "keys create" in refused.stderr
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        INSTRUCTLOOP_GATEWAY_MODEL=str(tiny_model_dir),
        INSTRUCTLOOP_GATEWAY_SERVED_MODEL_NAME="tiny",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "gateway",
            "run",
            "--port",
            str(port),
            "--backends",
            serve.url,
            "--keys-file",
            str(path),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("gateway run did not become ready")
        response = httpx.post(
            f"{url}/v1/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
            timeout=60,
        )
        assert response.status_code == 200 and response.json()["choices"][0]["index"] == 0
        # no Redis configured: feedback is refused with 503 + Retry-After, not lost silently
        feedback = httpx.post(
            f"{url}/v1/feedback",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
            json={"type": "pairwise", "completion_id": response.json()["id"], "chosen": 0, "rejected": 1},
        )
        assert feedback.status_code == 503 and feedback.headers["Retry-After"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert b'"msg": "gateway started"' in out  # structured JSON logs
