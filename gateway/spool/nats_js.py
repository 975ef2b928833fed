"""Talking to NATS JetStream for ``storage.backend: nats``: the connection,
the JetStream API, and the names and definitions of what the gateway keeps
there.  Shared by the spool (``nats.py``) and the command line
(``nats_dead_letters.py``); nothing here imports nats-py at module level, so
the SQLite path never pays for it.

What lives in JetStream, for ``storage.nats.stream: GATEWAY``:

- stream ``GATEWAY_CALLS`` (subject ``GATEWAY.calls``, limits retention,
  discard new at ``storage.max_bytes``): one message per request (or per
  turn of the event loop), the calls of one source joined by newlines.  A
  call's position is ``stream sequence * SPAN + index``.  Every gateway
  purges what every consumer has acknowledged (and is older than
  ``storage.retention``).
- on it, one durable pull consumer per destination, ``GATEWAY_<token>``,
  shared by every gateway process (deliver new: a new destination starts at
  the end; explicit acks; ack wait from the destination's ``timeout``).
- stream ``GATEWAY_RETRIES`` (work queue, subjects ``GATEWAY.retry.<token>``):
  one message per call waiting for another attempt, with its attempts,
  reason and due time; a consumer per destination, filtered on its subject,
  naks each message with a delay until it is due.
- stream ``GATEWAY_DEAD`` (subjects ``GATEWAY.dead.<token>``): the dead letters.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from gateway.config import NatsConfig
from gateway.spool.records import StorageFailed

if TYPE_CHECKING:
    from nats.aio.client import Client

log = logging.getLogger("gateway.spool.nats")

SPAN = 1 << 20  # positions per message, as in the SQLite spool (store.py)
MESSAGE_CALLS = 10_000  # calls a message holds at most (well below SPAN)
#: calls (with a messageId each) of one atomic batch at most: the server takes
#: 1,000 messages a batch, and each call's marker is one
BATCH_IDS = 999
API_TIMEOUT = 5.0  # seconds for one JetStream API request
DUPLICATE_WINDOW = 120.0  # seconds a Nats-Msg-Id is remembered (a publish retried after a timeout)
#: JetStream's error codes the gateway tells apart
STREAM_NOT_FOUND, CONSUMER_NOT_FOUND, MESSAGE_NOT_FOUND = 10059, 10014, 10037
STREAM_NAME_IN_USE, STORE_FAILED = 10058, 10077
#: a publish sent again while the first, with its Nats-Msg-Id, still waits for its quorum
DUPLICATE_IN_PROCESS = 10158
#: a marker of an atomic batch exists already; two markers of one batch share a subject
WRONG_LAST_SEQUENCE, WRONG_LAST_SEQUENCE_IN_BATCH = 10071, 10164
#: errors that waiting does not cure: no disk to reserve storage.max_bytes on, a request the server refuses
NO_STORAGE = 10047
#: "no suitable peers for placement": a peer still joining or offline (waiting cures it), or fewer
#: servers than replicas (it does not); a request refused with it is tried again until a deadline
NO_PEERS = 10005
#: consumer metadata: the destination a consumer delivers to, and when a
#: gateway with that destination in its config last said so (Unix seconds)
META_DESTINATION, META_SEEN = "gateway_destination", "gateway_seen"
_TOKEN_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class ApiError(StorageFailed):
    """JetStream answered an API request with an error."""

    def __init__(self, subject: str, error: dict[str, Any]) -> None:
        self.code = int(error.get("code") or 0)
        self.err_code = int(error.get("err_code") or 0)
        self.description = str(error.get("description") or "")
        super().__init__(f"JetStream refused {subject}: {self.description} (error {self.err_code})")


class Names:
    """The streams, subjects and consumers of one ``storage.nats.stream`` prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.calls = f"{prefix}_CALLS"
        self.retries = f"{prefix}_RETRIES"
        self.dead = f"{prefix}_DEAD"
        self.calls_subject = f"{prefix}.calls"
        #: the subjects (in the calls stream) of the markers of stored messageIds
        self.ids_prefix = f"{prefix}.ids"
        self._tokens: dict[str, str] = {}

    def token(self, destination: str) -> str:
        """A subject token and name part for a destination: its name made safe,
        and a hash of the exact name so that two names never share one."""
        got = self._tokens.get(destination)
        if got is None:
            slug = _TOKEN_CHARS.sub("_", destination).strip("_")[:40] or "d"
            got = self._tokens[destination] = f"{slug}_{hashlib.sha1(destination.encode()).hexdigest()[:8]}"
        return got

    def consumer(self, destination: str) -> str:
        return f"{self.prefix}_{self.token(destination)}"

    def retry_subject(self, destination: str) -> str:
        return f"{self.prefix}.retry.{self.token(destination)}"

    def dead_subject(self, destination: str) -> str:
        return f"{self.prefix}.dead.{self.token(destination)}"


