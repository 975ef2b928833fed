"""Helpers for the ingest and enrichment tests: a config builder that controls
every block (``storage`` included), the real app on a real socket, a look at
what the spool holds, and a /metrics reader.  127.0.0.1 only."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable

import msgspec
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import config as config_mod
from gateway.app import create_app
from gateway.spool.sqlite_reads import stored_calls

KEY = "test-write-key"
OTHER_KEY = "other-write-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STRICT = {"X-Strict-Mode": "1"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def config_doc(tmp_path: Path, *, server: dict[str, Any] | None = None, storage: dict[str, Any] | None = None,
               sources: list[dict[str, Any]] | None = None, **top: Any) -> str:
    """YAML for a gateway whose spool is under ``tmp_path/spool``.

    ``retention`` is an hour so that what was stored stays in the spool to be
    read by the test (with no destination, delivered == everything)."""
    doc: dict[str, Any] = {
        "server": {"shutdown_timeout": 1.0, **(server or {})},
        "storage": {"path": str(tmp_path / "spool"), "retention": 3600, **(storage or {})},
        "sources": sources if sources is not None else [
            {"name": "web", "write_keys": [KEY]},
            {"name": "app", "write_keys": [OTHER_KEY]},
        ],
    }
    doc.update(top)
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
def gw(aiohttp_client: Any, tmp_path: Path) -> Callable[..., Any]:
    """``await gw(server={...}, storage={...}, ...)`` → a test client of the real app."""
    async def make(**kw: Any) -> Any:
        cfg = config_mod.loads(config_doc(tmp_path, **kw))
        return await aiohttp_client(create_app(cfg))
    return make


def stored(tmp_path: Path) -> list[dict[str, Any]]:
    """Every call the spool file holds, decoded, in order."""
    if not (tmp_path / "spool" / "spool.sqlite3").exists():
        return []
    return [msgspec.json.decode(c) for c in stored_calls(tmp_path / "spool")]


def spool_rows(tmp_path: Path) -> list[tuple[str, int, bytes]]:
    """(source, count, data) of each row of the spool's ``events`` table."""
    conn = sqlite3.connect(f"file:{tmp_path / 'spool' / 'spool.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT source, count, data FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


async def post(client: Any, path: str, payload: Any, *, strict: bool = False, auth: bool = True,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """POST ``payload`` (bytes as is, anything else as JSON); → (status, JSON body or text, response)."""
    data = payload if isinstance(payload, (bytes, bytearray)) else msgspec.json.encode(payload)
    h = {"Content-Type": "application/json", **(AUTH if auth else {}), **(STRICT if strict else {}),
         **(headers or {})}
    resp = await client.post(path, data=data, headers=h)
    raw = await resp.read()
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        doc = raw.decode(errors="replace")
    return resp.status, doc, resp


async def metrics(client: Any) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    out: Samples = {}
    for fam in text_string_to_metric_families(await resp.text()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(ms: Samples, name: str, **labels: str) -> float | None:
    return ms.get((name, tuple(sorted(labels.items()))))


def track(n: int | str = 1, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u1", "event": "Clicked", "messageId": f"m-{n}", **extra}


def padded(call: dict[str, Any], size: int) -> bytes:
    """``call`` as JSON of exactly ``size`` bytes (padding in properties.pad)."""
    call = {**call, "properties": {**call.get("properties", {}), "pad": ""}}
    base = len(msgspec.json.encode(call))
    assert base <= size, (base, size)
    call["properties"]["pad"] = "x" * (size - base)
    data = msgspec.json.encode(call)
    assert len(data) == size
    return data
