"""The plugin system: a third-party package installed with pip and found
through its ``gateway`` entry point, used by a real app and listed by
``gateway check``; modules named under ``plugins:`` in the config; the
lifecycle hooks; and plugins that are wrong fail loudly, naming themselves."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from aiohttp import web

from gateway import app_state
from gateway.config import ConfigError
from gateway.plugins import build_registry, make_manager
from gateway.spool.sqlite_reads import stored_calls
from gateway.testing import (
    Action, CliResult, FakeDestination, ReceivedRequest, dead_letters, gateway_cli, send_batch, spool_path, track,
    wait_until, webhook,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "plugins" / "sample_plugin"


@pytest.fixture
def sample_installed(sample_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed sample on sys.path for this test only."""
    monkeypatch.syspath_prepend(str(sample_site))
    yield sample_site
    sys.modules.pop("gateway_sample_plugin", None)


async def check(config: Path, *pythonpath: Path) -> CliResult:
    """``gateway check`` of ``config``, with ``pythonpath`` importable to it."""
    return await gateway_cli("check", "--config", str(config), cwd=ROOT, pythonpath=pythonpath)


def write_config(tmp_path: Path, **doc: Any) -> Path:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump({"storage": {"path": str(tmp_path / "spool")},
                                    "sources": [{"name": "web", "write_keys": ["k"]}], **doc}, sort_keys=False))
    return path


# -- a third-party package -------------------------------------------------------------

def test_the_sample_is_a_package_with_an_entry_point(sample_site: Path) -> None:
    [dist] = sample_site.glob("gateway_sample_plugin-*.dist-info")
    assert (dist / "entry_points.txt").read_text().split() == ["[gateway]", "sample", "=", "gateway_sample_plugin"]
    assert (sample_site / "gateway_sample_plugin.py").read_text() == \
        (SAMPLE / "gateway_sample_plugin.py").read_text()
    assert not (SAMPLE / "build").exists() and not list(SAMPLE.glob("*.egg-info"))


def test_entry_point_plugins_load_only_when_installed(sample_installed: Path) -> None:
    pm = make_manager()
    assert pm.get_plugin("sample") is sys.modules["gateway_sample_plugin"]
    reg = build_registry(pm)
    assert reg.provider["destination:collect"] == "sample"
    assert reg.provider["transform:redact_emails"] == "sample"
    assert reg.plugins(pm)["sample"] == ["destination:collect", "transform:redact_emails"]


def test_entry_points_come_from_what_is_installed_only(sample_site: Path) -> None:
    """Built but not on sys.path (the fixture above is undone after each test):
    no trace of the sample in a new manager."""
    assert str(sample_site) not in sys.path
    pm = make_manager()
    assert pm.get_plugin("sample") is None
    assert "destination:collect" not in build_registry(pm).provider


def collect_api() -> Action:
    """Collect's answer: 207, item by item; a ``plan`` of ``bad`` is refused."""
    async def act(request: web.Request, req: ReceivedRequest) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer key-1":
            return web.Response(status=401, text="bad key")
        results = [{"status": 400, "error": "unknown plan"} if item["data"].get("plan") == "bad" else {"status": 200}
                   for item in req.json["items"]]
        return web.json_response({"results": results}, status=207)
    return act


async def test_an_installed_plugin_works_in_a_real_app(sample_installed: Path, gateway_client: Any,
                                                       fake_destination: FakeDestination,
                                                       tmp_path: Path) -> None:
    fake_destination.default = collect_api()
    client = await gateway_client(
        destinations=[{**webhook("Collect EU", fake_destination.url), "type": "collect",
                       "settings": {"api_key": "key-1", "region": "eu", "endpoint": fake_destination.url}}],
        transforms=[{"type": "redact_emails", "settings": {}}])
    await send_batch(client, [
        track("m-1", properties={"plan": "pro", "note": "write to ann@example.com"}),
        track("m-2", properties={"plan": "bad"}),
        {"type": "identify", "anonymousId": "a-1", "messageId": "m-3", "traits": {"email": "bo@example.org"}},
        track("m-4", integrations={"Collect": False}),  # the type's alias
        {"type": "group", "groupId": "g-1", "messageId": "m-5"},  # a group needs no person; Collect does
    ])
    await fake_destination.wait_requests(1)
    [req] = fake_destination.requests
    assert req.path == "/hook/v1/items"
    items = req.json["items"]
    assert [(i["id"], i["user"], i["kind"]) for i in items] == [
        ("m-1", "u1", "track"), ("m-2", "u1", "track"), ("m-3", "a-1", "identify")]
    assert items[0]["name"] == "Clicked" and items[0]["data"] == {"plan": "pro", "note": "write to [redacted]"}
    assert items[2]["data"] == {"email": "[redacted]"}
    # the transform ran before the spool
    stored = b"".join(stored_calls(spool_path(tmp_path)))
    assert b"@example" not in stored

    def two_dead_letters() -> list[Any] | None:
        letters = dead_letters(tmp_path)
        return letters if len(letters) == 2 else None

    dead = await wait_until(two_dead_letters, what="two dead letters")
    assert sorted((d.message_id, d.status, d.reason) for d in dead) == [
        ("m-2", 400, "item 400: unknown plan"), ("m-5", None, "NO_USER: Collect needs a userId or an anonymousId")]
    await fake_destination.wait_quiet()
    assert len(fake_destination.requests) == 1


