#!/usr/bin/env python3
"""What each SDK the tests use does when its calls are answered 400, 429 or
503: the measurements behind docs/sdks-section.md ("What each SDK does with
400, 429 and 503").

Each SDK, unchanged and with its default retry settings, sends one call
(the browser pages: their first call, identify) to a proxy in front of a real
gateway.  The proxy passes GETs and preflights on (the browser SDKs' settings
documents) and answers every POST with the status under test, the gateway's
own error body (``code``, ``message``, ...) and ``Retry-After: 5`` (what the
gateway sends with its 503s), and notes when each attempt came.  After
``--seconds`` (or once the SDK has given up and said so) the attempts and
what the SDK reported are summed up in one Markdown table.

    PYTHONPATH=. python3 scripts/measure_sdk_errors.py [--seconds 40] [--only segment-node ...]

Needs what the tests need: the test extra (Python SDKs), tests/node and
tests/browser installed with ``npm ci``, and Chromium for the browser rows
(skipped, with the reason, when missing).  127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from aiohttp import ClientSession, web  # noqa: E402

from gateway import config as config_mod  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.errors import error_body  # noqa: E402

WRITE_KEY = "test-write-key"  # what tests/browser's pages load with
STATUSES = (400, 429, 503)
RETRY_AFTER = 5
MESSAGE = {400: ("missing_field", "track requires an event name"),
           429: ("rate_limited", "too many requests"),
           503: ("overload", "the gateway cannot store calls right now")}

PY_DRIVER = r"""
import importlib, json, sys
module, key, host = sys.argv[1:4]
errors = []
client = importlib.import_module(module).Client(
    key, host=host, on_error=lambda e, batch: errors.append(f"{type(e).__name__}: {e}"))
