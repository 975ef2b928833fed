"""The debugger page (issue 15) in headless Chromium, against ``gateway
serve`` in a child process: while the page is open, calls sent to the gateway
appear within seconds with each destination's outcome; a lax rejection shows
its reason; a destination answering 400 shows the dead letter with its
status, and the replay button puts it back in the queue (it is then
delivered); pause, clear and the filters work; nothing on the page comes from
anywhere but the gateway, and no write key or admin credential is on it.

Chromium is driven as tests/test_browser.py drives it (Debian's Chromium,
playwright-core from tests/browser, ``cd tests/browser && npm ci``): without
them the test skips and says why, and with ``REQUIRE_BROWSER_TESTS=1`` it
fails instead.  The driver is tests/browser/debugger.mjs, which takes one
command a line.

``UPDATE_SCREENSHOT=1`` also writes the page's screenshot to docs/debugger.png
(the README shows it).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

# -- what this file takes from the test kit (gateway/testing.py) and test_browser.py --
# fixtures: gateway_process, make_fake_destination (the kit); how the browser
# tests find Chromium and skip (test_browser.py).
from gateway.testing import AUTH_HEADERS, WRITE_KEY, status, webhook
from test_browser import BROWSER_DIR, CHROMIUM, _need_browser

ROOT = Path(__file__).resolve().parent.parent
DOCS_SCREENSHOT = ROOT / "docs" / "debugger.png"
ADMIN_USER = "ops-b41c"
ADMIN_PASSWORD = "pw-Kd93-never-on-the-page"
#: seconds a call may take to show on the page
APPEARS_WITHIN = 5.0
SCREENSHOT_MAX = 150_000


class Page:
    """tests/browser/debugger.mjs: one JSON command a line, one answer a line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.next_id = 0
        self.stderr = b""
        assert proc.stderr is not None
        self._errs = asyncio.ensure_future(self._read_stderr())

    @classmethod
    async def open(cls, url: str) -> "Page":
        proc = await asyncio.create_subprocess_exec(
            "node", str(BROWSER_DIR / "debugger.mjs"),
            json.dumps({"url": url, "chromium": CHROMIUM, "username": ADMIN_USER, "password": ADMIN_PASSWORD,
                        "timeoutMs": 120_000}),
            cwd=BROWSER_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=16 * 1024 * 1024)
        page = cls(proc)
        loaded = await page._answer(0, 45.0)
        assert loaded["status"] == 200, loaded
        return page

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr = (self.stderr + chunk)[-20000:]

    async def _answer(self, want: int, timeout: float) -> Any:
        assert self.proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"the driver did not answer command {want} in {timeout}s") from None
            if not line:
                raise AssertionError(f"the driver exited before answering command {want}")
            msg = json.loads(line)
            if msg["id"] == want:
                if not msg["ok"]:
                    raise AssertionError(f"command {want} failed: {msg['error']}")
                return msg["value"]

    async def do(self, op: str, timeout: float = 30.0, **args: Any) -> Any:
        self.next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self.next_id, "op": op, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._answer(self.next_id, timeout)

    async def wait(self, selector: str, text: str | None = None, within: float = APPEARS_WITHIN,
                   state: str = "visible") -> Any:
        return await self.do("wait", timeout=within + 10, selector=selector, text=text,
                             timeoutMs=int(within * 1000), state=state)

    def why(self) -> str:
        return f"\n--- driver stderr:\n{self.stderr.decode(errors='replace')[-6000:]}"

    async def close(self) -> None:
        try:
            if self.proc.returncode is None:
                await self.do("quit", timeout=20)
        except (AssertionError, BrokenPipeError, ConnectionResetError):
            pass
        finally:
            if self.proc.returncode is None:
                try:
                    await asyncio.wait_for(self.proc.wait(), 10)
                except asyncio.TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
            self._errs.cancel()


