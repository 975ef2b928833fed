"""What the tests that run Node.js (real SDKs, headless Chromium) need, and
one way to skip without it: with REQUIRE_BROWSER_TESTS=1 (CI) a missing tool
fails the test instead, so CI never passes by skipping."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def node_problem(needed_by: str, directory: Path, packages: tuple[str, ...], chromium: bool = False) -> str | None:
    """Why Node.js 20+, ``packages`` under ``directory/node_modules`` (and
    Chromium) are not there to use, or None when they are."""
    node = shutil.which("node")
    if node is None:
        return "Node.js (20 or later, with npm) is not installed"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return f"{node} --version did not answer"
    if major < 20:
        return f"Node.js {version} is too old for {needed_by}: it needs 20 or later"
    if chromium and not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium is not installed at {CHROMIUM}: apt-get update && apt-get install -y chromium"
    for pkg in packages:
        if not (directory / "node_modules" / pkg / "package.json").is_file():
            return f"{directory.name}/node_modules lacks {pkg}: cd tests/{directory.name} && npm ci"
    return None


def skip_without(reason: str | None) -> None:
    """Skip, saying what to install (fail instead with REQUIRE_BROWSER_TESTS=1)."""
    if reason is None:
        return
    if os.environ.get("REQUIRE_BROWSER_TESTS") == "1":
        pytest.fail(f"REQUIRE_BROWSER_TESTS=1, but {reason}", pytrace=False)
    pytest.skip(reason)
