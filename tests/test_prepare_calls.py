"""``Ingest.prepare_calls``: calls another front end built (the Track API's)
take the per-call path of ``Ingest.prepare``: the same checks, enrichment and
source transforms give the same rows; rejections name the call by index."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from gateway import config as config_mod
from gateway.ingest import Ingest
from gateway.plugins import build

NOW = datetime(2024, 3, 20, 15, 30, 0, 123000, tzinfo=timezone.utc)


def ingest_for(tmp_path: Path, transforms: str = "") -> Ingest:
    cfg = config_mod.loads(f"storage: {{path: {tmp_path}}}\nsources:\n  - name: web\n    write_keys: [k]\n"
                           + transforms, env={})
    return Ingest(cfg, build(cfg).source_transforms)


def call(n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u", "event": "E", "messageId": f"m-{n}", "properties": {"n": n}, **extra}


def test_the_same_call_gives_the_same_row_by_either_way(tmp_path: Path) -> None:
    ingest = ingest_for(tmp_path, "transforms:\n  - type: drop_fields\n    settings: {paths: [properties.n]}\n")
    source = ingest.cfg.sources[0]
    calls = [call(1), call(2, timestamp="2024-03-20T15:00:00.000Z")]
    body = msgspec.json.encode({"batch": calls})
    by_body = ingest.prepare("batch", body, {"Authorization": "Bearer k"}, "10.0.0.1", NOW)
    by_calls = ingest.prepare_calls(source, [dict(c) for c in calls], "10.0.0.1", NOW)
    assert by_calls.rows == by_body.rows and len(by_calls.rows) == 2
    row = msgspec.json.decode(by_calls.rows[0])
    assert row["receivedAt"] == row["timestamp"] == "2024-03-20T15:30:00.123Z"
    assert row["context"] == {"ip": "10.0.0.1"} and row["properties"] == {}, "enriched, then transformed"
    assert by_calls.source is source and by_calls.rejections == [] and by_calls.dropped == []


def test_rejections_name_the_call_by_its_index(tmp_path: Path) -> None:
    ingest = ingest_for(tmp_path, "transforms:\n  - type: deny_events\n    settings: {events: [Denied]}\n")
    built = [call(0), {"type": "track", "event": "E"}, call(2, event="Denied"), call(3, timestamp="soon"),
             {"type": "fly"}, call(5)]
    prepared = ingest.prepare_calls(ingest.cfg.sources[0], built, None, NOW)
    assert [msgspec.json.decode(r)["messageId"] for r in prepared.rows] == ["m-0", "m-5"]
    assert [(r.index, r.reason, r.field) for r in prepared.rejections] == [
        (1, "missing_field", "userId"), (3, "bad_field", "timestamp"), (4, "bad_type", "type")]
    assert len(prepared.dropped) == 1


def test_calls_are_enriched_in_place(tmp_path: Path) -> None:
    ingest = ingest_for(tmp_path)
    c = {"type": "identify", "userId": "u", "traits": {}}
    [row] = ingest.prepare_calls(ingest.cfg.sources[0], [c], "127.0.0.1", NOW).rows
    assert msgspec.json.decode(row) == c and c["messageId"].startswith("gw-") and c["context"]["ip"] == "127.0.0.1"
