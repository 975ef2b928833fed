"""The docs say what the code does: docs/pipelines-api.md lists every error
``code`` the gateway can answer or count (and none that it cannot), every
pixel endpoint, and the required fields ``check_call`` enforces; the SDKs
table names the very versions the tests run."""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

from gateway.events import NEEDS_PERSON
from gateway.pixels import KINDS, PATHS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "pipelines-api.md").read_text()
#: where a reason is written in the code: a rejection, a pixel problem, an error body, a counter
REASON_IN_CODE = re.compile(r'(?:Rejection|PixelProblem|error_body)\("([a-z_]+)"|bump\([^)]*rejected, "([a-z_]+)"')


def codes_in_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):  # its subpackages too (gateway/ingest/call_checks.py)
        for m in REASON_IN_CODE.finditer(path.read_text()):
            found.add(m.group(1) or m.group(2))
    return found


def codes_in_doc() -> set[str]:
    row = next(line for line in DOC.splitlines() if line.startswith("| `code` |"))
    return set(re.findall(r"`([a-z_]+)`", row.split("|")[3]))


def test_the_error_codes_are_documented() -> None:
    in_code = codes_in_code()
    assert {"auth", "size", "overload", "missing_field"} <= in_code, "the pattern finds the reasons"
    assert codes_in_doc() == in_code


def test_every_pixel_endpoint_is_documented() -> None:
    for template in PATHS.values():
        for kind in KINDS:
            assert f"`GET {template.format(kind=kind)}" in DOC or f"`{template.format(kind=kind)}" in DOC, \
                template.format(kind=kind)


def test_the_required_fields_are_those_checked() -> None:
    row = next(line for line in DOC.splitlines() if "`userId` or `anonymousId`" in line and line.startswith("|"))
    assert set(re.findall(r"`(\w+)`", row.split("|")[1])) == set(NEEDS_PERSON)
    for kind, field in (("track", "event"), ("group", "groupId"), ("alias", "previousId")):
        assert re.search(rf"^\| `{kind}` \| .*`{field}`", DOC, re.M), kind


def sdks_section() -> str:
    """The README's "SDKs" section."""
    readme = (ROOT / "README.md").read_text()
    start = readme.find("\n## SDKs\n")
    assert start >= 0, "README.md has no section \"## SDKs\""
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end >= 0 else None]


def test_the_sdks_table_names_the_versions_the_tests_run() -> None:
    """A version bump in tests/node, tests/browser or the Python test extra
    must come with the table's row, since its measurements are of that version."""
    doc = sdks_section()
    for lock in (ROOT / "tests" / "node" / "package.json", ROOT / "tests" / "browser" / "package.json"):
        for name, version in json.loads(lock.read_text())["dependencies"].items():
            if name != "playwright-core":
                assert f"[{name}](https://www.npmjs.com/package/{name}) {version}" in doc, name
    for dist in ("customerio-cdp-analytics", "segment-analytics-python", "rudder-sdk-python"):
        assert f"[{dist}](https://pypi.org/project/{dist}/) {metadata.version(dist)}" in doc, dist
