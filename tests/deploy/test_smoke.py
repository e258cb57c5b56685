"""Deployment smoke test: run what the rendered manifests say, as the kubelet would, and use the Services.

For an overlay: every container of every Deployment / StatefulSet is started (init containers first, to
completion) from its image's ENTRYPOINT + the manifest's command/args, with exactly the env the kubelet
would give it, as its runAsUser, on a read-only root when the manifest says so, inside a network namespace
with an address of its own (tests/deploy/pods.py). Then every startup, readiness and liveness probe runs
as the kubelet runs it (httpGet to the pod IP and port, exec inside the container), and the Service path
outside → gateway → serve → Redis is used with real keys. Static checks cannot see a process bound to
the wrong address; this test can.

In the local overlay serve is scaled to two pods (as ``kubectl scale`` would): the gateway must find both
through the headless Service's name and balance over them, keep answering when one is killed, and drop
it once it leaves the Service's endpoints. In the gpu overlay the base model comes from the PVC
instructloop-model, and no image holds a model.

Substitutions are listed in docs/deploy.md (Checks). Containers whose image this machine cannot provide
(the Redis exporter) are reported and skipped. Needs root (network namespaces); skips otherwise.
"""

from __future__ import annotations

import json
import os
import re
import secrets as secrets_lib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKER, kustomize_build
from tests.deploy.pods import Cluster, Image, quantity

pytestmark = pytest.mark.timeout(360)

# image name (as the manifests spell it, after kustomize's images: rewrite) -> (Dockerfile, stage)
_IMAGES = {
    "instructloop/serve": ("serve.Dockerfile", "runtime"),
    "instructloop/gateway": ("gateway.Dockerfile", "runtime"),
    "instructloop/learner": ("learner.Dockerfile", "runtime"),
    "instructloop/serve-cuda": ("cuda.Dockerfile", "serve"),
    "instructloop/learner-cuda": ("cuda.Dockerfile", "learner"),
}
# images this machine provides as host binaries: the official redis image's entrypoint execs its args
_HOST_IMAGES = {"redis": Image(entrypoint=[], env={})}
PROBE_BUDGET_S = 75.0
START = [time.monotonic()]


def _netns_possible() -> str | None:
    if os.geteuid() != 0:
        return "the deployment smoke test needs root (it creates network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare", "chroot", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: run `make install` (installs iproute2 and redis-server)"
    probe = f"il-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here ({made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def dockerfile_image(path: Path, stage: str) -> Image:
    """ENTRYPOINT and ENV of ``stage`` and the stages it builds FROM (a small Dockerfile reader)."""
    text = path.read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    parents: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line.strip(), re.I)
        if match:
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = []
            parents[current] = match.group(1)
        elif current:
            stages[current].append(line.strip())
    chain, name = [], stage
    while name in stages:
        chain.insert(0, name)
        name = parents[name]
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    healthcheck: list[str] | None = None
    baked = False
    for name in chain:
        for line in stages[name]:
            if line.startswith("ENV "):
                for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', line[4:]):
                    env[key] = value.strip('"')
            elif line.startswith("ENTRYPOINT "):
                entrypoint = json.loads(line[len("ENTRYPOINT ") :])
            elif line.startswith("HEALTHCHECK ") and " CMD " in line:
                healthcheck = json.loads(line.split(" CMD ", 1)[1])
            elif line.startswith("COPY --from=build /opt/instructloop"):
                baked = True
    return Image(entrypoint=entrypoint, env=env, baked_model=baked, healthcheck=healthcheck)


