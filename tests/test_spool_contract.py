"""The spool contract (gateway/spool/interface.py): what every backend
promises ingest, delivery and the command line.  Each test runs on every
backend: the embedded SQLite spool and NATS JetStream (a real nats-server,
one for the session; each test has streams of its own)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import pytest

from gateway.config import StorageConfig
from gateway.spool import Ack, DeadLetter, Pending, Record, Spool, open_dead_letters, spool_for
from gateway.testing import wait_until


class Backend:
    """One backend's storage config, and its spool opened (again) from it."""

    def __init__(self, storage: StorageConfig) -> None:
        self.storage = storage
        self.spool: Spool = spool_for(storage)

    async def reopen(self) -> Spool:
        """Close the spool (a restart) and open a new one on the same storage."""
        await self.spool.close()
        self.spool = spool_for(self.storage)
        await self.spool.open()
        return self.spool


@pytest.fixture(params=["sqlite", "nats"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        storage = StorageConfig(path=str(tmp_path / "spool"))
    else:
        from nats_servers import delete_streams, prefix, storage_config

        node = request.getfixturevalue("nats_node")  # skips (or fails in CI) without nats-server
        storage = storage_config(node.urls, prefix())
    b = Backend(storage)
    await b.spool.open()
    try:
        yield b
    finally:
        await b.spool.close()
        if request.param == "nats":
            await delete_streams(storage.nats.servers, storage.nats.stream)  # type: ignore[union-attr]


async def window(spool: Spool, destination: str, after: int, n: int) -> list[Record]:
    """The destination's next window once it holds ``n`` calls (a lease may
    arrive a moment after the append on a backend shared by processes)."""
    got: list[Record] = []

    async def enough() -> bool:
        got[:] = await spool.window(destination, after, 1000)
        return len(got) >= n

    await wait_until(enough, what=f"{n} call(s) in the window of {destination}", timeout=10, poll=0.05,
                     seen=lambda: [r.data for r in got])
    return got


async def due(spool: Spool, destination: str, n: int, what: str) -> list[Pending]:
    """The destination's retries due now, once there are ``n`` (they come due
    by the clock, and on a shared backend a moment after)."""
    async def enough() -> list[Pending] | None:
        got = await spool.due(destination, time.time(), 10)
        return got if len(got) >= n else None

    return await wait_until(enough, what=what, timeout=10, poll=0.05)


async def test_append_then_deliver_in_order(backend: Backend) -> None:
    spool = backend.spool
    start = await spool.cursor("d")
    await spool.append("web", [b'{"n":1}', b'{"n":2}'])
    await spool.append("app", [b'{"n":3}'])
    got = await window(spool, "d", start, 3)
    assert [r.data for r in got] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert [r.source for r in got] == ["web", "web", "app"]
    assert [r.seq for r in got] == sorted(r.seq for r in got) and len({r.seq for r in got}) == 3
    assert [r.data for r in await spool.window("d", got[0].seq, 10)] == [b'{"n":2}', b'{"n":3}']
    assert [r.data for r in await spool.read(start, 10)] == [r.data for r in got]


async def test_a_new_destination_starts_at_the_end(backend: Backend) -> None:
    spool = backend.spool
    await spool.append("web", [b"before"])
    start = await spool.cursor("late")
    await spool.append("web", [b"after"])
    got = await window(spool, "late", start, 1)
    assert [r.data for r in got] == [b"after"]


async def test_acked_calls_are_not_delivered_again_after_a_restart(backend: Backend) -> None:
    spool = backend.spool
    start = await spool.cursor("d")
    await spool.append("web", [b"1", b"2"])
    await spool.append("web", [b"3"])
    got = await window(spool, "d", start, 3)
    await spool.ack(Ack("d", cursor=got[1].seq))  # the first append, whole
    spool = await backend.reopen()
    again = await window(spool, "d", await spool.cursor("d"), 1)
    assert [r.data for r in again] == [b"3"], "what was acked stays done; what was not comes again"


async def test_unacked_calls_come_again_after_a_crash(backend: Backend) -> None:
    spool = backend.spool
    start = await spool.cursor("d")
    await spool.append("web", [b"a", b"b"])
    await window(spool, "d", start, 2)
    spool = await backend.reopen()  # no ack: the step died with the process
    got = await window(spool, "d", await spool.cursor("d"), 2)
    assert [r.data for r in got] == [b"a", b"b"], "at least once: nothing skipped"


async def test_appended_calls_survive_a_restart(backend: Backend) -> None:
    spool = backend.spool
    start = await spool.cursor("d")
    await spool.append("web", [b'{"a":1}', b'{"b":2}'])
    spool = await backend.reopen()
    got = await window(spool, "d", start, 2)
    assert [r.data for r in got] == [b'{"a":1}', b'{"b":2}']


async def test_a_per_item_failure_touches_only_that_call(backend: Backend) -> None:
    spool = backend.spool
    start = await spool.cursor("d")
    await spool.append("web", [b"ok-1", b"bad", b"ok-2"])
    got = await window(spool, "d", start, 3)
    now = time.time()
    bad = got[1]
    await spool.ack(Ack("d", cursor=got[-1].seq,
                        retry=[Pending(bad.seq, bad.data, bad.source, 1, now, now + 0.5, 503, "HTTP 503", "busy")]))
    assert await spool.due("d", now, 10) == [], "not before its delay"

    [p] = await due(spool, "d", 1, "the retry to come due after its delay")
    assert (p.seq, p.data, p.attempts, p.status, p.reason) == (bad.seq, b"bad", 1, 503, "HTTP 503")
    await spool.ack(Ack("d", done=[p.seq]))
    assert await spool.due("d", time.time() + 3600, 10) == []
    spool = await backend.reopen()
    assert await spool.window("d", await spool.cursor("d"), 10) == [], "the others were delivered once"


async def test_retries_come_due_in_order_of_their_time(backend: Backend) -> None:
    spool = backend.spool
    start = await spool.cursor("d")
    await spool.append("web", [b"x", b"y"])
    x, y = await window(spool, "d", start, 2)
    now = time.time()
    await spool.ack(Ack("d", cursor=y.seq, retry=[Pending(x.seq, b"x", "web", 1, now, now + 1.5, 503, "HTTP 503", ""),
                                                 Pending(y.seq, b"y", "web", 2, now, now, 500, "HTTP 500", "")]))

    first = await due(spool, "d", 1, "the retry due now")
    assert [(p.seq, p.data, p.attempts) for p in first] == [(y.seq, b"y", 2)], "x is not due yet"
    both = await due(spool, "d", 2, "the later retry to come due too")
    assert [p.data for p in both] == [b"y", b"x"], "soonest first"
    assert await spool.due("other", time.time(), 10) == []


async def test_dead_letters_list_show_and_replay(backend: Backend) -> None:
    spool = backend.spool
    start = await spool.cursor("d")
    call = b'{"messageId":"m-1","type":"track"}'
    await spool.append("web", [call])
    [r] = await window(spool, "d", start, 1)
    now = time.time()
    await spool.ack(Ack("d", cursor=r.seq, dead=[DeadLetter(0, "d", r.seq, "m-1", "HTTP 400", 400, "bad", 1, now,
                                                            "web", call)]))
    # The store is the command line's (gateway dlq): blocking, so off this loop.
    off_loop = asyncio.get_running_loop().run_in_executor
    letters = await off_loop(None, open_dead_letters, backend.storage)
    try:
        async def listed() -> list[DeadLetter]:
            return await off_loop(None, letters.list, "d")

        [x] = await wait_until(listed, what="the dead letter to be listed", timeout=10, poll=0.1)
        assert (x.message_id, x.reason, x.status, x.body, x.data) == ("m-1", "HTTP 400", 400, "bad", call)
        assert await off_loop(None, letters.list, "other") == []
        assert await off_loop(None, lambda: letters.list(message_id="nope")) == []
        assert [y.message_id for y in await off_loop(None, lambda: letters.replay(message_id="m-1"))] == ["m-1"]
        assert await off_loop(None, letters.list) == []
    finally:
        await off_loop(None, letters.close)

    [p] = await due(spool, "d", 1, "the replayed dead letter to come due")
    assert (p.data, p.attempts) == (call, 0) and p.reason.startswith("replayed")


async def test_a_message_id_is_stored_once_within_the_window(backend: Backend) -> None:
    """storage.dedup_window (24h by default), on every backend: an append
    leaves out the calls whose messageId was stored, and says how many;
    the same within one turn of the loop, and after a restart."""
    spool = backend.spool
    start = await spool.cursor("d")
    assert await spool.append("web", [b"a", b"b"], ["x", "y"]) == 0
    assert await spool.append("web", [b"c", b"d", b"e"], ["y", None, "z"]) == 1, "y was stored"
    same_turn = await asyncio.gather(spool.append("app", [b"f"], ["w"]), spool.append("web", [b"g"], ["w"]),
                                     spool.append("web", [b"h"], ["w"]))
    assert sorted(same_turn) == [0, 1, 1], "one of the three is stored"
    got = await window(spool, "d", start, 5)
    data = [r.data for r in got]
    assert data[:4] == [b"a", b"b", b"d", b"e"] and data[4:] in ([b"f"], [b"g"]), data
    await spool.ack(Ack("d", cursor=got[-1].seq))
    spool = await backend.reopen()
    assert await spool.append("web", [b"i", b"j"], ["x", "v"]) == 1, "stored before the restart"
    assert await spool.append("web", [b"k"], [None]) == 0, "calls without a client's messageId are never left out"
    assert [r.data for r in await window(spool, "d", await spool.cursor("d"), 2)] == [b"j", b"k"]