def nanos(seconds: float) -> int:
    return int(seconds * 1e9)


def stream_configs(names: Names, nats: NatsConfig, max_bytes: int, dedup: bool = False) -> list[dict[str, Any]]:
    """The three streams, as the JetStream API takes them.  With ``dedup``
    the calls stream also holds a marker per stored messageId (a subject
    each, expiring with its own TTL), written in the atomic batch of its
    call (nats-server 2.12 or later)."""
    common = {"storage": "file", "num_replicas": nats.replicas, "discard": "new",
              "duplicate_window": nanos(DUPLICATE_WINDOW)}
    # JetStream reserves a stream's max_bytes on every replica's disk: the
    # retries and dead letters (small, and bounded by the servers' own
    # max_file_store) reserve nothing.
    return [
        {"name": names.calls, "retention": "limits", "max_bytes": max_bytes,
         "description": "gateway: the calls every destination delivers", **common,
         **({"subjects": [names.calls_subject, f"{names.ids_prefix}.*"], "allow_atomic": True,
             "allow_msg_ttl": True} if dedup else {"subjects": [names.calls_subject]})},
        {"name": names.retries, "subjects": [f"{names.prefix}.retry.*"], "retention": "workqueue", "max_bytes": -1,
         "description": "gateway: calls waiting for another attempt, a subject per destination", **common},
        {"name": names.dead, "subjects": [f"{names.prefix}.dead.*"], "retention": "limits", "max_bytes": -1,
         "description": "gateway: dead letters, a subject per destination", **common},
    ]


#: what the gateway sets on its streams and may change on one that exists
_UPDATABLE = ("max_bytes", "num_replicas", "discard", "duplicate_window", "subjects", "description",
              "allow_atomic", "allow_msg_ttl")
#: what cannot change on a stream that exists
_FIXED = ("retention", "storage")


def consumer_config(names: Names, destination: str, ack_wait: float, *, retry: bool) -> dict[str, Any]:
    """The durable pull consumer of a destination on the calls stream (or,
    ``retry``, on the retries stream), with the metadata cleanup reads."""
    name = names.consumer(destination)
    cfg: dict[str, Any] = {
        "durable_name": name, "name": name,
        "description": f"gateway destination {destination!r}" + (" (retries)" if retry else ""),
        "deliver_policy": "all" if retry else "new",
        "ack_policy": "explicit", "ack_wait": nanos(ack_wait), "max_deliver": -1, "max_ack_pending": -1,
        "metadata": {META_DESTINATION: destination, META_SEEN: str(int(time.time()))},
    }
    # The calls only (the calls stream also holds the markers of messageIds).
    cfg["filter_subject"] = names.retry_subject(destination) if retry else names.calls_subject
    return cfg


def ack_wait_for(timeout: float) -> float:
    """How long a delivered message stays leased to one process without news
    (a send reports progress while it waits longer): twice the destination's
    timeout, 5 s at least."""
    return max(5.0, 2.0 * timeout)


