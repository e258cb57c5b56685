import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import CURRENT_FILE, InvalidCheckpoint, Registry
from instructloop.streams import Stream, stream_key


def _save_tensors(tensors):
    def save(folder):
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "test"}))

    return save


def test_write_verify_and_load(tmp_path):
    registry = Registry(tmp_path)
    weights = {"w": torch.ones(2, 3)}
    manifest = registry.write_version("v0001", _save_tensors(weights), parent="base", metrics={"reward": 1.5})
    assert manifest.files.keys() == {"model.safetensors", "config.json"}
    assert registry.verify("v0001").sha256 == manifest.sha256
    state = registry.load_state_dict("v0001", expected_shapes={"w": (2, 3)})
    torch.testing.assert_close(state["w"], weights["w"])
    assert registry.next_version() == "v0002"
    with pytest.raises(FileExistsError):
        registry.write_version("v0001", _save_tensors(weights))


def test_tampered_nan_and_misshapen_checkpoints_are_refused(tmp_path):
    registry = Registry(tmp_path)
    registry.write_version("nan", _save_tensors({"w": torch.tensor([1.0, float("nan")])}))
    with pytest.raises(InvalidCheckpoint, match="non-finite"):
        registry.load_state_dict("nan")

    registry.write_version("shape", _save_tensors({"w": torch.ones(3, 2)}))
    with pytest.raises(InvalidCheckpoint, match="shape"):
        registry.load_state_dict("shape", expected_shapes={"w": (2, 3)})

    registry.write_version("tampered", _save_tensors({"w": torch.ones(2)}))
    save_file({"w": torch.zeros(2)}, str(registry.version_dir("tampered") / "model.safetensors"))
    with pytest.raises(InvalidCheckpoint, match="sha256"):
        registry.verify("tampered")
    with pytest.raises(InvalidCheckpoint):
        registry.set_current("tampered")

    with pytest.raises(InvalidCheckpoint, match="not found"):
        registry.verify("missing")


def test_current_pointer_file_only(tmp_path):
    registry = Registry(tmp_path)
    assert registry.current() is None
    registry.write_version("v0001", _save_tensors({"w": torch.ones(1)}))
    registry.set_current("v0001")
    assert registry.current() == "v0001"
    assert registry.manifest("v0001").status == PolicyStatus.promoted


def test_current_pointer_with_redis_notifies_and_logs(tmp_path, redis_server):
    client = redis_server.client("learner")  # the registry's writer
    pubsub = redis_server.client("serve").pubsub()
    pubsub.subscribe("instructloop:policy:changed")
    pubsub.get_message(timeout=1)  # subscribe confirmation
    registry = Registry(tmp_path, redis=client)
    registry.write_version("v0001", _save_tensors({"w": torch.ones(1)}))
    registry.set_current("v0001", reason="gate passed")
    assert registry.current() == "v0001"
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["data"] == b"v0001"
    events = [
        PolicyEvent.from_fields(f) for _, f in redis_server.client().xrange(stream_key(Stream.policies))
    ]
    assert [(e.version, e.status) for e in events] == [
        ("v0001", PolicyStatus.candidate),
        ("v0001", PolicyStatus.promoted),
    ]
    # another process on the same registry volume reads the same pointer
    assert Registry(tmp_path, redis=client).current() == "v0001"


def test_rollback_while_redis_is_down_is_not_undone_when_redis_returns(tmp_path, redis_server):
    """Finding 6: the pointer has one source of truth (the CURRENT file). A manual rollback during a Redis
    outage succeeds (the notification is best effort) and stays rolled back once Redis is back."""
    client = redis_server.client("learner")
    registry = Registry(tmp_path, redis=client)
    for version in ("v0001", "v0002"):
        registry.write_version(version, _save_tensors({"w": torch.ones(1)}))
    registry.set_current("v0001")
    registry.set_current("v0002")
    redis_server.stop()
    registry.set_current("v0001", reason="manual rollback")  # raised ConnectionError before
    assert registry.current() == "v0001"
    redis_server.start()
    assert Registry(tmp_path, redis=redis_server.client("learner")).current() == "v0001"
    assert (tmp_path / CURRENT_FILE).read_text() == "v0001\n"


def test_a_redis_writer_cannot_move_the_pointer(tmp_path, redis_server):
    """The old Redis key is no copy of the pointer any more: writing it changes nothing a reader sees."""
    client = redis_server.client()  # admin: anyone who can write Redis
    registry = Registry(tmp_path, redis=redis_server.client("learner"))
    registry.write_version("v0001", _save_tensors({"w": torch.ones(1)}))
    registry.set_current("v0001")
    client.set("instructloop:policy:current", "rejected-candidate")
    assert registry.current() == "v0001"


def test_writes_are_fsynced_and_staging_leftovers_are_cleaned(tmp_path, monkeypatch):
    """Finding 9: every version file, the version folder, its parent after the rename, and CURRENT (and its
    folder) are fsynced; a staging folder left by a writer that died is removed by clean_staging."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    registry = Registry(tmp_path)
    registry.write_version("v0001", _save_tensors({"w": torch.ones(1)}))
    registry.set_current("v0001")
    version_dir = registry.version_dir("v0001")
    synced_names = {Path(p).name for p in synced}
    assert {"model.safetensors", "config.json"} <= synced_names  # the files (under their staging folder)
    assert any(".staging-v0001-" in p for p in synced)  # the staging folder itself
    assert str(registry.policies_dir) in synced  # the parent, after the rename
    assert str(tmp_path) in synced  # CURRENT's folder, after its rename
    assert version_dir.exists() and (tmp_path / CURRENT_FILE).read_text() == "v0001\n"

    leftover = registry.policies_dir / ".staging-v0002-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".CURRENT.xyz.tmp").write_text("v00")
    assert sorted(registry.clean_staging()) == [".CURRENT.xyz.tmp", ".staging-v0002-abc123"]
    assert not leftover.exists() and registry.list_versions()[0].version == "v0001"
    assert registry.current() == "v0001"
