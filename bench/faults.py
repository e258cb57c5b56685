"""Fault injection under steady load: every accepted feedback (202) must end up in the learner's dataset.

A real stack on loopback, supervised by ``launcher.supervisor`` exactly as ``instructloop up`` does it
(crashed components restarted with backoff): redis-server (AOF, ``--appendfsync`` everysec or always),
one or two serve replicas, the learner (ingesting only: its training thresholds are out of reach) and the
gateway. Several client threads loop "completion (n=2) → ranking feedback on it" with an
``Idempotency-Key`` per feedback, retrying a failed feedback with the same key (as the labeler does).
Each scenario injects its fault mid-load, then waits until the learner has ingested everything and
compares the event ids the clients were answered 202 for with the dataset:

- ``redis-kill``: SIGKILL redis-server (restarted from its AOF). Lost accepted feedback must be 0 with
  ``always``; with ``everysec`` at most the feedback accepted in the 2 s before the kill (Redis's own
  bound: a fsync stalled by the disk postpones the AOF write by up to 2 s; normally an acknowledged write
  is already in the kernel's page cache and survives a process kill).
- ``serve-kill``: SIGKILL one of two serve replicas; client-visible errors only for completions in
  flight at the kill.
- ``gateway-kill``: SIGKILL the gateway (restarted); 0 lost, 0 double-counted.
- ``learner-kill``: SIGKILL the learner N times at random points (restarted each time); 0 lost,
  0 double-counted.
- ``redis-full``: Redis at ``maxmemory``: completions keep serving, feedback answers 503 with
  Retry-After, nothing is half-written (the comparisons stream does not grow), ``gateway_redis_full``
  is 1; once memory is freed the retried feedback is accepted and ingested.

    python bench/faults.py                       # every scenario, tiny model, figures on stdout
    python bench/faults.py --scenario redis-kill --appendfsync everysec --clients 6 --seconds 20

Figures and what each guarantee means: docs/reliability.md. A fast subset runs in tests/faults/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from gateway.auth import Role, append_key, hash_key, key_id_of  # noqa: E402
from gateway.store import fingerprint  # noqa: E402
from launcher.supervisor import (  # noqa: E402
    ComponentSpec,
    RestartPolicy,
    Supervisor,
    free_port,
    http_health,
    redis_health,
)

MODEL_NAME = "instructloop"
EVERYSEC_BOUND_S = 2.0
"""Redis's documented worst case for appendfsync everysec: up to 2 s of acknowledged writes."""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", *args]


# ---- the stack ------------------------------------------------------------------------------------------


