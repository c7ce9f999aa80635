"""Setup never depends on a uv or pip on PATH, and works in any order, any number of times.

The Makefile puts .venv/bin first on PATH, so `python3` there is the venv's interpreter, which
uv creates without pip: the setup scripts must bring their own uv from a base Python.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def path_without_uv(shadow: Path) -> str:
    """PATH with .venv/bin first (as in the Makefile) and every uv hidden."""
    dirs = [str(ROOT / ".venv" / "bin")]
    for i, entry in enumerate(os.environ["PATH"].split(os.pathsep)):
        here = Path(entry)
        if entry and ((here / "uv").exists() or (here / "uvx").exists()):
            copy = shadow / str(i)
            copy.mkdir(parents=True)
            for cmd in here.iterdir():
                if cmd.name not in ("uv", "uvx") and os.access(cmd, os.X_OK):
                    (copy / cmd.name).symlink_to(cmd)
            entry = str(copy)
        dirs.append(entry)
    return os.pathsep.join(dirs)


@pytest.fixture
def env_without_uv(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PATH=path_without_uv(tmp_path / "shadow"))
    check = subprocess.run(["bash", "-c", "command -v uv"], env=env, capture_output=True, text=True)
    assert check.returncode != 0, f"uv still on PATH: {check.stdout}"
    return env


def test_uv_bootstraps_into_an_empty_cache_without_uv_on_path(env_without_uv, tmp_path: Path):
    env = dict(env_without_uv, LLAVARUN_CACHE=str(tmp_path / "cache"))
    for _ in range(2):  # the second call uses the bootstrapped copy
        result = subprocess.run(
            [str(ROOT / "scripts" / "uv"), "--version"], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("uv ")
    assert (tmp_path / "cache" / "uv-bootstrap").is_dir()


def test_make_venv_repeats_without_uv_on_path(env_without_uv):
    for _ in range(2):
        result = subprocess.run(
            ["make", "--no-print-directory", "venv"],
            cwd=ROOT,
            env=env_without_uv,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "matches uv.lock" in result.stdout
