"""The fast subset of the fault-injection suite (bench/faults.py has all of it, with figures in
docs/reliability.md): one real stack (redis-server with AOF ``always``, serve, the learner, the gateway)
under a restarting supervisor, steady completions + feedback from several clients, and faults injected
with SIGKILL. Every feedback the gateway answered 202 must be in the learner's dataset exactly once."""

from __future__ import annotations

import pytest

from bench.faults import FaultStack, scenario_gateway_kill, scenario_learner_kill, scenario_redis_kill


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    stack = FaultStack(
        tiny_model_dir, tmp_path_factory.mktemp("faults"), replicas=1, appendfsync="always", clients=3
    )
    stack.start()
    yield stack
    stack.stop()


def _assert_nothing_lost(result: dict) -> None:
    assert result["accepted"] > 0, result
    assert result["lost"] == 0, result
    assert result["double_counted"] == 0, result
    assert result["in_dataset"] == result["accepted"], result


def test_redis_sigkill_under_load_loses_no_accepted_feedback_with_aof_always(stack):
    result = scenario_redis_kill(stack, seconds=4.0)
    _assert_nothing_lost(result)
    assert stack.supervisor.component("redis").restarts == 1  # restarted alone; the rest kept running
    assert [stack.supervisor.component(n).restarts for n in ("serve-0", "learner", "gateway")] == [0, 0, 0]


def test_gateway_sigkill_and_restart_loses_and_doubles_nothing(stack):
    result = scenario_gateway_kill(stack, seconds=4.0)
    _assert_nothing_lost(result)
    assert stack.supervisor.component("gateway").restarts == 1


def test_learner_sigkilled_at_random_points_loses_and_doubles_nothing(stack):
    result = scenario_learner_kill(stack, kills=3, seconds=1.0, seed=11)
    _assert_nothing_lost(result)
    assert result["restarts"] == 3
