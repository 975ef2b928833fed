"""The spool contract on the NATS backend, against a real nats-server (one
node for the session; each test has streams of its own): what a backend
promises ingest and delivery (order, windows, acks, retries with their
delay, per-item failures, dead letters and their replay, purges), and what
this backend adds: leases shared by processes, redelivery after a process
dies, publishes sent again with the same Nats-Msg-Id."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import pytest

from gateway.config import DestinationConfig
from gateway.spool import Ack, DeadLetter, Pending, SpoolFull, StorageFailed
from gateway.spool import nats as nats_spool
from gateway.spool.nats_dead_letters import NatsDeadLetters
from gateway.spool.nats_js import SPAN
from nats_servers import NatsCluster, eventually, js_api, open_nats_spool, prefix, storage_config



@pytest.fixture
async def spool(nats_node: NatsCluster) -> AsyncIterator[Any]:
    async with open_nats_spool(nats_node.urls) as s:
        yield s


async def window(spool: Any, destination: str, after: int = 0, n: int = 1, limit: int = 100) -> list[Any]:
    """The destination's window once it holds ``n`` calls at least (delivery
    to this process is asynchronous)."""
    return list(await eventually(lambda: _at_least(spool, destination, after, n, limit), 10,
                                 f"{n} call(s) for {destination}"))


async def _at_least(spool: Any, destination: str, after: int, n: int, limit: int) -> list[Any] | None:
    got = await spool.window(destination, after, limit)
    return got if len(got) >= n else None


async def test_append_then_read_and_deliver_in_order(spool: Any) -> None:
    await spool.cursor("d")
    await spool.append("web", [b'{"n":1}', b'{"n":2}'])
    await spool.append("app", [b'{"n":3}'])
    got = await spool.read(0, 100)
    assert [r.data for r in got] == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert [r.source for r in got] == ["web", "web", "app"]
    assert [r.seq for r in got] == sorted(r.seq for r in got) and len({r.seq for r in got}) == 3
    assert [r.data for r in await spool.read(got[0].seq, 1)] == [b'{"n":2}']
    assert await spool.read(got[2].seq, 10) == []
    w = await window(spool, "d", 0, 3)
    assert [(r.seq, r.data, r.source) for r in w] == [(r.seq, r.data, r.source) for r in got]
    # After a call of the window (a read-ahead): what follows it.
    assert [r.data for r in await spool.window("d", w[0].seq, 10)] == [b'{"n":2}', b'{"n":3}']
    assert [r.data for r in await spool.window("d", 0, 2)] == [b'{"n":1}', b'{"n":2}']


async def test_one_message_per_source_per_turn_of_the_loop(spool: Any) -> None:
    """Appends waiting together become one message per source; every call
    has its own position and each source's calls keep their order."""
    sources = [f"s{i % 3}" for i in range(30)]
    await asyncio.gather(*(spool.append(src, [b'{"n":%d}' % i, b'{"m":%d}' % i]) for i, src in enumerate(sources)))
    info = await js_api(spool.cfg.servers, f"STREAM.INFO.{spool.names.calls}")
    assert info["state"]["messages"] == 3
    got = await spool.read(0, 1000)
    assert len(got) == 60 and len({r.seq for r in got}) == 60
    for k in ("s0", "s1", "s2"):
        assert [r.data for r in got if r.source == k] == [d for i, src in enumerate(sources) if src == k
                                                          for d in (b'{"n":%d}' % i, b'{"m":%d}' % i)]


async def test_calls_past_the_servers_max_payload_go_in_several_messages(spool: Any) -> None:
    """A batch of 1.5 MB (max_payload is 1 MB): stored as two messages, its
    calls in order, delivered in one window."""
    await spool.cursor("d")
    calls = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * 3000) for i in range(500)]
    await spool.append("web", calls)
    info = await js_api(spool.cfg.servers, f"STREAM.INFO.{spool.names.calls}")
    assert info["state"]["messages"] == 2
    assert [r.data for r in await spool.read(0, 1000)] == calls
    assert [r.data for r in await window(spool, "d", 0, 500, limit=1000)] == calls