class Js:
    """JetStream's API over one connection: JSON requests, errors raised."""

    def __init__(self, nc: "Client", timeout: float = API_TIMEOUT) -> None:
        self.nc = nc
        self.timeout = timeout

    async def call(self, subject: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        import nats.errors

        payload = json.dumps(body).encode() if body is not None else b""
        try:
            msg = await self.nc.request(f"$JS.API.{subject}", payload, timeout=timeout or self.timeout)
        except nats.errors.NoRespondersError:
            raise StorageFailed(f"JetStream does not answer {subject}: no server with JetStream is reachable, "
                                f"or the stream has no leader") from None
        except nats.errors.TimeoutError:
            raise StorageFailed(f"JetStream did not answer {subject} within {timeout or self.timeout:.0f}s "
                                f"(no quorum?)") from None
        except nats.errors.Error as e:
            raise StorageFailed(f"NATS: {type(e).__name__}: {e}") from None
        resp = json.loads(msg.data)
        if isinstance(resp, dict) and "error" in resp:
            raise ApiError(subject, resp["error"])
        return resp

    async def ensure_stream(self, want: dict[str, Any]) -> dict[str, Any]:
        """Create the stream, or bring one that exists to ``want``; safe with
        several gateways starting at once."""
        name = want["name"]
        for _ in range(3):
            try:
                info = await self.call(f"STREAM.INFO.{name}")
            except ApiError as e:
                if e.err_code != STREAM_NOT_FOUND:
                    raise
                try:
                    return dict(await self.call(f"STREAM.CREATE.{name}", want))
                except ApiError as e2:
                    if e2.err_code == STREAM_NAME_IN_USE:
                        continue  # another gateway made it first: look at it again
                    raise
            have = info["config"]
            for k in _FIXED:
                if have.get(k) != want[k]:
                    raise StorageFailed(f"the stream {name} exists with {k} {have.get(k)!r}, not {want[k]!r}: "
                                        f"it is not the gateway's, or was changed by hand")
            changed = [k for k in _UPDATABLE if k in want and have.get(k) != want[k]]
            if not changed:
                return dict(info)
            log.warning("updating the stream %s: %s", name,
                        ", ".join(f"{k} {have.get(k)!r} -> {want[k]!r}" for k in changed))
            return dict(await self.call(f"STREAM.UPDATE.{name}", {**have, **want}))
        raise StorageFailed(f"could not create or read the stream {name}")

    async def ensure_consumer(self, stream: str, cfg: dict[str, Any]) -> dict[str, Any]:
        """Create the consumer or update it (an identical one is left as it is)."""
        return dict(await self.call(f"CONSUMER.CREATE.{stream}.{cfg['name']}", {"stream_name": stream, "config": cfg}))

    async def consumers(self, stream: str) -> list[dict[str, Any]]:
        """Every consumer of a stream, with its state.  StorageFailed when the
        server could not reach some of them (during an election it lists the
        others and names these ``missing``): a partial list must not decide a
        purge."""
        out: list[dict[str, Any]] = []
        while True:
            page = await self.call(f"CONSUMER.LIST.{stream}", {"offset": len(out)})
            if page.get("missing"):
                raise StorageFailed(f"the consumers {', '.join(page['missing'])} of {stream} did not answer")
            got = page.get("consumers") or []
            out.extend(got)
            if not got or len(out) >= int(page.get("total", 0)):
                return out

    async def get(self, stream: str, seq: int, subject: str | None = None) -> tuple[int, dict[str, str], bytes] | None:
        """The stream's message at ``seq`` (or the first after it on
        ``subject``), read from the stream's leader: (sequence, headers,
        data), or None when there is none."""
        body: dict[str, Any] = {"seq": max(1, seq)}
        if subject is not None:
            body["next_by_subj"] = subject
        try:
            got = await self.call(f"STREAM.MSG.GET.{stream}", body)
        except ApiError as e:
            if e.err_code in (MESSAGE_NOT_FOUND, 10058) or e.code == 404:
                return None
            raise
        m = got["message"]
        hdrs = parse_headers(base64.b64decode(m["hdrs"])) if m.get("hdrs") else {}
        return int(m["seq"]), hdrs, base64.b64decode(m.get("data") or b"")

    async def scan(self, stream: str, subject: str, start: int = 1,
                   stop: Callable[[int], bool] = lambda seq: False
                   ) -> AsyncIterator[tuple[int, dict[str, str], bytes]]:
        """Every message of ``subject`` from sequence ``start`` on, in order."""
        seq = start
        while True:
            got = await self.get(stream, seq, subject)
            if got is None or stop(got[0]):
                return
            yield got
            seq = got[0] + 1


def parse_headers(raw: bytes) -> dict[str, str]:
    """NATS headers (``NATS/1.0`` then ``Key: value`` lines)."""
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def parse_reply(reply: str) -> tuple[int, int]:
    """(stream sequence, times delivered) of a message, from its ack subject
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``
    (or the longer form with a domain and an account hash)."""
    t = reply.split(".")
    if len(t) == 9:
        return int(t[5]), int(t[4])
    return int(t[7]), int(t[6])


def consumer_of(reply: str) -> str:
    """``stream.consumer`` of an ack subject."""
    t = reply.split(".", 6)
    return f"{t[2]}.{t[3]}" if reply.count(".") == 8 else f"{t[4]}.{t[5]}"


Callback = Callable[..., Awaitable[None]]


async def connect(cfg: NatsConfig, *, purpose: str, timeout: float, forever: bool,
                  disconnected: Callback | None = None, reconnected: Callback | None = None,
                  error: Callback | None = None) -> "Client":
    """A connection to the cluster.  ``forever``: it reconnects over the
    server list (and the servers the cluster announces) without end; the
    first connection is tried for ``timeout`` seconds, then StorageFailed."""
    import nats
    import nats.errors

    opts: dict[str, Any] = {
        "servers": list(cfg.servers), "name": f"gateway {purpose} {socket.gethostname()} pid {os.getpid()}",
        "connect_timeout": max(1, min(5, int(timeout))), "reconnect_time_wait": 0.5,
        "max_reconnect_attempts": -1 if forever else 0, "allow_reconnect": forever,
        # A dead server whose socket stays open is found within ~15 s.
        "ping_interval": 5, "max_outstanding_pings": 3,
        # While reconnecting, what is published waits here (a publish past it is a 503).
        "pending_size": 16 << 20, "drain_timeout": 5,
    }
    if cfg.user is not None:
        opts.update(user=cfg.user, password=cfg.password)
    if cfg.token is not None:
        opts["token"] = cfg.token
    if cfg.creds is not None:
        opts["user_credentials"] = cfg.creds
    if cfg.tls_ca is not None:
        opts["tls"] = ssl.create_default_context(cafile=cfg.tls_ca)
    last: list[BaseException] = []

    async def on_error(e: Exception) -> None:
        last[:] = [e]
        if error is not None:
            await error(e)

    async def nothing() -> None:
        return None

    opts.update(error_cb=on_error, disconnected_cb=disconnected or nothing, reconnected_cb=reconnected or nothing,
                closed_cb=nothing)
    nc = nats.NATS()
    try:
        await asyncio.wait_for(nc.connect(**opts), timeout)
    except (asyncio.TimeoutError, OSError, nats.errors.Error) as e:
        why = last[0] if last else e
        try:
            await nc.close()
        except Exception:  # noqa: BLE001 - it never connected
            pass
        raise StorageFailed(f"cannot reach NATS at {', '.join(cfg.servers)} within {timeout:.0f}s: "
                            f"{type(why).__name__}: {why}".rstrip(": ")) from None
    return nc