async def test_gateway_check_lists_an_installed_plugin(sample_site: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, transforms=[{"type": "redact_emails"}], destinations=[
        {"name": "Collect", "type": "collect", "settings": {"api_key": "k"}}])
    rc, out, err = await check(cfg, sample_site)
    assert rc == 0, err
    lines = out.splitlines()
    assert "  redact_emails  [plugin sample]" in lines
    assert "  Collect: collect  [plugin sample]" in lines
    assert "  sample: destination:collect, transform:redact_emails" in lines
    rc, out, err = await check(cfg)  # not installed: the type is unknown, and the error says so
    assert rc == 2
    assert "unknown transform type 'redact_emails'" in err


# -- modules named in the config ----------------------------------------------------------

async def test_config_plugins_module_and_lifecycle_hooks(test_plugins: Path, gateway_client: Any,
                                                         fake_destination: FakeDestination,
                                                         tmp_path: Path) -> None:
    import itemized_destination as mod
    mod.LIFECYCLE.clear()
    client = await gateway_client(destinations=[{**webhook("Items", fake_destination.url), "type": "itemized",
                                                 "settings": {"endpoint": fake_destination.url}}],
                                  plugins=["itemized_destination"])
    app = client.server.app
    assert app[app_state.BUILT].registry.provider["destination:itemized"] == "itemized_destination"
    assert mod.LIFECYCLE == [("startup", app)], "startup is awaited once, before calls are taken"
    await client.close()
    assert mod.LIFECYCLE == [("startup", app), ("shutdown", app)]

    cfg = write_config(tmp_path, plugins=["itemized_destination"],
                       destinations=[{"name": "Items", "type": "itemized",
                                      "settings": {"endpoint": fake_destination.url}}])
    rc, out, err = await check(cfg, test_plugins)
    assert rc == 0, err
    assert "  Items: itemized  [plugin itemized_destination]" in out.splitlines()
    assert "  itemized_destination: destination:itemized" in out.splitlines()


def test_a_module_that_cannot_be_imported_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^plugins: cannot import 'no_such_plugin_module': No module named"):
        make_manager(["no_such_plugin_module"])


async def test_a_misspelled_hook_fails_loudly(test_plugins: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^plugins: unknown hook 'register_destination' in plugin "
                                          r"<module 'misspelled_hook_plugin'"):
        make_manager(["misspelled_hook_plugin"])
    rc, out, err = await check(write_config(tmp_path, plugins=["misspelled_hook_plugin"]), test_plugins)
    assert rc == 2 and out == ""
    assert "gateway: config error: plugins: unknown hook 'register_destination'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("source, message", [
    ("from gateway.hookspecs import hookimpl\n"
     "@hookimpl\ndef register_destinations(app):\n    return []\n",
     "plugins: Plugin 'bad_plugin_mod' for hook 'register_destinations'"),
    ("from gateway.hookspecs import hookimpl\n"
     "@hookimpl\ndef register_destinations():\n    return [object]\n",
     "register_destinations of plugin bad_plugin_mod returned <class 'object'>, which is not a subclass of "
     "gateway.api.Destination"),
    ("from gateway.hookspecs import hookimpl\nfrom gateway.api import Transform\n"
     "class T(Transform):\n    pass\n"
     "@hookimpl\ndef register_transforms():\n    return [T]\n",
     "register_transforms of plugin bad_plugin_mod: T has no type string"),
    ("from gateway.hookspecs import hookimpl\nfrom plugins.file import FileDestination\n"
     "class F(FileDestination):\n    pass\n"
     "@hookimpl\ndef register_destinations():\n    return [F]\n",
     "destination type 'file' is provided twice: by plugins.file and by bad_plugin_mod"),
], ids=["hook-arguments", "not-a-class", "no-type", "duplicate-type"])
def test_wrong_plugins_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                         message: str) -> None:
    (tmp_path / "bad_plugin_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_plugin_mod", raising=False)
    try:
        with pytest.raises(ConfigError) as e:
            build_registry(make_manager(["bad_plugin_mod"]))
        assert str(e.value).startswith(message), str(e.value)
    finally:
        sys.modules.pop("bad_plugin_mod", None)
