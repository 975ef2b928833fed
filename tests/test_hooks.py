"""One test per hook of gateway/hookspecs.py (tests/test_docs.py checks that
each hook has one): each drives the hook through a real plugin manager or a
real app."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway import config as config_mod
from gateway.app import create_app
from gateway.plugins import build, build_registry, make_manager
from gateway.spool.sqlite_reads import stored_calls

PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"
KEY = "hooks-write-key"


def _config(tmp_path: Path, body: str) -> config_mod.Config:
    return config_mod.loads(textwrap.dedent(f"""
        server: {{shutdown_timeout: 1.0}}
        storage: {{path: {tmp_path / 'spool'}, retention: 3600}}
        sources: [{{name: web, write_keys: ["{KEY}"]}}]
        """) + textwrap.dedent(body))


@pytest.fixture
def plugins_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))


def test_hook_register_destinations(plugins_on_path: None, tmp_path: Path) -> None:
    import itemized_destination as mod

    registry = build_registry(make_manager(["itemized_destination"]))
    assert registry.destinations["itemized"] is mod.ItemizedDestination
    assert registry.provider["destination:itemized"] == "itemized_destination"
    built = build(_config(tmp_path, """
        plugins: [itemized_destination]
        destinations: [{name: Items, type: itemized, settings: {endpoint: "http://127.0.0.1:9/"}}]
        """))
    [item] = built.destinations
    assert isinstance(item.destination, mod.ItemizedDestination) and item.destination.name == "Items"
    assert item.destination.http.throttle is item.throttle, "built with the client of its own rate limit"


async def test_hook_register_transforms(aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shout_transform.py").write_text(textwrap.dedent("""
        import msgspec
        from gateway.api import Transform, hookimpl

        class Shout(Transform):
            type = "shout"

            class Settings(msgspec.Struct):
                pass

            def apply(self, call):
                if call.get("event") == "Drop me":
                    return None
                call["event"] = call["event"].upper()
                return call

        @hookimpl
        def register_transforms():
            return [Shout]
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shout_transform", raising=False)
    client = await aiohttp_client(create_app(_config(tmp_path, """
        plugins: [shout_transform]
        transforms: [{type: shout}]
        """)))
    for event in ("Clicked", "Drop me"):
        resp = await client.post("/v1/track", json={"userId": "u1", "event": event},
                                 headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status == 200
    assert [msgspec.json.decode(c)["event"] for c in stored_calls(tmp_path / "spool")] == ["CLICKED"]


async def test_hook_startup(plugins_on_path: None, aiohttp_client: Any, tmp_path: Path) -> None:
    import itemized_destination as mod

    mod.LIFECYCLE.clear()
    client = await aiohttp_client(create_app(_config(tmp_path, "plugins: [itemized_destination]\n")))
    assert mod.LIFECYCLE == [("startup", client.server.app)], "awaited once, before the first request"
    resp = await client.get("/ready")
    assert resp.status == 200


async def test_hook_shutdown(plugins_on_path: None, aiohttp_client: Any, tmp_path: Path) -> None:
    import itemized_destination as mod

    mod.LIFECYCLE.clear()
    client = await aiohttp_client(create_app(_config(tmp_path, "plugins: [itemized_destination]\n")))
    app = client.server.app
    await client.close()
    assert mod.LIFECYCLE == [("startup", app), ("shutdown", app)]
