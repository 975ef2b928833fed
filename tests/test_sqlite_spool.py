"""The embedded SQLite spool beyond the contract every backend passes
(tests/test_spool_contract.py): positions and cursors in its one log, group
commits, purges in steps, byte accounting, its writer process."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from gateway.spool import Ack, SpoolFull, StorageFailed
from gateway.spool import store
from gateway.spool.sqlite import SqliteSpool
from gateway.spool.sqlite_reads import stored_calls
from gateway.testing import wait_until


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "spool", max_bytes=1 << 30)
    await s.open()
    yield s
    await s.close()


async def reopen(s: SqliteSpool) -> SqliteSpool:
    await s.close()
    again = SqliteSpool(s.dir, s.max_bytes)
    await again.open()
    return again


async def test_concurrent_appends_of_several_sources_share_one_insert(spool: SqliteSpool) -> None:
    """Appends waiting for the writer become one multi-row INSERT; every call
    gets its own position and last_seq is the newest of them."""
    sources = [f"s{i % 3}" for i in range(30)]
    await asyncio.gather(*(spool.append(src, [b'{"n":%d}' % i, b'{"m":%d}' % i]) for i, src in enumerate(sources)))
    got = await spool.read(-1, 1000)
    assert len(got) == 60 and len({r.seq for r in got}) == 60
    assert [r.seq for r in got] == sorted(r.seq for r in got)
    assert spool.last_seq == got[-1].seq
    by_source: dict[str, list[bytes]] = {}
    for r in got:
        by_source.setdefault(r.source, []).append(r.data)
    for k in ("s0", "s1", "s2"):  # each source's calls in the order they were appended
        assert by_source[k] == [d for i, src in enumerate(sources) if src == k
                                for d in (b'{"n":%d}' % i, b'{"m":%d}' % i)]


async def test_appended_calls_survive_reopen(spool: SqliteSpool) -> None:
    await spool.append("web", [b'{"a":1}', b'{"b":2}'])
    spool = await reopen(spool)
    try:
        assert stored_calls(spool.dir) == [b'{"a":1}', b'{"b":2}']
        assert spool.rows == 2 and spool.bytes == len(b'{"a":1}\n{"b":2}') + 1
    finally:
        await spool.close()
        await spool.open()  # the fixture closes it again


async def test_new_destination_starts_at_the_end_and_cursor_persists(spool: SqliteSpool) -> None:
    await spool.append("web", [b"1", b"2"])
    start = await spool.cursor("late")
    assert await spool.read(start, 10) == []
    await spool.append("web", [b"3"])
    new = await spool.read(start, 10)
    assert [r.data for r in new] == [b"3"]
    await spool.ack(Ack("late", cursor=new[-1].seq))
    assert await spool.cursor("late") == new[-1].seq
    # The cursor never moves back.
    await spool.ack(Ack("late", cursor=start))
    assert await spool.cursor("late") == new[-1].seq


async def test_positions_are_never_reused_after_a_purge(spool: SqliteSpool) -> None:
    """An emptied table must not hand out old positions: cursors would skip new calls."""
    await spool.append("web", [b"1", b"2"])
    cur = await spool.cursor("d")
    first = await spool.read(-1, 10)
    await spool.ack(Ack("d", cursor=first[-1].seq))
    await spool.purge(["d"], retention=0)
    assert spool.rows == 0 and stored_calls(spool.dir) == []
    await spool.append("web", [b"3"])
    after = await spool.read(await spool.cursor("d"), 10)
    assert [r.data for r in after] == [b"3"] and after[0].seq > first[-1].seq >= cur


async def test_purge_keeps_what_any_destination_still_needs(spool: SqliteSpool) -> None:
    await spool.cursor("fast")
    await spool.cursor("slow")
    await spool.append("web", [b"1"])
    await spool.append("web", [b"2"])
    recs = await spool.read(-1, 10)
    await spool.ack(Ack("fast", cursor=recs[-1].seq))
    assert await spool.purge(["fast", "slow"], retention=0) == 0
    await spool.ack(Ack("slow", cursor=recs[0].seq))
    assert await spool.purge(["fast", "slow"], retention=0) == 1
    assert stored_calls(spool.dir) == [b"2"]
    # Retention keeps delivered calls for a while.
    await spool.ack(Ack("slow", cursor=recs[1].seq))
    assert await spool.purge(["fast", "slow"], retention=3600) == 0


async def test_purge_of_many_rows_goes_in_steps_and_stops_at_the_cursor(spool: SqliteSpool) -> None:
    """A purge deletes PURGE_ROWS rows a transaction (so appends are not held
    behind one long delete) and still removes all it may, and nothing more."""
    await spool.cursor("d")
    total = store.PURGE_ROWS * 3 + 5
    for i in range(total):
        await spool.append("web", [b"%d" % i])  # one row each (nothing else is pending)
    recs = await spool.read(-1, total)
    keep = 7
    await spool.ack(Ack("d", cursor=recs[-keep - 1].seq))
    assert await spool.purge(["d"], retention=0) == total - keep
    assert stored_calls(spool.dir) == [b"%d" % i for i in range(total - keep, total)]
    assert spool.rows == keep and spool.bytes == sum(len(b"%d" % i) + 1 for i in range(total - keep, total))


async def test_purge_of_large_rows_deletes_about_a_megabyte_a_step(spool: SqliteSpool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    await spool.cursor("d")
    big = b"x" * (store.PURGE_BYTES // 2 + 1)  # two rows are past the bound
    for _ in range(4):
        await spool.append("web", [big])
    recs = await spool.read(-1, 10)
    await spool.ack(Ack("d", cursor=recs[-1].seq))
    steps = 0
    submit = spool.submit

    def counted(job: Any) -> Any:
        nonlocal steps
        steps += 1
        return submit(job)
    monkeypatch.setattr(spool, "submit", counted)
    assert await spool.purge(["d"], retention=0) == 4
    assert steps >= 4 and stored_calls(spool.dir) == [] and spool.bytes == 0


async def test_full_spool_refuses(tmp_path: Path) -> None:
    s = SqliteSpool(tmp_path / "small", max_bytes=10)
    await s.open()
    try:
        await s.append("web", [b"12345"])
        with pytest.raises(SpoolFull):
            await s.append("web", [b"1234567"])
        assert stored_calls(s.dir) == [b"12345"] and s.room_problem(4) is None
        assert "storage.max_bytes" in (s.room_problem(5) or "")
    finally:
        await s.close()


# -- the embedded backend's writer process ---------------------------------


def _state(pid: int) -> str:
    """The state letter of a process in /proc (``S`` sleeping, ``T`` stopped, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_a_dead_writer_fails_what_it_had_not_answered_and_is_replaced(spool: SqliteSpool) -> None:
    """kill -9 of the writer process: appends it had not answered raise
    StorageFailed (the server's 503), none is reported stored that is not, and
    a new writer takes over with the totals read back from the file.

    The writer is stopped (SIGSTOP) before the appends are made: when it is
    killed they have surely been sent to it, and surely not answered."""
    await spool.append("web", [b"before"])
    old = spool.writer_pid
    assert old is not None
    os.kill(old, signal.SIGSTOP)
    try:
        await wait_until(lambda: _state(old) == "T", what=f"the writer {old} to stop", seen=lambda: _state(old))
        appends = [asyncio.ensure_future(spool.append("web", [b"during-%d" % i])) for i in range(50)]
        # One message for all 50 (they came in one turn of the loop), written to the writer's socket.
        await wait_until(lambda: len(spool._waiting) == 1 and not spool._pending,
                         what="the appends to be sent to the writer",
                         seen=lambda: (spool._waiting, spool._pending))
        assert not any(a.done() for a in appends), "a stopped writer answered"
    finally:
        os.kill(old, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*appends, return_exceptions=True), 10)
    assert all(isinstance(r, (int, StorageFailed)) for r in results), results
    stored_during = [b"during-%d" % i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert stored_during == [], "an append the writer never answered was reported stored"

    async def appended_after() -> bool:
        try:
            await spool.append("web", [b"after"])
        except StorageFailed:
            return False
        return True

    await wait_until(appended_after, what="a new writer to store a call", timeout=10)
    assert spool.writer_pid not in (None, old)
    got = stored_calls(spool.dir)
    # A call may be stored with its answer lost (kill -9 after the commit), never the reverse.
    assert got[0] == b"before" and got[-1] == b"after" and set(stored_during) <= set(got)
    assert not [c for c in got if c.startswith(b"during-")], "the stopped writer committed nothing"
    assert spool.rows == len(got) and spool.bytes == sum(len(c) + 1 for c in got)
    assert [r.data for r in await spool.read(-1, 100)] == got


async def test_a_spool_that_cannot_be_opened_says_where(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a directory")
    s = SqliteSpool(tmp_path / "taken", max_bytes=1 << 20)
    with pytest.raises(StorageFailed, match="taken"):
        await s.open()
    await s.close()


async def test_a_read_stops_at_its_byte_bound_but_returns_one_call_at_least(spool: SqliteSpool) -> None:
    """Windows of large calls are bounded by bytes as well as by count (RSS)."""
    from gateway.spool.sqlite_reads import read_after
    big = [b"x" * 1000 + b"%d" % i for i in range(10)]
    await spool.append("web", big)
    conn = store.connect(spool.file, readonly=True)
    try:
        got = read_after(conn, -1, 100, max_bytes=3500)
        assert [r.data for r in got] == big[:4]  # the fourth crosses the bound
        assert [r.data for r in read_after(conn, -1, 100, max_bytes=1)] == big[:1]
        assert [r.data for r in read_after(conn, got[-1].seq, 100)] == big[4:]
    finally:
        conn.close()


async def test_windows_across_rows_are_the_log_cut_by_count_and_bytes(spool: SqliteSpool) -> None:
    """Every window, from any position, by any count and byte bound, is the
    log's next calls: rows of several calls are split and cut in the middle."""
    import random

    from gateway.spool.sqlite_reads import SplitCache, read_after
    rnd = random.Random(11)
    for r in range(12):  # a row per append: 1 to 15 calls of 1 to 60 bytes
        await spool.append(f"s{r % 3}", [b"c%d-%d-" % (r, i) + b"x" * rnd.randint(0, 54)
                                         for i in range(rnd.randint(1, 15))])
    conn = store.connect(spool.file, readonly=True)
    try:
        log = [(rec.seq, rec.source, rec.data) for rec in read_after(conn, -1, 1 << 30, max_bytes=1 << 30)]
        assert len({seq // store.SPAN for seq, _, _ in log}) == 12  # calls of one append share a row
        cache = SplitCache()
        for _ in range(400):
            k = rnd.randrange(-1, len(log))
            after = -1 if k < 0 else log[k][0] + rnd.choice((0, 0, 1))  # a position, or one past it
            limit, max_bytes = rnd.randint(1, 40), rnd.randint(1, 600)
            want, size = [], 0
            for entry in (e for e in log if e[0] > after):  # the reference: count, then bytes
                if len(want) >= limit or size >= max_bytes:
                    break
                want.append(entry)
                size += len(entry[2])
            got = read_after(conn, after, limit, cache if rnd.random() < 0.5 else None, max_bytes)
            assert [(rec.seq, rec.source, rec.data) for rec in got] == want, (after, limit, max_bytes)
    finally:
        conn.close()


def test_windows_of_records_and_items_set_off_no_garbage_collection() -> None:
    """Delivery holds thousands of these at a time: were they objects the
    collector counts, each window would set off collections (gc=False)."""
    import gc

    from gateway.delivery.batching import Item
    from gateway.spool import Record
    gc.collect()
    gc.disable()  # the count then only grows: no collection resets it midway
    try:
        before = gc.get_count()[0]
        held = [Record(i, "web", 1.0, b"{}") for i in range(5000)]
        held += [Item(i, "web", b"{}", b"{}") for i in range(5000)]
        counted = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(held) == 10000
    assert counted < 100, f"{counted} allocations counted towards the collector's threshold"