def call(type_: str, message_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "messageId": message_id, "userId": "user-42", **fields}


def row(message_id: str) -> str:
    return f'li.call[data-message-id="{message_id}"]'


async def test_the_debugger_page(gateway_process: Any, make_fake_destination: Any, tmp_path: Path) -> None:
    _need_browser()
    sink, crm = await make_fake_destination(), await make_fake_destination()
    crm.default = status(400, '{"error": "invalid field: traits.email is not an email"}')
    gw = await gateway_process(
        server={"admin": {"user": ADMIN_USER, "password": ADMIN_PASSWORD}},
        destinations=[webhook("Warehouse", sink.url), webhook("CRM", crm.url),
                      webhook("Profiles", sink.url, filter={"types": ["identify"]})])
    page: Page | None = None
    try:
        page = await Page.open(f"{gw.url}/debugger")
        async with aiohttp.ClientSession() as http:
            async def send(c: dict[str, Any], **headers: str) -> None:
                async with http.post(f"{gw.url}/v1/{c['type']}", json=c, headers={**AUTH_HEADERS, **headers}) as r:
                    assert r.status == 200, await r.text()

            await page.wait("#conn.live", within=15)
            assert "This process only" in await page.wait("#scope")
            assert "NATS" in await page.wait("#scope-note")

            # calls appear within seconds, with each destination's outcome
            sent = time.monotonic()
            await send(call("identify", "m-identify-1", traits={"email": "ada@example.com", "plan": "pro"}))
            await send(call("track", "m-track-1", event="Order Completed", writeKey=WRITE_KEY,
                            properties={"revenue": 42.5, "currency": "EUR"}))
            await send(call("page", "m-page-1", name="Pricing", properties={"path": "/pricing"}))
            await page.wait(row("m-track-1"))
            assert time.monotonic() - sent < APPEARS_WITHIN
            await page.wait(f'{row("m-track-1")} .chip.delivered[data-destination="Warehouse"]')
            await page.wait(f'{row("m-track-1")} .chip.skipped[data-destination="Profiles"]')
            dead_chip = await page.wait(f'{row("m-track-1")} .chip.dead_lettered[data-destination="CRM"]')
            assert "400" in dead_chip
            await page.wait(f'{row("m-identify-1")} .chip.delivered[data-destination="Profiles"]')
            assert "Order Completed" in await page.wait(row("m-track-1"))

            # a lax rejection shows its reason
            await send({"type": "track", "userId": "user-42", "properties": {"revenue": 1}})
            rejected = await page.wait("li.call.rejected", text="missing_field")
            assert "track requires an event name" in rejected and "lax" in rejected

            # expanded: the call as stored, and each destination's outcome
            await page.do("click", selector=f"{row('m-track-1')} > .row")
            stored = await page.wait(f"{row('m-track-1')} .detail pre.json")
            doc = json.loads(stored)
            assert (doc["messageId"], doc["event"], doc["properties"]["revenue"]) == \
                ("m-track-1", "Order Completed", 42.5)
            assert "writeKey" not in doc
            crm_row = await page.wait(f'{row("m-track-1")} .detail tr[data-destination="CRM"]')
            assert "400" in crm_row and "traits.email is not an email" in crm_row
            routed = await page.wait(f'{row("m-track-1")} .detail tr[data-destination="Profiles"]')
            assert "filter.types does not include 'track'" in routed

            # the dead letter, with its status; the status panel
            letter = 'tr.letter[data-message-id="m-track-1"][data-destination="CRM"]'
            assert (await page.wait(f"{letter} td.status")).strip() == "400"
            assert "HTTP 400" in await page.wait(f"{letter} td.reason")
            last_error = await page.wait('section.dest[data-destination="CRM"] .last-error', text="HTTP 400")
            assert "traits.email" in last_error
            await page.wait('section.dest[data-destination="Warehouse"] .state.ok')
            await page.wait('section.dest[data-destination="Warehouse"] .chart svg polyline.delivered',
                            state="attached")
            assert (await page.wait('section.dest[data-destination="Warehouse"] .delivered .n')).strip() == "3"
            await page.wait("#dlq-total", text="3")

            # the screenshot the README shows
            shot = tmp_path / "debugger.png"
            await page.do("screenshot", path=str(shot))
            png = shot.read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("UPDATE_SCREENSHOT") == "1":
                # (its size depends on the machine's fonts: checked only when it is kept)
                assert len(png) < SCREENSHOT_MAX, f"the screenshot is {len(png)} bytes"
                shutil.copyfile(shot, DOCS_SCREENSHOT)

            # replay: the dead letter goes back in the queue, and is delivered
            crm.default = status(200)
            await page.do("click", selector=f"{letter} button.replay")
            await page.wait("#dlq-message", text="Replayed 1 dead letter")
            deadline = time.monotonic() + 10
            while "m-track-1" not in {c["messageId"] for c in crm.delivered()}:
                assert time.monotonic() < deadline, "the replayed call never reached CRM"
                await asyncio.sleep(0.1)
            await page.wait(f'{row("m-track-1")} .chip.delivered[data-destination="CRM"]')
            await page.wait(letter, state="detached")
            await page.wait("#dlq-total", text="2")

            # pause holds new records back; resume shows them
            await page.do("click", selector="#pause")
            await send(call("track", "m-paused-1", event="Held Back"))
            await page.wait("#held", text="waiting")
            assert await page.do("count", selector=row("m-paused-1")) == 0
            await page.do("click", selector="#pause")
            await page.wait(f'{row("m-paused-1")} .chip.delivered[data-destination="Warehouse"]')
            await page.wait(f'{row("m-paused-1")} .chip.delivered[data-destination="CRM"]')
            await page.wait(f'{row("m-paused-1")} .chip.skipped[data-destination="Profiles"]')

            # clear, then a filter: only what it names
            await page.do("click", selector="#clear")
            assert await page.do("count", selector="li.call") == 0
            await page.do("fill", selector='input[name="type"]', value="identify")
            await page.do("press", selector='input[name="type"]', key="Enter")
            await page.wait("#conn-text", text="filtered: type=identify", within=10)
            await send(call("track", "m-filtered-out", event="Not Shown"))
            await send(call("identify", "m-identify-2", traits={"plan": "team"}))
            await page.wait(f'{row("m-identify-2")} .chip.delivered[data-destination="Profiles"]')
            await asyncio.sleep(0.5)
            assert await page.do("count", selector=row("m-filtered-out")) == 0

            # no secret on the page or in what it reads
            seen = await page.do("eval", expression="""(async () => {
                const texts = [document.documentElement.outerHTML]
                for (const p of ['/debugger/status', '/debugger/dead-letters', '/debugger/page.js'])
                    texts.push(await (await fetch(p)).text())
                return texts.join('\\n')
            })()""")
            for secret in (WRITE_KEY, ADMIN_PASSWORD, ADMIN_USER):
                assert secret not in seen, secret

        got = await page.do("report")
        hosts = {urlsplit(r["url"]).hostname for r in got["requests"]}
        assert hosts == {"127.0.0.1"}, got["requests"]
        paths = {urlsplit(r["url"]).path for r in got["requests"]}
        assert paths <= {"/debugger", "/debugger/page.js", "/debugger/page.css", "/debugger/events",
                         "/debugger/status", "/debugger/dead-letters", "/debugger/replay"}, paths
        assert got["pageErrors"] == [], got["pageErrors"]
        errors = [m for m in got["console"] if m["type"] == "error"]
        assert errors == [], errors
    except AssertionError as e:
        why = page.why() if page is not None else ""
        raise AssertionError(f"{e}{why}\n--- gateway log:\n{gw.log_tail()}") from None
    finally:
        if page is not None:
            await page.close()
