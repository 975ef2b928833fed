"""``gateway dlq list|show|replay`` against dead letters a real server made,
run as subprocesses while that server runs; and ``gateway explain``, which
shows what each destination would receive and sends nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from gateway.testing import (
    AUTH_HEADERS, CliResult, FakeDestination, gateway_cli, gateway_config, spool_path, spool_query, status, track,
    wait_until, webhook,
)

ROOT = Path(__file__).resolve().parent.parent


async def cli(*args: str, stdin: bytes | None = None) -> CliResult:
    """``python -m gateway ARGS`` from the repository, beside the fakes' event loop."""
    return await gateway_cli(*args, stdin=stdin, cwd=ROOT)


def listing(out: str) -> list[tuple[str, str, str, str]]:
    """``dlq list`` lines as (messageId, destination, last status, reason)."""
    rows = []
    for line in out.splitlines():
        _id, mid, dest, last_status, _when, reason = line.split("\t")
        rows.append((mid, dest, last_status, reason))
    return sorted(rows)


async def test_dlq_list_show_replay_while_the_server_runs(gateway_process: Any, make_fake_destination: Any,
                                                          tmp_path: Path) -> None:
    hook: FakeDestination = await make_fake_destination()
    other: FakeDestination = await make_fake_destination()
    other.default = status(422, "unknown field")
    hook.default = status(400, '{"error": "invalid field: traits"}')
    gw = await gateway_process(destinations=[webhook("Hook", hook.url), webhook("Other", other.url)])
    cfg = str(gw.config_path)
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{gw.url}/v1/batch", json={"batch": [track("m-1"), track("m-2")]},
                            headers=AUTH_HEADERS)
        assert r.status == 200
        r = await http.post(f"{gw.url}/v1/track", json=track("m-3"), headers=AUTH_HEADERS)
        assert r.status == 200

    async def listed(*extra: str) -> list[tuple[str, str, str, str]]:
        rc, out, err = await cli("dlq", "list", "--config", cfg, *extra)
        assert rc == 0, err
        return listing(out)

    want = [(f"m-{i}", d, s, f"HTTP {s}") for i in (1, 2, 3) for d, s in (("Hook", "400"), ("Other", "422"))]
    got: list[tuple[str, str, str, str]] = []

    async def all_listed() -> bool:
        got[:] = await listed()
        return got == sorted(want)

    await wait_until(all_listed, timeout=15, poll=0.2, what="every dead letter in `dlq list`", seen=lambda: got)
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
    hook.default = status(200)
    rc, out, err = await cli("dlq", "replay", "--config", cfg, "--destination", "Hook", "--id", "m-2")
    assert (rc, out.strip()) == (0, "replayed 1 dead letter(s): queued for delivery now"), err
    await wait_until(lambda: [c["messageId"] for c in hook.delivered()] == ["m-2"], timeout=8, what="m-2 replayed")
    assert await listed("--destination", "Hook") == [("m-1", "Hook", "400", "HTTP 400"),
                                                      ("m-3", "Hook", "400", "HTTP 400")]
    rc, out, err = await cli("dlq", "replay", "--config", cfg, "--destination", "Hook")
    assert (rc, out.strip()) == (0, "replayed 2 dead letter(s): queued for delivery now"), err
    await wait_until(lambda: sorted(c["messageId"] for c in hook.delivered()) == ["m-1", "m-2", "m-3"], timeout=8,
                     what="every Hook letter replayed")
    rc, out, err = await cli("dlq", "list", "--config", cfg, "--destination", "Hook")
    assert (rc, out, err.strip()) == (0, "", "0 dead letter(s)")
    assert await listed() == sorted(w for w in want if w[1] == "Other"), "other destinations' letters stay"
    rc, out, err = await cli("dlq", "replay", "--config", cfg, "--id", "no-such-id")
    assert (rc, out.strip()) == (1, "replayed 0 dead letter(s): queued for delivery now")
    # Replays are found by a poll of the retries table (every RETRY_POLL s): a
    # call sent twice would be one still there, sent again at a later poll.
    await wait_until(lambda: spool_query(tmp_path, "SELECT count(*) FROM retries WHERE destination = 'Hook'")
                     == [(0,)], timeout=8, what="Hook's replays to leave the retries table")
    await hook.wait_quiet()  # longer than the poll
    assert sorted(c["messageId"] for c in hook.delivered()) == ["m-1", "m-2", "m-3"], "each replayed call sent once"


# -- explain --------------------------------------------------------------------------

EXPLAIN_CALL = {"type": "track", "event": "Clicked", "userId": "u1", "messageId": "m-1",
                "timestamp": "2024-05-01T10:00:00.000Z", "properties": {"secret": "s3", "plan": "pro"},
                "integrations": {"Archive": False}}


def explain_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "explain.yaml"
    path.write_text(gateway_config(
        tmp_path,
        transforms=[{"type": "set_fields", "settings": {"values": {"context.gateway": "gw-1"}}}],
        destinations=[
            {"name": "Hook", "type": "webhook", "settings": {"url": url},
             "transforms": [{"type": "drop_fields", "settings": {"paths": ["properties.secret"]}}]},
            {"name": "Identify only", "type": "webhook", "settings": {"url": url}, "filter": {"types": ["identify"]}},
            {"name": "Disabled", "type": "webhook", "settings": {"url": url}, "enabled": False},
            {"name": "Denied", "type": "webhook", "settings": {"url": url},
             "transforms": [{"type": "deny_events", "settings": {"events": ["Clicked"]}}]},
            {"name": "Tiny", "type": "webhook", "settings": {"url": url, "max_call_bytes": 50}},
            {"name": "Archive", "type": "file", "settings": {"path": str(tmp_path / "archive.jsonl")}},
        ]))
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


async def test_explain_from_stdin_and_from_a_file_sends_nothing(make_fake_destination: Any,
                                                                tmp_path: Path) -> None:
    hook = await make_fake_destination()
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
    await hook.wait_quiet()
    assert hook.requests == [], "explain never sends"
    assert not spool_path(tmp_path).exists(), "explain never opens the spool"
    assert not (tmp_path / "archive.jsonl").exists()


async def test_explain_a_batch_and_a_rejected_call(make_fake_destination: Any, tmp_path: Path) -> None:
    hook = await make_fake_destination()
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
