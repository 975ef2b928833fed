"""Routing: the ``integrations`` object (as Segment and Customer.io define it,
plus the non-boolean values gateway/routing.py documents), then each
destination's ``filter``.  Table-driven on ``Route.refuse``, the same table
through the engine's fast path for destinations that forward stored bytes,
and end to end through HTTP to two destinations."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.config import DestinationConfig, FilterConfig
from gateway.delivery.planner import Planner
from gateway.http_client import HttpClient, HttpPool, Throttle
from gateway.routing import Route, enabled
from gateway.testing import metrics, post, sample, send, track, wait_until, webhook
from plugins.webhook import WebhookDestination

NAMES = ["Hook", "hook-alias"]
OFF_ALL = "integrations.All is {!r} and 'Hook' is not enabled by name"


def call(integrations: Any = None, **kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"type": "track", "event": "Clicked", "userId": "u1", "messageId": "m1", **kw}
    if integrations is not None:
        c["integrations"] = integrations
    return c


# (integrations, refusal or None)
INTEGRATIONS = [
    pytest.param(None, None, id="absent"),
    pytest.param({}, None, id="empty"),
    pytest.param({"All": True}, None, id="All-true"),
    pytest.param({"All": False}, OFF_ALL.format(False), id="All-false"),
    pytest.param({"All": False, "Hook": True}, None, id="All-false-name-true"),
    pytest.param({"All": False, "Hook": {"apiKey": "x"}}, None, id="All-false-name-object"),
    pytest.param({"All": False, "Hook": {}}, None, id="All-false-name-empty-object"),
    pytest.param({"All": False, "Other": True}, OFF_ALL.format(False), id="All-false-other-true"),
    pytest.param({"Hook": False}, "integrations.Hook is False", id="name-false"),
    pytest.param({"All": True, "Hook": False}, "integrations.Hook is False", id="All-true-name-false"),
    pytest.param({"Other": False}, None, id="other-false"),
    pytest.param({"hook": False}, None, id="names-match-exactly"),
    pytest.param({"all": False}, None, id="All-is-case-sensitive"),
    # aliases (config ``aliases`` and a type's own) match like the name
    pytest.param({"All": False, "hook-alias": True}, None, id="alias-true"),
    pytest.param({"All": False, "hook-alias": {}}, None, id="alias-object"),
    pytest.param({"hook-alias": False}, "integrations.hook-alias is False", id="alias-false"),
    pytest.param({"Hook": True, "hook-alias": False}, None, id="name-before-alias"),
    pytest.param({"Hook": None, "hook-alias": False}, "integrations.hook-alias is False", id="null-name-then-alias"),
    # non-boolean values, as the routing.py docstring's table reads them
    pytest.param({"All": 0}, OFF_ALL.format(0), id="All-0"),
    pytest.param({"All": 0.0}, OFF_ALL.format(0.0), id="All-0.0"),
    pytest.param({"All": "false"}, OFF_ALL.format("false"), id="All-string-false"),
    pytest.param({"All": " OFF "}, OFF_ALL.format(" OFF "), id="All-string-off"),
    pytest.param({"All": "no"}, OFF_ALL.format("no"), id="All-string-no"),
    pytest.param({"All": "0"}, OFF_ALL.format("0"), id="All-string-0"),
    pytest.param({"All": None}, None, id="All-null-is-absent"),
    pytest.param({"All": 1}, None, id="All-1"),
    pytest.param({"All": "yes"}, None, id="All-string-yes"),
    pytest.param({"All": "true"}, None, id="All-string-true"),
    pytest.param({"All": []}, None, id="All-list"),
    pytest.param({"All": False, "Hook": None}, OFF_ALL.format(False), id="name-null-is-absent"),
    pytest.param({"All": False, "Hook": 1}, None, id="name-1"),
    pytest.param({"All": False, "Hook": "on"}, None, id="name-string-on"),
    pytest.param({"All": False, "Hook": ""}, None, id="name-empty-string"),
    pytest.param({"Hook": 0}, "integrations.Hook is 0", id="name-0"),
    pytest.param({"Hook": "Off"}, "integrations.Hook is 'Off'", id="name-string-Off"),
]


@pytest.mark.parametrize("integrations, refusal", INTEGRATIONS)
def test_integrations(integrations: Any, refusal: str | None) -> None:
    route = Route(NAMES, FilterConfig())
    assert route.refuse(call(integrations), "web") == refusal


@pytest.mark.parametrize("value, on", [
    (True, True), (False, False), ({}, True), ({"x": 1}, True), ([], True), (1, True), (-1, True), (0, False),
    (0.0, False), (2.5, True), ("false", False), ("FALSE", False), (" off", False), ("no", False), ("0", False),
    ("true", True), ("yes", True), ("", True), ("disabled", True),
])
def test_enabled(value: Any, on: bool) -> None:
    assert enabled(value) is on


# (filter, call, source, refusal or None)
FILTERS = [
    pytest.param({}, call(), "web", None, id="no-filter"),
    pytest.param({"types": ["identify"]}, call(), "web", "filter.types does not include 'track'", id="types-out"),
    pytest.param({"types": ["identify", "track"]}, call(), "web", None, id="types-in"),
    pytest.param({"types": []}, {"type": "identify", "userId": "u"}, "web",
                 "filter.types does not include 'identify'", id="types-empty-refuses-all"),
    pytest.param({"events": ["Signed Up"]}, call(), "web", "filter.events does not include 'Clicked'",
                 id="events-out"),
    pytest.param({"events": ["Signed Up", "Clicked"]}, call(), "web", None, id="events-in"),
    pytest.param({"events": ["Signed Up"]}, {"type": "identify", "userId": "u"}, "web", None,
                 id="events-only-filter-track"),
    pytest.param({"events": ["Signed Up"]}, {"type": "page", "name": "Home", "userId": "u"}, "web", None,
                 id="events-ignore-page-names"),
    pytest.param({"exclude_events": ["Clicked"]}, call(), "web", "filter.exclude_events includes 'Clicked'",
                 id="exclude-out"),
    pytest.param({"exclude_events": ["Spam"]}, call(), "web", None, id="exclude-other"),
    pytest.param({"exclude_events": ["Clicked"]}, {"type": "screen", "name": "Clicked", "userId": "u"}, "web",
                 None, id="exclude-only-track"),
    pytest.param({"events": ["Clicked"], "exclude_events": ["Clicked"]}, call(), "web",
                 "filter.exclude_events includes 'Clicked'", id="exclude-beats-include"),
    pytest.param({"sources": ["ios"]}, call(), "web", "filter.sources does not include 'web'", id="sources-out"),
    pytest.param({"sources": ["ios", "web"]}, call(), "web", None, id="sources-in"),
    pytest.param({"types": ["identify"]}, call({"Hook": False}), "web", "integrations.Hook is False",
                 id="integrations-decide-first"),
    pytest.param({"types": ["identify"]}, call({"All": False, "Hook": True}), "web",
                 "filter.types does not include 'track'", id="integrations-on-then-filter"),
    pytest.param({"types": ["track"], "events": ["Clicked"], "sources": ["web"]}, call(), "web", None,
                 id="all-filters-pass"),
]


@pytest.mark.parametrize("flt, c, source, refusal", FILTERS)
def test_filters(flt: dict[str, Any], c: dict[str, Any], source: str, refusal: str | None) -> None:
    route = Route(NAMES, msgspec.convert(flt, FilterConfig))
    assert route.refuse(c, source) == refusal


def _webhook_planner(flt: dict[str, Any]) -> Planner:
    dc = msgspec.convert({"name": "Hook", "type": "webhook", "aliases": ["hook-alias"],
                          "settings": {"url": "http://127.0.0.1:9/"}, "filter": flt}, DestinationConfig)
    http = HttpClient(HttpPool(), Throttle(1e9, 1.0))  # never used: planning sends nothing
    dest = WebhookDestination("Hook", msgspec.convert({"url": "http://127.0.0.1:9/"}, WebhookDestination.Settings),
                              http)
    return Planner(dc, dest, [])


@pytest.mark.parametrize("integrations, refusal", INTEGRATIONS)
def test_integrations_on_stored_bytes(integrations: Any, refusal: str | None) -> None:
    """A destination that forwards stored calls routes on the bytes without
    decoding the call: the answer must be the same."""
    planner = _webhook_planner({})
    assert planner.passthrough
    data = msgspec.json.encode(call(integrations))
    plan = planner.plan(data, "web")
    assert plan.refused == refusal
    assert (plan.payload == data) is (refusal is None)


@pytest.mark.parametrize("flt, c, source, refusal", FILTERS)
def test_filters_on_stored_bytes(flt: dict[str, Any], c: dict[str, Any], source: str, refusal: str | None) -> None:
    plan = _webhook_planner(flt).plan(msgspec.json.encode(c), source)
    assert plan.refused == refusal


async def test_routing_end_to_end(gateway_client: Any, make_fake_destination: Any) -> None:
    alpha, beta = await make_fake_destination(), await make_fake_destination()
    client = await gateway_client(destinations=[
        webhook("Alpha", alpha.url, aliases=["alpha-alias"]),
        webhook("Beta", beta.url, filter={"types": ["track"], "exclude_events": ["Spam"]}),
    ])
    both = track("both")
    await send(client, both)
    await send(client, track("alpha-by-name", integrations={"All": False, "Alpha": True}))
    await send(client, track("beta-excluded", integrations={"Beta": False}))
    await send(client, track("alpha-by-alias", integrations={"All": False, "alpha-alias": {"opt": 1}}))
    await send(client, {"type": "identify", "userId": "u1", "messageId": "identify-alpha-only"})
    await send(client, track("spam-alpha-only", event="Spam"))
    await send(client, track("beta-by-number", integrations={"All": "off", "Beta": 1}))
    await send(client, track("nobody", integrations={"All": False}))
    answer = await post(client, "/v1/batch", {
        "integrations": {"All": False, "Beta": True},
        "batch": [track("batch-beta-1"), track("batch-alpha-too", integrations={"Alpha": True})]})
    assert answer.status == 200
    await send(client, track("last"))
    await wait_until(lambda: any(c["messageId"] == "last" for c in alpha.delivered())
                     and any(c["messageId"] == "last" for c in beta.delivered()), what="the last call")
    assert [c["messageId"] for c in alpha.delivered()] == [
        "both", "alpha-by-name", "beta-excluded", "alpha-by-alias", "identify-alpha-only", "spam-alpha-only",
        "batch-alpha-too", "last"]
    assert [c["messageId"] for c in beta.delivered()] == [
        "both", "beta-by-number", "batch-beta-1", "batch-alpha-too", "last"]
    ms = await metrics(client)
    assert sample(ms, "gateway_destination_skipped_total", destination="Alpha", reason="routing") == 3
    assert sample(ms, "gateway_destination_skipped_total", destination="Beta", reason="routing") == 6
