"""One locked environment: uv.lock pins every package, and the images install exactly its versions.

The developer/CI environment is `uv sync --frozen` of uv.lock (scripts/setup-env); the image
requirement files are exported from the same lock (scripts/lock-image-requirements), and the
trainer image's PyTorch base carries the locked torch.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", re.M)


def locked_versions() -> dict[str, set[str]]:
    """Every locked version of each package (the lock forks a few by Python version)."""
    versions: dict[str, set[str]] = {}
    for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        versions.setdefault(package["name"], set()).add(package["version"])
    return versions


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_lock_matches_pyproject():
    result = run("scripts/uv", "lock", "--check")
    assert result.returncode == 0, f"uv.lock is stale, run `make lock`:\n{result.stderr}"


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_image_requirements_are_exported_from_the_lock(image: str, tmp_path: Path):
    result = run("scripts/lock-image-requirements", str(tmp_path))
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "docker" / f"requirements-{image}.txt").read_text()
    assert committed == (tmp_path / f"requirements-{image}.txt").read_text(), (
        f"docker/requirements-{image}.txt differs from uv.lock, run `make lock`"
    )


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_image_pins_equal_locked_versions(image: str):
    locked = locked_versions()
    pins = PIN.findall((ROOT / "docker" / f"requirements-{image}.txt").read_text())
    assert pins
    for name, version in pins:
        assert version in locked.get(name, ()), (
            f"{name}=={version} in the {image} image, {locked.get(name)} locked"
        )


def test_trainer_base_image_carries_the_locked_torch():
    base = re.search(r"^ARG TRAINER_BASE=pytorch/pytorch:([0-9.]+)-", (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "TRAINER_BASE is not a pytorch/pytorch:<torch version>-... image"
    assert {base.group(1)} == locked_versions()["torch"]


def test_images_install_no_torch_of_their_own():
    trainer = dict(PIN.findall((ROOT / "docker" / "requirements-trainer.txt").read_text()))
    assert "torch" not in trainer
    assert not [name for name in trainer if name.startswith(("nvidia-", "triton"))]