async def test_new_destination_starts_at_the_end_and_acks_persist(spool: Any, nats_node: NatsCluster) -> None:
    await spool.append("web", [b"1", b"2"])
    start = await spool.cursor("late")
    await spool.append("web", [b"3"])
    new = await window(spool, "late", start, 1)
    assert [r.data for r in new] == [b"3"]
    await asyncio.sleep(0.2)
    assert [r.data for r in await spool.window("late", start, 10)] == [b"3"], "1 and 2 came before it"
    await spool.ack(Ack("late", cursor=new[-1].seq))
    assert await spool.cursor("late") == new[-1].seq
    await spool.ack(Ack("late", cursor=start))  # never moves back
    assert await spool.cursor("late") == new[-1].seq
    assert await spool.window("late", 0, 10) == []
    # Another process on the same consumer: what was acknowledged stays acknowledged.
    async with open_nats_spool(nats_node.urls, spool.cfg.stream, keep=True) as other:
        await asyncio.sleep(0.3)
        assert await other.window("late", 0, 10) == []


async def test_positions_grow_across_purges(spool: Any) -> None:
    await spool.cursor("d")
    await spool.append("web", [b"1", b"2"])
    first = await window(spool, "d", 0, 2)
    await spool.ack(Ack("d", cursor=first[-1].seq))
    assert await spool.purge(["d"], retention=0) == 1
    assert spool.rows == 0 and await spool.read(0, 10) == []
    await spool.append("web", [b"3"])
    after = await window(spool, "d", await spool.cursor("d"), 1)
    assert [r.data for r in after] == [b"3"] and after[0].seq > first[-1].seq


async def test_purge_keeps_what_any_destination_still_needs(spool: Any) -> None:
    await spool.cursor("fast")
    await spool.cursor("slow")
    await spool.append("web", [b"1"])
    await spool.append("web", [b"2"])
    fast = await window(spool, "fast", 0, 2)
    await spool.ack(Ack("fast", cursor=fast[-1].seq))
    assert await spool.purge(["fast", "slow"], retention=0) == 0
    slow = await window(spool, "slow", 0, 2)
    await spool.ack(Ack("slow", cursor=slow[0].seq))
    assert await spool.purge(["fast", "slow"], retention=0) == 1
    assert [r.data for r in await spool.read(0, 10)] == [b"2"]
    await spool.ack(Ack("slow", cursor=slow[1].seq))
    assert await spool.purge(["fast", "slow"], retention=3600) == 0, "retention keeps delivered calls"
    assert await spool.purge(["fast", "slow"], retention=0) == 1


async def test_a_full_stream_refuses_with_spool_full(nats_node: NatsCluster) -> None:
    async with open_nats_spool(nats_node.urls, max_bytes=4096) as s:
        await s.append("web", [b"x" * 1000])
        with pytest.raises(SpoolFull):
            for _ in range(10):  # the stream counts its own overhead; it refuses before 4 KB of calls
                await s.append("web", [b"y" * 1000])
        with pytest.raises(SpoolFull):
            await s.append("web", [b"z"])
        assert s.room_problem(1) is not None
        assert all(r.data[:1] in (b"x", b"y") for r in await s.read(0, 100))


async def test_retries_come_due_after_their_delay_and_finish(spool: Any) -> None:
    now = time.time()
    await spool.ack(Ack("d", retry=[Pending(7 * SPAN, b"x", "web", 1, now, now + 1.0, 503, "HTTP 503", "busy"),
                                    Pending(8 * SPAN, b"y", "web", 2, now, now - 1, 500, "HTTP 500", "")]))
    due = await eventually(lambda: spool.due("d", time.time(), 10), 5, "the retry due now")
    assert [(p.seq, p.data, p.attempts, p.status) for p in due] == [(8 * SPAN, b"y", 2, 500)]
    assert await spool.due("other", time.time(), 10) == []
    await spool.ack(Ack("d", done=[8 * SPAN]))
    assert await spool.due("d", time.time(), 10) == [], "not due for a second yet"
    later = await eventually(lambda: spool.due("d", time.time(), 10), 5, "the retry due in a second")
    assert time.time() >= now + 1.0 and [(p.seq, p.body) for p in later] == [(7 * SPAN, "busy")]
    # Scheduled again: the entry is replaced, not added to.
    again = Pending(7 * SPAN, b"x", "web", 2, now, time.time() - 0.1, 503, "HTTP 503", "still busy")
    await spool.ack(Ack("d", retry=[again]))
    [p] = await eventually(lambda: spool.due("d", time.time(), 10), 5, "the retry scheduled again")
    assert (p.attempts, p.body) == (2, "still busy")
    await spool.ack(Ack("d", done=[7 * SPAN]))
    assert await eventually(lambda: _retry_count(spool, "d", 0), 5, "no retry left")


