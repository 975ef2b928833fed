"""The test kit itself (gateway/testing.py): its waits fail, and say what they
waited for and saw; its config builder's defaults and merging; the fake
destination answers as scripted and records what it got; and installed with
its ``pytest11`` entry point it is registered once, beside tests/conftest.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway import config as config_mod
from gateway.testing import (
    WRITE_KEY, FakeDestination, drop_connection, gateway_config, status, wait_until, webhook,
)

ROOT = Path(__file__).resolve().parent.parent


async def test_wait_until_returns_what_the_check_found() -> None:
    found = iter([None, [], ["call"]])
    assert await wait_until(lambda: next(found), what="a call", poll=0.01) == ["call"]

    async def looked_up() -> int:
        return 7
    assert await wait_until(looked_up, what="a number") == 7


async def test_wait_until_fails_saying_what_it_waited_for_and_what_it_saw() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        await wait_until(lambda: [], what="two calls", timeout=0.2)
    assert str(failed.value) == "timed out after 0.2s waiting for two calls; saw []"
    assert 0.2 <= time.monotonic() - started < 2
    with pytest.raises(AssertionError, match=r"^timed out after 0.1s waiting for x; saw 'the last look'$"):
        await wait_until(lambda: False, what="x", timeout=0.1, seen=lambda: "the last look")


async def test_wait_until_wakes_on_its_event() -> None:
    event, box = asyncio.Event(), []

    def fill() -> None:
        box.append("filled")
        event.set()
    asyncio.get_running_loop().call_later(0.05, fill)
    started = time.monotonic()
    assert await wait_until(lambda: box, what="the box", event=event) == ["filled"]
    assert time.monotonic() - started < 0.5, "woken by the event, not by the look each second"


def test_gateway_config_defaults_and_blocks(tmp_path: Path) -> None:
    assert yaml.safe_load(gateway_config(tmp_path)) == {
        "server": {"shutdown_timeout": 1.0}, "storage": {"path": str(tmp_path / "spool")},
        "sources": [{"name": "web", "write_keys": [WRITE_KEY]}], "destinations": []}
    doc = yaml.safe_load(gateway_config(tmp_path, """
        server: {port: 9000}
        sources: []
        """, server={"host": "::1"}, storage={"retention": 5}, plugins=["mine"]))
    assert doc["server"] == {"shutdown_timeout": 1.0, "port": 9000, "host": "::1"}, "merged, keywords last"
    assert doc["storage"] == {"path": str(tmp_path / "spool"), "retention": 5}
    assert (doc["sources"], doc["plugins"]) == ([], ["mine"]), "replaced"
    with pytest.raises(ValueError, match="top-level keys"):
        gateway_config(tmp_path, "- a list")
    built = config_mod.loads(gateway_config(tmp_path, destinations=[webhook("Hook", "http://127.0.0.1:9/",
                                                                            retry={"max_attempts": 2})]))
    [hook] = built.destinations
    assert (hook.batch.max_wait, hook.retry.max_attempts, hook.retry.backoff_cap) == (0, 2, 0.2)
    assert built.server.shutdown_timeout == 1.0 and built.sources[0].write_keys == [WRITE_KEY]


async def test_the_fake_destination_answers_by_script_then_default(fake_destination: FakeDestination) -> None:
    fake_destination.script = [status(503, "busy"), drop_connection()]
    async with aiohttp.ClientSession() as http:
        async with http.post(fake_destination.url, json={"batch": [{"n": 1}]}) as r:
            assert (r.status, await r.text()) == (503, "busy")
        with pytest.raises(aiohttp.ClientError):
            async with http.post(fake_destination.url, json={"batch": [{"n": 2}]}) as r:
                await r.read()
        async with http.post(fake_destination.url + "/more", data=b"not json", headers={"X-Test": "1"}) as r:
            assert (r.status, await r.json()) == (200, {})
        async with http.post(fake_destination.url, json={"batch": [{"n": 4}]}) as r:
            assert r.status == 200
    assert [r.status for r in fake_destination.requests] == [503, None, 200, 200]
    third = fake_destination.requests[2]
    assert (third.path, third.json, third.headers["X-Test"]) == ("/hook/more", "not json", "1")
    assert fake_destination.delivered() == [{"n": 4}], "only the calls of 2xx answers"


async def test_wait_quiet_fails_while_requests_keep_coming(fake_destination: FakeDestination) -> None:
    async def keep_sending(http: aiohttp.ClientSession) -> None:
        while True:
            async with http.post(fake_destination.url, json={"batch": []}):
                pass
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as http:
        sender = asyncio.create_task(keep_sending(http))
        try:
            with pytest.raises(AssertionError, match=r"waiting for 0.30s without a request"):
                await fake_destination.wait_quiet(0.3, timeout=1.0)
        finally:
            sender.cancel()
    started = time.monotonic()
    await fake_destination.wait_quiet(0.3)
    assert time.monotonic() - started >= 0.3


def test_the_kit_is_registered_once_with_its_entry_point_installed(kit_entry_point: Path) -> None:
    """tests/conftest.py registers the kit only when no entry point did: both
    at once would stop pytest with "Plugin already registered"."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, kit_entry_point)))}
    test = "tests/test_testkit.py::test_the_fake_destination_answers_by_script_then_default"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", test,
                           "--trace-config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "1 passed" in done.stdout
    registered = [line for line in done.stdout.splitlines() if line.startswith("PLUGIN registered: <module ")]
    kit = [i for i, line in enumerate(registered) if "'gateway.testing'" in line]
    conftest = [i for i, line in enumerate(registered) if "tests/conftest.py" in line]
    assert len(kit) == 1 and len(conftest) == 1, registered
    assert kit[0] < conftest[0], "registered from the entry point, before the conftest was read"
