"""gateway/share.py: ingest's share of each turn of the event loop.

Spending is passed in as seconds, so these tests do not depend on how fast
the machine is."""

from __future__ import annotations

import asyncio

from gateway.loop_share import IngestShare


async def next_turn() -> None:
    """Let the loop finish this turn and run the next."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_under_the_share_nobody_waits() -> None:
    turns = IngestShare(lambda: True, budget=0.001)
    for _ in range(5):
        assert not turns.full()
        turns.spend(0.0001)
    assert turns.used > 0 and not turns.full()


async def test_past_the_share_requests_wait_for_later_turns_in_arrival_order() -> None:
    turns = IngestShare(lambda: True, budget=0.001)
    for _ in range(16):  # requests of 0.5 ms: two fit in a turn
        turns.spend(0.0005)
    assert turns.full()
    order: list[int] = []

    async def request(n: int) -> None:
        if turns.full():
            await turns.wait()
        order.append(n)
        turns.spend(0.0005)

    tasks = [asyncio.ensure_future(request(n)) for n in range(6)]
    seen: list[int] = []
    for _ in range(10):
        await asyncio.sleep(0)
        seen.append(len(order))
        if len(order) == 6:
            break
    assert order == list(range(6)), order
    # No turn let more go than the share holds (budget / average = 2).
    steps = [b - a for a, b in zip([0] + seen, seen)]
    assert max(steps) <= 2 and len(seen) >= 3, seen
    await asyncio.gather(*tasks)


async def test_a_cancelled_request_gives_its_place_to_the_next() -> None:
    turns = IngestShare(lambda: True, budget=0.001)
    turns.spend(0.002)
    first = asyncio.ensure_future(turns.wait())
    second = asyncio.ensure_future(turns.wait())
    await asyncio.sleep(0)
    first.cancel()
    for _ in range(5):
        await next_turn()
        if second.done():
            break
    assert second.done() and not second.cancelled()
    assert not turns._waiting


async def test_while_delivery_is_not_behind_ingest_takes_the_whole_turn() -> None:
    """A destination that is caught up, down or on hold never slows ingest."""
    behind = False
    turns = IngestShare(lambda: True, budget=0.001)
    turns.contended = lambda: behind
    turns.spend(0.05)  # requests look costly: one a turn while contended
    assert not turns.full()
    behind = True
    assert turns.full()
    waiters = [asyncio.ensure_future(turns.wait()) for _ in range(5)]
    await asyncio.sleep(0)  # all queue
    assert len(turns._waiting) == 5
    behind = False  # caught up: everyone waiting goes at the next turn
    await next_turn()
    await asyncio.sleep(0)
    assert all(w.done() for w in waiters) and not turns.full()
