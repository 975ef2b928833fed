"""``server.strict`` (issue 12, point 2; docs/pipelines-api.md, "Strict and lax").

It is the default of every source's ``strict`` (a source's own setting wins)
and the mode of requests whose write key matches no source: before it, a
mistyped key was always lax (200, nothing stored), even with ``strict: true``
on every source, and SDKs that cannot send ``X-Strict-Mode`` (Customer.io's
Node SDK) never learnt of it.  ``X-Strict-Mode: 1`` still makes any request
strict.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.config import loads, strict_for
from gateway.testing import WRITE_KEY, gateway_cli, metrics, post, sample, spool_calls, track

WRONG = {"Authorization": "Bearer not-a-key"}
#: the second source's key
OTHER_KEY = "other-write-key"
#: no destination reads the spool, so the purge would remove what it stores: keep it for the test to read
KEEP = {"retention": 3600}


def sources(web: bool | None, app: bool | None = None) -> list[dict[str, Any]]:
    """Two sources, ``web`` (WRITE_KEY) and ``app`` (OTHER_KEY), with ``strict`` set only where not None."""
    def source(name: str, key: str, strict: bool | None) -> dict[str, Any]:
        return {"name": name, "write_keys": [key], **({} if strict is None else {"strict": strict})}
    return [source("web", WRITE_KEY, web), source("app", OTHER_KEY, app)]


# -- the config ----------------------------------------------------------------------------

@pytest.mark.parametrize("server,own,expected", [
    (None, None, False),   # nothing set: lax, as before
    (True, None, True),    # unset takes server.strict
    (False, None, False),
    (True, False, False),  # a source's own setting wins, both ways
    (False, True, True),
    (True, True, True),
], ids=["default", "server-strict", "server-lax", "own-lax-wins", "own-strict-wins", "both"])
def test_source_strict_defaults_to_server_strict(server: bool | None, own: bool | None, expected: bool) -> None:
    text = "sources:\n  - name: web\n    write_keys: [k]\n"
    if own is not None:
        text += f"    strict: {str(own).lower()}\n"
    if server is not None:
        text = f"server:\n  strict: {str(server).lower()}\n" + text
    cfg = loads(text, env={})
    assert cfg.server.strict is bool(server)
    assert cfg.sources[0].strict is own, "unset stays unset, so server.strict can decide"
    assert strict_for(cfg, cfg.sources[0]) is expected
    assert strict_for(cfg, None) is bool(server), "a key that matches no source"


def test_strict_null_is_unset() -> None:
    cfg = loads("server: {strict: true}\nsources:\n  - {name: web, write_keys: [k], strict: null}\n", env={})
    assert cfg.sources[0].strict is None and strict_for(cfg, cfg.sources[0]) is True


def test_server_strict_must_be_a_boolean() -> None:
    from gateway.config import ConfigError
    with pytest.raises(ConfigError, match=r"line 2: server.strict: Expected `bool`"):
        loads("server:\n  strict: sometimes\n", env={})


async def test_gateway_check_shows_the_mode_each_source_gets(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(textwrap.dedent(f"""
        server: {{strict: true}}
        storage: {{path: {tmp_path / 'spool'}}}
        sources:
          - {{name: inherits, write_keys: [a]}}
          - {{name: own-lax, write_keys: [b], strict: false}}
        """))
    r = await gateway_cli("check", "--config", "c.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "  inherits: 1 write key(s), strict\n  own-lax: 1 write key(s), lax\n" in r.stdout


# -- over HTTP -----------------------------------------------------------------------------

@pytest.mark.parametrize("server_strict,status", [(False, 200), (True, 401)], ids=["lax", "strict"])
async def test_a_key_that_matches_no_source_takes_server_strict(gateway_client: Any, tmp_path: Path,
                                                                server_strict: bool, status: int) -> None:
    """Even when every source is strict, the unknown key follows server.strict
    alone (it belongs to no source), in the header and in the body alike."""
    client = await gateway_client(server={"strict": server_strict}, storage=KEEP, sources=sources(True, True))
    got, doc, _ = await post(client, "/v1/track", track("m-1"), auth=False, headers=WRONG)
    assert got == status, doc
    got_body, doc_body, _ = await post(client, "/v1/track", {**track("m-2"), "writeKey": "not-a-key"}, auth=False)
    got_none, doc_none, _ = await post(client, "/v1/track", track("m-3"), auth=False)
    assert got_body == got_none == status, (doc_body, doc_none)
    if server_strict:
        for d, field in ((doc, "Authorization"), (doc_body, "writeKey"), (doc_none, "writeKey")):
            assert (d["code"], d["field"]) == ("auth", field) and d["message"], d
    else:
        assert doc == doc_body == doc_none == {}
    assert spool_calls(tmp_path) == []
    assert sample(await metrics(client), "gateway_calls_rejected_total", reason="auth") == 3


async def test_the_header_still_makes_a_wrong_key_strict(gateway_client: Any) -> None:
    client = await gateway_client(server={"strict": False})
    got, doc, _ = await post(client, "/v1/track", track("m-1"), auth=False, headers=WRONG, strict=True)
    assert (got, doc["code"]) == (401, "auth")


@pytest.mark.parametrize("server_strict,web,app,web_status,app_status", [
    (True, None, None, 400, 400),    # both inherit strict
    (True, False, None, 200, 400),   # web's own lax wins
    (False, None, True, 200, 400),   # app's own strict wins
    (False, None, None, 200, 200),   # the old default
], ids=["inherit-strict", "own-lax", "own-strict", "all-lax"])
async def test_sources_inherit_server_strict(gateway_client: Any, tmp_path: Path, server_strict: bool,
                                             web: bool | None, app: bool | None, web_status: int,
                                             app_status: int) -> None:
    client = await gateway_client(server={"strict": server_strict}, storage=KEEP, sources=sources(web, app))
    no_event = {"userId": "u1"}
    for key, status in ((WRITE_KEY, web_status), (OTHER_KEY, app_status)):
        got, doc, _ = await post(client, "/v1/track", no_event, auth=False,
                                 headers={"Authorization": f"Bearer {key}"})
        assert got == status, (key, doc)
        if status == 400:
            assert (doc["code"], doc["field"]) == ("missing_field", "event")
        # X-Strict-Mode: 1 makes every source strict, whatever its setting
        got, doc, _ = await post(client, "/v1/track", no_event, auth=False, strict=True,
                                 headers={"Authorization": f"Bearer {key}"})
        assert (got, doc["code"]) == (400, "missing_field")
    assert spool_calls(tmp_path) == []


async def test_whole_request_errors_before_the_key_is_read_take_server_strict(gateway_client: Any) -> None:
    """A body too large to read names no source yet when the key is in the
    body (browser SDKs): server.strict decides; a header key's own source
    decides for itself."""
    client = await gateway_client(server={"strict": True, "max_event_bytes": "1KiB"}, sources=sources(False))
    big = {**track("m-1"), "writeKey": WRITE_KEY, "properties": {"pad": "x" * 2000}}
    got, doc, _ = await post(client, "/v1/track", big, auth=False)
    assert (got, doc["code"], doc["limit"]) == (400, "size", 1024)
    got, doc, _ = await post(client, "/v1/track", big)  # Bearer WRITE_KEY: web, strict: false
    assert (got, doc) == (200, {})


async def test_a_python_sdk_learns_of_a_wrong_key_under_server_strict(gateway_client: Any, tmp_path: Path,
                                                                      no_proxy: None) -> None:
    """customerio-cdp-analytics with a mistyped key: a 401 it can read (code
    and message) and does not retry, where lax mode said 200."""
    from customerio.analytics import Client
    from customerio.analytics.request import APIError

    client = await gateway_client(server={"strict": True}, storage=KEEP)
    url = str(client.make_url("")).rstrip("/")
    errors: list[Exception] = []

    def run() -> None:
        c = Client("not-a-key", host=url, sync_mode=True, max_retries=3, on_error=lambda e, b: errors.append(e))
        try:
            c.track("u-3", "Nope")  # sync_mode: the error is raised to the caller
        except APIError as e:
            errors.append(e)

    await asyncio.wait_for(asyncio.to_thread(run), 30)
    assert [(e.status, e.code) for e in errors] == [(401, "auth")], errors  # type: ignore[attr-defined]
    ms = await metrics(client)
    assert sample(ms, "gateway_http_requests_total", endpoint="/v1/batch", status="401") == 1
    assert spool_calls(tmp_path) == []
