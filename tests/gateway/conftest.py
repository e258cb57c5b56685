"""Gateway test harness: a real serve (subprocess, tiny model, loopback), a real redis-server (the
``redis_server`` fixture), and the gateway in a uvicorn thread of the test process, reached over HTTP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "instructloop"


class ServeProcess:
    """``instructloop serve run`` on a tiny model, as a child process on a free loopback port."""

    def __init__(self, model_dir: Path, log_path: Path, **env_overrides: str):
        self.port = free_port()
        self.log_path = log_path
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO_ROOT),
            INSTRUCTLOOP_SERVE_TORCH_THREADS="1",
            INSTRUCTLOOP_SERVE_JSON_LOGS="false",
            INSTRUCTLOOP_SERVE_LOG_LEVEL="WARNING",
            INSTRUCTLOOP_SERVE_MAX_INPUT_TOKENS="1024",
            INSTRUCTLOOP_SERVE_MAX_TOTAL_TOKENS="1536",
            **env_overrides,
        )
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "serve",
                "run",
                "--model",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
                "--max-batch-size",
                "16",
                "--max-queue",
                "64",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"serve exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"serve did not become healthy: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def serve(tiny_model_dir, tmp_path_factory) -> Iterator[ServeProcess]:
    """One real serve on the tiny model for the whole gateway test session."""
    process = ServeProcess(tiny_model_dir, tmp_path_factory.mktemp("serve-log") / "serve.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@dataclass
class GatewayServer:
    """The gateway app served by uvicorn in a thread; ``keys`` maps a caller name to its bearer key."""

    app: object
    port: int
    keys: dict[str, str] = field(default_factory=dict)
    server: object = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state.gateway

    def headers(self, who: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"} if who else {}

    def http(self, who: str | None = None, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(who), timeout=60, **kwargs)

    def openai(self, who: str):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[who], max_retries=0, timeout=60)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + (labels or "")) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head == name + labels or (not labels and head.startswith(name + "{")) or head == name:
                    total += float(value)
        return total

    def start(self) -> GatewayServer:
        import uvicorn

        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"gateway-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)


ROLES = {"alice": "user", "bob": "user", "lara": "labeler", "ada": "admin"}


@pytest.fixture
def start_gateway(tmp_path, tokenizer) -> Iterator[Callable[..., GatewayServer]]:
    """Factory: a gateway with keys for alice and bob (users), lara (labeler), ada (admin)."""
    from gateway.app import create_app
    from gateway.auth import Role, append_key
    from gateway.settings import Settings

    gateways: list[GatewayServer] = []

    def start(backends: list[str], redis_url: str | None = None, **overrides) -> GatewayServer:
        keys_file = tmp_path / f"keys-{len(gateways)}.jsonl"
        keys = {name: append_key(keys_file, name=name, role=Role(role))[0] for name, role in ROLES.items()}
        port = free_port()
        settings = Settings(
            **({"backends": backends} if backends else {}),  # none: backends_dns in the overrides
            redis_url=redis_url,
            keys_file=keys_file,
            port=port,
            served_model_name=MODEL_NAME,
            registry_dir=overrides.pop("registry_dir", tmp_path / "registry"),
            health_interval_s=overrides.pop("health_interval_s", 0.5),
            json_logs=False,
            **overrides,
        )
        gateway = GatewayServer(create_app(settings, tokenizer=tokenizer), port, keys).start()
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway, serve, redis_server) -> GatewayServer:
    """The usual setup: one serve backend, Redis up."""
    return start_gateway([serve.url], redis_server.url_for("gateway"))
