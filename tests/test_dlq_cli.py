"""``gateway dlq list|show|replay`` against dead letters a real server made,
run as subprocesses while that server runs; and ``gateway explain``, which
shows what each destination would receive and sends nothing."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yaml
from aiohttp import web

from delivery_kit import AUTH, body, make_fake, status, track, wait_until, webhook  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


async def cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    """``python -m gateway ARGS`` without blocking the loop the fakes answer on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=cwd or ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def listing(out: str) -> list[tuple[str, str, str, str]]:
    """``dlq list`` lines as (messageId, destination, last status, reason)."""
    rows = []
    for line in out.splitlines():
        _id, mid, dest, status, _when, reason = line.split("\t")
        rows.append((mid, dest, status, reason))
    return sorted(rows)


async def test_dlq_list_show_replay_while_the_server_runs(gateway_process: Any, sink: Any, make_fake: Any,
                                                          tmp_path: Path) -> None:
    other = await make_fake()
    other.default = status(422, "unknown field")
    sink.default = lambda request, raw: web.Response(status=400, text='{"error": "invalid field: traits"}')
    gw = gateway_process(body([webhook("Hook", sink.url), webhook("Other", other.url)]))
    cfg = str(gw.cfg_path)
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{gw.url}/v1/batch", json={"batch": [track("m-1"), track("m-2")]}, headers=AUTH)
        assert r.status == 200
        r = await http.post(f"{gw.url}/v1/track", json=track("m-3"), headers=AUTH)
        assert r.status == 200

    async def listed(*extra: str) -> list[tuple[str, str, str, str]]:
        rc, out, err = await cli("dlq", "list", "--config", cfg, *extra)
        assert rc == 0, err
        return listing(out)

    want = [(f"m-{i}", d, s, f"HTTP {s}") for i in (1, 2, 3) for d, s in (("Hook", "400"), ("Other", "422"))]
    deadline = asyncio.get_running_loop().time() + 15
    while (got := await listed()) != sorted(want):
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.2)
    assert await listed("--destination", "Other") == sorted(w for w in want if w[1] == "Other")
    assert await listed("--destination", "Hook", "--id", "m-2") == [("m-2", "Hook", "400", "HTTP 400")]

    rc, out, err = await cli("dlq", "show", "--config", cfg, "--destination", "Hook", "--id", "m-2")
    assert rc == 0, err
    [shown] = msgspec.json.decode(out)
    assert (shown["destination"], shown["message_id"], shown["status"], shown["reason"], shown["attempts"],
            shown["source"]) == ("Hook", "m-2", 400, "HTTP 400", 1, "web")
    assert shown["body"] == '{"error": "invalid field: traits"}'
    assert shown["data"]["messageId"] == "m-2" and shown["data"]["event"] == "Clicked"

    # The destination is fixed: replay one, then the rest of Hook's.
    sink.default = lambda request, raw: web.json_response({})
    rc, out, err = await cli("dlq", "replay", "--config", cfg, "--destination", "Hook", "--id", "m-2")
    assert (rc, out.strip()) == (0, "replayed 1 dead letter(s): queued for delivery now"), err
    await wait_until(lambda: [c["messageId"] for c in sink.calls] == ["m-2"], timeout=8, what="m-2 replayed")
    assert await listed("--destination", "Hook") == [("m-1", "Hook", "400", "HTTP 400"),
                                                      ("m-3", "Hook", "400", "HTTP 400")]
    rc, out, err = await cli("dlq", "replay", "--config", cfg, "--destination", "Hook")
    assert (rc, out.strip()) == (0, "replayed 2 dead letter(s): queued for delivery now"), err
    await wait_until(lambda: sorted(c["messageId"] for c in sink.calls) == ["m-1", "m-2", "m-3"], timeout=8,
                     what="every Hook letter replayed")
    rc, out, err = await cli("dlq", "list", "--config", cfg, "--destination", "Hook")
    assert (rc, out, err.strip()) == (0, "", "0 dead letter(s)")
    assert await listed() == sorted(w for w in want if w[1] == "Other"), "other destinations' letters stay"
    rc, out, err = await cli("dlq", "replay", "--config", cfg, "--id", "no-such-id")
    assert (rc, out.strip()) == (1, "replayed 0 dead letter(s): queued for delivery now")
    await asyncio.sleep(0.3)
    assert sorted(c["messageId"] for c in sink.calls) == ["m-1", "m-2", "m-3"], "each replayed call sent once"


# -- explain --------------------------------------------------------------------------

EXPLAIN_CALL = {"type": "track", "event": "Clicked", "userId": "u1", "messageId": "m-1",
                "timestamp": "2024-05-01T10:00:00.000Z", "properties": {"secret": "s3", "plan": "pro"},
                "integrations": {"Archive": False}}


