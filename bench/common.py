"""Shared by the benchmarks: realistic calls, wrk scripts, processes, parsing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "demo-write-key"
AUTH = "Basic ZGVtby13cml0ZS1rZXk6"  # base64("demo-write-key:")

#: a track call as mobile SDKs send it (~600 bytes); messageId is filled per request
CALL: dict[str, Any] = {
    "type": "track", "userId": "user-1234", "event": "Order Completed",
    "properties": {"orderId": "abc-123", "total": 42.5, "currency": "USD",
                   "products": [{"sku": "p1", "name": "Widget", "price": 21.25, "quantity": 2}]},
    "context": {"library": {"name": "analytics-python", "version": "2.3.0"},
                "app": {"name": "shop", "version": "1.2.3", "build": "456"},
                "device": {"type": "ios", "model": "iPhone15,2"}, "os": {"name": "iOS", "version": "17.1"},
                "locale": "en-US", "timezone": "Europe/Berlin"},
    "messageId": "MSGID", "timestamp": "2026-11-23T03:00:00.000Z", "sentAt": "2026-11-23T03:00:00.100Z",
}

#: the call shapes of ``bench/run.py --shape``: issue 16's server-side track
#: (~300 bytes: userId, event, a few properties with a nested list,
#: context.library, timestamp) and browser one (~1 KB: context.page,
#: userAgent, library, campaign), and the mobile CALL of the earlier figures;
#: each with a fresh messageId
SHAPES: dict[str, dict[str, Any]] = {
    "server": {
        "type": "track", "userId": "user-1234", "event": "Order Completed",
        "properties": {"orderId": "abc-123", "total": 42.5, "currency": "USD",
                       "skus": ["p1", "p7"], "coupon": None},
        "context": {"library": {"name": "analytics-python", "version": "2.3.0"}},
        "messageId": "MSGID", "timestamp": "2026-11-23T03:00:00.000Z",
    },
    "browser": {
        "type": "track", "anonymousId": "0b6f3c2e-5f4a-4b7e-9a51-2f8c1d3e4a5b", "userId": "user-1234",
        "event": "Product Viewed",
        "properties": {"product_id": "p1", "name": "Widget", "price": 21.25, "category": "tools"},
        "context": {
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
            "page": {"path": "/products/widget", "referrer": "https://www.google.com/",
                     "search": "?utm_source=newsletter&utm_medium=email&utm_campaign=winter-sale",
                     "title": "Widget - The Shop", "url": "https://shop.example.com/products/widget"
                     "?utm_source=newsletter&utm_medium=email&utm_campaign=winter-sale"},
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
                         "Chrome/131.0.0.0 Safari/537.36",
            "userAgentData": {"brands": [{"brand": "Chromium", "version": "131"},
                                         {"brand": "Google Chrome", "version": "131"}],
                              "mobile": False, "platform": "macOS"},
            "campaign": {"name": "winter-sale", "source": "newsletter", "medium": "email"},
            "locale": "en-US", "timezone": "Europe/Berlin",
        },
        "messageId": "MSGID", "timestamp": "2026-11-23T03:00:00.000Z", "sentAt": "2026-11-23T03:00:00.100Z",
    },
    "mobile": CALL,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until something listens on ``port``; an error at once if ``proc`` exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited ({proc.returncode}) before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def lua_script(path: Path, calls_per_request: int, call: dict[str, Any] = CALL) -> None:
    """A wrk script posting a single call (/v1/track) or a batch (/v1/batch)
    whose every call has a messageId never sent before: with deduplication on
    (the default), repeated ids would measure the skip path, not ingest."""
    one = json.dumps(call, separators=(",", ":"))
    head, tail = one.split('"MSGID"')  # Lua long strings [[...]] need no escaping
    path_ = "/v1/track" if calls_per_request == 1 else "/v1/batch"
    path.write_text(f"""
