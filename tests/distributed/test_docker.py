"""The cluster image cannot be built here (no Docker, no registry for CUDA images), so check what
a build would trip over: every file it copies exists, every version it pins is the lock's (or the
Makefile's, for pip), it installs the lock and provides the ``ebmscale`` entry point, and the Ray
example only references files and services that exist."""
from __future__ import annotations

import os
import re

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(REPO, "docker")
PIN = re.compile(r"(?<![\w.-])([A-Za-z][A-Za-z0-9_.-]*)==([0-9][A-Za-z0-9_.+!-]*)")


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts)) as fh:
        return fh.read()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def _lock() -> dict[str, str]:
    pins = {}
    for name in ("requirements.lock", "requirements-nodeps.lock"):
        for m in PIN.finditer(_read(name)):
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_every_copied_path_exists_and_context_excludes_the_venv():
    steps = _instructions(_read("docker", "Dockerfile"))
    copies = [args.split() for op, args in steps if op in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        sources = [a for a in args if not a.startswith("--")][:-1]
        assert sources, args
        for src in sources:
            assert os.path.exists(os.path.join(REPO, src)), f"COPY source '{src}' does not exist"
    ignored = _read("docker", "Dockerfile.dockerignore").split()
    assert ".venv" in ignored and ".cache" in ignored, "the 5 GB venv would be sent as build context"


def test_pinned_versions_match_the_lock():
    lock = _lock()
    makefile_pip = re.search(r"'pip==([0-9.]+)'", _read("Makefile")).group(1)
    texts = {name: _read("docker", name) for name in os.listdir(DOCKER)}
    found = 0
    for name, text in texts.items():
        for m in PIN.finditer(text):
            pkg, version = m.group(1).lower().replace("_", "-"), m.group(2)
            want = makefile_pip if pkg == "pip" else lock.get(pkg)
            assert want is not None, f"{name} pins {pkg}, which is not in the lock"
            assert version == want, f"{name} pins {pkg}=={version}, the lock has {want}"
            found += 1
    assert found >= 1
    dockerfile = texts["Dockerfile"]
    # The dependencies are the lock itself, installed as `make` installs them.
    assert "pip install -r requirements.lock" in dockerfile
    assert "pip install --no-deps -r requirements-nodeps.lock" in dockerfile


def test_cuda_base_python_and_entry_point():
    steps = _instructions(_read("docker", "Dockerfile"))
    args = dict(re.findall(r"ARG (\w+)=(\S+)", _read("docker", "Dockerfile")))
    base = next(a for op, a in steps if op == "FROM")
    image = args.get(base.strip("${}"), base)
    assert image.startswith("nvidia/cuda:"), image
    # torch from the lock is a CUDA 13 build: the base image must speak the same major version.
    assert "nvidia-cuda-runtime" in _lock() and image.split(":")[1].startswith(
        _lock()["nvidia-cuda-runtime"].split(".")[0] + "."), image
    assert "python3.11" in _read("docker", "Dockerfile") and "Python 3.11" in _read("README.md")
    entry = next(a for op, a in steps if op == "ENTRYPOINT")
    assert entry == '["ebmscale"]' and 'ebmscale = "ebmscale.cli:main"' in _read("pyproject.toml")


def test_ray_example_runs_head_workers_and_ranks_from_this_image():
    with open(os.path.join(DOCKER, "ray-cluster.compose.yaml")) as fh:
        compose = yaml.safe_load(fh)
    services = compose["services"]
    assert {"ray-head", "ray-worker", "trainer"} <= set(services)
    tag = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", _read("docker", "Dockerfile")).group(1)
    head_port = None
    for name, svc in services.items():
        assert svc["image"] == tag, f"{name} does not run the image docker/Dockerfile builds"
        assert svc["environment"]["RAY_ADDRESS"] == "ray-head:6379"
        command = " ".join(svc["command"])
        if name == "ray-head":
            head_port = re.search(r"--port=(\d+)", command).group(1)
        for path in re.findall(r"(?:launch|configs)/[\w./-]+\.ya?ml", command):
            assert os.path.isfile(os.path.join(REPO, path)), f"{name} references missing {path}"
    assert head_port == "6379" and "ray-head:6379" in " ".join(services["ray-worker"]["command"])
    trainer = " ".join(services["trainer"]["command"])
    assert services["trainer"]["entrypoint"] == ["bash", "-c"] and "accelerate launch" in trainer
    assert "ebmscale.cli train" in trainer and "buffer.ray_address=auto" in trainer
    assert trainer.startswith("ray start --address=$$RAY_ADDRESS")  # a driver needs a raylet on its node
