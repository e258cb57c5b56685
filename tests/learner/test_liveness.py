"""Finding 7: the learner's liveness is its main loop's heartbeat (``/healthz`` on the metrics port), not the
metrics thread; its Redis client gives up on a Redis that accepts connections and never answers."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import redis as redis_lib

from learner.loop import Learner
from learner.metrics import LearnerMetrics
from learner.settings import Settings


def _settings(tmp_path, redis_url: str, **overrides) -> Settings:
    return Settings(
        redis_url=redis_url,
        state_dir=tmp_path / "state",
        registry_dir=tmp_path / "registry",
        stream_prefix="t",
        consumer_name="learner-0",
        metrics_port=0,
        **overrides,
    )


@pytest.mark.slow
def test_healthz_fails_when_the_heartbeat_is_stale_while_metrics_still_answer():
    metrics = LearnerMetrics()
    metrics.liveness_max_age_s = 0.3
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port}"
        metrics.beat()
        assert httpx.get(f"{url}/healthz").status_code == 200
        time.sleep(0.4)
        stale = httpx.get(f"{url}/healthz")
        assert stale.status_code == 503 and stale.json()["status"] == "stale"
        assert stale.json()["heartbeat_age_s"] > 0.3
        assert httpx.get(f"{url}/metrics").status_code == 200  # what the old probe looked at: still fine
        metrics.beat()
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert "learner_heartbeat_timestamp_seconds" in httpx.get(f"{url}/metrics").text
    finally:
        metrics.server.shutdown()


def test_the_main_loop_keeps_the_heartbeat_fresh_and_it_goes_stale_once_the_loop_stops(
    tmp_path, redis_server
):
    settings = _settings(
        tmp_path,
        redis_server.url_for("learner"),
        poll_interval_s=0.2,
        read_block_ms=100,
        liveness_max_age_s=1.0,
    )
    metrics = LearnerMetrics()
    learner = Learner(settings, metrics=metrics, progress=False)
    port = metrics.serve(0, addr="127.0.0.1")
    loop = threading.Thread(target=learner.run, daemon=True)
    try:
        loop.start()
        for _ in range(10):  # 2 s of idling (no events): every probe passes
            time.sleep(0.2)
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        learner.request_stop()
        loop.join(10)
        time.sleep(1.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 503
    finally:
        learner.request_stop()
        metrics.server.shutdown()


@pytest.mark.slow
def test_redis_client_times_out_on_a_redis_that_never_answers(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        learner = Learner(
            _settings(tmp_path, url, redis_socket_timeout_s=1.5, read_block_ms=100), progress=False
        )
        outcome: list[BaseException] = []

        def ping() -> None:
            try:
                learner.redis.ping()
            except BaseException as exc:  # noqa: BLE001 - whatever it is, the test reports it
                outcome.append(exc)

        started = time.monotonic()
        caller = threading.Thread(target=ping, daemon=True)
        caller.start()
        caller.join(20)
        assert not caller.is_alive(), "the Redis client blocked without a socket timeout"
        assert outcome and isinstance(outcome[0], redis_lib.TimeoutError)
        assert time.monotonic() - started < 10


def test_socket_timeout_must_exceed_the_blocking_read():
    with pytest.raises(ValueError, match="REDIS_SOCKET_TIMEOUT_S"):
        Settings(redis_url="redis://127.0.0.1:1/0", redis_socket_timeout_s=1.0, read_block_ms=1000)