-- The body's static pieces are built once; per request only the id slots
-- change and table.concat (C) joins them: wrk shares the cores with the
-- server, so building each body in Lua strings would measure wrk.
local head = [[{head}"]]
local tail = [["{tail}]]
local calls = {calls_per_request}
local pieces = {{}}
local slots = {{}}
local counter = 0
-- Each thread's ids start with random bytes of its own: two wrk processes
-- started in the same second (one per gateway) must not send the same ids,
-- or deduplication answers the second copy without storing it.
local urandom = io.open("/dev/urandom", "rb")
function setup(thread)
  local bytes = urandom:read(8)
  thread:set("prefix", "t" .. bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end) .. "-")
end
function init(args)
  if calls > 1 then pieces[#pieces + 1] = '{{"batch":[' end
  for i = 1, calls do
    if i > 1 then pieces[#pieces + 1] = "," end
    pieces[#pieces + 1] = head
    pieces[#pieces + 1] = ""
    slots[#slots + 1] = #pieces
    pieces[#pieces + 1] = (calls > 1 and ("-" .. tostring(i)) or "") .. tail
  end
  if calls > 1 then pieces[#pieces + 1] = "]}}" end
end
request = function()
  counter = counter + 1
  local id = prefix .. tostring(counter)
  for k = 1, #slots do pieces[slots[k]] = id end
  return wrk.format("POST", "{path_}", {{["Content-Type"] = "application/json",
                                        ["Authorization"] = "{AUTH}"}}, table.concat(pieces))
end
""")


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, script: Path, duration: float, connections: int, threads: int) -> dict[str, float]:
    """wrk's figures: requests/s, latency percentiles in ms, requests and errors."""
    wrk = shutil.which("wrk")
    if not wrk:
        sys.exit("bench: wrk is missing (apt-get install -y wrk)")
    out = subprocess.run([wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, check=True).stdout
    got: dict[str, float] = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "90", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)\b", out)
        got[f"p{pct}"] = float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")
    got["requests"] = float(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    got["non2xx"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    got["socket_errors"] = float(sum(int(x) for x in m.groups())) if m else 0.0
    return got


def wrk_each(ports: list[int], script: Path, duration: float, connections: int) -> list[dict[str, float]]:
    """wrk against every port at the same time, ``connections`` each: one result a port, in order."""
    out: list[dict[str, float]] = [{} for _ in ports]

    def one(i: int) -> None:
        out[i] = run_wrk(f"http://127.0.0.1:{ports[i]}", script, duration, connections, 1)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ports))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class Proc:
    """A server process, stopped with SIGTERM."""

    def __init__(self, args: list[str], port: int, log: Path, cwd: Path | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(log, "ab")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.port = port
        try:
            wait_port(port, proc=self.p)
        except RuntimeError as e:
            self.stop(5)
            self.log.close()
            tail = Path(log).read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{' '.join(args[:4])} ...: {e}; its log ends:\n{tail}") from None

    @property
    def pid(self) -> int:
        return self.p.pid

    def _tree(self) -> list[int]:
        """The server and its children (the spool writer, other workers)."""
        pids = [self.p.pid]
        for pid in pids:  # grows as children are found
            try:
                pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                pass
        return pids

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user and system) so far of the spool writer and of the rest of the tree."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {"server": 0.0, "writer": 0.0}
        for pid in self._tree():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out["writer" if b"gateway.spool.writer" in cmd else "server"] += (int(fields[11]) + int(fields[12])) / tick
        return out

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (the spool writer)."""
        total = 0
        for pid in self._tree():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return total / 1024 if total else float("nan")

    def stop(self, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                return self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                return self.p.wait()
        return self.p.returncode


def metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics as name{labels} -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def wait_drained(port: int, destination: str, timeout: float) -> float:
    """Seconds until the destination's backlog is empty (gauges refresh every 2 s)."""
    start = time.monotonic()
    key = f'gateway_destination_backlog{{destination="{destination}"}}'
    rkey = f'gateway_destination_retry_backlog{{destination="{destination}"}}'
    time.sleep(2.5)
    while time.monotonic() - start < timeout:
        m = metrics(port)
        if m.get(key, 1) == 0 and m.get(rkey, 0) == 0:
            return time.monotonic() - start
        time.sleep(0.5)
    raise RuntimeError(f"{destination} still has a backlog after {timeout}s")


def gateway_config(tmp: Path, destinations: str, dedup_window: str | None = None) -> Path:
    """The gateway's config for a run; ``dedup_window`` None keeps the default (24h)."""
    cfg = tmp / "config.yaml"
    dedup = f", dedup_window: {dedup_window}" if dedup_window is not None else ""
    cfg.write_text(f"""
server: {{host: 127.0.0.1, max_event_bytes: 64KiB, max_batch_bytes: 1MiB}}
storage: {{path: {tmp / 'spool'}, max_bytes: 20GiB{dedup}}}
sources:
  - name: default
    write_keys: ["{WRITE_KEY}"]
destinations:
{destinations}
""")
    return cfg


@contextlib.contextmanager
def scratch(prefix: str, keep: bool) -> Iterator[Path]:
    """A working directory for one run (spools, logs, wrk scripts), removed
    afterwards unless ``keep``: a backlog run leaves a gigabyte behind."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
