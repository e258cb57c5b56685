"""``instructloop up``'s supervisor: start order, health waits, failure reports, clean stops.

Components here are real processes (small Python programs, a real HTTP server over loopback); the
whole stack on a tiny model is tested in tests/test_loop_e2e.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from launcher.supervisor import (
    ComponentFailed,
    ComponentSpec,
    RestartPolicy,
    Supervisor,
    free_port,
    http_health,
    redis_health,
    tail_lines,
)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists" until reaped; the supervisor reaps its children, so this is exact
    return True


@pytest.fixture
def supervisors():
    """Every supervisor a test makes is stopped at the end, whatever the test did."""
    made: list[Supervisor] = []
    yield made
    for supervisor in made:
        supervisor.stop_all()


def _supervisor(made: list[Supervisor], specs: list[ComponentSpec], **kwargs) -> Supervisor:
    messages: list[str] = []
    supervisor = Supervisor(specs, echo=messages.append, **kwargs)
    supervisor.messages = messages  # type: ignore[attr-defined]
    made.append(supervisor)
    return supervisor


@pytest.mark.slow
def test_component_that_fails_to_start_is_reported_with_exit_code_and_log(tmp_path: Path, supervisors):
    log_path = tmp_path / "logs" / "serve" / "serve.log"
    spec = ComponentSpec(
        name="serve",
        argv=_python("""
            import sys
            print("loading model /nowhere", flush=True)
            print("ModelNotAvailable: /nowhere is not a Hugging Face model folder", file=sys.stderr)
            sys.exit(3)
        """),
        health=lambda: False,
        log_path=log_path,
        env=dict(os.environ),
    )
    supervisor = _supervisor(supervisors, [spec])
    with pytest.raises(ComponentFailed) as failed:
        supervisor.start_all()
    failure = failed.value
    assert (failure.name, failure.exit_code, failure.log_path) == ("serve", 3, log_path)
    report = failure.report()
    assert "serve exited (exit code 3)" in report
    assert str(log_path) in report
    assert "ModelNotAvailable: /nowhere is not a Hugging Face model folder" in report  # the log tail


@pytest.mark.slow
def test_component_that_never_gets_healthy_times_out_with_a_clear_message(tmp_path: Path, supervisors):
    spec = ComponentSpec(
        name="learner",
        argv=_python("import time; time.sleep(60)"),
        health=lambda: False,
        log_path=tmp_path / "learner.log",
        env=dict(os.environ),
        startup_timeout_s=0.5,
    )
    supervisor = _supervisor(supervisors, [spec])
    with pytest.raises(ComponentFailed, match="learner did not become healthy within 0.5s") as failed:
        supervisor.start_all()
    assert "--startup-timeout" in failed.value.reason
    pid = supervisor.component("learner").proc.pid
    supervisor.stop_all()
    assert supervisor.component("learner").proc.returncode == -signal.SIGTERM
    assert not _alive(pid)


@pytest.mark.slow
def test_dependents_start_only_after_their_dependencies_are_healthy(tmp_path: Path, supervisors):
    port = free_port()
    order_file = tmp_path / "order"
    specs = [
        ComponentSpec(
            name="gateway",
            argv=_python(f"open({str(order_file)!r}, 'a').write('gateway\\n'); import time; time.sleep(60)"),
            health=lambda: order_file.exists() and "gateway" in order_file.read_text(),
            log_path=tmp_path / "gateway.log",
            env=dict(os.environ),
            after=["serve"],
        ),
        ComponentSpec(
            name="serve",
            argv=_http_server(port),
            health=http_health(f"http://127.0.0.1:{port}/"),
            log_path=tmp_path / "serve.log",
            env=dict(os.environ),
            url=f"http://127.0.0.1:{port}",
        ),
    ]
    supervisor = _supervisor(supervisors, specs)
    assert supervisor.start_all()
    assert [c.name for c in supervisor.started_order] == ["serve", "gateway"]
    messages = supervisor.messages
    assert messages.index(next(m for m in messages if m.startswith("serve is healthy"))) < messages.index(
        next(m for m in messages if m.startswith("starting gateway"))
    )
    pids = [c.proc.pid for c in supervisor.started_order]
    supervisor.stop_all()
    assert all(not _alive(pid) for pid in pids)
    # stopped in reverse start order
    stops = [m for m in messages if m.startswith("stopped")]
    assert [m.split()[1] for m in stops] == ["gateway", "serve"]


@pytest.mark.slow
def test_a_crashed_component_is_restarted_with_a_new_pid_and_the_rest_keeps_running(
    tmp_path: Path, supervisors
):
    """Finding 8: one component dying (SIGKILL) no longer stops the stack; it is restarted after its backoff,
    its log says so, the change callback (stack.json) runs, and the other components are untouched."""
    port_a, port_b = free_port(), free_port()
    specs = [
        ComponentSpec(
            name="serve",
            argv=_http_server(port_a),
            health=http_health(f"http://127.0.0.1:{port_a}/"),
            log_path=tmp_path / "serve" / "serve.log",
            env=dict(os.environ),
        ),
        ComponentSpec(
            name="learner",
            argv=_http_server(port_b),
            health=http_health(f"http://127.0.0.1:{port_b}/"),
            log_path=tmp_path / "learner" / "learner.log",
            env=dict(os.environ),
        ),
    ]
    changes: list[tuple[int, bool]] = []
    supervisor = _supervisor(
        supervisors,
        specs,
        restart=RestartPolicy(backoff_initial_s=0.2, max_restarts=3),
        on_change=lambda: changes.append((learner.proc.pid, learner.healthy)),
    )
    supervisor.install_signal_handlers()  # SIGCHLD wakes watch() as soon as the learner dies
    learner = supervisor.component("learner")
    try:
        assert supervisor.start_all()
        serve_pid, old_pid = supervisor.component("serve").proc.pid, learner.proc.pid
        os.kill(old_pid, signal.SIGKILL)
        watcher = threading.Thread(target=lambda: changes.append(supervisor.watch()), daemon=True)
        watcher.start()
        deadline = time.monotonic() + 15
        while not (learner.restarts == 1 and learner.healthy) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        supervisor.stop_requested.set()
        supervisor.wake.set()
        watcher.join(5)
        supervisor.restore_signal_handlers()
    assert learner.restarts == 1 and learner.healthy, supervisor.messages
    assert changes[-1] is None  # watch() ended on the stop request, not on a failure
    assert learner.proc.pid != old_pid and _alive(learner.proc.pid)
    assert (learner.proc.pid, True) in changes  # stack.json was rewritten with the new pid once healthy
    assert supervisor.component("serve").proc.pid == serve_pid and _alive(serve_pid)
    assert any(
        m.startswith("learner exited (killed by SIGKILL): restarting in 0.2s") for m in supervisor.messages
    )
    assert (
        "==== instructloop up: restarting learner (restart 1)"
        in (tmp_path / "learner" / "learner.log").read_text()
    )
    supervisor.stop_all()
    assert not _alive(serve_pid) and not _alive(learner.proc.pid)


@pytest.mark.slow
def test_a_crash_loop_gives_up_and_reports_the_component(tmp_path: Path, supervisors):
    """A component that dies again right after each restart: after max_restarts restarts within the window
    the supervisor stops trying and reports it (``up`` then stops everything)."""
    ready = tmp_path / "ready"
    spec = ComponentSpec(
        name="learner",
        argv=_python(f"""
            import pathlib, sys, time
            ready = pathlib.Path({str(ready)!r})
            first_start = not ready.exists()
            ready.write_text("ok")
            # the first start stays up long enough for start_all to see it healthy, even on a loaded machine
            time.sleep(3.0 if first_start else 0.2)
            print("Traceback: learner cannot reach Redis", flush=True)
            sys.exit(4)
        """),
        health=ready.exists,
        log_path=tmp_path / "learner.log",
        env=dict(os.environ),
    )
    supervisor = _supervisor(
        supervisors,
        [spec],
        restart=RestartPolicy(backoff_initial_s=0.1, backoff_max_s=1.0, max_restarts=2, window_s=60),
    )
    assert supervisor.start_all()
    failure = supervisor.watch()
    assert failure is not None
    assert (failure.name, failure.exit_code) == ("learner", 4)
    assert "crash loop: 3 crashes within 60s" in failure.report()
    assert "Traceback: learner cannot reach Redis" in failure.report()
    assert supervisor.component("learner").restarts == 2
    waits = [m.split("restarting in ")[1].split("s ")[0] for m in supervisor.messages if "restarting in" in m]
    assert waits == ["0.1", "0.2"]  # the backoff doubles


def test_restart_backoff_doubles_up_to_its_cap():
    policy = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=10.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="backoff"):
        RestartPolicy(backoff_initial_s=5.0, backoff_max_s=1.0)


@pytest.mark.slow
def test_stop_escalates_to_sigkill_for_a_component_ignoring_sigterm(tmp_path: Path, supervisors):
    ready = tmp_path / "ready"
    spec = ComponentSpec(
        name="stubborn",
        argv=_python(f"""
            import signal, time, pathlib
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            pathlib.Path({str(ready)!r}).write_text("ok")
            time.sleep(60)
        """),
        health=ready.exists,
        log_path=tmp_path / "stubborn.log",
        env=dict(os.environ),
    )
    supervisor = _supervisor(supervisors, [spec], stop_timeout_s=0.5)
    assert supervisor.start_all()
    supervisor.stop_all()
    assert supervisor.component("stubborn").proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigterm_to_the_supervisor_ends_watch(tmp_path: Path, supervisors):
    port = free_port()
    spec = ComponentSpec(
        name="serve",
        argv=_http_server(port),
        health=http_health(f"http://127.0.0.1:{port}/"),
        log_path=tmp_path / "serve.log",
        env=dict(os.environ),
    )
    supervisor = _supervisor(supervisors, [spec])
    supervisor.install_signal_handlers()
    try:
        assert supervisor.start_all()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets stop_requested
        assert supervisor.watch() is None
    finally:
        supervisor.restore_signal_handlers()
    assert supervisor.stop_requested.is_set()


def test_redis_health_against_a_real_redis(redis_server):
    assert redis_health(redis_server.url_for("probe"))()
    assert not redis_health(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)()


def test_unknown_dependency_is_refused(tmp_path: Path):
    spec = ComponentSpec(
        name="gateway", argv=["true"], health=lambda: True, log_path=tmp_path / "g.log", after=["serve"]
    )
    with pytest.raises(ValueError, match="unknown components"):
        Supervisor([spec])


def test_tail_lines_reads_the_end_of_a_log(tmp_path: Path):
    log_file = tmp_path / "x.log"
    log_file.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail_lines(log_file, 3) == ["line 997", "line 998", "line 999"]
    assert tail_lines(tmp_path / "missing.log") == []


ROOT = Path(__file__).resolve().parents[2]


def _run_up(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "up", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_up_reports_a_component_that_fails_to_start_and_stops_the_rest(tmp_path: Path):
    """A model folder serve cannot load: `up` names serve, its exit code and log, shows the log's end,
    stops Redis (already started) and exits 1."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    run_dir, redis_port = tmp_path / "run", free_port()
    result = _run_up(
        "--run-dir",
        str(run_dir),
        "--model",
        str(not_a_model),
        "--port",
        str(free_port()),
        "--redis-port",
        str(redis_port),
        "--no-learner",
        "--startup-timeout",
        "120",
    )
    output = result.stdout + result.stderr
    serve_log = run_dir / "logs" / "serve" / "serve.log"
    assert result.returncode == 1, output
    assert "error: serve exited (exit code 2)" in output
    assert f"log: {serve_log}" in output
    assert "is not a Hugging Face model folder (no config.json)" in output  # the tail of serve's log
    assert "stopped redis" in output
    assert "starting gateway" not in output  # the gateway waits for a healthy serve
    assert not (run_dir / "stack.json").exists()
    assert redis_health(f"redis://127.0.0.1:{redis_port}/0", timeout=0.2)() is False  # nothing left running
    keys = run_dir / "api-keys.json"
    assert (keys.stat().st_mode & 0o777) == 0o600


@pytest.mark.slow
def test_up_refuses_a_busy_gateway_port_with_the_fix(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_up("--run-dir", str(tmp_path / "run"), "--port", str(port), timeout=60)
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use: pass --port N" in result.stdout + result.stderr
