"""serve test helpers: a real uvicorn server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import build_tiny_model_dir, free_port


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """serve tests run servers in this process: one torch thread on the shared 2-core machine (restored after,
    so other rooms' tests keep their own setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ServerThread:
    """``create_app(settings)`` served by uvicorn in a background thread; ``stop()`` shuts it down cleanly."""

    def __init__(self, **overrides):
        import uvicorn

        from serve.app import create_app
        from serve.settings import Settings

        self.port = free_port()
        overrides.setdefault("json_logs", False)
        self.settings = Settings(host="127.0.0.1", port=self.port, **overrides)
        self.app = create_app(self.settings)
        self.runtime = self.app.state.runtime
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("serve did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample on /metrics (0.0 when absent)."""
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with a wide init, so greedy outputs vary token to token (a strict parity check)."""
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("varied-model"), tokenizer, seed=0, initializer_range=0.3
    )


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(**overrides) -> ServerThread:
        server = ServerThread(**overrides).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tokenizer) -> Iterator[ServerThread]:
    """One server on the varied tiny model shared by a module's protocol tests."""
    model_dir = build_tiny_model_dir(
        tmp_path_factory.mktemp("tiny-served"), tokenizer, seed=0, initializer_range=0.3
    )
    server = ServerThread(
        model=str(model_dir),
        device="cpu",
        max_batch_size=8,
        max_queue=16,
        max_input_tokens=256,
        max_total_tokens=512,
    ).start()
    yield server
    server.stop()