def _make_secrets(tmp: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The Secrets docs/deploy.md tells the operator to create, made the way it says
    (``gateway keys create``; ``openssl rand -hex 32`` per password / token)."""
    from gateway.auth import Role, append_key
    from launcher.credentials import USERS

    keys_file = tmp / "keys.jsonl"
    user_key, _ = append_key(keys_file, name="smoke-user", role=Role.user)
    labeler_key, _ = append_key(keys_file, name="smoke-labeler", role=Role.labeler)
    secrets = {
        "instructloop-api-keys": {"keys.jsonl": keys_file.read_text()},
        "instructloop-serve-token": {"token": secrets_lib.token_hex(32)},
        "instructloop-redis-users": {user: secrets_lib.token_hex(32) for user in USERS},
    }
    return secrets, {"user": user_key, "labeler": labeler_key}


def _baked_model(tmp: Path, tiny_model_dir: Path, tokenizer) -> Path:
    """What the images bake in /opt/instructloop (serve, learner: the prepared default model; gateway: its
    tokenizer alone), with the tiny test model (and its real tokenizer) in its place."""
    from instructloop.model import _COMPLETE, default_model_dir, default_tokenizer_dir

    baked = tmp / "baked"
    target = default_model_dir(baked)
    shutil.copytree(tiny_model_dir, target)
    (target / _COMPLETE).write_text("the deployment smoke test's tiny model\n")
    tokenizer.save_pretrained(default_tokenizer_dir(baked))
    (default_tokenizer_dir(baked) / _COMPLETE).write_text("the real tokenizer\n")
    os.chmod(baked, 0o755)
    for folder, dirs, files in os.walk(baked):
        for name in dirs:
            os.chmod(Path(folder) / name, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    return baked


def _model_on_claim(cluster: Cluster, model: str, tiny_model_dir: Path) -> Path:
    """The operator's step for the model PVC (docs/deploy.md: copy a model folder onto it), with the tiny
    model and its tokenizer; ``model`` is the path the overlay's setting names under /models."""
    relative = Path(model).relative_to("/models")
    target = cluster.claims / "instructloop-model" / relative
    shutil.copytree(tiny_model_dir, target)
    for folder, _dirs, files in os.walk(cluster.claims / "instructloop-model"):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    return target


def _metrics(ip: str, port: int) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def _wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _wait_probes(cluster: Cluster, container, kind: str, deadline: float) -> str:
    probe = container.spec.get(kind)
    if probe is None:
        return "none"
    period = probe.get("periodSeconds", 10)
    # startup / liveness: failureThreshold misses in a row and the kubelet kills the container; readiness
    # failing only keeps the pod out of its Services, so it is waited for (until the test's deadline)
    budget = probe.get("failureThreshold", 3) * period if kind != "readinessProbe" else PROBE_BUDGET_S
    until = min(deadline, time.monotonic() + budget)
    last = ""
    while True:
        if container.proc.poll() is not None:
            pytest.fail(
                f"{container.pod.name}/{container.name} exited ({container.proc.returncode}) before its "
                f"{kind} passed; its log:\n{cluster.log_tail(container)}"
            )
        ok, last = cluster.probe(container, probe)
        if ok:
            return f"{last} (after {time.monotonic() - START[0]:.1f} s)"
        if time.monotonic() > until:
            break
        time.sleep(min(period, 0.5))
    pytest.fail(
        f"{container.pod.name}/{container.name}: {kind} fails as the kubelet would see it ({last}); "
        f"its log:\n{cluster.log_tail(container)}"
    )


def _http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _without_a_gpu(config_maps: dict[str, dict]) -> list[str]:
    """On a machine without CUDA, serve in the gpu overlay runs on the CPU: the one substitution for that
    overlay (docs/deploy.md, Checks). Returns what was changed."""
    import torch

    if torch.cuda.is_available():
        return []
    changed = []
    for name, data in config_maps.items():
        if data.get("INSTRUCTLOOP_SERVE_DEVICE", "cpu") != "cpu":
            data.update(INSTRUCTLOOP_SERVE_DEVICE="cpu", INSTRUCTLOOP_SERVE_DTYPE="float32")
            changed.append(f"{name}: INSTRUCTLOOP_SERVE_DEVICE=cpu, INSTRUCTLOOP_SERVE_DTYPE=float32")
    return changed


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_manifests_run(overlay: str, tmp_path_factory, tiny_model_dir, tokenizer):
    reason = _netns_possible()
    if reason:
        pytest.skip(reason)
    objects = kustomize_build(Path(__file__).resolve().parents[2] / "k8s" / "overlays" / overlay)
    tmp = tmp_path_factory.mktemp(f"cluster-{overlay}")
    os.chmod(tmp, 0o755)
    namespace = next(o["metadata"]["name"] for o in objects if o["kind"] == "Namespace")
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    substituted = _without_a_gpu(config_maps) if overlay == "gpu" else []
    services = [o for o in objects if o["kind"] == "Service"]
    ingress_services = frozenset(
        path["backend"]["service"]["name"]
        for o in objects
        if o["kind"] == "Ingress"
        for rule in o["spec"]["rules"]
        for path in rule["http"]["paths"]
    )
    model = next(o for o in objects if o["kind"] == "ConfigMap" and "model" in o.get("data", {}))["data"][
        "model"
    ]
    secrets, api_keys = _make_secrets(tmp)
    images = {**_HOST_IMAGES}
    for obj in objects:
        for spec in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            name, _, _ = spec["image"].partition(":")
            if name in _IMAGES:
                file, stage = _IMAGES[name]
                images[spec["image"]] = dockerfile_image(DOCKER / file, stage)
            elif name in _HOST_IMAGES:
                images[spec["image"]] = _HOST_IMAGES[name]
    venv = Path(sys.executable).parent.parent
    cluster = Cluster(
        tmp,
        config_maps,
        secrets,
        services,
        images,
        namespace,
        # the images bake the default model; a deployment that names another one must not need it
        baked_model=_baked_model(tmp, tiny_model_dir, tokenizer) if model == "default" else None,
        venv=venv,
        entry_services=ingress_services,
    )
    skipped: list[str] = []
    try:
        cluster.create_network()
        workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
        pods = []
        for obj in workloads:
            template = obj["spec"]["template"]
            # `kubectl -n instructloop scale deploy/instructloop-serve --replicas=2` in the local overlay
            serve = template["metadata"]["labels"].get("app.kubernetes.io/component") == "serve"
            for index in range(2 if serve and overlay == "local" else 1):
                pod_name = f"{obj['metadata']['name']}-{index}"
                pods.append(cluster.add_pod(pod_name, template, obj["spec"].get("volumeClaimTemplates")))
        if model != "default":
            _model_on_claim(cluster, model, tiny_model_dir)
        cluster.write_hosts()
        started = []
        for pod in pods:
            for init in pod.spec.get("initContainers", []):
                container = cluster.start_container(pod, init, init=True)
                assert container.proc.wait(timeout=30) == 0, (
                    f"{pod.name}: init container {init['name']} failed:\n{cluster.log_tail(container)}"
                )
            for spec in pod.spec["containers"]:
                if spec["image"] not in images:
                    skipped.append(
                        f"{pod.name}/{spec['name']} ({spec['image']}: not available on this machine)"
                    )
                    continue
                started.append(cluster.start_container(pod, spec))
        START[0] = time.monotonic()
        deadline = START[0] + PROBE_BUDGET_S
        results = {}
        for container in started:  # the kubelet: startup first, then readiness and liveness
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                results[f"{container.pod.name}/{container.name} {kind}"] = _wait_probes(
                    cluster, container, kind, deadline
                )
        for container in started:  # the image's HEALTHCHECK, run inside the container as Docker runs it
            check = images[container.spec["image"]].healthcheck
            if check:
                result = cluster.exec(container, check, timeout=30)
                assert result.returncode == 0, (
                    f"{container.pod.name}/{container.name}: the image's HEALTHCHECK "
                    f"fails in the pod: {result.stderr[-500:]}"
                )
                results[f"{container.pod.name}/{container.name} HEALTHCHECK"] = "ok"
        print("\n".join(f"{k}: {v}" for k, v in results.items()))
        print("skipped:", skipped, "substituted:", substituted)

        # outside -> gateway (its Service's target) -> serve -> Redis
        ip, port = cluster.service_address("instructloop-gateway", "http")
        gateway = f"http://{ip}:{port}"
        auth = {"Authorization": f"Bearer {api_keys['user']}"}
        status, body = _http(
            "POST",
            f"{gateway}/v1/completions",
            {"model": "instructloop", "prompt": "Hello", "n": 2, "max_tokens": 4},
            auth,
        )
        assert status == 200, (status, body)
        assert len(body["choices"]) == 2
        status, feedback = _http(
            "POST",
            f"{gateway}/v1/feedback",
            {"type": "ranking", "completion_id": body["id"], "ranking": [[1], [0]]},
            {"Authorization": f"Bearer {api_keys['labeler']}"},
        )
        assert status == 202, (status, feedback)

        # serve answers only the gateway: no token, no generation; its probes and metrics stay open
        ip, port = cluster.service_address("instructloop-serve", "http")
        status, refused = _http("POST", f"http://{ip}:{port}/generate", {"inputs": "Hello"})
        assert status == 401 and refused["error_type"] == "unauthorized", (status, refused)
        assert _http("GET", f"http://{ip}:{port}/health")[0] == 200
        token = {"Authorization": f"Bearer {secrets['instructloop-serve-token']['token']}"}
        status, info = _http("GET", f"http://{ip}:{port}/info", headers=token)
        assert status == 200, (status, info)
        if model != "default":  # from the model PVC: no image holds a model in this run
            assert info["model_id"] == model, info
        ip, port = cluster.service_address("instructloop-serve", "metrics")
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as resp:
            assert b"tgi_request_count" in resp.read()

        # the gateway's /metrics: on its metrics port (monitoring's), not on the API port the Ingress routes
        gateway_ip, metrics_port = cluster.service_address("instructloop-gateway", "metrics")
        status, not_here = _http("GET", f"{gateway}/metrics")
        assert status == 404 and not_here["error"]["code"] == "not_found", (status, not_here)
        assert _metrics(gateway_ip, metrics_port)["gateway_backend_replicas"] >= 1

        # Redis: nothing without a password; each component's user can do its job and nothing more
        import redis

        ip, port = cluster.service_address("instructloop-redis", "redis")
        users = secrets["instructloop-redis-users"]
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=ip, port=port).get("anything")
        gateway_user = redis.Redis(host=ip, port=port, username="gateway", password=users["gateway"])
        for forbidden in (
            ("FLUSHALL",),
            ("CONFIG", "GET", "maxmemory"),
            ("XRANGE", "instructloop:stream:comparisons", "-", "+"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                gateway_user.execute_command(*forbidden)
        admin = redis.Redis(host=ip, port=port, username="admin", password=users["admin"])
        assert admin.xlen("instructloop:stream:comparisons") == 1  # outside -> gateway -> Redis
        limit = next(
            c
            for c in cluster.pods_for({"app.kubernetes.io/name": "redis"})[0].spec["containers"]
            if c["name"] == "redis"
        )["resources"]["limits"]["memory"]
        assert int(admin.config_get("maxmemory")["maxmemory"]) == int(quantity(limit)) // 10 * 8
        assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"

        if overlay == "local":
            _two_serve_pods_then_one(cluster, gateway, gateway_ip, metrics_port, auth)
    finally:
        cluster.close()


def _two_serve_pods_then_one(cluster: Cluster, gateway: str, gateway_ip: str, metrics_port: int, auth: dict):
    """Per-pod balancing through the headless Service's name, a killed pod, and its removal from DNS."""
    serve_pods = cluster.pods_for(
        {"app.kubernetes.io/name": "instructloop", "app.kubernetes.io/component": "serve"}
    )
    assert len(serve_pods) == 2
    urls = {f"http://{pod.ip}:8080" for pod in serve_pods}

    def readyz() -> dict:
        return _http("GET", f"{gateway}/readyz")[1]["backends"]

    def healthy() -> set[str]:
        return {url for url, state in readyz().items() if state["healthy"]}

    _wait_for("the gateway to see both serve pods healthy", lambda: healthy() == urls)
    metrics = _metrics(gateway_ip, metrics_port)
    assert metrics["gateway_backend_replicas"] == 2
    assert {k for k in metrics if k.startswith("gateway_backend_healthy{")} == {
        f'gateway_backend_healthy{{backend="{url}"}}' for url in urls
    }

    def complete(prompt: str, n: int) -> None:
        status, body = _http(
            "POST",
            f"{gateway}/v1/completions",
            {"model": "instructloop", "prompt": prompt, "n": n, "max_tokens": 4},
            auth,
        )
        assert status == 200 and len(body["choices"]) == n, (status, body)

    complete("Spread me", 6)  # six concurrent choices: least-outstanding puts them on both pods
    metrics = _metrics(gateway_ip, metrics_port)
    served = {
        url: metrics.get(f'gateway_backend_requests_total{{backend="{url}",outcome="ok"}}', 0) for url in urls
    }
    assert all(count > 0 for count in served.values()), served

    killed, survivor = serve_pods[1], serve_pods[0]
    killed_url, survivor_url = f"http://{killed.ip}:8080", f"http://{survivor.ip}:8080"
    cluster.kill(killed)
    for attempt in range(4):  # right away: before any health check or DNS change has noticed
        complete(f"Still there {attempt}", 2)
    assert _wait_for("the gateway to mark the killed pod unhealthy", lambda: healthy() == {survivor_url})
    assert killed_url in readyz()  # still resolved: the endpoints controller has not acted yet

    # the kubelet's readiness probe fails, so the endpoints controller drops the pod from the Service
    ok, why = cluster.probe(killed.containers[0], killed.containers[0].spec["readinessProbe"])
    assert not ok, why
    cluster.remove_endpoint(killed)
    _wait_for("the gateway to drop the pod that left the Service", lambda: set(readyz()) == {survivor_url})
    metrics = _metrics(gateway_ip, metrics_port)
    assert metrics["gateway_backend_replicas"] == 1
    assert {k for k in metrics if k.startswith("gateway_backend_healthy{")} == {
        f'gateway_backend_healthy{{backend="{survivor_url}"}}'
    }
    complete("One left", 2)
    print(f"serve pods: balanced {served}; killed {killed_url}; the gateway kept answering and dropped it")