class FaultStack:
    """redis + serve replicas + learner + gateway under a restarting supervisor, on free loopback ports."""

    def __init__(
        self,
        model_dir: Path,
        workdir: Path,
        *,
        replicas: int = 1,
        appendfsync: str = "always",
        clients: int = 4,
    ):
        self.model_dir = Path(model_dir)
        self.workdir = Path(workdir)
        self.redis_port = free_port()
        self.serve_ports = [free_port() for _ in range(replicas)]
        self.gateway_port = free_port()
        self.metrics_port = free_port()
        self.events: list[str] = []
        keys_file = self.workdir / "gateway" / "keys.jsonl"
        self.user_keys = [
            append_key(keys_file, name=f"client-{i}", role=Role.user)[0] for i in range(clients)
        ]
        self.probe_key = append_key(keys_file, name="probe", role=Role.user)[0]  # a scenario's own calls
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO_ROOT),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        logs = self.workdir / "logs"
        redis_dir = self.workdir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        specs = [
            ComponentSpec(
                name="redis",
                log_path=logs / "redis.log",
                env=env,
                health=redis_health(self.redis_url),
                argv=[
                    "redis-server",
                    "--port",
                    str(self.redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(redis_dir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    appendfsync,
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                    "--maxmemory-policy",
                    "noeviction",
                ],
            )
        ]
        for i, port in enumerate(self.serve_ports):
            specs.append(
                ComponentSpec(
                    name=f"serve-{i}",
                    argv=_cli("serve", "run"),
                    log_path=logs / f"serve-{i}.log",
                    health=http_health(f"http://127.0.0.1:{port}/health"),
                    env={
                        **env,
                        "INSTRUCTLOOP_SERVE_MODEL": str(self.model_dir),
                        "INSTRUCTLOOP_SERVE_DEVICE": "cpu",
                        "INSTRUCTLOOP_SERVE_HOST": "127.0.0.1",
                        "INSTRUCTLOOP_SERVE_PORT": str(port),
                        "INSTRUCTLOOP_SERVE_TORCH_THREADS": "1",
                        "INSTRUCTLOOP_SERVE_REGISTRY_DIR": str(self.workdir / "registry"),
                        "INSTRUCTLOOP_SERVE_LOG_LEVEL": "WARNING",
                    },
                )
            )
        specs.append(
            ComponentSpec(
                name="learner",
                argv=_cli("learner", "run"),
                log_path=logs / "learner.log",
                after=["redis"],
                health=http_health(f"http://127.0.0.1:{self.metrics_port}/healthz"),
                env={
                    **env,
                    "INSTRUCTLOOP_LEARNER_MODEL": str(self.model_dir),
                    "INSTRUCTLOOP_LEARNER_REDIS_URL": self.redis_url,
                    "INSTRUCTLOOP_LEARNER_STATE_DIR": str(self.state_dir),
                    "INSTRUCTLOOP_LEARNER_REGISTRY_DIR": str(self.workdir / "registry"),
                    "INSTRUCTLOOP_LEARNER_METRICS_PORT": str(self.metrics_port),
                    "INSTRUCTLOOP_LEARNER_CONSUMER_NAME": "learner-0",
                    "INSTRUCTLOOP_LEARNER_POLL_INTERVAL_S": "0.5",
                    "INSTRUCTLOOP_LEARNER_READ_BLOCK_MS": "200",
                    "INSTRUCTLOOP_LEARNER_REDIS_SOCKET_TIMEOUT_S": "5",
                    "INSTRUCTLOOP_LEARNER_MIN_NEW_COMPARISONS": "100000000",
                    "INSTRUCTLOOP_LEARNER_MIN_PROMPTS": "100000000",
                    "INSTRUCTLOOP_LEARNER_TRIM_INTERVAL_S": "2",
                    "INSTRUCTLOOP_LEARNER_TORCH_THREADS": "1",
                },
            )
        )
        specs.append(
            ComponentSpec(
                name="gateway",
                argv=_cli("gateway", "run"),
                log_path=logs / "gateway.log",
                after=["redis", *[f"serve-{i}" for i in range(replicas)]],
                health=http_health(f"{self.gateway_url}/readyz"),
                env={
                    **env,
                    "INSTRUCTLOOP_GATEWAY_MODEL": str(self.model_dir),
                    "INSTRUCTLOOP_GATEWAY_REDIS_URL": self.redis_url,
                    "INSTRUCTLOOP_GATEWAY_HOST": "127.0.0.1",
                    "INSTRUCTLOOP_GATEWAY_PORT": str(self.gateway_port),
                    "INSTRUCTLOOP_GATEWAY_BACKENDS": ",".join(self.serve_urls),
                    "INSTRUCTLOOP_GATEWAY_KEYS_FILE": str(keys_file),
                    "INSTRUCTLOOP_GATEWAY_HEALTH_INTERVAL_S": "0.5",
                    "INSTRUCTLOOP_GATEWAY_REGISTRY_DIR": str(self.workdir / "registry"),
                    "INSTRUCTLOOP_GATEWAY_RATE_LIMIT_PER_MINUTE": "1000000",
                    "INSTRUCTLOOP_GATEWAY_FEEDBACK_RATE_LIMIT_PER_MINUTE": "1000000",
                },
            )
        )
        self.supervisor = Supervisor(
            specs,
            echo=self._echo,
            poll_interval_s=0.1,
            restart=RestartPolicy(backoff_initial_s=0.2, backoff_max_s=1.0, max_restarts=50, window_s=600),
        )
        self._watcher: threading.Thread | None = None
        self.failure = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def serve_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.serve_ports]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "learner"

    def _echo(self, message: str) -> None:
        self.events.append(f"{time.monotonic():.2f} {message}")

    def start(self) -> FaultStack:
        if not self.supervisor.start_all():
            raise RuntimeError("stop requested during start-up")
        self._watcher = threading.Thread(target=self._watch, name="fault-supervisor", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        self.failure = self.supervisor.watch()

    def stop(self) -> None:
        self.supervisor.stop_requested.set()
        self.supervisor.wake.set()
        if self._watcher is not None:
            self._watcher.join(10)
        self.supervisor.stop_all()

    # -- faults --
    def kill(self, name: str) -> float:
        """SIGKILL a component's process group; returns the monotonic time of the kill."""
        component = self.supervisor.component(name)
        assert component.proc is not None
        os.killpg(component.proc.pid, signal.SIGKILL)
        self.supervisor.wake.set()
        return time.monotonic()

    def wait_restarted(self, name: str, restarts: int, timeout: float = 120.0) -> float:
        """Wait until ``name`` has been restarted ``restarts`` times in all and is healthy; returns the
        time."""
        component = self.supervisor.component(name)
        deadline = time.monotonic() + timeout
        while not (component.restarts >= restarts and component.healthy and component.restart_at is None):
            if self.failure is not None:
                raise RuntimeError(f"the supervisor gave up: {self.failure}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{name} was not restarted and healthy within {timeout:g}s: {self.events[-5:]}"
                )
            time.sleep(0.05)
        return time.monotonic()

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def gateway_metric(self, name: str) -> float:
        text = httpx.get(f"{self.gateway_url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"
        )

    # -- what the learner holds --
    def dataset_comparisons(self) -> list[tuple[str, list[str]]]:
        """(event_id, completion_ids) of every comparison in the learner's dataset."""
        path = self.state_dir / "dataset.sqlite3"
        if not path.exists():
            return []
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
            rows = conn.execute("SELECT event_id, event FROM comparisons").fetchall()
        return [(event_id, json.loads(event).get("completion_ids", [])) for event_id, event in rows]


# ---- the load ----------------------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str  # completion | feedback
    sent: float
    done: float
    status: int | None  # None: no HTTP answer (connection refused / reset)
    error: str = ""


@dataclass
class Accepted:
    event_id: str
    completion_id: str
    at: float
    duplicate: bool


@dataclass
class Load:
    """Client threads looping completion → feedback until ``stop``; feedback retried with its key."""

    gateway_url: str
    keys: list[str]
    retry_s: float = 60.0
    calls: list[Call] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    refused_503: list[tuple[float, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for i, key in enumerate(self.keys):
            thread = threading.Thread(target=self._client, args=(i, key), name=f"client-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def finish(self, timeout: float = 120.0) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)

    def _record(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def _post(
        self, http: httpx.Client, kind: str, path: str, body: dict, **headers: str
    ) -> httpx.Response | None:
        sent = time.monotonic()
        try:
            response = http.post(path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            self._record(Call(kind, sent, time.monotonic(), None, type(exc).__name__))
            return None
        self._record(
            Call(
                kind,
                sent,
                time.monotonic(),
                response.status_code,
                "" if response.status_code < 400 else response.text[:200],
            )
        )
        return response

    def _client(self, index: int, key: str) -> None:
        rng = random.Random(index)
        with httpx.Client(
            base_url=self.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as http:
            while not self.stop.is_set():
                completion = self._post(
                    http,
                    "completion",
                    "/v1/completions",
                    {
                        "model": MODEL_NAME,
                        "prompt": f"client {index} question {rng.randrange(10**6)}",
                        "n": 2,
                        "max_tokens": 4,
                        "temperature": 1.0,
                    },
                )
                if completion is None or completion.status_code != 200:
                    time.sleep(0.1)
                    continue
                self._feedback(http, completion.json()["id"])

    def _feedback(self, http: httpx.Client, completion_id: str) -> None:
        """Post one ranking; retry (same Idempotency-Key) on no answer, 502/503/504, until ``retry_s``."""
        key = uuid.uuid4().hex
        deadline = time.monotonic() + self.retry_s
        while time.monotonic() < deadline:
            response = self._post(
                http,
                "feedback",
                "/v1/feedback",
                {"type": "ranking", "completion_id": completion_id, "ranking": [[0], [1]]},
                **{"Idempotency-Key": key},
            )
            if response is not None and response.status_code == 202:
                body = response.json()
                with self.lock:
                    self.accepted.append(
                        Accepted(body["id"], completion_id, time.monotonic(), body["duplicate"])
                    )
                return
            if response is not None and response.status_code == 503:
                with self.lock:
                    self.refused_503.append((time.monotonic(), response.headers.get("Retry-After")))
            if response is not None and response.status_code not in (502, 503, 504):
                return  # 404: the completion was never stored (Redis down or full when it was served)
            time.sleep(0.2)


# ---- accounting --------------------------------------------------------------------------------------------


def wait_ingested(stack: FaultStack, load: Load, timeout: float = 90.0) -> dict[str, int]:
    """Wait until the dataset holds every accepted event (or the timeout); returns lost / double counts."""
    wanted = {a.event_id for a in load.accepted}
    deadline = time.monotonic() + timeout
    while True:
        rows = stack.dataset_comparisons()
        held = {event_id for event_id, _ in rows}
        if wanted <= held or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    per_completion: dict[str, int] = {}
    for _, completion_ids in rows:
        for cid in completion_ids:
            per_completion[cid] = per_completion.get(cid, 0) + 1
    ours = {a.completion_id for a in load.accepted}
    return {
        "accepted": len(wanted),
        "accepted_replays": sum(a.duplicate for a in load.accepted),
        "in_dataset": len(held & wanted),
        "lost": len(wanted - held),
        "double_counted": sum(
            count - 1 for cid, count in per_completion.items() if cid in ours and count > 1
        ),
        "lost_ids": sorted(wanted - held)[:10],
    }


def _run_load(stack: FaultStack, seconds: float, inject) -> tuple[Load, dict]:
    load = Load(stack.gateway_url, stack.user_keys).start()
    time.sleep(seconds / 2)
    facts = inject() or {}
    time.sleep(seconds / 2)
    load.finish()
    return load, facts


def scenario_redis_kill(stack: FaultStack, seconds: float = 10.0) -> dict:
    restarts = stack.supervisor.component("redis").restarts

    def inject() -> dict:
        killed = stack.kill("redis")
        back = stack.wait_restarted("redis", restarts + 1)
        return {"killed_at": killed, "redis_down_s": round(back - killed, 2)}

    load, facts = _run_load(stack, seconds, inject)
    result = wait_ingested(stack, load)
    killed = facts.pop("killed_at")
    result["accepted_in_last_2s_before_kill"] = sum(
        killed - EVERYSEC_BOUND_S <= a.at <= killed for a in load.accepted
    )
    result["feedback_503_while_down"] = len(load.refused_503)
    return {**result, **facts}


def scenario_gateway_kill(stack: FaultStack, seconds: float = 10.0) -> dict:
    restarts = stack.supervisor.component("gateway").restarts

    def inject() -> dict:
        killed = stack.kill("gateway")
        return {"gateway_down_s": round(stack.wait_restarted("gateway", restarts + 1) - killed, 2)}

    load, facts = _run_load(stack, seconds, inject)
    result = wait_ingested(stack, load)
    result["calls_without_answer"] = sum(c.status is None for c in load.calls)
    return {**result, **facts}


def scenario_learner_kill(stack: FaultStack, kills: int = 10, seconds: float = 4.0, seed: int = 0) -> dict:
    """Kill the learner ``kills`` times, each at a random point 0.2–``seconds`` s after it is healthy
    again."""
    rng = random.Random(seed)
    restarts = stack.supervisor.component("learner").restarts
    load = Load(stack.gateway_url, stack.user_keys).start()
    for k in range(kills):
        time.sleep(rng.uniform(0.2, seconds))
        stack.kill("learner")
        stack.wait_restarted("learner", restarts + k + 1)
    time.sleep(1.0)
    load.finish()
    return {
        "kills": kills,
        "restarts": stack.supervisor.component("learner").restarts - restarts,
        **wait_ingested(stack, load),
    }


def scenario_serve_kill(stack: FaultStack, seconds: float = 10.0) -> dict:
    """Two replicas; SIGKILL serve-0 mid-load. A client-visible error is allowed only for a completion that
    was in flight when the replica died."""

    def inject() -> dict:
        return {"killed_at": stack.kill("serve-0")}

    load, facts = _run_load(stack, seconds, inject)
    killed = facts["killed_at"]
    completions = [c for c in load.calls if c.kind == "completion"]
    errors = [c for c in completions if c.status is None or c.status >= 500]
    in_flight = [c for c in completions if c.sent <= killed <= c.done]
    result = wait_ingested(stack, load)
    return {
        **result,
        "completions": len(completions),
        "in_flight_at_kill": len(in_flight),
        "errors": len(errors),
        "errors_not_in_flight_at_kill": sum(not (c.sent <= killed <= c.done) for c in errors),
        "error_statuses": sorted({str(c.status) for c in errors}),
    }


def _fill_to_maxmemory(client, stop: threading.Event) -> None:
    """Keep Redis at maxmemory: small writes until one is refused, again whenever memory was freed (the
    learner trims the streams it acknowledged, which frees memory)."""
    import redis as redis_lib

    batch = 0
    while not stop.is_set():
        try:
            with client.pipeline(transaction=False) as pipe:
                for i in range(50):
                    pipe.set(f"ballast:{batch}:{i}", b"x" * 2048)
                pipe.execute()
            batch += 1
        except redis_lib.exceptions.OutOfMemoryError:
            stop.wait(0.01)


def scenario_redis_full(stack: FaultStack, seconds: float = 6.0, rated_later: int = 12) -> dict:
    """Hold Redis at maxmemory for ``seconds`` under load, then free it. Besides the load, ``rated_later``
    completions served (and stored) before the fill are rated while Redis is full: those must answer 503 +
    Retry-After with nothing written, and be accepted when retried (same Idempotency-Key) after."""
    client = stack.redis()
    stream = "instructloop:stream:comparisons"
    load = Load(stack.gateway_url, stack.user_keys).start()
    key = stack.probe_key
    with httpx.Client(
        base_url=stack.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        pending = [
            http.post(
                "/v1/completions",
                json={"model": MODEL_NAME, "prompt": f"rate me later {i}", "n": 2, "max_tokens": 4},
            ).json()["id"]
            for i in range(rated_later)
        ]
        time.sleep(1.0)
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 2 * 1024 * 1024)
        stop_filling = threading.Event()
        filler = threading.Thread(target=_fill_to_maxmemory, args=(client, stop_filling), daemon=True)
        filler.start()
        while stack.gateway_metric("gateway_redis_full") < 1:  # the gateway has met the full Redis
            time.sleep(0.1)
        full_at = time.monotonic()
        length_full = client.xlen(stream)
        body = {"type": "ranking", "ranking": [[0], [1]]}
        answers = [
            http.post("/v1/feedback", json={**body, "completion_id": cid}, headers={"Idempotency-Key": cid})
            for cid in pending
        ]
        caller = key_id_of(hash_key(key))
        refused = [
            (i, cid)
            for i, (cid, answer) in enumerate(zip(pending, answers, strict=True))
            if answer.status_code == 503
        ]
        half_written = (
            sum(  # what a 503'd feedback must not have left: its idempotency or one-per-completion key
                client.exists(f"instructloop:gateway:idempotency:{caller}:comparisons:{cid}")
                + client.exists(
                    f"instructloop:gateway:rated:{caller}:{fingerprint([[cid], f'rate me later {i}'])}"
                )
                for i, cid in refused
            )
        )
        time.sleep(seconds)
        alert = stack.gateway_metric("gateway_redis_full")
        oom = stack.gateway_metric("gateway_redis_oom_total")
        length_still = client.xlen(stream)
        freed_at = time.monotonic()
        stop_filling.set()
        filler.join(10)
        client.config_set("maxmemory", 0)
        for ballast in client.scan_iter("ballast:*", count=1000):
            client.unlink(ballast)
        retried = [
            http.post("/v1/feedback", json={**body, "completion_id": cid}, headers={"Idempotency-Key": cid})
            for cid in pending
        ]
    for cid, answer in zip(pending, retried, strict=True):
        if answer.status_code == 202:
            load.accepted.append(
                Accepted(answer.json()["id"], cid, time.monotonic(), answer.json()["duplicate"])
            )
    time.sleep(2.0)
    load.finish()
    result = wait_ingested(stack, load)
    while_full = [c for c in load.calls if full_at <= c.sent and c.done <= freed_at]
    completions = [c for c in while_full if c.kind == "completion"]
    return {
        **result,
        "completions_while_full": len(completions),
        "completions_ok_while_full": sum(c.status == 200 for c in completions),
        "feedback_on_stored_completions_while_full": len(answers),
        "of_which_503_with_retry_after": sum(
            a.status_code == 503 and bool(a.headers.get("Retry-After")) for a in answers
        ),
        "accepted_when_retried_after": sum(a.status_code == 202 for a in retried),
        "comparisons_stream_grew_while_full": length_still - length_full,
        "keys_left_by_the_503s": half_written,
        "gateway_redis_full_alert_while_full": alert,
        "gateway_redis_oom_total": oom,
    }


SCENARIOS = {
    "redis-kill": scenario_redis_kill,
    "serve-kill": scenario_serve_kill,
    "gateway-kill": scenario_gateway_kill,
    "learner-kill": scenario_learner_kill,
    "redis-full": scenario_redis_full,
}


def tiny_model(path: Path) -> Path:
    """The tests' tiny random Llama with the real tokenizer (fast on CPU)."""
    from instructloop.model import load_default_tokenizer
    from tests.conftest import build_tiny_model_dir

    return build_tiny_model_dir(path, load_default_tokenizer(), seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument(
        "--appendfsync",
        choices=["everysec", "always", "both"],
        default="both",
        help="Redis AOF policy for redis-kill (both: run it twice)",
    )
    parser.add_argument("--model", default=None, help="HF model folder (default: a tiny random Llama)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--learner-kills", type=int, default=10)
    args = parser.parse_args()
    workroot = Path(tempfile.mkdtemp(prefix="instructloop-faults-"))
    model = Path(args.model) if args.model else tiny_model(workroot / "tiny-model")
    wanted = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    runs: list[tuple[str, str, int]] = []
    for name in wanted:
        if name == "redis-kill":
            policies = ["everysec", "always"] if args.appendfsync == "both" else [args.appendfsync]
            runs += [(name, policy, 1) for policy in policies]
        else:
            runs.append(
                (name, "always" if name != "redis-full" else "everysec", 2 if name == "serve-kill" else 1)
            )
    for name, policy, replicas in runs:
        stack = FaultStack(
            model, workroot / f"{name}-{policy}", replicas=replicas, appendfsync=policy, clients=args.clients
        )
        started = time.monotonic()
        stack.start()
        try:
            if name == "learner-kill":
                result = scenario_learner_kill(stack, kills=args.learner_kills)
            else:
                result = SCENARIOS[name](stack, args.seconds)
        finally:
            stack.stop()
        result.pop("lost_ids", None) if not result.get("lost") else None
        print(
            json.dumps(
                {
                    "scenario": name,
                    "appendfsync": policy,
                    "replicas": replicas,
                    "clients": args.clients,
                    "wall_s": round(time.monotonic() - started, 1),
                    **result,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
