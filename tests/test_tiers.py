"""The test tiers (tests/conftest.py): what `make test-fast` deselects, and the guard that fails an unmarked
test which starts a process or a server. Runs pytest on a scratch suite that uses the repo's tier hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRATCH_CONFTEST = """
import pytest
from tests.conftest import pytest_collection_modifyitems, pytest_runtest_call, pytest_runtest_setup

@pytest.fixture
def redis_server():  # the name is what marks a test slow
    return None
"""

SCRATCH_TESTS = """
import socket
import subprocess
import pytest

def test_unit():
    assert 1 + 1 == 2

def test_starts_a_process_unmarked():
    subprocess.run(["true"], check=True)

def test_swallows_the_refusal_and_still_fails():
    try:
        subprocess.run(["true"], check=True)
    except Exception:
        pass

def test_listens_unmarked():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()

@pytest.mark.slow
def test_starts_a_process_marked():
    subprocess.run(["true"], check=True)

def test_uses_a_slow_fixture(redis_server):
    subprocess.run(["true"], check=True)
"""


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(SCRATCH_CONFTEST)
    (tmp_path / "test_scratch.py").write_text(SCRATCH_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_guard_fails_unmarked_processes_and_servers_and_lets_slow_tests_through(tmp_path):
    result = _pytest(tmp_path)
    out = result.stdout
    assert "3 failed, 3 passed" in out, out
    for name in ("starts_a_process_unmarked", "swallows_the_refusal", "listens_unmarked"):
        assert f"FAILED test_scratch.py::test_{name}" in out, out
    assert "mark the test `@pytest.mark.slow`" in out, out


@pytest.mark.slow
def test_the_fast_tier_deselects_marked_tests_and_tests_using_a_slow_fixture(tmp_path):
    result = _pytest(tmp_path, "-m", "not slow", "--collect-only")
    out = result.stdout
    assert "4/6 tests collected (2 deselected)" in out, out
    assert "test_starts_a_process_marked" not in out and "test_uses_a_slow_fixture" not in out, out