def explain_config(tmp_path: Path, url: str) -> Path:
    doc = {
        "storage": {"path": str(tmp_path / "spool")},
        "sources": [{"name": "web", "write_keys": ["test-write-key"]}],
        "transforms": [{"type": "set_fields", "settings": {"values": {"context.gateway": "gw-1"}}}],
        "destinations": [
            {"name": "Hook", "type": "webhook", "settings": {"url": url},
             "transforms": [{"type": "drop_fields", "settings": {"paths": ["properties.secret"]}}]},
            {"name": "Identify only", "type": "webhook", "settings": {"url": url}, "filter": {"types": ["identify"]}},
            {"name": "Disabled", "type": "webhook", "settings": {"url": url}, "enabled": False},
            {"name": "Denied", "type": "webhook", "settings": {"url": url},
             "transforms": [{"type": "deny_events", "settings": {"events": ["Clicked"]}}]},
            {"name": "Tiny", "type": "webhook", "settings": {"url": url, "max_call_bytes": 50}},
            {"name": "Archive", "type": "file", "settings": {"path": str(tmp_path / "archive.jsonl")}},
        ],
    }
    path = tmp_path / "explain.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def check_explained(doc: dict[str, Any]) -> None:
    assert (doc["source"], doc["rejected"], doc["dropped_by_source_transforms"]) == ("web", [], [])
    [c] = doc["calls"]
    stored = c["stored_as"]
    assert stored["context"] == {"ip": "127.0.0.1", "gateway": "gw-1"}
    assert {k: stored[k] for k in EXPLAIN_CALL} == EXPLAIN_CALL
    assert stored["originalTimestamp"] == "2024-05-01T10:00:00.000Z" and stored["receivedAt"].endswith("Z")
    payload = {**stored, "properties": {"plan": "pro"}}
    by_name = {d["destination"]: d for d in c["destinations"]}
    assert list(by_name) == ["Hook", "Identify only", "Disabled", "Denied", "Tiny", "Archive"]
    assert by_name["Hook"] == {"destination": "Hook", "type": "webhook", "sends": True, "why": "routed",
                               "payload": payload, "request_body": {"batch": [payload]}}
    assert by_name["Identify only"] == {"destination": "Identify only", "type": "webhook", "sends": False,
                                        "why": "filter.types does not include 'track'"}
    assert by_name["Disabled"] == {"destination": "Disabled", "type": "webhook", "sends": False,
                                   "why": "the destination is disabled"}
    assert by_name["Denied"] == {"destination": "Denied", "type": "webhook", "sends": False,
                                 "why": "transform:deny_events"}
    tiny = by_name["Tiny"]
    assert (tiny["sends"], tiny["why"]) == (False, "dead letter")
    assert tiny["error"].startswith("LIMIT_EXCEEDED: payload is ") and tiny["error"].endswith(
        " bytes; the destination takes 50 a call")
    assert by_name["Archive"] == {"destination": "Archive", "type": "file", "sends": False,
                                  "why": "integrations.Archive is False"}


async def test_explain_from_stdin_and_from_a_file_sends_nothing(make_fake: Any, tmp_path: Path) -> None:
    hook = await make_fake()
    cfg = explain_config(tmp_path, hook.url)
    rc, out, err = await cli("explain", "--config", str(cfg), "-", stdin=msgspec.json.encode(EXPLAIN_CALL))
    assert rc == 0, err
    check_explained(msgspec.json.decode(out))
    rc, out, err = await cli("explain", "--config", str(cfg), stdin=msgspec.json.encode(EXPLAIN_CALL))
    assert rc == 0, err
    check_explained(msgspec.json.decode(out))
    call_file = tmp_path / "call.json"
    call_file.write_bytes(msgspec.json.encode(EXPLAIN_CALL))
    rc, out, err = await cli("explain", "--config", str(cfg), str(call_file))
    assert rc == 0, err
    check_explained(msgspec.json.decode(out))
    await asyncio.sleep(0.2)
    assert hook.requests == [], "explain never sends"
    assert not (tmp_path / "spool").exists(), "explain never opens the spool"
    assert not (tmp_path / "archive.jsonl").exists()


async def test_explain_a_batch_and_a_rejected_call(make_fake: Any, tmp_path: Path) -> None:
    hook = await make_fake()
    cfg = explain_config(tmp_path, hook.url)
    batch = {"batch": [{"type": "identify", "userId": "u2", "messageId": "i-1"},
                       {"type": "track", "userId": "u2", "messageId": "t-1"}]}  # no event: rejected
    rc, out, err = await cli("explain", "--config", str(cfg), stdin=msgspec.json.encode(batch))
    assert rc == 0, err
    doc = msgspec.json.decode(out)
    assert [r["field"] for r in doc["rejected"]] == ["batch[1].event"]
    [c] = doc["calls"]
    sends = {d["destination"]: d["sends"] for d in c["destinations"]}
    # deny_events checks track calls only; the identify is over Tiny's 50 bytes
    assert sends == {"Hook": True, "Identify only": True, "Disabled": False, "Denied": True, "Tiny": False,
                     "Archive": True}
    rc, out, err = await cli("explain", "--config", str(cfg), stdin=b"not json")
    assert rc == 2 and err.startswith("gateway explain: not JSON")
    assert hook.requests == []
