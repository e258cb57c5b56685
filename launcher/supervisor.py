"""Process supervision for ``instructloop up``: start components in order, probe health, watch, restart, stop.

A component that exits after it was healthy is restarted with exponential backoff, as a Kubernetes
``restartPolicy: Always`` would (``RestartPolicy``); the supervisor gives up, and ``up`` stops everything,
only on a crash loop: more than ``max_restarts`` restarts of one component within ``window_s``.

Nothing here knows which components exist; ``launcher.stack`` builds their specs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HealthCheck = Callable[[], bool]
"""Returns True when the component is ready; must return (not hang) within about a second."""

TAIL_LINES = 20


class ComponentFailed(RuntimeError):
    """A component exited or never became healthy. ``report()`` is what ``up`` prints."""

    def __init__(self, name: str, reason: str, log_path: Path, exit_code: int | None = None):
        self.name = name
        self.reason = reason
        self.log_path = log_path
        self.exit_code = exit_code
        super().__init__(f"{name} {reason} (log: {log_path})")

    def report(self, lines: int = TAIL_LINES) -> str:
        tail = tail_lines(self.log_path, lines)
        body = "\n".join(f"  | {line}" for line in tail) if tail else "  | (the log is empty)"
        return (
            f"error: {self.name} {self.reason}\n  log: {self.log_path}\n  last {len(tail)} log lines:\n{body}"
        )


def describe_exit(code: int | None) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` (subprocess reports a signal as a negative code)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def tail_lines(path: Path, count: int = TAIL_LINES) -> list[str]:
    """The last ``count`` lines of a (possibly large) text file; [] when it does not exist."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-count:]


