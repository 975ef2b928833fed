"""docs/plugins.md documents every hook of the live plugin manager exactly
once (what it is for, when it is called, what it returns), names no hook that
does not exist, every hook has a test, its complete example is the sample
package the tests install, and the example of "Testing your plugin" passes
against that package."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.plugins import make_manager

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugins.md"
TESTING_HEADING = "## Testing your plugin\n"
SAMPLE = ROOT / "tests" / "plugins" / "sample_plugin"
HEADING = re.compile(r"^### `(\w+)\((.*?)\)`$", re.MULTILINE)


def hookspecs() -> dict[str, list[str]]:
    """Hook name -> argument names, read from a live plugin manager (as
    datasette's tests read ``pm.hook``)."""
    pm = make_manager()
    out = {}
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if not name.startswith("_") and getattr(caller, "spec", None) is not None:
            out[name] = list(caller.spec.argnames)
    return out


def hook_tests() -> set[str]:
    """Names of every ``test_hook_*`` function of the test suite."""
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_hook_"):
                names.add(node.name)
    return names


def sections() -> dict[str, list[tuple[str, str]]]:
    """Hook heading -> every (arguments as written, section text) under that name."""
    text = DOC.read_text()
    found = list(HEADING.finditer(text))
    out: dict[str, list[tuple[str, str]]] = {}
    for i, m in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else text.find("\n## ", m.end())
        out.setdefault(m.group(1), []).append((m.group(2), text[m.end():end if end > 0 else len(text)]))
    return out


def test_the_hookspecs_are_found() -> None:
    # The parser must see the hooks; if hookspecs.py is reshaped, fix the parser.
    specs = hookspecs()
    assert {"register_destinations", "register_transforms", "startup", "shutdown"} <= set(specs)


@pytest.mark.parametrize("hook", sorted(hookspecs()))
def test_every_hook_is_documented_once(hook: str) -> None:
    found = sections().get(hook, [])
    assert len(found) == 1, f"docs/plugins.md must have exactly one '### `{hook}(...)`' section, has {len(found)}"
    [(args, text)] = found
    assert [a.strip() for a in args.split(",") if a.strip()] == hookspecs()[hook], "the heading shows the arguments"
    for part in ("**For:**", "**When:**", "**Returns:**"):
        assert part in text, f"the section of {hook} says nothing under {part}"
    assert "```python" in text and "@hookimpl" in text and f"def {hook}(" in text, "the section has an example"


def test_no_section_documents_a_hook_that_does_not_exist() -> None:
    assert set(sections()) <= set(hookspecs())


@pytest.mark.parametrize("hook", sorted(hookspecs()))
def test_every_hook_has_a_test(hook: str) -> None:
    assert f"test_hook_{hook}" in hook_tests(), f"no test named test_hook_{hook} (tests/test_hooks.py)"


def _block(text: str, lang: str, after: str) -> str:
    start = text.index(after)
    m = re.compile(rf"^```{lang}\n(.*?)^```$", re.MULTILINE | re.DOTALL).search(text, start)
    assert m is not None
    return m.group(1)


def test_the_complete_example_is_the_installed_sample_package() -> None:
    text = DOC.read_text()
    assert _block(text, "toml", "`pyproject.toml`: the entry point") == (SAMPLE / "pyproject.toml").read_text()
    assert _block(text, "python", "`gateway_sample_plugin.py`: a destination") == \
        (SAMPLE / "gateway_sample_plugin.py").read_text()
    assert '[project.entry-points.gateway]\nsample = "gateway_sample_plugin"' in \
        (SAMPLE / "pyproject.toml").read_text()


def test_every_python_example_compiles() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 5
    for block in blocks:
        compile(block, "docs/plugins.md", "exec")


def section_on_testing() -> str:
    """The "Testing your plugin" section of docs/plugins.md."""
    text = DOC.read_text()
    assert TESTING_HEADING in text, f"docs/plugins.md has no section {TESTING_HEADING.strip()!r}"
    start = text.index(TESTING_HEADING)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def test_the_testing_example_runs_against_the_sample_plugin(sample_site: Path, kit_entry_point: Path,
                                                            tmp_path: Path) -> None:
    """The section's example as a plugin package has it: a project of its own
    with the section's pytest settings, the sample plugin installed, and the
    kit found only through the gateway's ``pytest11`` entry point (this
    repository's tests/conftest.py is not in that project)."""
    section = section_on_testing()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert tomllib.loads(_block(section, "toml", "declares the entry point"))["project"]["entry-points"] == \
        {"pytest11": declared["pytest11"]}, "the section shows the entry point pyproject.toml declares"
    project = tmp_path / "gateway-sample-plugin"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text(_block(section, "toml", "pytest's settings"))
    example = _block(section, "python", "`tests/test_collect.py`:")
    (project / "tests" / "test_collect.py").write_text(example)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, sample_site, kit_entry_point)))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-5000:]}\n{done.stderr[-3000:]}"
    tests = len(re.findall(r"^async def test_", example, re.MULTILINE))
    assert tests >= 3 and f"{tests} passed" in done.stdout, done.stdout[-2000:]
