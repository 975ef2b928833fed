"""The README's set-up, as a newcomer on Debian 12 or Ubuntu 24.04 meets it:
the system Python refuses ``pip install`` (PEP 668), and ``scripts/setup``
(which ``scripts/serve`` and ``scripts/test`` call) must not need it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFUSING_PYTHON = """#!/bin/sh
# A system python3 as Debian 12 ships it: pip refuses to install outside a virtual environment.
for a in "$@"; do
  if [ "$a" = "pip" ]; then
    echo "error: externally-managed-environment" >&2
    exit 1
  fi
done
exec "{real}" "$@"
"""


def checkout_copy(tmp_path: Path) -> Path:
    """The files a fresh clone has that the set-up needs."""
    dest = tmp_path / "checkout"
    for name in ("pyproject.toml", "README.md", "config.yaml", "scripts", "gateway", "plugins"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            dest.mkdir(exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_setup_works_where_the_system_python_refuses_pip(tmp_path: Path) -> None:
    checkout = checkout_copy(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(REFUSING_PYTHON.format(real=sys.executable))
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    refused = subprocess.run(["python3", "-m", "pip", "install", "-e", "."], cwd=checkout, env=env,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "externally-managed" in refused.stderr, "the fake refuses as Debian's does"
    r = subprocess.run(["scripts/setup"], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode and "No matching distribution" in r.stderr:
        pytest.skip(f"the package registry cannot be reached: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    venv_bin = Path(r.stdout.strip())
    assert venv_bin == checkout / ".venv" / "bin"
    version = subprocess.run([str(venv_bin / "gateway"), "--version"], cwd=checkout, env=env, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("gateway "), version
    check = subprocess.run([str(venv_bin / "gateway"), "check"], cwd=checkout, env=env, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "config config.yaml: OK" in check.stdout, check
    again = subprocess.run(["scripts/setup"], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and Path(again.stdout.strip()) == venv_bin, "running it again reuses .venv"