async def _retry_count(spool: Any, destination: str, want: int) -> bool:
    await spool.purge([destination], 0)
    return (await spool.stats(destination))[1] == want


async def test_a_per_item_failure_touches_only_that_call(spool: Any) -> None:
    """A window delivered but for one call: the cursor covers the window, and
    only that call comes back, as a retry; the others never again."""
    await spool.cursor("d")
    await spool.append("web", [b'{"n":%d}' % i for i in range(5)])
    w = await window(spool, "d", 0, 5)
    bad = w[2]
    now = time.time()
    await spool.ack(Ack("d", cursor=w[-1].seq,
                        retry=[Pending(bad.seq, bad.data, bad.source, 1, now, now, 500, "HTTP 500", "")]))
    assert await spool.window("d", await spool.cursor("d"), 10) == []
    [p] = await eventually(lambda: spool.due("d", time.time(), 10), 5, "the failed call")
    assert (p.seq, p.data) == (bad.seq, bad.data)


async def test_a_stalled_window_starts_again_at_the_cut(spool: Any) -> None:
    """A batch that failed whole holds the queue: the ack's cursor stops
    before it (inside a message), and the next window starts there, with
    nothing before the cut again."""
    await spool.cursor("d")
    await spool.append("web", [b'{"n":%d}' % i for i in range(6)])
    w = await window(spool, "d", 0, 6)
    cut = w[3].seq
    await spool.ack(Ack("d", cursor=cut - 1))
    again = await spool.window("d", cut - 1, 100)
    assert [r.data for r in again] == [b'{"n":3}', b'{"n":4}', b'{"n":5}']
    await spool.ack(Ack("d", cursor=again[-1].seq))
    assert await spool.window("d", 0, 100) == []


async def test_dead_letters_list_show_and_replay(spool: Any) -> None:
    now = time.time()
    call = b'{"messageId":"m-1","type":"track"}'
    await spool.ack(Ack("d", dead=[DeadLetter(0, "d", 5 * SPAN, "m-1", "HTTP 400", 400, "bad", 1, now, "web", call)]))
    await spool.ack(Ack("e", dead=[DeadLetter(0, "e", 6 * SPAN, "m-2", "HTTP 422", 422, "", 3, now, "web", b"{}")]))
    storage = storage_config(spool.cfg.servers, spool.cfg.stream)

    def cli() -> tuple[list[Any], list[Any], list[Any], list[Any], list[Any]]:
        store = NatsDeadLetters(storage)
        try:
            return (store.list("d"), store.list(), store.list(message_id="nope"),
                    store.replay(message_id="m-1"), store.list())
        finally:
            store.close()
    d, every, none, replayed, left = await asyncio.to_thread(cli)
    [x] = d
    assert (x.destination, x.seq, x.message_id, x.reason, x.status, x.body, x.data) == \
        ("d", 5 * SPAN, "m-1", "HTTP 400", 400, "bad", call)
    assert sorted(y.message_id for y in every) == ["m-1", "m-2"] and none == []
    assert [y.message_id for y in replayed] == ["m-1"] and [y.message_id for y in left] == ["m-2"]
    [p] = await eventually(lambda: spool.due("d", time.time(), 10), 5, "the replayed call")
    assert (p.seq, p.data, p.attempts, p.reason) == (5 * SPAN, call, 0, "replayed: HTTP 400")


async def test_a_process_that_dies_loses_its_leases_to_another_after_the_ack_wait(nats_node: NatsCluster) -> None:
    """Process A holds a window and dies (its connection just ends: no nak);
    process B, on the same consumer, gets those calls once the ack wait
    (from the destination's timeout, 5 s at least) has run out; and while A
    lives and reports progress, nobody else gets them."""
    name = prefix()
    dc = DestinationConfig(name="d", type="webhook", timeout=1.0)
    a = nats_spool.NatsSpool(storage_config(nats_node.urls, name), [dc])
    await a.open()
    try:
        await a.append("web", [b"held-1", b"held-2"])
        held = await window(a, "d", 0, 2)
        started = time.monotonic()
        async with open_nats_spool(nats_node.urls, name, destinations=[dc]) as b:
            await asyncio.sleep(7)  # past the ack wait: A's progress reports keep them A's
            assert await b.window("d", 0, 10) == []
            assert a.nc is not None
            await a.nc.close()  # A dies: no nak, no drain
            got = await window(b, "d", 0, 2, limit=10)
            assert [r.data for r in got] == [r.data for r in held] == [b"held-1", b"held-2"]
            assert time.monotonic() - started >= 7
    finally:
        a.nc = None
        await a.close()


