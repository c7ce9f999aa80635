"""The Dockerfile matches the project (images cannot be built on the CI machine, so every step
is checked here instead): lint, copied paths, entrypoints, pinned requirements, no torch in the
operator image."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest

from tests.helpers import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = re.compile(r"^(torch|triton|nvidia-|deepspeed|transformers)\b", re.M)


def stages() -> dict[str, list[str]]:
    """Instructions per build stage (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM \S+ AS (\S+)", line):
            current = m.group(1)
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_exist():
    assert {"operator", "trainer"} <= stages().keys()


def test_copied_paths_exist():
    for lines in stages().values():
        for line in lines:
            if line.startswith("COPY") and "--from" not in line:
                *sources, _dest = line.split()[1:]
                for source in sources:
                    assert (ROOT / source).exists(), f"COPY {source}: no such path"


@pytest.mark.parametrize(("target", "script"), [("operator", "llavarun"), ("trainer", "llava-trainer")])
def test_entrypoint_is_a_console_script(target, script):
    lines = stages()[target]
    assert f'ENTRYPOINT ["{script}"]' in lines
    assert script in PYPROJECT["project"]["scripts"]


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_images_run_as_non_root(target):
    users = [line for line in stages()[target] if line.startswith("USER")]
    assert users and not users[-1].split()[1].startswith(("0", "root"))


def test_operator_image_installs_no_torch():
    operator_reqs = (ROOT / "docker" / "requirements-operator.txt").read_text()
    assert not HEAVY.findall(operator_reqs)
    assert not any(HEAVY.match(dep) for dep in PYPROJECT["project"]["optional-dependencies"]["operator"])
    assert not any(HEAVY.match(dep) for dep in PYPROJECT["project"]["dependencies"])
    assert any("requirements-operator.txt" in line for line in stages()["operator"])


def _pinned(path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M)
    return {name.lower().replace("_", "-"): version for name, version in pins}


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_requirements_pin_every_dependency(extra):
    pins = _pinned(ROOT / "docker" / f"requirements-{extra}.txt")
    wanted = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"][extra]
    for dep in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower().replace("_", "-")
        if extra == "trainer" and name == "torch":
            continue  # from the PyTorch base image
        assert name in pins, f"{dep} is not pinned in docker/requirements-{extra}.txt"
