"""Fixtures for every learner test."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import RedisServer
from tests.learner.helpers import PREFIX


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices on a CPU shared with other test processes: one thread is several times faster than two
    spin-waiting threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def redis_server(tmp_path_factory):
    """The stack's ACL'd redis-server (tests/conftest.py), its rules written for the learner tests' prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), prefix=PREFIX)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server_aof(tmp_path_factory):
    """As ``redis_server``, with AOF (fsync always)."""
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True, prefix=PREFIX)
    server.start()
    yield server
    server.stop()
