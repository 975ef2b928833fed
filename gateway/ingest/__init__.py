"""From an HTTP request to calls ready for the spool: auth, decode, limits,
strict/lax validation and enrichment.

Nothing here touches aiohttp, so the rules can be read (and tested) apart from
the server; ``app.py`` feeds it the body, headers and peer address, and asks
it through methods which source and mode a request has.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Mapping

import msgspec

from gateway.config import Config, SourceConfig
from gateway.events import BATCH_PATHS, PATH_TYPES, batch_decoder, call_decoder, encoder
from gateway.ingest.auth import KeyRing, ProxyTrust, key_from_header
from gateway.ingest.call_checks import Rejection, RequestRejected, check_call
from gateway.ingest.enrich import Enricher
from gateway.plugin_classes import Transform


class Prepared(msgspec.Struct):
    """What one request yields: rows for the spool and what was turned away."""

    source: SourceConfig
    rows: list[bytes]
    rejections: list[Rejection]
    dropped: list[str]  # transform drop reasons, one per dropped call
    #: the messageId each row's client sent, for the spool's deduplication
    #: (None where the gateway made one up); empty when it is switched off
    ids: list[str | None] = msgspec.field(default_factory=list)
    #: calls left out because an earlier call of the same request had their messageId
    duplicates: int = 0

    def merge(self, other: "Prepared") -> None:
        """Add another part of the same request (the operations of a Track batch)."""
        self.rows += other.rows
        self.rejections += other.rejections
        self.dropped += other.dropped
        self.ids += other.ids
        self.duplicates += other.duplicates


BOM = b"\xef\xbb\xbf"
#: what decoding hostile JSON may raise besides ValidationError
BAD_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError)


def _why(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8"
    return str(e)


class Ingest:
    """The rules of one config, built once and used for every request."""

    def __init__(self, cfg: Config, transforms: list[Transform]) -> None:
        self.cfg = cfg
        self.keys = KeyRing(cfg.sources)
        self.proxies = ProxyTrust(cfg.server.trusted_proxies)
        self.transforms = transforms
        self.max_event = int(cfg.server.max_event_bytes)
        self.max_batch = int(cfg.server.max_batch_bytes)
        self.dedup = cfg.storage.dedup_window > 0

    def body_limit(self, kind: str) -> int:
        """Bytes a request body of this kind may hold (before and after decompression)."""
        return self.max_batch if kind in BATCH_PATHS else self.max_event

    def source_for_key(self, key: str | None) -> SourceConfig | None:
        """The source a write key belongs to, if any (constant-time comparisons)."""
        return self.keys.source_for(key)

    def client_ip(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        """The client's address: the peer's, or from X-Forwarded-For when the
        peer is a trusted proxy (``server.trusted_proxies``)."""
        proxies = self.proxies
        return proxies.client_ip(peer, headers.get("X-Forwarded-For")) if proxies.any else peer

    def header_source(self, headers: Mapping[str, str]) -> SourceConfig | None:
        """The source named by the Authorization header alone (before a body is read)."""
        return self.keys.source_for(key_from_header(headers.get("Authorization")))

    def prepare(self, kind: str, body: bytes, headers: Mapping[str, str], peer: str | None,
                now: datetime | None = None) -> Prepared:
        """Decode, authenticate, check and enrich the calls of one request.

        Raises RequestRejected for what costs the whole request; per-call
        problems come back as rejections beside the good rows."""
        header_key = key_from_header(headers.get("Authorization"))
        source = self.keys.source_for(header_key) if header_key else None
        if header_key and source is None:
            raise RequestRejected(401, Rejection("auth", "the write key is not valid", "Authorization"))
        is_batch = kind in BATCH_PATHS
        type_ = None if is_batch else PATH_TYPES[kind]
        if body[:3] == BOM:
            body = body[3:]
        envelope: Any
        items: list[Any]
        try:
            if is_batch:
                envelope = batch_decoder.decode(body)
                items = envelope.batch
                body_key = envelope.writeKey
            else:
                envelope = None
                single = call_decoder.decode(body)
                items = [single]
                body_key = single.get("writeKey")
        except msgspec.ValidationError as e:
            raise RequestRejected(400, Rejection("json", f"invalid request: {e}", _field_of(e))) from None
        except BAD_JSON as e:
            raise RequestRejected(400, Rejection("json", f"body is not valid JSON: {_why(e)}")) from None
        if source is None:
            source = self.keys.source_for(body_key) if isinstance(body_key, str) else None
            if source is None:
                msg = "the write key is not valid" if body_key else \
                    "a write key is required (Authorization: Basic or Bearer, or writeKey in the body)"
                raise RequestRejected(401, Rejection("auth", msg, "writeKey"))
        received_ms = round(now.timestamp() * 1000) if now else int(time.time() * 1000)
        proxies = self.proxies  # client_ip(), inline: this runs for every request
        peer_ip = proxies.client_ip(peer, headers.get("X-Forwarded-For")) if proxies.any else peer
        if envelope is not None:
            enricher = Enricher(received_ms, peer_ip, envelope.context, envelope.integrations, envelope.sentAt)
        else:
            enricher = Enricher(received_ms, peer_ip)
        return self._each_call(source, items, type_, enricher, raw=is_batch, indexed=is_batch)

    def prepare_calls(self, source: SourceConfig, calls: list[dict[str, Any]], peer: str | None,
                      now: datetime | None = None) -> Prepared:
        """The per-call path of ``prepare`` for calls another front end built
        (the Track API's, gateway/track_api): no decoding or auth here.

        ``peer`` is the client address as already resolved (X-Forwarded-For
        applied); the dicts are enriched in place.  A rejection's ``index`` is
        the call's position in ``calls``."""
        received_ms = round(now.timestamp() * 1000) if now else int(time.time() * 1000)
        return self._each_call(source, calls, None, Enricher(received_ms, peer), raw=False, indexed=True)

    def _each_call(self, source: SourceConfig, items: list[Any], type_: str | None, enricher: Enricher, *,
                   raw: bool, indexed: bool) -> Prepared:
        """The one definition of what every call goes through: (a raw batch
        call measured and decoded,) check_call, enrichment, deduplication
        within the request, source transforms, encoding."""
        rows: list[bytes] = []
        rejections: list[Rejection] = []
        dropped: list[str] = []
        transforms = self.transforms
        limit = self.max_event
        dedup = self.dedup
        ids: list[str | None] = []
        seen: set[str] = set()
        duplicates = 0
        for i, item in enumerate(items):
            index = i if indexed else None
            if raw:
                # Each call is measured as sent and decoded on its own: one
                # malformed call costs only itself.
                if len(item) > limit:
                    rejections.append(Rejection(
                        "size", f"call is {len(item)} bytes; the limit is {limit} (server.max_event_bytes)",
                        f"batch[{i}]", limit, i))
                    continue
                try:
                    call = call_decoder.decode(item)
                except (msgspec.ValidationError, *BAD_JSON) as e:
                    rejections.append(Rejection("json", f"a call must be a JSON object: {_why(e)}",
                                                f"batch[{i}]", None, i))
                    continue
            else:
                call = item
            problem = check_call(call, type_)
            if problem is not None:
                problem.index = index
                if raw:
                    problem.field = f"batch[{i}].{problem.field}" if problem.field else f"batch[{i}]"
                rejections.append(problem)
                continue
            sent_id = call.get("messageId") if dedup else None
            problem = enricher.apply(call, type_)
            if problem is not None:
                problem.index = index
                if raw:
                    problem.field = f"batch[{i}].{problem.field}"
                rejections.append(problem)
                continue
            if sent_id:
                sent_id = sent_id if sent_id.__class__ is str else str(sent_id)
                if sent_id in seen:
                    duplicates += 1
                    continue
                seen.add(sent_id)
            for t in transforms:
                call = t.apply(call)
                if call is None:
                    dropped.append(t.drop_reason)
                    break
            else:
                rows.append(encoder.encode(call))
                if dedup:
                    ids.append(sent_id or None)
        return Prepared(source, rows, rejections, dropped, ids, duplicates)




def _field_of(e: msgspec.ValidationError) -> str | None:
    msg = str(e)
    at = msg.rfind("at `$")
    if at < 0:
        return None
    path = msg[at + 5:].rstrip("`")
    return path.lstrip(".") or None
