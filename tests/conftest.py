"""Shared fixtures: a throwaway redis-server on a free port, the real tokenizer, a tiny random-init model;
and the test tiers (``slow`` marks, and the guard that keeps the fast tier free of processes and servers).

Tests mirror the package tree (tests/serve, tests/gateway, tests/learner, tests/instructloop).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from instructloop.streams import DEFAULT_PREFIX

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server process owned by a test, started as ``instructloop up`` starts it: with the stack's
    own ACL file (``launcher/credentials.py``: ``default`` off, one user per component). A test connects as
    the user of the component it plays (``url_for("gateway")`` for a gateway, ``"learner"``, ``"serve"``) and
    sets up or inspects as ``admin`` (``client()``), so a command missing from a user's rules fails a test.
    ``stop``/``start`` simulate an outage. ``prefix``: the stream prefix the ACL rules are written for."""

    def __init__(self, workdir: Path, appendonly: bool = False, prefix: str = DEFAULT_PREFIX):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: run `make install` (apt-get install redis-server)")
        from launcher.credentials import acl_file_text, ensure_passwords, write_private

        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.prefix = prefix
        self.passwords = ensure_passwords(workdir / "passwords.json")
        self.acl_file = workdir / "users.acl"
        write_private(self.acl_file, acl_file_text(self.passwords, prefix))
        self.proc: subprocess.Popen | None = None

    def url_for(self, user: str) -> str:
        """``redis://user:password@127.0.0.1:port/0`` for one of the ACL file's users."""
        from launcher.credentials import user_url

        return user_url("127.0.0.1", self.port, user, self.passwords[user])

    @property
    def url(self) -> str:
        raise AttributeError(
            "RedisServer has no single URL: connect as the component's user, url_for('gateway' | 'learner' | "
            "'serve'), or url_for('admin') / client() to set up and inspect"
        )

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
            "--aclfile",
            str(self.acl_file),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        args += (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        hello = f"AUTH probe {self.passwords['probe']}\r\nPING\r\n".encode()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(hello)
                    reply = b""
                    while reply.count(b"\r\n") < 2:
                        chunk = sock.recv(64)
                        if not chunk:
                            break
                        reply += chunk
                    if reply == b"+OK\r\n+PONG\r\n":
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def client(self, user: str = "admin"):
        """A client as ``user`` (``admin`` by default: the test's own setup and inspection)."""
        import redis

        return redis.Redis.from_url(self.url_for(user))


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server_aof(tmp_path_factory) -> Iterator[RedisServer]:
    """A redis-server with AOF (fsync always): for tests about durability across a restart."""
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tokenizer():
    """The real default tokenizer (fixed special tokens), loaded from the shipped GGUF."""
    from instructloop.model import load_default_tokenizer

    return load_default_tokenizer()


def tiny_llama(tokenizer, seed: int = 0, **config_overrides):
    """A tiny random-init Llama with the real tokenizer's vocabulary and special tokens (2 layers, hidden 64,
    tied embeddings unless overridden)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config_overrides,
    }
    return LlamaForCausalLM(LlamaConfig(**config))


def save_model_dir(model, tokenizer, path: Path) -> Path:
    """Save ``model`` (its generation config taking the tokenizer's pad and EOS) and the tokenizer to
    ``path``."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_model_dir(path: Path, tokenizer, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random-init Llama (same vocab as the real tokenizer) plus the tokenizer to ``path``."""
    return save_model_dir(tiny_llama(tokenizer, seed, **config_overrides), tokenizer, path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A folder with a tiny random-init causal LM and the real tokenizer (loads in well under a second)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), tokenizer)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, prepared once (about 30 s the first time on 2 cores)."""
    from instructloop.model import prepare_default_model

    return prepare_default_model()


# Test tiers. `make test` runs every test; `make test-fast` (`pytest -m "not slow"`) runs the unit tests only:
# no process, no server, no browser, no default model. A test is slow when it is marked `@pytest.mark.slow`,
# lives under one of SLOW_PATHS, or uses one of SLOW_FIXTURES (directly or through another fixture). Every
# other test runs under a guard that fails it if it starts a process or listens on a socket, so a slow test
# cannot slip into the fast tier unmarked.
SLOW_PATHS = ("tests/deploy/", "tests/faults/", "tests/gateway/web/", "tests/test_loop_e2e.py")
SLOW_FIXTURES = frozenset(
    {
        "redis_server",  # a redis-server process
        "redis_server_aof",
        "default_model_dir",  # the real default model (prepared on first use, ~30 s)
        "serve",  # tests/gateway: `instructloop serve run` as a process
        "start_gateway",  # tests/gateway: uvicorn on a loopback port
        "start_server",  # tests/serve: uvicorn on a loopback port
        "tiny_server",
        "browser",  # tests/gateway/web: Chromium
    }
)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        path = Path(os.path.relpath(item.path, config.rootpath)).as_posix()
        if path.startswith(SLOW_PATHS) or SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)


class _FastTierViolation(RuntimeError):
    pass


@contextlib.contextmanager
def _no_process_no_server(nodeid: str, violations: list[str]) -> Iterator[None]:
    """Within a fast-tier test, starting a process or listening on a socket fails the test."""
    import multiprocessing.process

    def refuse(what: str):
        def refused(*args, **kwargs):
            message = (
                f"{nodeid} {what}, which the fast tier (`make test-fast`) never does: mark the test "
                "`@pytest.mark.slow` or use a fixture listed in tests/conftest.py SLOW_FIXTURES"
            )
            violations.append(message)
            raise _FastTierViolation(message)

        return refused

    patched = [
        (subprocess.Popen, "_execute_child", refuse("starts a process")),
        (socket.socket, "listen", refuse("listens on a socket (a server)")),
        (multiprocessing.process.BaseProcess, "start", refuse("starts a process")),
    ]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patched]
    for owner, name, replacement in patched:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            if original is None:  # inherited (socket.socket.listen comes from _socket.socket)
                delattr(owner, name)
            else:
                setattr(owner, name, original)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item))


def _guarded(item):
    if item.get_closest_marker("slow") is not None:
        return (yield)
    violations: list[str] = []
    with _no_process_no_server(item.nodeid, violations):
        result = yield
    if violations:  # also when the code under test caught the error
        pytest.fail(violations[0], pytrace=False)
    return result
