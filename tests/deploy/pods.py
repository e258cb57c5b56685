"""A tiny kubelet for the deployment smoke test: run rendered pod specs as real processes on this machine.

Each pod gets its own network namespace (``ip netns``) joined to a bridge in this namespace by a veth
pair, with an address of its own in a 10.200.N.0/24 the test picks unused; the bridge holds .1 (the
"node", where the kubelet's probes come from). Nothing is routed anywhere else.

Each container runs in its own mount namespace with a root built like a container runtime builds it:
an overlay of this machine's ``/`` (so the binaries and the project's venv are there), made read-only
when the container asks for ``readOnlyRootFilesystem``, with the pod's volumes bind-mounted at their
``mountPath`` (PVC = a folder per claim shared by the pods that mount it, emptyDir = a folder per pod,
configMap / secret = their files, mode and fsGroup as the kubelet sets them), an ``/etc/hosts`` standing
in for the cluster DNS: a headless Service's name maps to every pod it selects that is in its endpoints
(one line each, as its A records; ``remove_endpoint`` takes a pod out, like the endpoints controller after
a failed readiness probe, and rewrites every pod's file in place), a ClusterIP Service's name to the first
pod behind it (its port must equal its target port for that to be the same path kube-proxy takes; checked,
except for ``entry_services``, which only the Ingress / outside reaches), and the process started as
``runAsUser`` / ``runAsGroup`` with ``fsGroup`` as a supplementary group, with exactly the env the kubelet
would give it (image ENV, then envFrom, then env, with ``$(VAR)`` expansion, secretKeyRef and
resourceFieldRef).

Substitutions (what an image would hold that this machine holds elsewhere) are listed in
``docs/deploy.md`` (Checks): the image's ``/opt/venv`` is the project's venv, ``/root`` is made
traversable inside the pod root because that venv's interpreter lives under it, and where the image
bakes the default model in ``/opt/instructloop`` the test bakes its tiny model there instead.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DOCKER_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_QUANTITY = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "m": 1e-3,
}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (``512Mi``, ``1``, ``250m``) as a number."""
    text = str(value)
    for suffix in sorted(_QUANTITY, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _QUANTITY[suffix]
    return float(text)


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, others stay."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


@dataclass
class Image:
    """What the runtime stage of an image contributes: ENTRYPOINT and ENV."""

    entrypoint: list[str]
    env: dict[str, str]
    baked_model: bool = False
    healthcheck: list[str] | None = None


@dataclass
class Container:
    pod: Pod
    name: str
    spec: dict
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    uid: int = 0
    gid: int = 0
    log_path: Path | None = None


@dataclass
class Pod:
    name: str
    spec: dict
    labels: dict
    ip: str = ""
    netns: str = ""
    dir: Path = Path()
    containers: list[Container] = field(default_factory=list)
    in_endpoints: bool = True  # listed in its Services' endpoints (DNS records); see Cluster.remove_endpoint


class Cluster:
    """Pods on one bridge, Services as /etc/hosts names, probes from the node address."""

    def __init__(
        self,
        workdir: Path,
        config_maps: dict[str, dict],
        secrets: dict[str, dict[str, str]],
        services: list[dict],
        images: dict[str, Image],
        namespace: str,
        baked_model: Path | None = None,
        venv: Path | None = None,
        entry_services: frozenset[str] = frozenset(),
    ):
        self.workdir = workdir
        self.config_maps = config_maps
        self.secrets = secrets
        self.services = services
        self.images = images
        self.namespace = namespace
        self.baked_model = baked_model
        self.venv = venv
        self.entry_services = entry_services
        self.tag = f"{random.randrange(16**4):04x}"
        self.subnet = self._free_subnet()
        self.node_ip = f"{self.subnet}.1"
        self.bridge = f"ilbr{self.tag}"
        self.pods: list[Pod] = []
        self.claims = workdir / "claims"
        self._links: list[str] = []
        self._netns: list[str] = []

    # ---- network --------------------------------------------------------------------------------------
    @staticmethod
    def _free_subnet() -> str:
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        choices = [n for n in range(64, 250) if f" 10.200.{n}." not in used]
        return f"10.200.{random.choice(choices)}"

    def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), *args]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")

    def create_network(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        self._ip("addr", "add", f"{self.node_ip}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")

    def _attach(self, pod: Pod, index: int) -> None:
        pod.netns = f"il-{self.tag}-{index}"
        pod.ip = f"{self.subnet}.{10 + index}"
        host_end, pod_end = f"ilv{self.tag}{index}", f"ilp{self.tag}{index}"
        self._ip("netns", "add", pod.netns)
        self._netns.append(pod.netns)
        self._ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        self._links.append(host_end)
        self._ip("link", "set", pod_end, "netns", pod.netns)
        self._ip("link", "set", host_end, "master", self.bridge)
        self._ip("link", "set", host_end, "up")
        self._ip("addr", "add", f"{pod.ip}/24", "dev", pod_end, netns=pod.netns)
        self._ip("link", "set", pod_end, "up", netns=pod.netns)
        self._ip("link", "set", "lo", "up", netns=pod.netns)

    # ---- services -------------------------------------------------------------------------------------
    def pods_for(self, selector: dict) -> list[Pod]:
        return [p for p in self.pods if all(p.labels.get(k) == v for k, v in selector.items())]

    def service(self, name: str) -> dict:
        for svc in self.services:
            if svc["metadata"]["name"] == name:
                return svc
        raise KeyError(f"no Service {name}")

    def service_address(self, name: str, port_name: str) -> tuple[str, int]:
        """Where kube-proxy would send a connection to Service ``name`` port ``port_name``: a pod IP and
        port."""
        svc = self.service(name)
        port = next(p for p in svc["spec"]["ports"] if p["name"] == port_name)
        pods = self.pods_for(svc["spec"]["selector"])
        assert pods, f"Service {name} selects no pod"
        target = port.get("targetPort", port["port"])
        if isinstance(target, str):
            target = next(
                cp["containerPort"]
                for c in pods[0].spec["containers"]
                for cp in c.get("ports", [])
                if cp.get("name") == target
            )
        return pods[0].ip, int(target)

    def hosts_file(self, pod: Pod) -> str:
        """Service DNS names: a headless Service → every pod in its endpoints (one line each, its A records);
        a ClusterIP Service → the first pod it selects, valid only where port == targetPort (checked)."""
        lines = ["127.0.0.1 localhost", f"{pod.ip} {pod.name}"]
        for svc in self.services:
            name = svc["metadata"]["name"]
            pods = self.pods_for(svc["spec"].get("selector", {}))
            if not pods:
                continue
            headless = svc["spec"].get("clusterIP") == "None"
            for port in svc["spec"]["ports"]:
                _, target = self.service_address(name, port["name"])
                if svc["spec"].get("type", "ClusterIP") == "ClusterIP" and name not in self.entry_services:
                    assert target == port["port"], (
                        f"Service {name} port {port['port']} -> {target}: "
                        "the test maps Service names to pod IPs in /etc/hosts, which needs port == targetPort"
                    )
            names = (
                f"{name} {name}.{self.namespace} {name}.{self.namespace}.svc "
                f"{name}.{self.namespace}.svc.cluster.local"
            )
            for target_pod in [p for p in pods if p.in_endpoints] if headless else pods[:1]:
                lines.append(f"{target_pod.ip} {names}")
        return "\n".join(lines) + "\n"

    def write_hosts(self) -> None:
        """(Re)write every pod's /etc/hosts in place (the containers bind-mount the file, so they see it)."""
        for pod in self.pods:
            (pod.dir / "hosts").write_text(self.hosts_file(pod))

    def remove_endpoint(self, pod: Pod) -> None:
        """What the endpoints controller does once a pod's readiness fails: its Services stop listing it, so a
        headless Service's name no longer resolves to it."""
        pod.in_endpoints = False
        self.write_hosts()

    def kill(self, pod: Pod) -> None:
        """SIGKILL every container of ``pod`` (a crash or a lost node: no preStop, no graceful drain)."""
        for container in pod.containers:
            if container.proc is not None and container.proc.poll() is None:
                os.killpg(container.proc.pid, signal.SIGKILL)
                container.proc.wait(timeout=10)

    # ---- env and volumes ------------------------------------------------------------------------------
    def container_env(self, pod: Pod, spec: dict, image: Image) -> dict[str, str]:
        env = {"PATH": DOCKER_DEFAULT_PATH, "HOSTNAME": pod.name}
        for key, value in image.env.items():
            env[key] = expand_shell(value, env)
        for source in spec.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config_maps[source["configMapRef"]["name"]])
            elif "secretRef" in source:
                env.update(self.secret(source["secretRef"]["name"]))
        k8s_env: dict[str, str] = {}
        for item in spec.get("env", []):
            if "value" in item:
                value = expand(item["value"], {**env, **k8s_env})
            else:
                ref = item["valueFrom"]
                if "secretKeyRef" in ref:
                    value = self.secret(ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
                elif "configMapKeyRef" in ref:
                    value = self.config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
                elif "resourceFieldRef" in ref:
                    field_ref = ref["resourceFieldRef"]
                    kind, resource = field_ref["resource"].split(".", 1)
                    amount = quantity(spec["resources"][kind][resource])
                    value = str(int(-(-amount // quantity(field_ref.get("divisor", 1)))))
                elif "fieldRef" in ref:
                    path = ref["fieldRef"]["fieldPath"]
                    value = {
                        "status.podIP": pod.ip,
                        "metadata.name": pod.name,
                        "metadata.namespace": self.namespace,
                    }[path]
                else:
                    raise AssertionError(f"unsupported env source {ref}")
            k8s_env[item["name"]] = value
        env.update(k8s_env)
        return env

    def secret(self, name: str) -> dict[str, str]:
        if name not in self.secrets:
            raise AssertionError(
                f"the manifests use Secret {name!r}, which docs/deploy.md does not tell the "
                f"operator to create (known: {sorted(self.secrets)})"
            )
        return self.secrets[name]

    def _volume_dir(self, pod: Pod, volume: dict, fs_group: int | None) -> Path:
        name = volume["name"]
        if "persistentVolumeClaim" in volume or "claim" in volume:
            path = self.claims / (volume.get("claim") or volume["persistentVolumeClaim"]["claimName"])
        elif "emptyDir" in volume:
            path = pod.dir / "volumes" / name
        else:
            path = pod.dir / "volumes" / name
            if path.exists():
                return path
            path.mkdir(parents=True)
            source = volume.get("configMap") or volume.get("secret")
            data = (
                self.config_maps[source["name"]]
                if "configMap" in volume
                else self.secret(source["secretName"])
            )
            mode = source.get("defaultMode", 0o644)
            for key, value in data.items():
                (path / key).write_text(value)
                os.chmod(path / key, mode)
                os.chown(path / key, 0, fs_group if fs_group is not None else 0)
            return path
        if not path.exists():
            path.mkdir(parents=True)
            os.chown(path, 0, fs_group if fs_group is not None else 0)
            os.chmod(path, 0o2777 if fs_group is None else 0o2775)
        return path

    # ---- pods -----------------------------------------------------------------------------------------
    def add_pod(self, name: str, template: dict, claim_templates: list[dict] | None = None) -> Pod:
        pod = Pod(name, template["spec"], template["metadata"].get("labels", {}))
        pod.dir = self.workdir / "pods" / name
        pod.dir.mkdir(parents=True)
        volumes = list(pod.spec.get("volumes", []))
        for claim in claim_templates or []:  # a StatefulSet's volumeClaimTemplates: PVC <name>-<pod>
            volumes.append(
                {"name": claim["metadata"]["name"], "claim": f"{claim['metadata']['name']}-{name}"}
            )
        pod.spec = {**pod.spec, "volumes": volumes}
        self._attach(pod, len(self.pods))
        self.pods.append(pod)
        return pod

    def _root_script(self, pod: Pod, container: Container, root: Path, ro: bool) -> str:
        pod_sc = pod.spec.get("securityContext", {})
        fs_group = pod_sc.get("fsGroup")
        mounts = []
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        for mount in container.spec.get("volumeMounts", []):
            source = self._volume_dir(pod, volumes[mount["name"]], fs_group)
            target = root / mount["mountPath"].lstrip("/")
            flags = ",ro" if mount.get("readOnly") else ""
            mounts.append(f"mkdir -p {shlex.quote(str(target))}")
            mounts.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}")
            if flags:
                mounts.append(f"mount -o remount,bind,ro {shlex.quote(str(target))}")
        image = self.images[container.spec["image"]]
        extra = []
        if self.venv is not None:
            extra += [f"mkdir -p {root}/opt/venv", f"mount --bind {self.venv} {root}/opt/venv"]
        # The venv's scripts name their interpreter by its real path, and an editable install points at the
        # checkout: when either lives under /tmp (a clone there, as CI may make), the pod's own /tmp (a tmpfs,
        # or the manifest's emptyDir) hides it, so it is bound again at the same path, after the volumes.
        unmask = []
        for host_path in sorted({self.venv.resolve(), REPO} if self.venv is not None else set()):
            if host_path.is_relative_to("/tmp"):
                inside = shlex.quote(f"{root}{host_path}")
                unmask += [f"mkdir -p {inside}", f"mount --bind {shlex.quote(str(host_path))} {inside}"]
        # The image installs this checkout. When the venv's editable install points at another checkout
        # (a venv shared by several worktrees), the pod sees this checkout's packages there (bound over
        # them in its own mount namespace only; nothing outside the pod changes).
        installed = installed_checkout(self.venv) if self.venv is not None else None
        if installed is not None and installed != REPO:
            for package in sorted(p.parent.name for p in REPO.glob("*/__init__.py")):
                if (installed / package / "__init__.py").exists():
                    inside = shlex.quote(f"{root}{installed / package}")
                    unmask.append(f"mount --bind {shlex.quote(str(REPO / package))} {inside}")
        if image.baked_model and self.baked_model is not None:
            extra += [
                f"mkdir -p {root}/opt/instructloop",
                f"mount --bind {self.baked_model} {root}/opt/instructloop",
                f"mount -o remount,bind,ro {root}/opt/instructloop",
            ]
        hosts = pod.dir / "hosts"
        if not hosts.exists():
            hosts.write_text(self.hosts_file(pod))
        upper, work = pod.dir / f"upper-{container.name}", pod.dir / f"work-{container.name}"
        upper.mkdir()
        work.mkdir()
        return "\n".join(
            [
                "set -e",
                f"mount -t overlay overlay -o lowerdir=/,upperdir={upper},workdir={work} {root}",
                *(f"mount --rbind /{d} {root}/{d}" for d in ("proc", "dev", "sys")),
                # the venv's interpreter lives under /root here (see module docstring)
                f"chmod 711 {root}/root",
                f"mount -t tmpfs -o size=64m,mode=1777 tmpfs {root}/tmp",
                f"mount --bind {hosts} {root}/etc/hosts",
                f"hostname {shlex.quote(pod.name)}",
                *extra,
                *mounts,
                *unmask,
                *([f"mount -o remount,bind,ro {root}"] if ro else []),
            ]
        )

    def start_container(self, pod: Pod, spec: dict, *, init: bool = False) -> Container:
        container = Container(pod, spec["name"], spec)
        image = self.images[spec["image"]]
        container.env = self.container_env(pod, spec, image)
        pod_sc, sc = pod.spec.get("securityContext", {}), spec.get("securityContext", {})
        container.uid = sc.get("runAsUser", pod_sc.get("runAsUser", 0))
        container.gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", container.uid))
        groups = ",".join(str(g) for g in {container.gid, pod_sc.get("fsGroup", container.gid)})
        command = spec.get("command") or image.entrypoint
        args = spec.get("args") if "args" in spec else ([] if spec.get("command") else [])
        argv = [expand(part, container.env) for part in [*command, *args]]
        root = pod.dir / f"root-{container.name}"
        root.mkdir()
        setup = self._root_script(pod, container, root, sc.get("readOnlyRootFilesystem", False))
        env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in container.env.items())
        run = (
            f"exec chroot --userspec={container.uid}:{container.gid} --groups={groups} {root} "
            f"env -i {env_args} {' '.join(shlex.quote(a) for a in argv)}"
        )
        container.log_path = pod.dir / f"{container.name}.log"
        with open(container.log_path, "wb") as log:
            container.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    pod.netns,
                    "unshare",
                    "--mount",
                    "--uts",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    f"{setup}\ncd /\n{run}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pod.containers.append(container)
        return container

    # ---- probes ---------------------------------------------------------------------------------------
    def probe(self, container: Container, probe: dict) -> tuple[bool, str]:
        """One probe as the kubelet runs it: from the node for httpGet/tcpSocket, inside the container for
        exec."""
        timeout = probe.get("timeoutSeconds", 1)
        port_of = {p.get("name"): p["containerPort"] for p in container.spec.get("ports", [])}
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = port_of.get(get["port"], get["port"])
            url = f"http://{container.pod.ip}:{port}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400, f"GET {url}: {resp.status}"
            except urllib.error.HTTPError as exc:
                return 200 <= exc.code < 400, f"GET {url}: {exc.code}"
            except OSError as exc:
                return False, f"GET {url}: {exc}"
        if "tcpSocket" in probe:
            import socket

            port = port_of.get(probe["tcpSocket"]["port"], probe["tcpSocket"]["port"])
            try:
                socket.create_connection((container.pod.ip, int(port)), timeout=timeout).close()
                return True, "connected"
            except OSError as exc:
                return False, f"tcp {container.pod.ip}:{port}: {exc}"
        if "exec" in probe:
            # at least 10 s: spawning nsenter + sh + the command on a loaded 2-core machine can take seconds
            result = self.exec(container, probe["exec"]["command"], timeout=max(timeout, 10))
            return (
                result.returncode == 0,
                f"exec {probe['exec']['command']}: rc={result.returncode} "
                f"{(result.stdout + result.stderr).strip()[-300:]}",
            )
        raise AssertionError(f"unsupported probe {probe}")

    def exec(
        self, container: Container, command: list[str], timeout: float = 10
    ) -> subprocess.CompletedProcess:
        """``kubectl exec``: the container's namespaces, root, user and env."""
        assert container.proc is not None
        argv = [
            "nsenter",
            "-t",
            str(container.proc.pid),
            "--mount",
            "--net",
            "--uts",
            "--root",
            "--wd",
            "-S",
            str(container.uid),
            "-G",
            str(container.gid),
            "env",
            "-i",
            *(f"{k}={v}" for k, v in container.env.items()),
            *command,
        ]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", "probe timed out")

    def log_tail(self, container: Container, lines: int = 25) -> str:
        if container.log_path is None or not container.log_path.exists():
            return ""
        return "\n".join(container.log_path.read_text(errors="replace").splitlines()[-lines:])

    # ---- teardown -------------------------------------------------------------------------------------
    def close(self) -> None:
        for pod in self.pods:
            for container in pod.containers:
                if container.proc is not None and container.proc.poll() is None:
                    os.killpg(container.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pod in self.pods:
            for container in pod.containers:
                if container.proc is None:
                    continue
                try:
                    container.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(container.proc.pid, signal.SIGKILL)
                    container.proc.wait(timeout=5)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for netns in self._netns:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(self.workdir / "pods", ignore_errors=True)


def installed_checkout(venv: Path) -> Path | None:
    """The checkout the venv imports the project from (an editable install), as a clean env sees it."""
    result = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import gateway, pathlib; print(pathlib.Path(gateway.__file__).parents[1])",
        ],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": DOCKER_DEFAULT_PATH},
        timeout=60,
    )
    return Path(result.stdout.strip()).resolve() if result.returncode == 0 else None


def expand_shell(value: str, env: dict[str, str]) -> str:
    """Dockerfile ENV's ``$VAR`` / ``${VAR}`` substitution."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), value)
