"""Helpers for tests that read `deploy/`: rendering overlays, the image's argv, tools CI installs.

    docs = render("production")                 # kubectl kustomize, parsed
    pod = deployment(docs)["spec"]["template"]["spec"]
    argv = compose_argv(image_argv(), container)  # what Kubernetes executes
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.process import ROOT

DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = ("dev", "production")
CONTAINERFILE = DEPLOY / "Containerfile"
CI_TOOLS = ROOT / ".venv-ci" / "bin"   # .ci/run installs checkov, hadolint and kubernetes-validate here


def tool(name: str) -> str | None:
    """A command-line tool from PATH or from the CI tools virtualenv."""
    found = shutil.which(name)
    if found:
        return found
    candidate = CI_TOOLS / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def render_text(path: Path) -> str:
    kubectl = tool("kubectl")
    assert kubectl is not None
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(overlay: str, root: Path = KUSTOMIZE) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(root / "overlays" / overlay)) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return deployment(docs)["spec"]["template"]["spec"]


def container(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec = pod_spec(docs)
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no single container {name}"
    return found[0]


def all_containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = pod_spec(docs)
    return spec.get("initContainers", []) + spec["containers"]


def gateway_config_text(docs: list[dict[str, Any]]) -> str:
    """The gateway.yaml the pod mounts: the ConfigMap its config volume names."""
    spec = pod_spec(docs)
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    return cm["data"]["gateway.yaml"]


def gateway_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(gateway_config_text(docs))


def image_argv(containerfile: Path = CONTAINERFILE) -> tuple[list[str], list[str]]:
    """The final stage's ENTRYPOINT and CMD (exec form only: a shell form would wrap the argv in sh -c)."""
    text = re.sub(r"\\\n", " ", containerfile.read_text())
    final = text.split("\nFROM ")[-1]
    found: dict[str, list[str]] = {}
    for line in final.splitlines():
        match = re.match(r"\s*(ENTRYPOINT|CMD)\s+(.*)$", line)
        if match:
            value = json.loads(match.group(2))
            assert isinstance(value, list), f"{match.group(1)} must use the exec (JSON) form"
            found[match.group(1)] = value
    return found.get("ENTRYPOINT", []), found.get("CMD", [])


def healthcheck_argv(containerfile: Path = CONTAINERFILE) -> list[str]:
    """The final stage's HEALTHCHECK CMD (exec form)."""
    text = re.sub(r"\\\n", " ", containerfile.read_text())
    match = re.search(r"^HEALTHCHECK\s.*?\bCMD\s+(\[.*\])\s*$", text.split("\nFROM ")[-1], re.M)
    assert match, "no exec-form HEALTHCHECK in the final stage"
    return json.loads(match.group(1))


def image_copies(containerfile: Path = CONTAINERFILE) -> dict[str, Path]:
    """The final stage's `COPY <repository file> <image path>` lines: {image path: repository file}."""
    final = containerfile.read_text().split("\nFROM ")[-1]
    copies = {}
    for line in final.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "COPY":
            copies[words[2]] = ROOT / words[1]
    return copies


def local_healthcheck_argv(python: str, pid: int, containerfile: Path = CONTAINERFILE) -> list[str]:
    """The image's HEALTHCHECK as it would run here: `python` is `python`, files the image copies are
    their repository originals, and the gateway it checks is `pid` instead of the container's PID 1."""
    copies = image_copies(containerfile)
    argv = healthcheck_argv(containerfile)
    return [python] + [str(copies.get(a, a)) for a in argv[1:]] + [str(pid)]


def kubectl_steps(text: str) -> list[list[str]]:
    """The `kubectl` command lines of a README block or a comment, in order, as argv lists."""
    steps = []
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line.startswith("kubectl "):
            steps.append(shlex.split(line, comments=True))
    return steps


def readme_section(title: str) -> str:
    """The README's `## title` section, up to the next `## ` heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n") + 1
    end = text.find("\n## ", start)
    return text[start:] if end == -1 else text[start:end]


def compose_argv(image: tuple[list[str], list[str]], spec: dict[str, Any] | None) -> list[str]:
    """Kubernetes' rule: `command` replaces ENTRYPOINT (and drops CMD); `args` replaces CMD."""
    entrypoint, cmd = image
    spec = spec or {}
    if "command" in spec:
        return list(spec["command"]) + list(spec.get("args", []))
    return list(entrypoint) + list(spec["args"] if "args" in spec else cmd)