async def test_calls_given_back_at_close_go_to_another_process_at_once(nats_node: NatsCluster) -> None:
    name = prefix()
    async with open_nats_spool(nats_node.urls, name) as b:
        async with open_nats_spool(nats_node.urls, name, keep=True) as a:
            await a.cursor("d")
            await b.cursor("d")
            await a.append("web", [b"1", b"2", b"3"])
            await eventually(lambda: _leased(a, b, 3), 5, "the calls leased")
            first = a if a.dests["d"].calls.calls else b
        # If A held them, it gave them back as it closed: B has them within a second.
        if first is a:
            got = await window(b, "d", 0, 3)
            assert [r.data for r in got] == [b"1", b"2", b"3"]


async def _leased(a: Any, b: Any, n: int) -> bool:
    await a.window("d", 0, 10)
    await b.window("d", 0, 10)
    return a.dests["d"].calls.calls + b.dests["d"].calls.calls == n


async def test_two_processes_share_a_destination_each_call_once(nats_node: NatsCluster) -> None:
    """One consumer, two processes delivering: every call goes to one of them."""
    name = prefix()
    async with open_nats_spool(nats_node.urls, name) as a, open_nats_spool(nats_node.urls, name, keep=True) as b:
        await a.cursor("d")
        await b.cursor("d")
        for i in range(40):
            await (a if i % 2 else b).append("web", [b"%d" % i])
        seen: list[bytes] = []

        async def drain(s: Any) -> None:
            for _ in range(50):
                w = await s.window("d", 0, 7)
                if w:
                    seen.extend(r.data for r in w)
                    await s.ack(Ack("d", cursor=w[-1].seq))
                else:
                    await asyncio.sleep(0.05)
        await asyncio.gather(drain(a), drain(b))
        assert sorted(seen, key=int) == [b"%d" % i for i in range(40)]


async def test_a_redelivered_older_message_starts_a_window_of_its_own(spool: Any, nats_node: NatsCluster) -> None:
    """Windows rise in position: a message delivered again (older than the
    ones this process holds) comes in the next window."""
    lane = (await spool._destination("d")).calls
    await spool.append("web", [b"new-1", b"new-2"])
    await window(spool, "d", 0, 2)
    old = lane.buf[0]
    # As if an older message had come back after another process died.
    from gateway.spool.nats_lanes import Leased
    lane.buf.append(Leased(old.sseq - 1 if old.sseq > 1 else 0, old.reply, "web", time.time(), [b"old"], 3,
                           time.time(), next(lane._order)))
    lane.by_sseq[lane.buf[-1].sseq] = lane.buf[-1]
    w1 = await spool.window("d", 0, 10)
    assert [r.data for r in w1] == [b"new-1", b"new-2"]
    w2 = await spool.window("d", w1[-1].seq, 10)
    assert [r.data for r in w2] == [b"old"]
    lane.buf.pop()  # not a real lease: nothing to acknowledge
    lane.by_sseq.pop(old.sseq - 1 if old.sseq > 1 else 0)
    await spool.ack(Ack("d", cursor=w1[-1].seq))


