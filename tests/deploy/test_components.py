"""The opt-in Kustomize components (k8s/components/): each renders on top of the base, validates
strictly, and does what docs/deploy.md says; the model loader pod meets the restricted standard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import CRD_KINDS, K8S, find_tool, kustomize_build, run_tool
from tests.deploy.test_k8s import (
    Peer,
    connection_allowed,
    container,
    objects,
    one,
    pod_spec,
    workload,
)


def build_with(tmp_path: Path, component: str, model: str | None = None) -> list[dict]:
    """``kubectl kustomize`` of an overlay made the way docs/deploy.md says: the base plus one component."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S / "base", overlay)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base],
        "components": [os.path.relpath(K8S / "components" / component, overlay)],
    }
    if model is not None:
        kustomization["configMapGenerator"] = [
            {"name": "instructloop-model", "behavior": "merge", "literals": [f"model={model}"]}
        ]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize_build(overlay)


def validate_strict(docs: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in CRD_KINDS]))
    result = run_tool([find_tool("kubernetes-validate"), "--strict", "--quiet", str(path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output and "ERROR" not in output, output


def _mount(work: dict, path: str) -> tuple[dict, dict]:
    (mount,) = [m for m in container(work).get("volumeMounts", []) if m["mountPath"] == path]
    volume = next(v for v in pod_spec(work)["volumes"] if v["name"] == mount["name"])
    return mount, volume


def test_model_pvc_mounts_the_model_read_only_where_the_setting_points(tmp_path):
    docs = build_with(tmp_path, "model-pvc", model="/models/base")
    validate_strict(docs, tmp_path)
    claim = one(docs, "PersistentVolumeClaim", "instructloop-model")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (model_map,) = [
        c for c in objects(docs, "ConfigMap") if c["metadata"]["name"].startswith("instructloop-model")
    ]
    assert model_map["data"]["model"] == "/models/base"
    for component in ("serve", "gateway", "learner"):
        work = workload(docs, component)
        mount, volume = _mount(work, "/models")
        assert mount["readOnly"] is True and volume["persistentVolumeClaim"]["readOnly"] is True
        assert volume["persistentVolumeClaim"]["claimName"] == "instructloop-model"
        assert model_map["data"]["model"].startswith(mount["mountPath"] + "/")
        env = {e["name"]: e for e in container(work)["env"]}
        prefix = f"INSTRUCTLOOP_{component.upper()}_"
        assert env[f"{prefix}MODEL"]["valueFrom"]["configMapKeyRef"]["name"] == model_map["metadata"]["name"]


def test_the_gpu_overlay_takes_its_model_from_the_pvc(rendered):
    docs = rendered["gpu"]
    (model_map,) = [
        c for c in objects(docs, "ConfigMap") if c["metadata"]["name"].startswith("instructloop-model")
    ]
    assert model_map["data"]["model"].startswith("/models/")
    for component in ("serve", "gateway", "learner"):
        assert _mount(workload(docs, component), "/models")[0]["readOnly"] is True
    (local_map,) = [
        c
        for c in objects(rendered["local"], "ConfigMap")
        if c["metadata"]["name"].startswith("instructloop-model")
    ]
    assert local_map["data"]["model"] == "default"  # baked into the CPU images


def test_model_hub_downloads_into_a_cache_and_may_reach_only_https_outside(tmp_path):
    docs = build_with(tmp_path, "model-hub", model="HuggingFaceTB/SmolLM2-360M-Instruct")
    validate_strict(docs, tmp_path)
    policies = objects(docs, "NetworkPolicy")
    outside = Peer(None)
    ns = {"kubernetes.io/metadata.name": "instructloop"}
    for component in ("serve", "gateway", "learner"):
        work = workload(docs, component)
        env = {e["name"]: e.get("value") for e in container(work)["env"]}
        assert env["HF_HUB_OFFLINE"] == "0"
        mount, volume = _mount(work, env["HF_HOME"])
        assert "emptyDir" in volume and volume["emptyDir"]["sizeLimit"]
        pod = Peer(work["spec"]["template"]["metadata"]["labels"], "instructloop", ns)
        assert connection_allowed(policies, pod, outside, 443), component
        assert not connection_allowed(policies, pod, outside, 80), component
    redis = Peer(workload(docs, "redis")["spec"]["template"]["metadata"]["labels"], "instructloop", ns)
    assert not connection_allowed(policies, redis, outside, 443)


def test_gateway_loadbalancer_exposes_the_api_port_only(tmp_path):
    docs = build_with(tmp_path, "gateway-loadbalancer")
    validate_strict(docs, tmp_path)
    (lb,) = [s for s in objects(docs, "Service") if s["spec"].get("type") == "LoadBalancer"]
    assert [p["targetPort"] for p in lb["spec"]["ports"]] == ["http"]
    gateway_labels = workload(docs, "gateway")["spec"]["template"]["metadata"]["labels"]
    assert all(gateway_labels.get(k) == v for k, v in lb["spec"]["selector"].items())


def test_the_model_loader_pod_is_valid_and_restricted(tmp_path):
    text = (K8S / "components" / "model-pvc" / "loader-pod.yaml").read_text()
    (pod,) = [d for d in yaml.safe_load_all(text) if d]
    validate_strict([pod], tmp_path)
    spec = pod["spec"]
    assert pod["metadata"]["namespace"] == "instructloop"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (loader,) = spec["containers"]
    assert loader["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert loader["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "instructloop-model"
    assert loader["volumeMounts"][0]["mountPath"] == "/models"


@pytest.mark.parametrize("component", sorted(p.name for p in (K8S / "components").iterdir()))
def test_every_component_is_tested_here(component):
    tested = {"model-pvc", "model-hub", "gateway-loadbalancer"}
    assert component in tested, f"k8s/components/{component} has no test in {__file__}"


def test_the_example_overlay_in_docs_deploy_md_builds_as_written(tmp_path):
    """The `deploy/prod/kustomization.yaml` block of docs/deploy.md, in a folder two levels below a
    checkout."""
    text = (K8S.parent / "docs" / "deploy.md").read_text()
    after = text[text.index("(`deploy/prod/kustomization.yaml` in your checkout)") :]
    start = after.index("```yaml\n") + len("```yaml\n")
    block = after[start : after.index("\n```", start)]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "k8s").symlink_to(K8S)  # the checkout's k8s/, as ../../k8s from deploy/prod
    prod = checkout / "deploy" / "prod"
    prod.mkdir(parents=True)
    (prod / "kustomization.yaml").write_text(block)
    docs = kustomize_build(prod)
    validate_strict(docs, tmp_path)
    (ingress,) = objects(docs, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "llm.example.org"
    assert ingress["spec"]["tls"][0]["hosts"] == ["llm.example.org"]
    (model_map,) = [
        c for c in objects(docs, "ConfigMap") if c["metadata"]["name"].startswith("instructloop-model")
    ]
    assert model_map["data"]["model"] == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert {e["name"]: e.get("value") for e in container(workload(docs, "serve"))["env"]}[
        "HF_HUB_OFFLINE"
    ] == "0"
