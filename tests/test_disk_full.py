"""A full disk never wedges the gateway (README "Durability"): below
storage.min_free_bytes the spool refuses new calls with 503 + Retry-After,
/ready says why, acknowledgements and purges always have room, and once the
destination is back everything answered 200 is delivered and ingest accepts
again by itself.  On a 40 MB tmpfs the test mounts (it needs root)."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from gateway.testing import AUTH_HEADERS, status, wait_ready, wait_until, webhook

DISK_MB = 40


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a 40 MB tmpfs for the spool needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def batch(n: int) -> dict[str, Any]:
    pad = "x" * 900
    return {"batch": [{"type": "track", "userId": "u1", "event": "Filled", "messageId": f"d-{n}-{i}",
                       "properties": {"pad": pad}} for i in range(50)]}


async def test_a_full_disk_refuses_with_503_and_recovers_by_itself(gateway_process: Any, fake_destination: Any,
                                                                   small_disk: Path) -> None:
    fake_destination.default = status(503)  # the destination is down while the disk fills
    gw = await gateway_process(storage={"path": str(small_disk / "spool")},
                               destinations=[webhook("Hook", fake_destination.url,
                                                     retry={"backoff_base": 0.2, "backoff_cap": 0.5})])
    answers: Counter[int] = Counter()
    stored: set[str] = set()
    async with aiohttp.ClientSession() as http:
        refused_in_a_row = 0
        for n in range(3000):  # bounded: the disk holds about 700 of these
            body = batch(n)
            async with http.post(f"{gw.url}/v1/batch", json=body, headers=AUTH_HEADERS) as resp:
                answers[resp.status] += 1
                if resp.status == 200:
                    stored.update(c["messageId"] for c in body["batch"])
                    refused_in_a_row = 0
                else:
                    assert resp.headers.get("Retry-After"), "a 503 says when to come back"
                    refused_in_a_row += 1
                    why = await resp.json()
            if refused_in_a_row >= 20:
                break
        assert set(answers) <= {200, 503}, answers
        assert answers[503] >= 20 and answers[200] > 100, answers
        async with http.get(f"{gw.url}/ready") as resp:
            ready = await resp.json()
            assert resp.status == 503 and "free space" in " ".join(ready["problems"]), (ready, why, answers)
        async with http.get(f"{gw.url}/metrics") as resp:
            text = await resp.text()
        free = float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("gateway_spool_free_bytes ")))
        reserve = float(next(line.split()[1] for line in text.splitlines()
                             if line.startswith("gateway_spool_min_free_bytes ")))
        assert 0 < reserve <= DISK_MB * 2**20 // 4 and free < reserve + 2 * 2**20, (free, reserve)

        fake_destination.default = status(200)  # the destination comes back
        def all_delivered() -> Counter[str] | None:
            got = Counter(c["messageId"] for c in fake_destination.delivered())
            return got if stored <= set(got) else None

        delivered = await wait_until(all_delivered, what=f"all {len(stored)} calls answered 200 to be delivered",
                                     timeout=120, seen=lambda: f"{len({c['messageId'] for c in fake_destination.delivered()} & stored)} of them")
        assert max(delivered.values()) <= 2, delivered.most_common(3)

        last: dict[str, Any] = {}

        async def accepts() -> bool:
            async with http.post(f"{gw.url}/v1/batch", json=batch(99999), headers=AUTH_HEADERS) as resp:
                last["answer"] = f"{resp.status} {await resp.text()}"
            async with http.get(f"{gw.url}/metrics") as resp:  # what the refusal was judged on
                last["spool"] = [line for line in (await resp.text()).splitlines()
                                 if line.startswith(("gateway_spool_", "gateway_destination_backlog"))
                                 and "_bucket" not in line]
            return last["answer"].startswith("200")
        await wait_until(accepts, what="ingest to accept calls again, without a restart", timeout=60, poll=0.5,
                         seen=lambda: f"{last}; the gateway's log ends: {gw.log_tail(3000)}")
        await wait_ready(gw.url, timeout=30)
    assert gw.proc is not None and gw.proc.poll() is None, "the same process recovered"
    assert "Traceback" not in gw.log_tail(200_000), gw.log_tail()


async def test_a_disk_another_program_filled_is_survived(gateway_process: Any, fake_destination: Any,
                                                         small_disk: Path) -> None:
    """The reserve is gone (another program took the disk): acknowledgements
    the disk refuses are stored again, never answered by re-sending, and
    everything recovers once there is room."""
    fake_destination.default = status(503)
    gw = await gateway_process(storage={"path": str(small_disk / "spool")},
                               destinations=[webhook("Hook", fake_destination.url,
                                                     retry={"backoff_base": 0.2, "backoff_cap": 0.5})])
    stored: set[str] = set()
    async with aiohttp.ClientSession() as http:
        for n in range(40):
            body = batch(n)
            async with http.post(f"{gw.url}/v1/batch", json=body, headers=AUTH_HEADERS) as resp:
                assert resp.status == 200
                stored.update(c["messageId"] for c in body["batch"])
        filler = small_disk / "filler"
        with open(filler, "wb") as f:  # take every byte that is left
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        async with http.post(f"{gw.url}/v1/batch", json=batch(9999), headers=AUTH_HEADERS) as resp:
            assert resp.status == 503 and resp.headers.get("Retry-After")

        async def not_ready() -> bool:
            async with http.get(f"{gw.url}/ready") as resp:
                return resp.status == 503
        await wait_until(not_ready, what="/ready to say 503 while the disk is full", timeout=10, poll=0.2)
        fake_destination.default = status(200)  # the destination is back, the disk still full
        await wait_until(lambda: len(fake_destination.requests) > 10, what="delivery to try again", timeout=30)
        filler.unlink()  # the other program lets go

        def all_delivered() -> Counter[str] | None:
            got = Counter(c["messageId"] for c in fake_destination.delivered())
            return got if stored <= set(got) else None

        delivered = await wait_until(all_delivered, what="every call answered 200 to be delivered", timeout=60,
                                     seen=lambda: len({c["messageId"] for c in fake_destination.delivered()}))
        assert max(delivered.values()) <= 2, delivered.most_common(3)

        async def accepts() -> bool:
            async with http.post(f"{gw.url}/v1/batch", json=batch(99999), headers=AUTH_HEADERS) as resp:
                return resp.status == 200
        await wait_until(accepts, what="ingest to accept calls again", timeout=30, poll=0.5)
    assert gw.proc is not None and gw.proc.poll() is None
