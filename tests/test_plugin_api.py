"""Built-in plugins have exactly a third party's power: from the gateway they
import ``gateway.api`` alone, and no other plugin (a module of their own
package is theirs).  docs/plugins.md, "The plugin API"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gateway.api

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"


def plugin_of(path: Path) -> str:
    """The plugin a file belongs to: ``plugins.file``, ``plugins.customerio``."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(rel[:2])


def package_of(path: Path) -> str:
    """The package a file's relative imports start from."""
    return ".".join(path.relative_to(ROOT).parts[:-1])


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file of ``package``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
    return out


FILES = sorted(p for p in PLUGINS.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_plugin_files_are_found() -> None:
    names = {plugin_of(p) for p in FILES}
    assert {"plugins.file", "plugins.webhook", "plugins.transforms", "plugins.customerio"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_built_in_plugin_imports_only_the_plugin_api(path: Path) -> None:
    own = plugin_of(path)
    wrong = []
    for line, module in imported_modules(path, package_of(path)):
        if (module == "gateway" or module.startswith("gateway.")) and module != "gateway.api":
            wrong.append(f"line {line}: {module} (a plugin imports gateway.api only)")
        if module.startswith("plugins.") and not (module == own or module.startswith(own + ".")):
            wrong.append(f"line {line}: {module} (another plugin)")
    assert not wrong, f"{path.relative_to(ROOT)}: " + "; ".join(wrong)


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The parser above must catch both shapes of a leak, or the test proves nothing.
    bad = tmp_path / "leak_probe.py"
    bad.write_text("from gateway.ingest import check_call\nfrom .file import FileDestination\n"
                   "from ..plugins.webhook import WebhookDestination\n")
    modules = [m for _, m in imported_modules(bad, "plugins.customerio")]
    assert modules == ["gateway.ingest", "plugins.customerio.file", "plugins.plugins.webhook"]


def test_everything_the_api_exports_exists() -> None:
    missing = [n for n in gateway.api.__all__ if not hasattr(gateway.api, n)]
    assert not missing