async def test_a_publish_that_times_out_is_sent_again_and_stored_once(spool: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt's acknowledgement comes too late (a timeout far
    below the server's answer time); the same message goes again with the
    same Nats-Msg-Id, and the stream keeps one copy."""
    await spool.cursor("d")
    monkeypatch.setattr(nats_spool, "PUBLISH_TIMEOUT", 0.00001)
    monkeypatch.setattr(nats_spool, "APPEND_DEADLINE", 1.0)
    try:  # attempts time out until one answer happens to be there in time, or the deadline
        await spool.append("web", [b'{"a":1}'])
    except StorageFailed as e:
        assert "did not store" in str(e)
    monkeypatch.setattr(nats_spool, "PUBLISH_TIMEOUT", 2.0)
    assert spool.publish_retries >= 1
    info = await js_api(spool.cfg.servers, f"STREAM.INFO.{spool.names.calls}")
    assert info["state"]["messages"] == 1, "every attempt carried one Nats-Msg-Id: stored once"
    await spool.append("web", [b'{"b":2}'])
    assert [r.data for r in await spool.read(0, 10)] == [b'{"a":1}', b'{"b":2}']


async def test_unreachable_cluster_fails_fast_and_the_spool_comes_back(tmp_path: Any) -> None:
    """The only server stops: appends fail with StorageFailed (503) and
    check_writable says so; the server comes back on the same port and the
    spool works again without being reopened."""
    c = NatsCluster(tmp_path, 1).start()
    try:
        async with open_nats_spool(c.urls) as s:
            await s.cursor("d")
            await s.append("web", [b"before"])
            c.nodes[0].stop()
            await eventually(lambda: _fails(s.check_writable()), 10, "check_writable to fail")
            with pytest.raises(StorageFailed):
                await s.append("web", [b"during"])
            c.nodes[0].start()
            c.wait_healthy()
            await eventually(lambda: _works(s.check_writable()), 20, "check_writable to work again")
            await s.append("web", [b"after"])
            async def through_after() -> list[bytes] | None:
                got = [r.data for r in await s.window("d", 0, 100)]
                return got if got[-1:] == [b"after"] else None

            got = await eventually(through_after, 10, "the window to reach the call sent last")
            # "during" was answered with StorageFailed (a 503); it may still
            # have been stored (sent when the connection came back, like any
            # publish whose answer timed out), and then once (its Nats-Msg-Id).
            assert got in ([b"before", b"after"], [b"before", b"during", b"after"])
            assert s.restarts >= 1
    finally:
        c.stop()


async def _fails(job: Any) -> bool:
    try:
        await job
    except StorageFailed:
        return True
    return False


async def _works(job: Any) -> bool:
    return not await _fails(job)


async def test_streams_and_consumers_made_once_by_processes_starting_together(nats_node: NatsCluster) -> None:
    name = prefix()
    dcs = [DestinationConfig(name="A", type="webhook"), DestinationConfig(name="B c.d", type="webhook", timeout=2)]
    spools = [nats_spool.NatsSpool(storage_config(nats_node.urls, name), dcs) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in spools))
        for stream in ("CALLS", "RETRIES"):
            got = await js_api(nats_node.urls, f"CONSUMER.LIST.{name}_{stream}")
            metas = sorted(c["config"]["metadata"]["gateway_destination"] for c in got["consumers"])
            assert metas == ["A", "B c.d"]
            acks = {c["config"]["metadata"]["gateway_destination"]: c["config"]["ack_wait"] for c in got["consumers"]}
            assert acks == {"A": 60e9, "B c.d": 5e9}
        names = await js_api(nats_node.urls, "STREAM.NAMES", {"subject": f"{name}.>"})
        assert sorted(names["streams"]) == [f"{name}_CALLS", f"{name}_DEAD", f"{name}_RETRIES"]
    finally:
        for s in spools:
            await s.close()
        from nats_servers import delete_streams
        await delete_streams(nats_node.urls, name)


async def test_consumers_of_destinations_no_process_has_are_deleted(nats_node: NatsCluster) -> None:
    """A and B were configured; the process that runs now has only A.  B's
    consumers (and its queued retries) go once nobody has marked them seen
    for cleanup_after, and only once this process has run that long."""
    name = prefix()
    both = [DestinationConfig(name="A", type="webhook"), DestinationConfig(name="B", type="webhook")]
    async with open_nats_spool(nats_node.urls, name, destinations=both, keep=True) as old:
        await old.ack(Ack("B", retry=[Pending(SPAN, b"x", "web", 1, 0, time.time() + 3600, None, "", "")]))
    async with open_nats_spool(nats_node.urls, name, destinations=both[:1], cleanup_after=2.0) as s:
        await s.purge(["A"], 0)
        assert await _consumers(nats_node, name) == ["A", "B"], "not before cleanup_after"
        await asyncio.sleep(2.2)
        await s.purge(["A"], 0)
        assert await _consumers(nats_node, name) == ["A"]
        info = await js_api(nats_node.urls, f"STREAM.INFO.{name}_RETRIES")
        assert info["state"]["messages"] == 0, "B's retries went with it"
        assert s.cleaned == 2


async def _consumers(c: NatsCluster, name: str) -> list[str]:
    got = []
    for stream in ("CALLS", "RETRIES"):
        resp = await js_api(c.urls, f"CONSUMER.LIST.{name}_{stream}")
        got.append(sorted(x["config"]["metadata"]["gateway_destination"] for x in resp["consumers"]))
    assert got[0] == got[1]
    return got[0]
