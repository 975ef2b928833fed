"""What is local to this repository's tests.  The fixtures and helpers come
from the test kit, ``gateway.testing``.

An installed gateway registers the kit with pytest itself (the ``pytest11``
entry point ``gateway``); a checkout run with ``PYTHONPATH=.``, or an install
made before the entry point existed, does not, so it is registered here,
under the entry point's name, unless it already is: registering a module
twice is an error to pytest ("Plugin already registered").  An explicit
``-p no:gateway`` still wins (pluggy ignores a blocked name)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import gateway.testing

#: the fake Customer.io API's fixtures (``cio``, ``http``), and the real
#: nats-servers' (``nats_node``, one for the session; ``nats_cluster``), for every test module here
pytest_plugins = ["fake_customerio", "nats_servers"]

REPO = Path(__file__).resolve().parent.parent
PLUGINS_DIR = REPO / "tests" / "plugins"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.is_registered(gateway.testing):
        config.pluginmanager.register(gateway.testing, "gateway")


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests (under the Python SDKs) honours HTTP(S)_PROXY from the environment: keep 127.0.0.1 direct."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> Path:
    """tests/plugins/ on sys.path, so that ``plugins:`` in a config can name
    its modules; → that directory."""
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))
    return PLUGINS_DIR


def _can_build_offline() -> bool:
    """setuptools builds wheels by itself from 70.1 on; before that it needs ``wheel``."""
    try:
        import setuptools
        if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1):
            return True
        import wheel  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="session")
def sample_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugins/sample_plugin installed with pip into a directory of its
    own (from a copy, so the build leaves nothing in the source tree), once a
    run: the plugin tests and the test of the docs' testing example use it.
    Where the local setuptools cannot build a wheel, pip builds in an isolated
    environment, fetching setuptools from the configured index."""
    work = tmp_path_factory.mktemp("sample")
    src, site = work / "src", work / "site"
    shutil.copytree(PLUGINS_DIR / "sample_plugin", src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--target", str(site), str(src)]
    if _can_build_offline():
        cmd.insert(5, "--no-build-isolation")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    return site


@pytest.fixture
def kit_entry_point(tmp_path: Path) -> Path:
    """A directory that, on PYTHONPATH, makes pytest see the gateway's
    ``pytest11`` entry point as an install of the gateway would (the metadata
    pip writes, as far as entry points go, from pyproject.toml), without
    touching the environment's own install of it."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared["pytest11"] == {"gateway": "gateway.testing"}
    site = tmp_path / "entry-points"
    dist = site / "event_gateway_entry_points-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: event-gateway-entry-points\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[pytest11]\n" + "".join(f"{name} = {value}\n" for name, value in declared["pytest11"].items()))
    return site
