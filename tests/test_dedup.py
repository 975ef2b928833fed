"""Deduplication by messageId (storage.dedup_window; README "Delivery
guarantees"): a call whose messageId was stored within the window is
answered 200 and not stored again, within one batch too, durably across
SIGTERM and SIGKILL; calls without a messageId are never deduplicated."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.spool import message_ids
from gateway.spool.store import FILE, connect
from gateway.testing import AUTH_HEADERS, metrics, post, sample, send, send_batch, spool_calls, spool_path, \
    spool_query, track, wait_until

KEEP = {"retention": 3600}  # what was stored stays in the spool for the test to read


def stored_ids(tmp_path: Path) -> list[str]:
    return [c["messageId"] for c in spool_calls(tmp_path)]


def recorded(tmp_path: Path) -> int:
    """The messageIds the spool holds, in its log and in its index
    (gateway/spool/message_ids.py; an id between the two counts twice)."""
    if not (spool_path(tmp_path) / FILE).exists():
        return 0
    total = spool_query(tmp_path, "SELECT coalesce(sum(json_array_length(ids)), 0) FROM message_id_log")[0][0]
    if (spool_path(tmp_path) / message_ids.FILE).exists():
        for (name,) in spool_query(tmp_path, "SELECT name FROM spans", file=message_ids.FILE):
            total += spool_query(tmp_path, f'SELECT count(*) FROM "{name}"', file=message_ids.FILE)[0][0]
    return int(total)


async def test_a_repeat_in_a_second_request_is_answered_200_and_not_stored(gateway_client: Any,
                                                                          tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    await send(client, track("m-1"))
    again = await post(client, "/v1/track", track("m-1", event="Clicked again"))
    assert again.status == 200 and again.body == {}
    await send(client, track("m-2"))
    assert stored_ids(tmp_path) == ["m-1", "m-2"]
    assert [c["event"] for c in spool_calls(tmp_path)] == ["Clicked", "Clicked"], "the first one is kept"
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_deduplicated_total", source="web") == 1
    assert sample(ms, "gateway_calls_accepted_total", source="web") == 2


async def test_repeats_within_one_batch_and_across_batches(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    await send_batch(client, [track("a"), track("b"), track("a"), track("c"), track("b")])
    await send_batch(client, [track("c"), track("d")])
    assert stored_ids(tmp_path) == ["a", "b", "c", "d"]
    assert sample(await metrics(client), "gateway_calls_deduplicated_total", source="web") == 3


async def test_concurrent_requests_with_the_same_id_store_it_once(gateway_client: Any, tmp_path: Path) -> None:
    # Requests of one loop turn share one group commit: the id is claimed once inside it.
    client = await gateway_client(storage=KEEP)
    answers = await asyncio.gather(*(post(client, "/v1/track", track("same")) for _ in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert stored_ids(tmp_path) == ["same"]


async def test_no_false_positives(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    ids = [f"id-{i}" for i in range(1500)]
    for k in range(0, len(ids), 100):
        await send_batch(client, [track(i) for i in ids[k:k + 100]])
    assert stored_ids(tmp_path) == ids
    assert sample(await metrics(client), "gateway_calls_deduplicated_total", source="web") is None


async def test_calls_without_a_message_id_are_never_deduplicated(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage=KEEP)
    call = {"userId": "u1", "event": "No id"}
    for _ in range(3):
        assert (await post(client, "/v1/track", call)).status == 200
    await send_batch(client, [{**call, "type": "track"}] * 2)
    got = stored_ids(tmp_path)
    assert len(got) == 5 and len(set(got)) == 5, "each got an id of its own"
    assert recorded(tmp_path) == 0, "generated ids are not recorded"


async def test_a_window_of_0_switches_it_off(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage={**KEEP, "dedup_window": 0})
    await send(client, track("m-1"))
    await send_batch(client, [track("m-1"), track("m-1")])
    assert stored_ids(tmp_path) == ["m-1"] * 3


async def test_past_the_window_an_id_is_stored_again_and_forgotten(gateway_client: Any, tmp_path: Path) -> None:
    client = await gateway_client(storage={**KEEP, "dedup_window": "1s"})
    await send(client, track("m-1"))
    await send(client, track("m-1"))
    assert stored_ids(tmp_path) == ["m-1"]
    await asyncio.sleep(1.1)
    await send(client, track("m-1"))
    assert stored_ids(tmp_path) == ["m-1", "m-1"], "stored again once the window has passed"
    # The housekeeping loop (every 2 s) forgets ids past the window: memory and disk stay bounded.
    await wait_until(lambda: recorded(tmp_path) == 0,
                     what="the expired messageId to be purged", timeout=8)


async def _post_all(url: str, calls: list[dict[str, Any]], answered: dict[str, int]) -> None:
    """POST each call as its own request, as an SDK would, recording answers; stops at the first
    connection error (the server is gone)."""
    async with aiohttp.ClientSession() as http:
        for call in calls:
            try:
                async with http.post(f"{url}/v1/track", json=call, headers=AUTH_HEADERS) as resp:
                    answered[call["messageId"]] = resp.status
            except aiohttp.ClientError:
                return


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_resent_after_a_kill_every_call_is_stored_exactly_once(gateway_process: Any, tmp_path: Path,
                                                                      how: signal.Signals) -> None:
    """The ids are written in the commit of their calls: after the server dies
    mid-load, an SDK re-sending everything (answered or not) gets each call
    stored exactly once."""
    gw = await gateway_process(storage=KEEP)
    calls = [track(f"k-{i}") for i in range(3000)]
    answered: dict[str, int] = {}
    senders = [asyncio.ensure_future(_post_all(gw.url, calls[k::4], answered)) for k in range(4)]
    await wait_until(lambda: len(answered) >= 300, what="300 answers before the signal", timeout=20)
    assert gw.proc is not None
    gw.proc.send_signal(how)
    await asyncio.gather(*senders)
    await asyncio.get_running_loop().run_in_executor(None, gw.proc.wait, 30)
    ok = {mid for mid, st in answered.items() if st == 200}
    assert ok and set(answered.values()) <= {200, 503}, set(answered.values())
    assert ok <= set(stored_ids(tmp_path)), "every call answered 200 before the signal is stored"
    gw = await gateway_process(storage=KEEP)  # the same spool
    resent: dict[str, int] = {}
    await _post_all(gw.url, calls, resent)
    assert set(resent.values()) == {200}
    ids = stored_ids(tmp_path)
    assert sorted(ids) == sorted(c["messageId"] for c in calls), "every call once, none twice, none lost"


async def test_ids_stay_known_after_the_log_moves_to_the_index(gateway_client: Any, tmp_path: Path) -> None:
    """Claimed ids go to a log in the commit of their calls, then to an index
    (gateway/spool/message_ids.py) and out of the log: ids claimed after the
    log was emptied are still known once indexed, and repeats stay out."""
    client = await gateway_client(storage=KEEP)
    log = "SELECT count(*) FROM message_id_log"
    for round_ in range(3):
        await send_batch(client, [track(f"r{round_}-{i}") for i in range(50)])
        # Indexed (every second) and removed from the log (housekeeping, every 2 s).
        await wait_until(lambda: spool_query(tmp_path, log) == [(0,)], what="the log to be indexed", timeout=10)
    assert recorded(tmp_path) == 150
    await send_batch(client, [track(f"r{r}-{i}") for r in range(3) for i in (0, 49)])
    assert len(stored_ids(tmp_path)) == 150
    assert sample(await metrics(client), "gateway_calls_deduplicated_total", source="web") == 6


async def test_ids_recorded_by_the_version_before_are_kept(gateway_client: Any, tmp_path: Path) -> None:
    """Spools written before the log and the index kept ids in one table
    (``message_ids``); the writer moves them into the log when it opens the spool."""
    spool_path(tmp_path).mkdir(parents=True)
    conn = connect(spool_path(tmp_path) / FILE)
    conn.executescript("CREATE TABLE message_ids (id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;"
                       "CREATE INDEX message_ids_by_time ON message_ids (at);")
    now = time.time()
    conn.executemany("INSERT INTO message_ids VALUES (?, ?)",
                     [("old-1", now - 60), ("old-2", now - 3600), ("expired", now - 2 * 86400)])
    conn.close()
    client = await gateway_client(storage=KEEP)
    await send_batch(client, [track("old-1"), track("old-2"), track("expired"), track("new")])
    assert stored_ids(tmp_path) == ["expired", "new"], "ids stored within the window stay out"
    tables = {r[0] for r in spool_query(tmp_path, "SELECT name FROM sqlite_master")}
    assert "message_ids" not in tables and "message_ids_by_time" not in tables


async def test_an_idle_gateway_forgets_ids_past_the_window(gateway_process: Any, tmp_path: Path) -> None:
    """Housekeeping tells the writer the window, so a gateway restarted
    without a single call since still drops the ids gone past it."""
    storage = {**KEEP, "dedup_window": "1s"}
    gw = await gateway_process(storage=storage)
    answered: dict[str, int] = {}
    await _post_all(gw.url, [track("before-restart")], answered)
    assert answered == {"before-restart": 200}
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    await asyncio.get_running_loop().run_in_executor(None, gw.proc.wait, 30)
    assert recorded(tmp_path) == 1
    await gateway_process(storage=storage)  # the same spool; no call is sent to it
    await wait_until(lambda: recorded(tmp_path) == 0,
                     what="the id past the window to be forgotten without a call", timeout=10)
