"""Resumability: atomic checkpoints (unit) and SIGKILL of a running learner (subprocess, real Redis)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import Registry
from instructloop.streams import Stream, stream_key
from learner.dataset import Dataset
from learner.state import CheckpointStore, LearnerState
from tests.learner.helpers import (
    PREFIX,
    PTX_TEXT,
    comparison,
    completion,
    demonstration,
    learner_env,
    pending,
    xadd,
)


def test_checkpoint_is_atomic_carries_parts_over_and_prunes(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None and store.load_state() == LearnerState()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()

    state = LearnerState(rm_updates=1, rm_cursor=7)
    first = store.save(
        state, models={"policy": (model, tokenizer)}, optimizers={"ppo": optimizer.state_dict()}
    )
    assert state.step == 1 and first.name == "ckpt-000001"

    state.rm_cursor = 9
    second = store.save(state)  # nothing new: weights and optimizer carried over by hard link
    policy_weights = second / "policy" / "model.safetensors"
    assert os.stat(policy_weights).st_ino == os.stat(first / "policy" / "model.safetensors").st_ino
    assert store.load_state().rm_cursor == 9 and store.load_state().step == 2
    restored = torch.optim.AdamW(
        AutoModelForCausalLM.from_pretrained(store.model_dir("policy")).parameters(), lr=1e-3
    )
    restored.load_state_dict(store.optimizer_state("ppo"))
    torch.testing.assert_close(
        restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert store.model_dir("reward") is None

    store.save(state)
    assert [p.name for p in store.checkpoints()] == ["ckpt-000002", "ckpt-000003"]
    assert store.model_dir("policy").parent.name == "ckpt-000003"

    # A checkpoint interrupted half-way (left as .tmp-*) is invisible and cleaned on the next start.
    (store.root / ".tmp-000004-123" / "policy").mkdir(parents=True)
    reopened = CheckpointStore(tmp_path, keep=2)
    assert reopened.load_state().step == 3
    assert not list(reopened.root.glob(".tmp-*"))


# ---- SIGKILL a running learner, several times, at different points ----------------------------------

REPO = Path(__file__).resolve().parents[2]


class LearnerProcess:
    """``instructloop learner run`` as a subprocess, its JSON log lines collected as they come."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "learner", "run"],
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.tail: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.tail = (self.tail + [line])[-40:]
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def wait_for(self, message: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                entry = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"learner exited ({self.proc.returncode}) before {message!r}:\n" + "".join(self.tail)
                    ) from None
                continue
            if entry["msg"] == message:
                return entry
        raise AssertionError(f"no {message!r} log within {timeout}s:\n" + "".join(self.tail))

    def remaining(self) -> list[dict]:
        """The log lines not consumed yet (call after the process exited)."""
        self.reader.join(timeout=10)  # the process exited: the reader drains the closed pipe and ends
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return out

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def test_sigkill_at_any_point_loses_and_duplicates_nothing(redis_server_aof, tmp_path, tiny_model_dir):
    client = redis_server_aof.client()
    (tmp_path / "ptx.txt").write_text(PTX_TEXT)
    state_dir, registry_dir = tmp_path / "state", tmp_path / "registry"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **learner_env(
            redis_server_aof.url_for("learner"), tiny_model_dir, state_dir, registry_dir, tmp_path / "ptx.txt"
        ),
    }
    comparisons, prompts, malformed = set(), set(), set()

    def push(start: int, n: int) -> None:
        for i in range(start, start + n):
            event = comparison(i)
            xadd(client, Stream.comparisons, event)
            comparisons.add(event.event_id)
            event = completion(i)
            xadd(client, Stream.completions, event)
            prompts.add(event.event_id)

    def learner() -> LearnerProcess:
        return LearnerProcess(env, tmp_path)

    # 1. Killed while training the reward model (events already committed and acked).
    push(0, 12)
    run = learner()
    run.wait_for("reward model update started")
    time.sleep(0.5)
    run.kill()

    # 2. More events, a re-delivered event and a malformed entry arrive while it is down; killed mid-PPO.
    push(12, 6)
    xadd(client, Stream.comparisons, comparison(3))
    malformed.add(
        client.xadd(stream_key(Stream.completions, PREFIX), {"event": '{"kind": "completion"}'}).decode()
    )
    run = learner()
    run.wait_for("ppo round started")
    time.sleep(0.3)  # inside the round (building the trainer + the round take well over a second)
    run.kill()

    # 3. Killed while publishing the candidate (between the registry write and the state checkpoint).
    run = learner()
    run.wait_for("policy version written")
    run.kill()

    # 4. SIGTERM during an RM update: the update and its checkpoint finish, no further step starts, exit 0.
    push(18, 14)  # 10 of them training comparisons: an RM update is due
    xadd(client, Stream.demonstrations, demonstration(1))
    run = learner()
    run.wait_for("reward model update started")
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=120) == 0, "".join(run.tail)
    after = run.remaining()
    assert [e["msg"] for e in after if e["msg"] in ("checkpoint written", "reward model updated")] == [
        "checkpoint written",
        "reward model updated",
    ]
    assert not any(e["msg"] in ("ppo round started", "gate started") for e in after)
    assert (
        CheckpointStore(state_dir).load_state().ppo_rm_update
        < CheckpointStore(state_dir).load_state().rm_updates
    )

    # 5. Killed right after a checkpoint (the PPO round that the new RM made due).
    run = learner()
    run.wait_for("ppo round done")
    run.kill()

    # 6. A last batch; this run catches up, goes idle and stops gracefully on SIGTERM.
    push(32, 8)  # 5 training comparisons: below the threshold, the learner ends idle
    malformed.add(client.xadd(stream_key(Stream.comparisons, PREFIX), {"event": b"\xff"}).decode())
    run = learner()
    run.wait_for("learner idle", timeout=300)
    assert run.terminate() == 0

    # Every event exactly once, every entry acknowledged, malformed ones dead-lettered.
    dataset = Dataset(state_dir / "dataset.sqlite3")
    assert sorted(dataset.event_ids("comparisons")) == sorted(comparisons)
    assert sorted(dataset.event_ids("prompts")) == sorted(prompts)
    assert dataset.event_ids("demonstrations") == ["dem-1"]
    for stream in (Stream.comparisons, Stream.completions, Stream.demonstrations):
        assert pending(client, stream) == 0
        assert client.xinfo_groups(stream_key(stream, PREFIX))[0]["lag"] == 0
    dead = {f[b"entry_id"].decode() for _, f in client.xrange(stream_key(Stream.dead_letter, PREFIX))}
    assert dead == malformed and dataset.counts()["dead_letters"] == 2

    # Training counters agree with each other, the dataset and the registry: nothing counted twice.
    state = CheckpointStore(state_dir).load_state()
    rm_records = [h for h in state.history if h["kind"] == "reward"]
    ppo_records = [h for h in state.history if h["kind"] == "ppo"]
    gate_records = [h for h in state.history if h["kind"] == "gate"]
    assert state.rm_updates == len(rm_records) >= 2
    cursors = [h["cursor"] for h in rm_records]
    assert cursors == sorted(set(cursors)) and cursors[-1] == state.rm_cursor
    trained_once = dataset.count_new_comparisons(0) - dataset.count_new_comparisons(state.rm_cursor)
    assert state.rm_comparisons_trained == sum(h["comparisons"] for h in rm_records) == trained_once
    assert dataset.count_new_comparisons(state.rm_cursor) < 8  # caught up
    assert (
        state.ppo_rounds == len(ppo_records) == len(gate_records) == state.promotions + state.rejections >= 2
    )
    assert state.pending_candidate is None
    registry = Registry(registry_dir, redis=client, prefix=PREFIX)
    versions = registry.list_versions()
    assert [m.version for m in versions] == [f"v{i:04d}" for i in range(1, state.ppo_rounds + 1)]
    assert [h["candidate"] for h in ppo_records] == [m.version for m in versions]
    assert all(m.status in (PolicyStatus.promoted, PolicyStatus.rejected) for m in versions)
    assert sum(m.status == PolicyStatus.promoted for m in versions) == state.promotions
    current = registry.current()
    assert current is None or registry.manifest(current).status == PolicyStatus.promoted
    events = [PolicyEvent.from_fields(f) for _, f in client.xrange(stream_key(Stream.policies, PREFIX))]
    for manifest in versions:
        statuses = [e.status for e in events if e.version == manifest.version]
        assert statuses[-1] == manifest.status  # the final word on the policies stream is the registry's
    client.close()
