"""`instructloop serve run` as a real subprocess: starts, answers the TGI client, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from text_generation import Client

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # every test here starts `instructloop serve run`


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), INSTRUCTLOOP_SERVE_TORCH_THREADS="1", **extra)
    return env


def test_serve_run_smoke(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "serve",
            "run",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not become healthy"
            time.sleep(0.2)
        response = Client(f"http://127.0.0.1:{port}").generate("Hello", max_new_tokens=3)
        assert response.details.generated_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    logs = proc.stdout.read()
    assert '"msg": "model loop started"' in logs  # structured JSON logs
    assert '"msg": "model loop stopped"' in logs  # the lifespan shutdown ran


def test_serve_run_refuses_bad_settings():
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "serve", "run", "--max-batch-size", "0"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_batch_size must be >= 1" in result.stderr