def http_health(url: str, timeout: float = 1.0) -> HealthCheck:
    """Healthy when ``GET url`` answers 200."""
    import httpx

    def check() -> bool:
        try:
            return httpx.get(url, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def redis_health(url: str, timeout: float = 1.0) -> HealthCheck:
    """Healthy when the Redis at ``url`` answers PING."""

    def check() -> bool:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    return check


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on ``port`` (SO_REUSEADDR like uvicorn: TIME_WAIT is no obstacle)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pick_port(preferred: int | None, host: str = "127.0.0.1") -> int:
    """``preferred`` if it is free, else any free port (for ports nobody outside ``up`` needs to know)."""
    if preferred and port_is_free(preferred, host):
        return preferred
    return free_port(host)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child when ``up`` dies (even by SIGKILL); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RestartPolicy:
    """When and how often a crashed component is restarted (Kubernetes' CrashLoopBackOff, in small)."""

    backoff_initial_s: float = 1.0
    """Wait before the first restart; doubled for each further crash while the component is unstable."""
    backoff_max_s: float = 30.0
    """The longest wait between two restarts."""
    max_restarts: int = 5
    """More restarts than this within ``window_s`` is a crash loop: the supervisor gives up."""
    window_s: float = 300.0
    """The crash-loop window; a component that stays up this long has its backoff reset."""

    def __post_init__(self) -> None:
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("restart backoff: need 0 <= backoff_initial_s <= backoff_max_s")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("restart policy: need max_restarts >= 0 and window_s > 0")

    def backoff(self, consecutive_crashes: int) -> float:
        """The wait before restart number ``consecutive_crashes`` (1-based) of an unstable component."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, consecutive_crashes - 1))


# ---- one component ------------------------------------------------------------------------------------


@dataclass
class ComponentSpec:
    """How to start one component and how to know it is ready."""

    name: str
    argv: list[str]
    health: HealthCheck
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)  # components that must be healthy before this one starts
    url: str | None = None  # shown to the user and written to stack.json
    startup_timeout_s: float = 600.0


class Component:
    """A running component: its process (own process group) and its log file."""

    def __init__(self, spec: ComponentSpec):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.healthy = False
        self.restarts = 0
        """How many times the supervisor restarted this component (shown in stack.json)."""
        self.crash_times: list[float] = []
        """Monotonic times of the crashes still inside the restart policy's window."""
        self.restart_at: float | None = None
        """When a crashed component is due to be started again (None: running or not crashed)."""

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_path, "ab") as log_file:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            what = (
                f"restarting {self.name} (restart {self.restarts})"
                if self.restarts
                else f"starting {self.name}"
            )
            log_file.write(f"==== instructloop up: {what} at {stamp}: {' '.join(self.spec.argv)}\n".encode())
            log_file.flush()
            try:
                self.proc = subprocess.Popen(
                    self.spec.argv,
                    env=self.spec.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches `up` only; `up` stops components in order
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                log_file.write(f"cannot start {self.name}: {exc}\n".encode())
                raise ComponentFailed(self.name, f"could not be started ({exc})", self.spec.log_path) from exc
        self.started_at = time.monotonic()
        self.healthy = False
        self.restart_at = None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def check_health(self) -> bool:
        """Raise ``ComponentFailed`` if the process exited; else run the health check (once healthy,
        stays)."""
        code = self.exit_code()
        if code is not None:
            raise ComponentFailed(
                self.name, f"exited ({describe_exit(code)})", self.spec.log_path, exit_code=code
            )
        if not self.healthy:
            self.healthy = self.spec.health()
        return self.healthy

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the process group, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: SIGKILL", self.name, timeout_s)
                self._signal(signal.SIGKILL)
                self.proc.wait()
        else:
            self._signal(signal.SIGKILL)  # the leader is gone; make sure nothing of its group is left
        return self.proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - the group was recycled by another user
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


# ---- the supervisor -----------------------------------------------------------------------------------


class Supervisor:
    """Starts components in dependency order, waits for their health, watches them, stops them in reverse.

    Wake-ups come from SIGCHLD (a component exited), SIGINT/SIGTERM (stop) or the poll interval (the
    next health check); nothing waits a fixed time to "let something start".
    """

    def __init__(
        self,
        specs: list[ComponentSpec],
        *,
        stop_timeout_s: float = 20.0,
        poll_interval_s: float = 0.25,
        echo: Callable[[str], None] = print,
        restart: RestartPolicy | None = None,
        on_change: Callable[[], None] | None = None,
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate component names: {names}")
        for spec in specs:
            unknown = set(spec.after) - set(names)
            if unknown:
                raise ValueError(f"{spec.name} waits for unknown components {sorted(unknown)}")
        self.components = [Component(s) for s in specs]
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.echo = echo
        self.restart = restart or RestartPolicy()
        self.on_change = on_change
        """Called after a component was restarted or became healthy again (``up`` rewrites stack.json)."""
        self.stop_requested = threading.Event()
        self.wake = threading.Event()
        self.started_order: list[Component] = []
        self._signals = 0
        self._previous_handlers: dict[int, object] = {}

    # -- signals --
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._on_stop_signal)
        self._previous_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        self.stop_requested.set()
        self.wake.set()

    def _on_child(self, signum: int, frame: object) -> None:
        self.wake.set()

    def _sleep(self) -> None:
        self.wake.wait(self.poll_interval_s)
        self.wake.clear()

    # -- lifecycle --
    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def start_all(self) -> bool:
        """Start everything and wait until all are healthy. False if a stop was requested meanwhile.

        Raises ``ComponentFailed`` when one exits or times out (the caller then calls ``stop_all``)."""
        waiting = list(self.components)
        while waiting:
            if self.stop_requested.is_set():
                return False
            healthy = {c.name for c in self.components if c.healthy}
            for component in waiting:
                if component.proc is None and set(component.spec.after) <= healthy:
                    self.echo(f"starting {component.name} (log: {component.spec.log_path})")
                    component.start()
                    self.started_order.append(component)
            for component in list(waiting):
                if component.proc is None:
                    continue
                if component.check_health():
                    took = time.monotonic() - component.started_at
                    self.echo(
                        f"{component.name} is healthy after {took:.1f}s"
                        + (f" at {component.spec.url}" if component.spec.url else "")
                    )
                    waiting.remove(component)
                elif time.monotonic() - component.started_at > component.spec.startup_timeout_s:
                    raise ComponentFailed(
                        component.name,
                        f"did not become healthy within {component.spec.startup_timeout_s:g}s "
                        "(raise --startup-timeout if it is only slow)",
                        component.spec.log_path,
                    )
            if waiting:
                self._sleep()
        return True

    def watch(self) -> ComponentFailed | None:
        """Block until a stop is requested (None) or a component crash-loops (its failure).

        A component that exits is restarted after its backoff; one that does not become healthy within its
        start-up timeout after a restart is killed and counts as a crash."""
        while not self.stop_requested.is_set():
            now = time.monotonic()
            for component in self.started_order:
                failure = self._tend(component, now)
                if failure is not None:
                    return failure
            waits = [c.restart_at - now for c in self.started_order if c.restart_at is not None]
            self.wake.wait(max(0.05, min([1.0, self.poll_interval_s * 4, *waits])))
            self.wake.clear()
        return None

    def _tend(self, component: Component, now: float) -> ComponentFailed | None:
        """One look at one component: notice a crash, restart when due, follow health after a restart."""
        if component.restart_at is not None:
            if now >= component.restart_at:
                component.restarts += 1
                self.echo(f"restarting {component.name} (restart {component.restarts})")
                try:
                    component.start()
                except ComponentFailed as failure:
                    return failure
                self._changed()
            return None
        code = component.exit_code()
        if code is None:
            if not component.healthy:
                if component.spec.health():
                    component.healthy = True
                    self.echo(f"{component.name} is healthy again after {now - component.started_at:.1f}s")
                    self._changed()
                elif now - component.started_at > component.spec.startup_timeout_s:
                    self.echo(
                        f"{component.name} did not become healthy within "
                        f"{component.spec.startup_timeout_s:g}s after a restart: killing it"
                    )
                    component.stop(0.0)
                    return self._crashed(component, "did not become healthy after a restart", now)
            return None
        return self._crashed(component, f"exited ({describe_exit(code)})", now, code)

    def _crashed(
        self, component: Component, reason: str, now: float, code: int | None = None
    ) -> ComponentFailed | None:
        """Schedule a restart with backoff, or give up (a crash loop): returns the failure to report."""
        window = self.restart.window_s
        if component.crash_times and now - component.started_at > window:
            component.crash_times.clear()  # it stayed up a whole window: stable again, backoff resets
        component.crash_times = [t for t in component.crash_times if now - t <= window] + [now]
        component.healthy = False
        recent = len(component.crash_times)
        if recent > self.restart.max_restarts:
            return ComponentFailed(
                component.name,
                f"{reason}; crash loop: {recent} crashes within {window:g}s "
                f"(more than --max-restarts {self.restart.max_restarts})",
                component.spec.log_path,
                exit_code=code,
            )
        delay = self.restart.backoff(recent)
        component.restart_at = now + delay
        self.echo(
            f"{component.name} {reason}: restarting in {delay:.1f}s "
            f"(crash {recent} of at most {self.restart.max_restarts} within {window:g}s; "
            f"log: {component.spec.log_path})"
        )
        log.warning(
            "component crashed; restarting",
            extra={
                "component": component.name,
                "reason": reason,
                "restart_in_s": delay,
                "recent_crashes": recent,
            },
        )
        return None

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception as exc:  # pragma: no cover - a stack.json write must not stop supervision
                log.warning("supervisor change callback failed", extra={"error": str(exc)})

    def stop_all(self) -> None:
        """Stop started components in reverse start order (a second Ctrl-C/SIGTERM skips the grace time)."""
        for component in reversed(self.started_order):
            if component.proc is None:
                continue
            was_running = component.exit_code() is None
            grace = 0.0 if self._signals >= 2 else self.stop_timeout_s
            code = component.stop(grace)
            if was_running:
                self.echo(f"stopped {component.name} ({describe_exit(code)})")
