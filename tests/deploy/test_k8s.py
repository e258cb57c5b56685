"""The Kubernetes manifests: every overlay renders, validates strictly, and means what docs/deploy.md says.

Rendering is ``kubectl kustomize`` (kubectl's built-in kustomize); validation is ``kubernetes-validate
--strict`` (schemas shipped in the wheel, offline) for every built-in kind, and the checks below for the
custom resources it has no schema for (ServiceMonitor, ScaledObject). The rest are the semantic checks a
reviewer would do by eye: resources and probes everywhere, only the gateway exposed, the registry
read-only in serve, one Recreate learner, Redis AOF fsync every second, GPUs only in the gpu overlay,
and the NetworkPolicies evaluated as a real CNI would for every pair of components.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.conftest import CRD_KINDS, OVERLAYS, REPO, find_tool, run_tool

ALL = ("base", *OVERLAYS)
NAMESPACE = "instructloop"
COMPONENTS = ("serve", "gateway", "learner", "redis")
# docs/architecture.md: the deployables' ports and health routes.
CONTRACT = {
    "serve": {"port": 8080, "ports": {8080, 9090}, "ready": "/health", "prefix": "INSTRUCTLOOP_SERVE_"},
    "gateway": {
        "port": 8000,
        "ports": {8000, 9091},
        "ready": "/readyz",
        "live": "/healthz",
        "prefix": "INSTRUCTLOOP_GATEWAY_",
    },
    "learner": {"port": 9100, "ready": "/metrics", "live": "/healthz", "prefix": "INSTRUCTLOOP_LEARNER_"},
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


# ---- helpers over the rendered objects -----------------------------------------------------------
def objects(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def component_of(labels: dict) -> str:
    if labels.get("app.kubernetes.io/name") == "redis":
        return "redis"
    return labels["app.kubernetes.io/component"]


def workloads(docs: list[dict]) -> list[dict]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def workload(docs: list[dict], component: str) -> dict:
    found = [
        w for w in workloads(docs) if component_of(w["spec"]["template"]["metadata"]["labels"]) == component
    ]
    assert len(found) == 1, f"expected one workload for {component}, found {len(found)}"
    return found[0]


def pod_spec(work: dict) -> dict:
    return work["spec"]["template"]["spec"]


def container(work: dict, name: str | None = None) -> dict:
    containers = pod_spec(work)["containers"]
    if name is None:
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def selector_matches(match_labels: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in match_labels.items())


def service_for(docs: list[dict], component: str) -> dict:
    work = workload(docs, component)
    labels = work["spec"]["template"]["metadata"]["labels"]
    found = [s for s in objects(docs, "Service") if selector_matches(s["spec"]["selector"], labels)]
    assert len(found) == 1, f"expected one Service selecting {component}, found {len(found)}"
    return found[0]


def config_data(docs: list[dict], work: dict, container_name: str | None = None) -> dict[str, str]:
    """The env a container gets from its envFrom ConfigMaps (names as rendered, hash suffix included)."""
    data: dict[str, str] = {}
    for source in container(work, container_name).get("envFrom", []):
        ref = source["configMapRef"]["name"]
        data.update(one(docs, "ConfigMap", ref)["data"])
    return data


def mounts_of_claim(work: dict, claim: str) -> list[tuple[dict, dict]]:
    """(volume, volumeMount) pairs of the PVC ``claim`` across the pod's containers."""
    volumes = {
        v["name"]: v
        for v in pod_spec(work).get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == claim
    }
    return [
        (volumes[m["name"]], m)
        for c in pod_spec(work)["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] in volumes
    ]


# ---- rendering and validation --------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_overlay_renders_and_passes_strict_schema_validation(rendered, tmp_path, name):
    docs = rendered[name]
    unchecked = {doc["kind"] for doc in docs} - _builtin_kinds(docs)
    assert unchecked <= CRD_KINDS, f"custom kinds without checks in this file: {unchecked - CRD_KINDS}"
    builtin = [doc for doc in docs if doc["kind"] not in CRD_KINDS]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    result = run_tool([find_tool("kubernetes-validate"), "--strict", "--quiet", str(path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A kind it has no schema for is only a WARN with exit 0: none may slip through.
    assert "WARN" not in output and "ERROR" not in output, output
    assert len(builtin) >= 25


def _builtin_kinds(docs: list[dict]) -> set[str]:
    return {
        doc["kind"]
        for doc in docs
        if "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].split("/")[0].endswith(".k8s.io")
    }


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    """The validator really is strict here: a misspelt field in a Deployment fails it."""
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "typo"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {
                    "containers": [{"name": "c", "image": "busybox:1.36", "imagePullPolicyy": "Always"}]
                },
            },
        },
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = run_tool([find_tool("kubernetes-validate"), "--strict", "--quiet", str(path)])
    assert result.returncode != 0
    assert "imagePullPolicyy" in result.stdout + result.stderr


# ---- custom resources ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_every_component_has_a_servicemonitor_that_matches_its_service_and_port(rendered, name):
    docs = rendered[name]
    monitors = objects(docs, "ServiceMonitor")
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["name"] and monitor["metadata"]["namespace"] == NAMESPACE
        assert monitor["spec"]["selector"]["matchLabels"], monitor["metadata"]["name"]
        assert monitor["spec"]["endpoints"], monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint.get("port") or endpoint.get("targetPort"), endpoint
            assert endpoint.get("path", "/metrics").startswith("/")
    for component in COMPONENTS:
        service = service_for(docs, component)
        matching = [
            m
            for m in monitors
            if selector_matches(m["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        ]
        assert len(matching) == 1, f"{component}: {len(matching)} ServiceMonitors select its Service"
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in matching[0]["spec"]["endpoints"]:
            assert endpoint["port"] in port_names, f"{component}: no Service port named {endpoint['port']}"


def test_gpu_scaledobject_targets_serve_and_is_complete(rendered):
    docs = rendered["gpu"]
    (scaled,) = objects(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    one(docs, "Deployment", target["name"])
    assert target["name"] == workload(docs, "serve")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"], "a ScaledObject needs at least one trigger"
    for trigger in spec["triggers"]:
        assert trigger["type"] and trigger["metadata"]
        if trigger["type"] == "prometheus":
            for key in ("serverAddress", "query", "threshold"):
                assert trigger["metadata"].get(key), f"prometheus trigger needs {key}"
            float(trigger["metadata"]["threshold"])
    # KEDA makes its own HPA: a second one on the same Deployment would fight it.
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in objects(docs, "HorizontalPodAutoscaler")}
    assert target["name"] not in hpa_targets
    assert not objects(rendered["local"], "ScaledObject")


# ---- every container: resources, probes, security -----------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_every_container_has_requests_limits_and_probes(rendered, name):
    for work in workloads(rendered[name]):
        spec = pod_spec(work)
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{work['metadata']['name']}/{c['name']}"
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert c.get("resources", {}).get(bound, {}).get(resource), (
                        f"{where}: no {bound}.{resource}"
                    )
            if (
                c in spec["containers"]
            ):  # init containers run to completion: Kubernetes refuses probes on them
                for probe in ("readinessProbe", "livenessProbe"):
                    assert probe in c, f"{where}: no {probe}"


@pytest.mark.parametrize("name", ALL)
def test_probes_follow_the_contract_and_serve_waits_long_enough_for_model_load(rendered, name):
    docs = rendered[name]
    for component, contract in CONTRACT.items():
        c = container(workload(docs, component))
        assert {p["containerPort"] for p in c["ports"]} == contract.get("ports", {contract["port"]})
        assert c["readinessProbe"]["httpGet"]["path"] == contract["ready"]
        if "live" in contract:
            assert c["livenessProbe"]["httpGet"]["path"] == contract["live"]
    serve = container(workload(docs, "serve"))
    startup = serve["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= (1200 if name == "gpu" else 600), f"serve startupProbe allows only {budget}s"
    assert serve["lifecycle"]["preStop"], "serve needs a preStop drain"
    grace = pod_spec(workload(docs, "serve"))["terminationGracePeriodSeconds"]
    assert grace > int(serve["lifecycle"]["preStop"]["exec"]["command"][-1])


@pytest.mark.parametrize("name", ALL)
def test_every_pod_runs_non_root_read_only_without_capabilities(rendered, name):
    for work in workloads(rendered[name]):
        spec = pod_spec(work)
        pod = spec.get("securityContext", {})
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", work["metadata"]["name"]
        assert spec.get("automountServiceAccountToken") is False, work["metadata"]["name"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{work['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 1)) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not sc.get("privileged"), where
            assert all("hostPort" not in p for p in c.get("ports", [])), where


@pytest.mark.parametrize("name", ALL)
def test_images_are_pinned_and_gpu_overlay_uses_cuda_images(rendered, name):
    images = {component: container(workload(rendered[name], component))["image"] for component in COMPONENTS}
    for work in workloads(rendered[name]):
        for c in pod_spec(work)["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, f"unpinned image {c['image']}"
    cuda = name == "gpu"
    assert images["serve"].startswith("instructloop/serve-cuda:" if cuda else "instructloop/serve:")
    assert images["learner"].startswith("instructloop/learner-cuda:" if cuda else "instructloop/learner:")
    assert images["gateway"].startswith("instructloop/gateway:")


# ---- exposure -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_only_the_gateway_is_exposed_through_a_tls_ingress_that_never_routes_metrics(rendered, name):
    docs = rendered[name]
    exposed = [
        s["metadata"]["name"]
        for s in objects(docs, "Service")
        if s["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort") or s["spec"].get("externalIPs")
    ]
    assert exposed == [], (
        f"no LoadBalancer / NodePort by default (k8s/components/gateway-loadbalancer): {exposed}"
    )
    gateway_service = service_for(docs, "gateway")
    (ingress,) = objects(docs, "Ingress")
    spec = ingress["spec"]
    hosts = [rule["host"] for rule in spec["rules"]]
    tls_hosts = [host for entry in spec["tls"] for host in entry["hosts"]]
    assert hosts and set(hosts) <= set(tls_hosts), "every routed host is served over TLS"
    assert all(entry["secretName"] for entry in spec["tls"])
    annotations = ingress["metadata"]["annotations"]
    assert annotations.get("cert-manager.io/cluster-issuer") or annotations.get("cert-manager.io/issuer")
    for rule in spec["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == gateway_service["metadata"]["name"]
            assert backend["port"] == {"name": "http"}, "only the API port is routed"
            assert path["pathType"] in ("Prefix", "Exact")
            # no routed path covers /metrics (nor "/", which would)
            assert not "/metrics".startswith(path["path"].rstrip("/") + "/") and path["path"] != "/"
            assert path["path"] != "/metrics"
    routed = {path["path"] for rule in spec["rules"] for path in rule["http"]["paths"]}
    assert routed == {"/v1", "/label"}
    # /metrics lives on its own port: the API port (the Ingress's target) does not answer it
    gateway_env = config_data(docs, workload(docs, "gateway"))
    metrics_port = int(gateway_env["INSTRUCTLOOP_GATEWAY_METRICS_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container(workload(docs, "gateway"))["ports"]}
    assert ports["metrics"] == metrics_port != ports["http"]


@pytest.mark.parametrize("name", ALL)
def test_services_select_their_pods_and_name_real_ports(rendered, name):
    docs = rendered[name]
    for service in objects(docs, "Service"):
        pods = [
            w
            for w in workloads(docs)
            if selector_matches(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)} workloads"
        container_ports = {
            p["name"]: p["containerPort"] for c in pod_spec(pods[0])["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (
                f"{service['metadata']['name']}: {port['targetPort']}"
            )


# ---- storage ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_serve_mounts_the_registry_read_only_and_only_learner_and_gateway_write_it(rendered, name):
    docs = rendered[name]
    serve = workload(docs, "serve")
    pairs = mounts_of_claim(serve, "instructloop-registry")
    assert pairs, "serve does not mount the registry"
    for volume, mount in pairs:
        assert mount.get("readOnly") is True and volume["persistentVolumeClaim"].get("readOnly") is True
        assert config_data(docs, serve)["INSTRUCTLOOP_SERVE_REGISTRY_DIR"] == mount["mountPath"]
    writers = {
        component_of(w["spec"]["template"]["metadata"]["labels"])
        for w in workloads(docs)
        for _, mount in mounts_of_claim(w, "instructloop-registry")
        if not mount.get("readOnly")
    }
    # The learner publishes versions; the gateway's admin routes move the current pointer.
    assert writers == {"learner", "gateway"}
    for component in ("learner", "gateway"):
        work = workload(docs, component)
        ((_, mount),) = mounts_of_claim(work, "instructloop-registry")
        prefix = CONTRACT[component]["prefix"]
        assert config_data(docs, work)[f"{prefix}REGISTRY_DIR"] == mount["mountPath"]


@pytest.mark.parametrize("name", ALL)
def test_registry_access_mode_fits_the_overlay(rendered, name):
    docs = rendered[name]
    claim = one(docs, "PersistentVolumeClaim", "instructloop-registry")
    if name != "local":
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        return
    # ReadWriteOnce is per node: every other pod mounting it must land on the learner's node.
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    learner_labels = workload(docs, "learner")["spec"]["template"]["metadata"]["labels"]
    for work in workloads(docs):
        if not mounts_of_claim(work, "instructloop-registry") or work is workload(docs, "learner"):
            continue
        terms = pod_spec(work)["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(
            t["topologyKey"] == "kubernetes.io/hostname"
            and selector_matches(t["labelSelector"]["matchLabels"], learner_labels)
            for t in terms
        ), work["metadata"]["name"]


@pytest.mark.parametrize("name", ALL)
def test_learner_is_one_replica_recreated_with_its_state_on_a_pvc(rendered, name):
    docs = rendered[name]
    learner = workload(docs, "learner")
    assert learner["kind"] == "Deployment"
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"]["type"] == "Recreate"
    assert not [
        h
        for h in objects(docs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == learner["metadata"]["name"]
    ]
    ((_, mount),) = mounts_of_claim(learner, "instructloop-learner-state")
    assert config_data(docs, learner)["INSTRUCTLOOP_LEARNER_STATE_DIR"] == mount["mountPath"]
    one(docs, "PersistentVolumeClaim", "instructloop-learner-state")


@pytest.mark.parametrize("name", ALL)
def test_redis_keeps_an_aof_fsynced_every_second_on_a_pvc(rendered, name):
    docs = rendered[name]
    redis = workload(docs, "redis")
    assert redis["kind"] == "StatefulSet" and redis["spec"]["replicas"] == 1
    service = one(docs, "Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "Redis needs a headless Service"
    server = container(redis, "redis")
    started = " ".join(server.get("command", []) + server.get("args", []))
    conf_path = re.search(r"redis-server (\S+)", started).group(1)
    conf_mount = next(m for m in server["volumeMounts"] if conf_path.startswith(m["mountPath"] + "/"))
    conf_volume = next(v for v in pod_spec(redis)["volumes"] if v["name"] == conf_mount["name"])
    conf_map = one(docs, "ConfigMap", conf_volume["configMap"]["name"])
    text = conf_map["data"][conf_path.rsplit("/", 1)[1]]
    directives = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            directives[key] = value.strip()
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert directives["maxmemory-policy"] == "noeviction"
    assert "save" in directives, "RDB snapshots are part of the backup story (docs/deploy.md)"
    # bounded: maxmemory = 80% of the container's memory limit, computed at start from the limit itself
    assert "maxmemory" not in directives and '--maxmemory "$((MEMORY_LIMIT / 10 * 8))"' in started
    limit_env = next(e for e in server["env"] if e["name"] == "MEMORY_LIMIT")["valueFrom"]["resourceFieldRef"]
    assert limit_env["resource"] == "limits.memory" and limit_env.get("containerName", "redis") == "redis"
    assert server["resources"]["limits"]["memory"]
    # closed: ACL users from the Secret, the default user off, no protected-mode escape hatch
    assert directives["protected-mode"] == "yes"
    acl_mount = next(
        m for m in server["volumeMounts"] if directives["aclfile"].startswith(m["mountPath"] + "/")
    )
    assert acl_mount.get("readOnly") is True
    (init,) = pod_spec(redis)["initContainers"]
    assert any(m["name"] == acl_mount["name"] and not m.get("readOnly") for m in init["volumeMounts"])
    assert init["env"][0] == {"name": "ACL_FILE", "value": directives["aclfile"]}
    volume = next(v for v in pod_spec(redis)["volumes"] if v["name"] == acl_mount["name"])
    assert volume["emptyDir"].get("medium") == "Memory", "the ACL file never reaches a disk"
    users = {e["valueFrom"]["secretKeyRef"]["key"] for e in init["env"] if "valueFrom" in e}
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in init["env"] if "valueFrom" in e} == {
        "instructloop-redis-users"
    }
    from launcher.credentials import USERS

    assert users == set(USERS)
    data_mount = next(m for m in server["volumeMounts"] if m["mountPath"] == directives["dir"])
    templates = {t["metadata"]["name"]: t for t in redis["spec"]["volumeClaimTemplates"]}
    assert data_mount["name"] in templates and not data_mount.get("readOnly")


# ---- GPUs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_gpus_are_requested_only_by_the_gpu_overlay(rendered, name):
    docs = rendered[name]
    for work in workloads(docs):
        component = component_of(work["spec"]["template"]["metadata"]["labels"])
        resources = container(work)["resources"]
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        if name == "gpu" and component in ("serve", "learner"):
            assert gpus >= 1, f"{component} requests no GPU in the gpu overlay"
            assert int(resources["requests"].get("nvidia.com/gpu", gpus)) == gpus
            tolerations = pod_spec(work).get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), component
        else:
            assert gpus == 0, f"{name}/{component} should not ask for a GPU"
    device = config_data(docs, workload(docs, "serve"))["INSTRUCTLOOP_SERVE_DEVICE"]
    assert device == ("cuda" if name == "gpu" else "cpu")


# ---- settings and secrets -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_settings_come_from_configmaps_with_each_components_prefix(rendered, name):
    docs = rendered[name]
    redis_service = service_for(docs, "redis")["metadata"]["name"]
    for component, contract in CONTRACT.items():
        work = workload(docs, component)
        data = config_data(docs, work)
        assert data, f"{component} has no ConfigMap settings"
        assert all(key.startswith(contract["prefix"]) for key in data), f"{component}: {sorted(data)}"
        # the Redis URL carries the component's own ACL user and its password from the Secret (never a
        # ConfigMap): env `$(REDIS_PASSWORD)` expansion, with REDIS_PASSWORD defined before it
        assert f"{contract['prefix']}REDIS_URL" not in data
        env = container(work)["env"]
        names = [e["name"] for e in env]
        url_item = env[names.index(f"{contract['prefix']}REDIS_URL")]
        password = env[names.index("REDIS_PASSWORD")]
        assert names.index("REDIS_PASSWORD") < names.index(f"{contract['prefix']}REDIS_URL")
        assert password["valueFrom"]["secretKeyRef"] == {"name": "instructloop-redis-users", "key": component}
        url = urlparse(url_item["value"])
        assert url.scheme == "redis" and url.hostname == redis_service and url.port == 6379
        assert url.username == component and url.password == "$(REDIS_PASSWORD)"
        assert data[f"{contract['prefix']}STREAM_PREFIX"] == "instructloop"
    gateway = config_data(docs, workload(docs, "gateway"))
    serve_service = service_for(docs, "serve")
    serve_port = serve_service["spec"]["ports"][0]["port"]
    # the gateway finds every serve pod through the headless Service's DNS records (one replica per pod)
    assert serve_service["spec"]["clusterIP"] == "None"
    assert "INSTRUCTLOOP_GATEWAY_BACKENDS" not in gateway
    assert (
        gateway["INSTRUCTLOOP_GATEWAY_BACKENDS_DNS"]
        == f"http://{serve_service['metadata']['name']}:{serve_port}"
    )
    assert float(gateway["INSTRUCTLOOP_GATEWAY_BACKENDS_DNS_REFRESH_S"]) <= 10
    assert gateway["INSTRUCTLOOP_GATEWAY_DEV_MODE"] == "false"
    # one model setting for all three, from one ConfigMap key
    sources = set()
    for component, contract in CONTRACT.items():
        env = {e["name"]: e for e in container(workload(docs, component))["env"]}
        ref = env[f"{contract['prefix']}MODEL"]["valueFrom"]["configMapKeyRef"]
        sources.add((ref["name"], ref["key"]))
        assert f"{contract['prefix']}MODEL" not in config_data(docs, workload(docs, component))
    ((map_name, key),) = sources
    assert one(docs, "ConfigMap", map_name)["data"][key]


@pytest.mark.parametrize("name", ALL)
def test_gateway_reads_hashed_api_keys_from_a_secret(rendered, name):
    docs = rendered[name]
    work = workload(docs, "gateway")
    keys_file = config_data(docs, work)["INSTRUCTLOOP_GATEWAY_KEYS_FILE"]
    secret_volumes = {v["name"]: v["secret"] for v in pod_spec(work)["volumes"] if "secret" in v}
    mounts = [m for m in container(work)["volumeMounts"] if m["name"] in secret_volumes]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    assert keys_file.startswith(mounts[0]["mountPath"] + "/")
    assert secret_volumes[mounts[0]["name"]]["secretName"] == "instructloop-api-keys"
    # No key material is ever committed: the Secret is created by the operator (docs/deploy.md).
    assert not objects(docs, "Secret")


# ---- availability -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_gateway_autoscales_and_disruption_budgets_cover_serve_and_gateway(rendered, name):
    docs = rendered[name]
    gateway = workload(docs, "gateway")
    (hpa,) = [
        h
        for h in objects(docs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    ]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o["spec"] for o in objects(docs, "ScaledObject")}
    for component in ("serve", "gateway"):
        work = workload(docs, component)
        labels = work["spec"]["template"]["metadata"]["labels"]
        budgets = [
            p
            for p in objects(docs, "PodDisruptionBudget")
            if selector_matches(p["spec"]["selector"]["matchLabels"], labels)
        ]
        assert len(budgets) == 1, component
        # the fewest replicas this overlay may run (HPA / KEDA minimum, else replicas)
        if work["metadata"]["name"] == gateway["metadata"]["name"]:
            fewest = hpa["spec"]["minReplicas"]
        elif work["metadata"]["name"] in scaled:
            fewest = scaled[work["metadata"]["name"]]["minReplicaCount"]
        else:
            fewest = work["spec"]["replicas"]
        spec = budgets[0]["spec"]
        evictable = spec["maxUnavailable"] if "maxUnavailable" in spec else fewest - spec["minAvailable"]
        # never the only replica; one at a time once there are two or more (a drain can proceed)
        assert evictable == (0 if fewest == 1 else 1), (name, component, fewest, spec)
        assert "minAvailable" in spec and spec["minAvailable"] == 1, "holds at every replica count"
    for component in ("serve", "gateway"):
        rolling = workload(docs, component)["spec"]["strategy"]["rollingUpdate"]
        assert rolling["maxUnavailable"] == 0


# ---- labels -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_recommended_labels_everywhere(rendered, name):
    for doc in rendered[name]:
        labels = doc["metadata"].get("labels", {})
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels.get("app.kubernetes.io/part-of") == "instructloop", where
        assert labels.get("app.kubernetes.io/managed-by") == "kustomize", where
        if name != "base":
            assert labels.get("app.kubernetes.io/instance") == f"instructloop-{name}", where
        if doc["kind"] != "Namespace" and doc["kind"] != "NetworkPolicy" and doc["kind"] != "ConfigMap":
            assert labels.get("app.kubernetes.io/name") and labels.get("app.kubernetes.io/component"), where
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, where
    for work in workloads(rendered[name]):
        template = work["spec"]["template"]["metadata"]["labels"]
        assert selector_matches(work["spec"]["selector"]["matchLabels"], template)
        assert template.get("app.kubernetes.io/part-of") == "instructloop"
        assert "app.kubernetes.io/managed-by" in template


# ---- NetworkPolicies, evaluated ----------------------------------------------------------------
@dataclass
class Peer:
    """One end of a connection: a pod (labels + namespace) or something outside the cluster."""

    labels: dict | None  # None = outside the cluster
    namespace: str | None = None
    namespace_labels: dict = field(default_factory=dict)


def _selects(selector: dict, labels: dict) -> bool:
    assert "matchExpressions" not in selector, "extend the evaluator for matchExpressions"
    return selector_matches(selector.get("matchLabels", {}), labels)


def _peer_matches(rule_peers: list[dict] | None, peer: Peer) -> bool:
    if not rule_peers:  # no `from`/`to`: everyone
        return True
    for entry in rule_peers:
        if "ipBlock" in entry:
            return True  # conservative: an ipBlock may match anything
        if peer.labels is None:
            continue  # pod/namespace selectors never match traffic from outside the cluster
        ns_ok = (
            _selects(entry["namespaceSelector"], peer.namespace_labels)
            if "namespaceSelector" in entry
            else peer.namespace == NAMESPACE
        )
        pod_ok = _selects(entry["podSelector"], peer.labels) if "podSelector" in entry else True
        if ns_ok and pod_ok:
            return True
    return False


def _port_matches(ports: list[dict] | None, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        assert isinstance(p["port"], int), "the evaluator resolves numeric ports only"
        if p.get("protocol", "TCP") == "TCP" and p["port"] == port:
            return True
    return False


def _allowed(policies: list[dict], direction: str, subject: Peer, other: Peer, port: int) -> bool:
    if subject.labels is None or subject.namespace != NAMESPACE:
        return True  # our policies only isolate our own pods
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [
        p
        for p in policies
        if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], subject.labels)
    ]
    if not isolating:
        return True
    return any(
        _peer_matches(rule.get(peers_key), other) and _port_matches(rule.get("ports"), port)
        for p in isolating
        for rule in p["spec"].get(key) or []
    )


def connection_allowed(policies: list[dict], source: Peer, dest: Peer, port: int) -> bool:
    return _allowed(policies, "Egress", source, dest, port) and _allowed(
        policies, "Ingress", dest, source, port
    )


@pytest.mark.parametrize("name", ALL)
def test_network_policies_allow_exactly_the_documented_flows(rendered, name):
    docs = rendered[name]
    policies = objects(docs, "NetworkPolicy")
    ns_labels = {"kubernetes.io/metadata.name": NAMESPACE}
    pods = {
        c: Peer(workload(docs, c)["spec"]["template"]["metadata"]["labels"], NAMESPACE, ns_labels)
        for c in COMPONENTS
    }
    outside = Peer(None)
    other_namespace = Peer({"app": "curious"}, "default", {"kubernetes.io/metadata.name": "default"})
    prometheus = Peer(
        {"app.kubernetes.io/name": "prometheus"}, "monitoring", {"kubernetes.io/metadata.name": "monitoring"}
    )
    ports = {"gateway": 8000, "serve": 8080, "learner": 9100, "redis": 6379}
    # the gateway's /metrics port: Prometheus only (its API port is public, its metrics are not)
    assert connection_allowed(policies, prometheus, pods["gateway"], 9091)
    for caller in (outside, other_namespace, pods["serve"], pods["learner"]):
        assert not connection_allowed(policies, caller, pods["gateway"], 9091), caller
    expected_open = {
        ("outside", "gateway"),
        ("other", "gateway"),
        ("gateway", "serve"),
        ("gateway", "redis"),
        ("serve", "redis"),
        ("learner", "redis"),
        ("prometheus", "gateway"),
        ("prometheus", "learner"),
    }
    sources = {"outside": outside, "other": other_namespace, "prometheus": prometheus, **pods}
    for source_name, source in sources.items():
        for dest_name in COMPONENTS:
            if source_name == dest_name:
                continue
            allowed = connection_allowed(policies, source, pods[dest_name], ports[dest_name])
            assert allowed == ((source_name, dest_name) in expected_open), (
                f"{source_name} -> {dest_name}:{ports[dest_name]} allowed={allowed}"
            )
            # Each side must hold on its own: the destination's ingress rules alone (as if the source had
            # no egress policy) admit only the documented callers; the gateway is public by design.
            ingress_only = _allowed(policies, "Ingress", pods[dest_name], source, ports[dest_name])
            assert ingress_only == ((source_name, dest_name) in expected_open or dest_name == "gateway"), (
                f"{dest_name} ingress admits {source_name}"
            )
    # serve: Prometheus reaches its metrics port (only /metrics is there), never its API port
    assert connection_allowed(policies, prometheus, pods["serve"], 9090)
    assert not connection_allowed(policies, other_namespace, pods["serve"], 9090)
    assert not connection_allowed(policies, pods["gateway"], pods["serve"], 9090)
    # Redis metrics only for Prometheus; no pod of ours reaches the internet (weights never come from a hub).
    assert connection_allowed(policies, prometheus, pods["redis"], 9121)
    assert not connection_allowed(policies, pods["gateway"], pods["redis"], 9121)
    for component in COMPONENTS:
        assert not connection_allowed(policies, pods[component], outside, 443), component
    # Every ServiceMonitor's port is open to Prometheus.
    for monitor in objects(docs, "ServiceMonitor"):
        service = next(
            s
            for s in objects(docs, "Service")
            if selector_matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        )
        component = component_of(service["metadata"]["labels"])
        for endpoint in monitor["spec"]["endpoints"]:
            port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
            target = next(
                cp["containerPort"]
                for c in pod_spec(workload(docs, component))["containers"]
                for cp in c["ports"]
                if cp["name"] == port["targetPort"]
            )
            assert connection_allowed(policies, prometheus, pods[component], target), monitor["metadata"][
                "name"
            ]


# ---- the Redis config, on a real redis-server ----------------------------------------------------
def test_rendered_redis_conf_runs_on_a_real_redis_server_with_aof_everysec(rendered, tmp_path):
    """The shipped redis.conf is loaded by redis-server as is (only dir/port/bind moved to this machine)."""
    import shutil
    import subprocess
    import time

    import redis

    from tests.conftest import free_port

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make install` (apt-get install redis-server)")
    (conf_map,) = [c for c in objects(rendered["base"], "ConfigMap") if "redis.conf" in c.get("data", {})]
    port = free_port()
    # the init container's script renders the ACL file from the Secret's passwords (here: made up)
    from launcher.credentials import USERS

    config_dir = tmp_path / "etc-redis"
    config_dir.mkdir()
    for name, text in conf_map["data"].items():
        (config_dir / name).write_text(text)
    passwords = {user: f"pw-{user}-0123456789" for user in USERS}
    render = conf_map["data"]["render-acl.sh"].replace("/etc/redis/", f"{config_dir}/")
    rendered_acl = subprocess.run(
        ["sh", "-c", render],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            "PATH": "/usr/bin:/bin",
            "ACL_FILE": str(tmp_path / "users.acl"),
            **{f"REDIS_PASSWORD_{user.upper()}": pw for user, pw in passwords.items()},
        },
    )
    assert rendered_acl.returncode == 0, rendered_acl.stderr
    assert not any(pw in (tmp_path / "users.acl").read_text() for pw in passwords.values()), "only hashes"
    overrides = {
        "dir": str(tmp_path),
        "port": str(port),
        "bind": "127.0.0.1",
        "aclfile": str(tmp_path / "users.acl"),
    }
    lines = [
        f"{key} {overrides[key]}" if (key := line.split(" ", 1)[0]) in overrides else line
        for line in conf_map["data"]["redis.conf"].splitlines()
    ]
    conf = tmp_path / "redis.conf"
    conf.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, username="admin", password=passwords["admin"])
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "redis-server did not start with the shipped config"
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).get("x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis(port=port, username="serve", password=passwords["serve"]).flushall()
        client.xadd("instructloop:stream:comparisons", {"event": '{"event_id": "deploy-test"}'})
        aof_dir = tmp_path / client.config_get("appenddirname")["appenddirname"]
        deadline = time.monotonic() + 5  # everysec: on disk within about a second
        while b"deploy-test" not in b"".join(p.read_bytes() for p in aof_dir.glob("*.aof")):
            assert time.monotonic() < deadline, "the XADD never reached the AOF"
            time.sleep(0.1)
        client.close()
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(
    ("component", "module"),
    [("serve", "serve.settings"), ("gateway", "gateway.settings"), ("learner", "learner.settings")],
)
def test_every_configmap_variable_is_a_setting_of_its_deployable(component, module):
    """A misspelt variable is silently ignored by pydantic-settings, so the pod would start on defaults
    (or, for the gateway's keys file, refuse to start): every INSTRUCTLOOP_* variable we ship must name a
    field of that deployable's Settings."""
    import importlib

    settings = importlib.import_module(module).Settings
    prefix = settings.model_config["env_prefix"]
    lines = (REPO / "k8s" / "base" / "config" / f"{component}.env").read_text().splitlines()
    names = [line.split("=", 1)[0] for line in lines if line.strip() and not line.startswith("#")]
    assert names, f"no variables in k8s/base/config/{component}.env"
    fields = {name.upper() for name in settings.model_fields}
    unknown = [n for n in names if not n.startswith(prefix) or n[len(prefix) :] not in fields]
    assert not unknown, f"{component}.env sets variables {unknown} that {module}.Settings does not read"