client.track("u-1", "Measured", {"n": 1}, message_id="measured-1")
client.flush()
print(json.dumps({"errors": errors}), flush=True)
"""


@dataclass
class Attempt:
    at: float
    path: str
    retry_count: str | None


@dataclass
class Outcome:
    attempts: list[Attempt] = field(default_factory=list)
    #: the SDK stopped by itself within the time; None: cannot be told (a page)
    finished: bool | None = False
    reported: list[str] = field(default_factory=list)  # errors the SDK reported
    note: str = ""


class StatusProxy:
    """Answers every POST with ``status``; passes everything else to the gateway."""

    def __init__(self, upstream: str, status: int) -> None:
        self.upstream = upstream
        self.status = status
        self.attempts: list[Attempt] = []
        self.started = time.monotonic()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin else {}
        if request.method == "POST" and request.path != "/v1/m":
            await request.read()
            self.attempts.append(Attempt(time.monotonic() - self.started, request.path,
                                         request.headers.get("X-Retry-Count")))
            code, message = MESSAGE[self.status]
            headers = {**cors, **({"Retry-After": str(RETRY_AFTER)} if self.status != 400 else {})}
            return web.json_response(error_body(code, message), status=self.status, headers=headers)
        body = await request.read()
        skip = {"content-length", "transfer-encoding", "connection"}
        async with ClientSession() as http:
            async with http.request(request.method, self.upstream + request.path_qs, data=body or None,
                                    headers={k: v for k, v in request.headers.items() if k.lower() not in skip},
                                    allow_redirects=False) as r:
                data = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower() not in skip | {"content-encoding"}}
                return web.Response(status=r.status, body=data, headers=out)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return {**env, "NO_PROXY": "127.0.0.1,localhost", "PYTHONPATH": str(ROOT)}


async def run_process(args: list[str], seconds: float, cwd: Path) -> tuple[bool, str]:
    """(finished by itself within ``seconds``, its stdout)."""
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, env=clean_env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds)
        return True, out.decode(errors="replace")
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return False, ""


def python_case(module: str) -> Callable[[str, float, Path], Awaitable[Outcome]]:
    async def run(url: str, seconds: float, tmp: Path) -> Outcome:
        finished, out = await run_process([sys.executable, "-c", PY_DRIVER, module, WRITE_KEY, url], seconds, ROOT)
        reported = json.loads(out.strip().splitlines()[-1])["errors"] if finished and out.strip() else []
        return Outcome(finished=finished, reported=reported)
    return run


def node_case(sdk: str) -> Callable[[str, float, Path], Awaitable[Outcome]]:
    async def run(url: str, seconds: float, tmp: Path) -> Outcome:
        report = tmp / f"{sdk}.json"
        spec = {"sdk": sdk, "host": url, "writeKey": WRITE_KEY, "report": str(report),
                "timeoutMs": int(seconds * 1000),
                "calls": [{"type": "track", "userId": "u-1", "event": "Measured", "messageId": "measured-1"}]}
        await run_process(["node", str(ROOT / "tests" / "node" / "drive.mjs"), json.dumps(spec)], seconds + 15,
                          ROOT / "tests" / "node")
        if not report.is_file():
            return Outcome(note="the driver wrote no report")
        doc = json.loads(report.read_text())
        reported = [r["error"] for r in doc["results"] if r["error"]] + doc["errors"]
        note = f"unhandled: {'; '.join(doc['unhandled'])}" if doc["unhandled"] else ""
        return Outcome(finished=not doc["timedOut"], reported=reported, note=note)
    return run


def browser_case(page: str) -> Callable[[str, float, Path], Awaitable[Outcome]]:
    async def run(url: str, seconds: float, tmp: Path) -> Outcome:
        import test_browser as tb

        missing = tb._browser_missing()
        if missing:
            return Outcome(note=f"not measured: {missing}")
        site = tb.PageServer({})
        site.gateway = url
        runner, origin = await serve(site.app())
        try:
            report, _ = await tb.drive(f"{origin}/{page}", lambda: asyncio.sleep(min(seconds, tb.RUN_TIMEOUT)))
        finally:
            await runner.cleanup()
        calls = (report.get("results") or {}).get("calls") or []
        first = calls[0] if calls else None
        # The page only knows what the SDK's promise said; whether the SDK
        # still retries behind it shows in the attempts.
        if first is None:
            note = "the call's promise had not resolved"
        elif first.get("failed"):
            note = f"the call's promise says it failed ({first['failed']})"
        else:
            note = "the call's promise says delivered"
        return Outcome(finished=None, note=note)
    return run


CASES: dict[str, tuple[str, Callable[[str, float, Path], Awaitable[Outcome]]]] = {
    "customerio-python": ("customerio-cdp-analytics", python_case("customerio.analytics")),
    "segment-python": ("segment-analytics-python", python_case("segment.analytics")),
    "rudderstack-python": ("rudder-sdk-python", python_case("rudderstack.analytics")),
    "segment-node": ("@segment/analytics-node", node_case("segment")),
    "customerio-node": ("@customerio/cdp-analytics-node", node_case("customerio")),
    "rudderstack-node": ("@rudderstack/rudder-sdk-node", node_case("rudderstack")),
    "segment-browser": ("@segment/analytics-next", browser_case("segment-npm.html")),
    "customerio-browser": ("@customerio/cdp-analytics-browser", browser_case("customerio-npm.html")),
}


def summary(status: int, o: Outcome, seconds: float) -> str:
    """One cell: how many attempts, how far apart, and how it ended."""
    if o.note.startswith("not measured"):
        return o.note
    first = [a for a in o.attempts if a.path == o.attempts[0].path] if o.attempts else []
    n = len(first)
    gaps = [round(b.at - a.at, 1) for a, b in zip(first, first[1:])]
    text = f"{n} attempt{'s' if n != 1 else ''}" + ("" if o.finished else f" in {seconds:g} s")
    if gaps:
        shown = ", ".join(f"{g:g}" for g in gaps[:8]) + (", ..." if len(gaps) > 8 else "")
        text += f" (gaps {shown} s)"
        if status != 400:
            text += "; waits Retry-After" if min(gaps) >= RETRY_AFTER - 0.5 else "; Retry-After not waited for"
    counts = [a.retry_count for a in first if a.retry_count]
    if counts:
        text += f"; X-Retry-Count {counts[0]}..{counts[-1]}"
    if o.finished:
        text += "; then gives up, " + ("reports the error" if o.reported else "reports nothing")
    elif o.finished is False:
        text += "; still retrying at the end"
    if o.note:
        text += f"; {o.note}"
    return text


async def measure(names: list[str], seconds: float) -> dict[str, dict[int, str]]:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cfg = config_mod.loads(json.dumps({"storage": {"path": str(tmp / "spool")},
                                           "sources": [{"name": "web", "write_keys": [WRITE_KEY]}]}))
        gw_runner, gw_url = await serve(create_app(cfg))
        results: dict[str, dict[int, str]] = {n: {} for n in names}
        browsers = asyncio.Semaphore(1)  # one Chromium at a time on a small machine

        async def one(name: str, status: int) -> None:
            proxy = StatusProxy(gw_url, status)
            runner, url = await serve(proxy.app())
            try:
                run = CASES[name][1]
                if name.endswith("-browser"):
                    async with browsers:
                        proxy.started = time.monotonic()
                        outcome = await run(url, seconds, tmp)
                else:
                    outcome = await run(url, seconds, tmp)
                outcome.attempts = proxy.attempts
                results[name][status] = summary(status, outcome, seconds)
                print(f"{name} {status}: {results[name][status]}", file=sys.stderr, flush=True)
            finally:
                await runner.cleanup()

        try:
            await asyncio.gather(*(one(n, s) for n in names for s in STATUSES))
        finally:
            await gw_runner.cleanup()
        return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=40.0, help="how long to watch each SDK (at most 45)")
    p.add_argument("--only", nargs="*", choices=sorted(CASES), help="these SDKs only")
    args = p.parse_args()
    names = args.only or list(CASES)
    results = asyncio.run(measure(names, min(args.seconds, 45.0)))
    print(f"| SDK | 400 | 429 (Retry-After: {RETRY_AFTER}) | 503 (Retry-After: {RETRY_AFTER}) |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {CASES[name][0]} | " + " | ".join(results[name].get(s, "") for s in STATUSES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
