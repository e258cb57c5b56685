"""A throwaway stack for the gateway benchmarks: redis-server, serve and the gateway as child processes on
free loopback ports, started the way an operator would (``instructloop serve run`` / ``gateway run``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready at {url}")


class Stack:
    def __init__(
        self,
        model: str,
        *,
        serve: bool = True,
        gateway_workers: int = 1,
        gateway_env: dict | None = None,
        serve_threads: int = 1,
    ):
        self.workdir = Path(tempfile.mkdtemp(prefix="instructloop-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.named: dict[str, subprocess.Popen] = {}
        self.model = model
        self.env = dict(
            os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"
        )
        self.redis_port = free_port()
        self.serve_port = free_port()
        self.gateway_port = free_port()
        self._start_redis()
        if serve:
            self._start_serve(serve_threads)
        self.keys = self._make_keys()
        self._start_gateway(gateway_workers, gateway_env or {})

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _spawn(self, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            args, cwd=REPO_ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        self.named[name] = proc
        return proc

    def _start_redis(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed: apt-get install redis-server")
        proc = self._spawn(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            "redis",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start ({proc.poll()})")

    def _start_serve(self, threads: int) -> None:
        env = dict(
            self.env, INSTRUCTLOOP_SERVE_TORCH_THREADS=str(threads), INSTRUCTLOOP_SERVE_LOG_LEVEL="WARNING"
        )
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "serve",
                "run",
                "--model",
                self.model,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.serve_port),
                "--device",
                "cpu",
                "--max-batch-size",
                "16",
                "--max-queue",
                "256",
            ],
            "serve",
            env,
        )
        wait_http(f"{self.serve_url}/health", proc, "serve")

    def _make_keys(self) -> dict[str, str]:
        from gateway.auth import Role, append_key

        path = self.workdir / "keys.jsonl"
        self.keys_file = path
        return {role.value: append_key(path, name=f"bench-{role.value}", role=role)[0] for role in Role}

    def _start_gateway(self, workers: int, extra_env: dict) -> None:
        env = dict(
            self.env,
            INSTRUCTLOOP_GATEWAY_MODEL=self.model,
            INSTRUCTLOOP_GATEWAY_LOG_LEVEL="WARNING",
            INSTRUCTLOOP_GATEWAY_RATE_LIMIT_PER_MINUTE="100000000",
            INSTRUCTLOOP_GATEWAY_FEEDBACK_RATE_LIMIT_PER_MINUTE="100000000",
            INSTRUCTLOOP_GATEWAY_RATE_LIMIT_GENERATIONS_PER_MINUTE="100000000",
            INSTRUCTLOOP_GATEWAY_RATE_LIMIT_TOKENS_PER_MINUTE="1000000000",
            **extra_env,
        )
        proc = self._spawn(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                "gateway",
                "run",
                "--port",
                str(self.gateway_port),
                "--backends",
                self.serve_url,
                "--redis-url",
                self.redis_url,
                "--keys-file",
                str(self.keys_file),
                "--workers",
                str(workers),
            ],
            "gateway",
            env,
        )
        wait_http(f"{self.gateway_url}/healthz", proc, "gateway")

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU time of one child process and its own children (gateway workers)."""
        import psutil

        root = psutil.Process(self.named[name].pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
