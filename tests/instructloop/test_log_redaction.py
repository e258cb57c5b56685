"""Redis URLs carry per-component passwords (redis://gateway:<password>@…): logs and CLI errors never
show them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from instructloop.logs import JsonFormatter, configure_logging, redact_url
from tests.conftest import free_port

SECRET = "s3cr3t-0123456789abcdef"


def test_redact_url_hides_only_the_password():
    text = (
        f"cannot reach redis://gateway:{SECRET}@instructloop-redis:6379/0 (refused); plain redis://h:6379/0"
    )
    redacted = redact_url(text)
    assert SECRET not in redacted
    assert "redis://gateway:***@instructloop-redis:6379/0" in redacted and "redis://h:6379/0" in redacted


def test_json_logs_never_print_a_url_password(capsys):
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "connect to %s failed", (f"redis://u:{SECRET}@h/0",), None
    )
    record.redis_url = f"rediss://learner:{SECRET}@h:6380/0"
    line = JsonFormatter().format(record)
    assert SECRET not in line and json.loads(line)["redis_url"] == "rediss://learner:***@h:6380/0"
    configure_logging("INFO", json_logs=False)
    logging.getLogger("redaction-test").warning("url redis://serve:%s@h/0", SECRET)
    assert SECRET not in capsys.readouterr().err


@pytest.mark.slow
def test_learner_cli_error_does_not_print_the_password(tmp_path):
    url = f"redis://learner:{SECRET}@127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "learner", "status"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(_root()),
            "INSTRUCTLOOP_LEARNER_REDIS_URL": url,
            "INSTRUCTLOOP_HOME": str(tmp_path),
        },
    )
    assert result.returncode != 0
    assert SECRET not in result.stdout + result.stderr
    assert "learner:***@127.0.0.1" in result.stdout + result.stderr


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
