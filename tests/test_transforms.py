"""The built-in transforms, one by one, and end to end: a source-level
transform runs before the spool (a dropped field never touches disk), a
destination-level one changes what that destination alone receives, and
every drop is counted in /metrics."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, TransformConfig
from gateway.api import Transform
from gateway.plugins import build_registry, build_transform, make_manager
from gateway.spool.store import FILE
from gateway.testing import metrics, sample, send, send_batch, spool_calls, spool_path, track, wait_metric, wait_until, webhook

REGISTRY = build_registry(make_manager())


def make(type_: str, **settings: Any) -> Transform:
    return build_transform(REGISTRY, TransformConfig(type=type_, settings=settings), "transforms[0]")


def sample_call() -> dict[str, Any]:
    return {"type": "identify", "userId": "u1", "messageId": "m1",
            "traits": {"email": "A@Example.com ", "plan": "pro", "age": 42},
            "context": {"ip": "203.0.113.9", "library": {"name": "x"}},
            "properties": {"a": "flat"}}


# -- each transform --------------------------------------------------------------

def test_drop_fields() -> None:
    t = make("drop_fields", paths=["context.ip", "traits.email", "missing.deep.path", "properties.a.b", "nothing"])
    want = sample_call()
    del want["context"]["ip"], want["traits"]["email"]
    assert t.apply(sample_call()) == want
    assert t.drop_reason == "transform:drop_fields"


def test_allow_events() -> None:
    t = make("allow_events", events=["Signed Up"])
    assert t.apply(track("m", event="Signed Up")) == track("m", event="Signed Up")
    assert t.apply(track("m", event="Clicked")) is None
    assert t.apply(sample_call()) == sample_call(), "other types pass"
    page = {"type": "page", "name": "Home", "userId": "u"}
    assert t.apply(dict(page)) == page, "only track is checked by default"
    t2 = make("allow_events", events=["Pricing"], types=["track", "page"])
    assert t2.apply(dict(page)) is None
    assert t2.apply({**page, "name": "Pricing"}) == {**page, "name": "Pricing"}
    assert t.drop_reason == "transform:allow_events"


def test_deny_events() -> None:
    t = make("deny_events", events=["Spam", "Noise"])
    assert t.apply(track("m", event="Spam")) is None
    assert t.apply(track("m", event="Clicked")) == track("m", event="Clicked")
    assert t.apply({"type": "screen", "name": "Spam", "userId": "u"}) == {"type": "screen", "name": "Spam",
                                                                        "userId": "u"}
    t2 = make("deny_events", events=["Spam"], types=["screen"])
    assert t2.apply({"type": "screen", "name": "Spam", "userId": "u"}) is None
    assert t2.apply(track("m", event="Spam")) == track("m", event="Spam")
    assert t.drop_reason == "transform:deny_events"


def test_rename_events() -> None:
    t = make("rename_events", mapping={"Clicked": "Button Clicked", "Old": "New"})
    assert t.apply(track("m", event="Clicked"))["event"] == "Button Clicked"
    assert t.apply(track("m", event="Other"))["event"] == "Other"
    page = {"type": "page", "name": "Clicked", "userId": "u"}
    assert t.apply(dict(page)) == page, "only track events are renamed"


def test_hash_fields_exact_sha256() -> None:
    t = make("hash_fields", paths=["traits.email", "traits.age", "userId", "traits.absent", "context.nope.x"],
             salt="pepper")
    got = t.apply(sample_call())
    # sha256("pepper" + "a@example.com"): trimmed and lower-cased first
    assert got["traits"]["email"] == "b933d59aaed37a1cf390cf5d081b2bc732116ea629ebd8fd26836f4b4d4849f0"
    assert got["traits"]["email"] == hashlib.sha256(b"pepper" + b"a@example.com").hexdigest()
    # a number is hashed as its JSON text
    assert got["traits"]["age"] == "93ca73bec2907ec825519db1f7ee28cb033d71c83d14b76ef78b0c4e64566e6e"
    assert got["userId"] == hashlib.sha256(b"pepperu1").hexdigest()
    assert "absent" not in got["traits"] and got["traits"]["plan"] == "pro"
    raw = make("hash_fields", paths=["traits.email"], salt="pepper", normalize=False)
    assert raw.apply(sample_call())["traits"]["email"] == \
        "5c8f0cf2810bc8aa7ce48e893b48fc956c1e8247e1a2f6b0dca974084273e82d"
    assert make("hash_fields", paths=["traits.email"], salt="").apply(sample_call())["traits"]["email"] == \
        hashlib.sha256(b"a@example.com").hexdigest()


def test_set_fields() -> None:
    t = make("set_fields", values={"context.app.env": "prod", "traits.plan": "free", "properties.tags": ["a"]})
    got = t.apply(sample_call())
    assert got["context"]["app"] == {"env": "prod"} and got["context"]["ip"] == "203.0.113.9"
    assert got["traits"]["plan"] == "free"
    assert got["properties"] == {"a": "flat", "tags": ["a"]}
    got["properties"]["tags"].append("b")
    assert t.apply(sample_call())["properties"]["tags"] == ["a"], "each call gets its own copy"
    keep = make("set_fields", values={"traits.plan": "free", "traits.source": "gw"}, overwrite=False)
    got = keep.apply(sample_call())
    assert got["traits"]["plan"] == "pro" and got["traits"]["source"] == "gw"


@pytest.mark.parametrize("type_, settings, message", [
    ("drop_fields", {"pathz": ["a"]}, "transforms[0].settings: unknown key 'pathz'"),
    ("hash_fields", {"paths": ["a"]}, "transforms[0].settings: Object missing required field `salt`"),
    ("set_fields", {"values": {}, "overwrite": "yes"}, "transforms[0].settings: overwrite: Expected `bool`"),
    ("no_such_transform", {}, "transforms[0].type: unknown transform type 'no_such_transform'"),
])
def test_settings_errors_name_the_key(type_: str, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(type_, **settings)
    assert str(e.value).startswith(message)


# -- end to end ------------------------------------------------------------------

def spool_bytes(tmp_path: Path) -> bytes:
    f = spool_path(tmp_path) / FILE
    return b"".join(p.read_bytes() for p in (f, f.with_name(f.name + "-wal")) if p.exists())


async def test_source_drop_fields_keeps_the_ip_off_disk(gateway_client: Any, make_fake_destination: Any,
                                                        tmp_path: Path) -> None:
    hook = await make_fake_destination()
    client = await gateway_client(destinations=[webhook("Hook", hook.url)],
                                  transforms=[{"type": "drop_fields", "settings": {"paths": ["context.ip"]}}])
    await send(client, track("m-1"))
    await send_batch(client, [track("m-2"), track("m-3", context={"ip": "198.51.100.7"})])
    stored = spool_calls(tmp_path)
    assert [c["messageId"] for c in stored] == ["m-1", "m-2", "m-3"]
    assert all("ip" not in c["context"] for c in stored)
    raw = spool_bytes(tmp_path)
    assert b"127.0.0.1" not in raw and b"198.51.100.7" not in raw
    await wait_until(lambda: len(hook.delivered()) == 3, what="three calls")
    assert all("ip" not in c["context"] for c in hook.delivered())


async def test_without_the_transform_the_ip_is_on_disk(gateway_client: Any, make_fake_destination: Any,
                                                       tmp_path: Path) -> None:
    """The control for the test above: the same look finds the IP when nothing drops it."""
    hook = await make_fake_destination()
    client = await gateway_client(destinations=[webhook("Hook", hook.url)])
    await send(client, track("m-1"))
    stored = spool_calls(tmp_path)
    assert stored[0]["context"]["ip"] == "127.0.0.1"
    assert b"127.0.0.1" in spool_bytes(tmp_path)


async def test_destination_transforms_change_one_destination_only(gateway_client: Any,
                                                                  make_fake_destination: Any) -> None:
    alpha, beta = await make_fake_destination(), await make_fake_destination()
    client = await gateway_client(
        destinations=[webhook("Alpha", alpha.url, transforms=[
            {"type": "set_fields", "settings": {"values": {"context.app.env": "prod"}}},
            {"type": "rename_events", "settings": {"mapping": {"Clicked": "Button Clicked"}}},
            {"type": "hash_fields", "settings": {"paths": ["userId"], "salt": "pepper"}},
            {"type": "drop_fields", "settings": {"paths": ["properties.secret"]}},
        ]), webhook("Beta", beta.url)],
        transforms=[{"type": "set_fields", "settings": {"values": {"context.gateway": "gw-1"}}}])
    await send(client, track("m-1", properties={"secret": "s3", "plan": "pro"}))
    await wait_until(lambda: alpha.delivered() and beta.delivered(), what="both destinations")
    [a], [b] = alpha.delivered(), beta.delivered()
    assert b["event"] == "Clicked" and b["userId"] == "u1" and b["properties"] == {"secret": "s3", "plan": "pro"}
    assert "app" not in b["context"] and b["context"]["gateway"] == "gw-1"
    want = copy.deepcopy(b)
    want["context"]["app"] = {"env": "prod"}
    want["event"] = "Button Clicked"
    want["userId"] = hashlib.sha256(b"pepperu1").hexdigest()
    del want["properties"]["secret"]
    assert a == want


async def test_drops_are_counted(gateway_client: Any, make_fake_destination: Any) -> None:
    alpha, beta = await make_fake_destination(), await make_fake_destination()
    client = await gateway_client(
        destinations=[webhook("Alpha", alpha.url, transforms=[{"type": "deny_events",
                                                                "settings": {"events": ["Keep B"]}}]),
                      webhook("Beta", beta.url)],
        transforms=[{"type": "allow_events", "settings": {"events": ["Keep A", "Keep B"]}}])
    await send_batch(client, [track("a", event="Keep A"), track("x", event="Noise"), track("b", event="Keep B"),
                              track("y", event="Other")])
    await send(client, track("z", event="Noise"))
    await send(client, {"type": "identify", "userId": "u1", "messageId": "i"})
    await wait_until(lambda: len(beta.delivered()) == 3 and len(alpha.delivered()) == 2, what="deliveries")
    assert [c["messageId"] for c in beta.delivered()] == ["a", "b", "i"]
    assert [c["messageId"] for c in alpha.delivered()] == ["a", "i"]
    # The fake sees a call before the gateway has its answer (and counts it).
    await wait_metric(client, "gateway_destination_delivered_total", lambda v: v == 2,
                      destination="Alpha")
    ms = await metrics(client)
    assert sample(ms, "gateway_calls_dropped_total", reason="transform:allow_events") == 3
    assert sample(ms, "gateway_calls_accepted_total", source="web") == 3
    assert sample(ms, "gateway_destination_skipped_total", destination="Alpha", reason="transform:deny_events") == 1
    assert sample(ms, "gateway_destination_skipped_total", destination="Beta", reason="transform:deny_events") is None
    assert sample(ms, "gateway_destination_delivered_total", destination="Alpha") == 2
