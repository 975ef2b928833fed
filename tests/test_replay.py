"""``gateway replay`` (README "Command line"): the calls the spool retains
queued again for one destination, filtered, while the server runs; a dry run
sends nothing; a range with nothing retained says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.testing import gateway_cli, metrics, sample, send_batch, track, wait_metric, wait_until, webhook

KEEP = {"retention": 3600}


def other_source() -> list[dict[str, Any]]:
    from gateway.testing import WRITE_KEY
    return [{"name": "web", "write_keys": [WRITE_KEY]}, {"name": "app", "write_keys": ["app-key"]}]


async def serving(gateway_client: Any, fake: Any, tmp_path: Path) -> tuple[Any, Path]:
    from gateway.testing import gateway_config

    cfg = tmp_path / "config.yaml"
    blocks = dict(storage=KEEP, sources=other_source(), destinations=[webhook("Hook", fake.url)])
    cfg.write_text(gateway_config(tmp_path, **blocks))
    return await gateway_client(**blocks), cfg


CALLS = [track("t-a1", event="A"), track("t-b1", event="B"), track("t-a2", event="A"),
         {"type": "identify", "userId": "u1", "messageId": "i-1", "traits": {"plan": "pro"}}]


async def test_replay_queues_the_matching_calls_again_while_serving(gateway_client: Any, fake_destination: Any,
                                                                    tmp_path: Path) -> None:
    client, cfg = await serving(gateway_client, fake_destination, tmp_path)
    await send_batch(client, CALLS)
    await fake_destination.wait_delivered(4)
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--since", "1h",
                          "--type", "track", "--event", "A")
    assert r.returncode == 0, r.stderr
    assert "queued 2 call(s)" in r.stdout and "'Hook'" in r.stdout
    got = await fake_destination.wait_delivered(6)
    await fake_destination.wait_quiet()
    assert [c["messageId"] for c in fake_destination.delivered()] == ["t-a1", "t-b1", "t-a2", "i-1", "t-a1", "t-a2"]
    assert got[4] == got[0], "the call as stored, again"
    await wait_metric(client, "gateway_destination_replayed_total", lambda v: v == 2, destination="Hook")


async def test_the_source_filter_and_every_type(gateway_client: Any, fake_destination: Any, tmp_path: Path) -> None:
    client, cfg = await serving(gateway_client, fake_destination, tmp_path)
    await send_batch(client, CALLS)
    resp = await client.post("/v1/track", json=track("app-1"), headers={"Authorization": "Bearer app-key"})
    assert resp.status == 200
    await fake_destination.wait_delivered(5)
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--source", "app")
    assert r.returncode == 0 and "queued 1 call(s)" in r.stdout, (r.stdout, r.stderr)
    await fake_destination.wait_delivered(6)
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--type", "identify",
                          "--type", "track", "--source", "web")
    assert r.returncode == 0 and "queued 4 call(s)" in r.stdout, (r.stdout, r.stderr)
    await fake_destination.wait_delivered(10)
    await fake_destination.wait_quiet()
    assert len(fake_destination.delivered()) == 10


async def test_a_dry_run_counts_and_sends_nothing(gateway_client: Any, fake_destination: Any,
                                                  tmp_path: Path) -> None:
    client, cfg = await serving(gateway_client, fake_destination, tmp_path)
    await send_batch(client, CALLS)
    await fake_destination.wait_delivered(4)
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--dry-run")
    assert r.returncode == 0 and "would queue 4 call(s)" in r.stdout, (r.stdout, r.stderr)
    await fake_destination.wait_quiet()
    assert len(fake_destination.delivered()) == 4
    assert sample(await metrics(client), "gateway_destination_replayed_total", destination="Hook") == 0


async def test_nothing_retained_is_said_not_printed_as_0(gateway_client: Any, fake_destination: Any,
                                                         tmp_path: Path) -> None:
    client, cfg = await serving(gateway_client, fake_destination, tmp_path)
    await send_batch(client, CALLS)
    await fake_destination.wait_delivered(4)
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--until", "2020-01-01T00:00:00Z")
    assert r.returncode == 1
    assert "nothing retained from 1970-01-01T00:00:00Z to 2020-01-01T00:00:00Z" in r.stderr
    assert "the spool holds 4 calls" in r.stderr, r.stderr
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--since", "banana")
    assert r.returncode == 2 and "neither an ISO-8601 time" in r.stderr
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Nope")
    assert r.returncode == 2 and "no destination is named 'Nope'" in r.stderr


async def test_without_retention_the_message_says_why(gateway_client: Any, fake_destination: Any,
                                                      tmp_path: Path) -> None:
    from gateway.testing import gateway_config

    blocks = dict(destinations=[webhook("Hook", fake_destination.url)])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_config(tmp_path, **blocks))
    client = await gateway_client(**blocks)
    await send_batch(client, CALLS)
    await fake_destination.wait_delivered(4)
    answers = []

    async def purged() -> bool:  # the housekeeping loop removes delivered calls within a few seconds
        answers.append(await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--since", "1h"))
        return "the spool holds no calls" in answers[-1].stderr

    await wait_until(purged, what="the delivered calls to be purged", timeout=15, poll=0.5,
                     seen=lambda: answers[-1])
    assert answers[-1].returncode == 1
    assert "storage.retention is 0s" in answers[-1].stderr
