import json

import pytest
import torch
from safetensors.torch import save_file

from instructloop.events import PolicyEvent, PolicyStatus
from instructloop.registry import InvalidCheckpoint, Registry
from instructloop.streams import Stream, current_policy_key, stream_key


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
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.subscribe("instructloop:policy:changed")
    pubsub.get_message(timeout=1)  # subscribe confirmation
    registry = Registry(tmp_path, redis=client)
    registry.write_version("v0001", _save_tensors({"w": torch.ones(1)}))
    registry.set_current("v0001", reason="gate passed")
    assert client.get(current_policy_key()) == b"v0001"
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["data"] == b"v0001"
    events = [PolicyEvent.from_fields(f) for _, f in client.xrange(stream_key(Stream.policies))]
    assert [(e.version, e.status) for e in events] == [("v0001", PolicyStatus.candidate), ("v0001", PolicyStatus.promoted)]
    # a second registry (another process) reads the same pointer from Redis
    assert Registry(tmp_path / "elsewhere", redis=client).current() == "v0001"
