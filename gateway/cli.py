"""``gateway serve|check|explain|dlq|replay``.

Exit codes, for every command: 0 done; 1 it could not do what was asked
(the port is taken, nothing matched, a call was rejected); 2 the config or
the command line is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import msgspec

from gateway import config as config_mod
from gateway.config import Config, ConfigError, StorageConfig

if TYPE_CHECKING:
    import asyncio
    import ssl

    from aiohttp import web

    from gateway.workers import WorkerPool

_pretty = msgspec.json.format


def _load(path: str) -> Config:
    return config_mod.load(path)


def spool_limits(st: StorageConfig) -> str:
    """The spool's limits as the banner and ``gateway check`` print them."""
    from gateway.units import human_duration, human_size

    retention = human_duration(st.retention) if st.retention > 0 else "none (purged once delivered)"
    dedup = human_duration(st.dedup_window) if st.dedup_window > 0 else "off"
    return f"max {human_size(st.max_bytes)}, retention {retention}, dedup window {dedup}"


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("event-gateway")
    except PackageNotFoundError:
        return "0+unknown"


def banner(cfg: Config, host: str, port: int, workers: int = 1) -> str:
    """What ``gateway serve`` serves, on one screen."""
    from gateway.cli_output import mask_key
    from gateway.config import strict_for

    tls = cfg.server.tls
    scheme = "https" if tls else "http"
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"{scheme}://{shown_host}:{port}"
    lines = [f"gateway {version()}: listening on {scheme}://{host}:{port}"
             + (f" ({workers} worker processes)" if workers > 1 else "")]
    lines.append("  sources:")
    width = max((len(s.name) for s in cfg.sources), default=0)
    first_key = None
    for s in cfg.sources:
        strict = strict_for(cfg, s)
        if s.kind != "pipelines":
            lines.append(f"    {s.name:<{width}}  {s.kind}")
            continue
        keys = ", ".join(mask_key(k) for k in s.write_keys)
        lines.append(f"    {s.name:<{width}}  key {keys}  {'strict' if strict else 'lax'}")
        first_key = first_key or (s.write_keys[0] if s.write_keys else None)
    if not cfg.sources:
        lines.append("    (none: every call is refused)")
    lines.append("  destinations:")
    width = max((len(d.name) for d in cfg.destinations), default=0)
    for d in cfg.destinations:
        lines.append(f"    {d.name:<{width}}  {d.type}{'' if d.enabled else ' (disabled)'}")
    if not cfg.destinations:
        lines.append("    (none: calls are stored and kept)")
    st = cfg.storage
    from gateway.spool import describe

    lines.append(f"  spool: {st.backend} at {describe(st)} ({spool_limits(st)})")
    admin = cfg.server.admin
    if admin is not None:
        lines.append(f"  debugger: {base}/debugger (user {admin.user})")
    if first_key:
        cacert = f" --cacert {tls.cert}" if tls else ""
        lines.append("  try:")
        lines.append(f"    curl{cacert} -u '{first_key}:' -H 'Content-Type: application/json' "
                     f"-d '{{\"userId\":\"u-1\",\"event\":\"Signed Up\"}}' {base}/v1/track")
    return "\n".join(lines)


def _print_json(obj: Any) -> None:
    sys.stdout.write(_pretty(msgspec.json.encode(obj), indent=2).decode() + "\n")


def server_runner(app: "web.Application", cfg: Config) -> "web.AppRunner":
    from gateway.http_fast_path import GatewayRunner

    # lingering_time=0: a body refused before it was read is not drained.
    # server.access_log: aiohttp writes the lines, so it answers every request (no fast path).
    return GatewayRunner(app, fast_path=not cfg.server.access_log, shutdown_timeout=cfg.server.shutdown_timeout,
                         lingering_time=0,
                         access_log=logging.getLogger("aiohttp.access") if cfg.server.access_log else None)


@contextlib.contextmanager
def event_loop_runner() -> Iterator["asyncio.Runner"]:
    """uvloop's event loop where the [fast] extra installed it, else asyncio's."""
    import asyncio

    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        yield runner


async def _serve(app: "web.Application", host: str, port: int, cfg: Config, quiet: bool = False,
                 ssl_context: "ssl.SSLContext | None" = None, pool: "WorkerPool | None" = None) -> None:
    import asyncio
    import signal

    from aiohttp import web

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = server_runner(app, cfg)
    control: web.AppRunner | None = None
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True, ssl_context=ssl_context,
                           reuse_port=pool is not None)
        await site.start()
        if pool is not None:
            from gateway import app_state as state
            from gateway.workers import first_control_app

            await web.UnixSite(runner, pool.runtime.first).start()
            control = web.AppRunner(first_control_app(app[state.ACTIVITY]), access_log=None)
            await control.setup()
            await web.UnixSite(control, pool.runtime.first_control).start()
            pool.start()
        if not quiet:
            print(banner(cfg, host, port, pool.n if pool is not None else 1), flush=True)
        await stop.wait()
        if not quiet:
            print("gateway: stopping: no new connections; finishing requests and sends", flush=True)
    finally:
        if pool is not None:
            # Every worker drains while this one still answers and still commits.
            await pool.stop(cfg.server.shutdown_timeout + 10)
        await runner.cleanup()
        if control is not None:
            await control.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.spool import StorageFailed
    from gateway.tls import server_ssl_context
    from gateway.workers import Runtime, WorkerPool

    cfg = _load(args.config)
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    if args.workers < 1:
        print("gateway: --workers must be 1 or more", file=sys.stderr)
        return 2
    ssl_context = server_ssl_context(cfg)  # a ConfigError naming server.tls before the port is bound
    runtime = Runtime.create() if args.workers > 1 else None
    try:
        if runtime is not None and port == 0:
            port = _free_port(host)  # every worker must bind the same port
        pool = WorkerPool(args.workers, args.config, host, port, runtime) if runtime is not None else None
        app = create_app(cfg, pool=pool)
        with event_loop_runner() as runner:
            try:
                runner.run(_serve(app, host, port, cfg, args.quiet, ssl_context, pool))
            except (OSError, StorageFailed) as e:  # the port is taken, the spool cannot be opened
                print(f"gateway: cannot start: {e}", file=sys.stderr, flush=True)
                return 1
    finally:
        if runtime is not None:
            runtime.remove()
    if not args.quiet:
        print("gateway: stopped", flush=True)
    return 0


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.plugins import build

    from gateway.config import strict_for
    from gateway.units import human_size

    cfg = _load(args.config)
    built = build(cfg)
    st = cfg.storage
    print(f"config {args.config}: OK")
    from gateway.spool import describe

    print(f"server: http://{cfg.server.host}:{cfg.server.port}  spool: {describe(st)} ({spool_limits(st)})")
    print(f"limits: {human_size(cfg.server.max_event_bytes)} a call, {human_size(cfg.server.max_batch_bytes)} "
          "a batch request")
    print("sources:")
    for s in cfg.sources:
        if s.kind == "track_api":
            print(f"  {s.name}: Track API, site id {s.track_api.site_id if s.track_api else '?'}")
            continue
        print(f"  {s.name}: {len(s.write_keys)} write key(s), {'strict' if strict_for(cfg, s) else 'lax'}")
    print("transforms (before the spool):")
    for t in cfg.transforms:
        print(f"  {t.type}  [plugin {built.registry.provider['transform:' + t.type]}]")
    print("destinations:")
    for b in built.destinations:
        dc = b.config
        extra = f" aliases {', '.join(dc.aliases)}" if dc.aliases else ""
        off = "" if dc.enabled else " (disabled)"
        print(f"  {dc.name}: {dc.type}{extra}{off}  [plugin {built.registry.provider['destination:' + dc.type]}]")
        for t in b.transforms:
            print(f"    transform {t.type}")
    print("plugins:")
    for name, provides in built.registry.plugins(built.pm).items():
        print(f"  {name}: {', '.join(provides) if provides else '(hooks only)'}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from gateway.config import strict_for
    from gateway.delivery.planner import Planner
    from gateway.events import BATCH_PATHS, PATH_TYPES
    from gateway.ingest import Ingest
    from gateway.ingest.call_checks import RequestRejected
    from gateway.plugins import build

    cfg = _load(args.config)
    built = build(cfg)
    raw = sys.stdin.buffer.read() if args.file in (None, "-") else open(args.file, "rb").read()
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        print(f"gateway explain: not JSON: {e}", file=sys.stderr)
        return 2
    if not cfg.sources:
        print("gateway explain: the config has no sources", file=sys.stderr)
        return 2
    source = next((s for s in cfg.sources if s.name == args.source), None) if args.source else cfg.sources[0]
    if source is None:
        print(f"gateway explain: no source is named {args.source!r}", file=sys.stderr)
        return 2
    if source.kind != "pipelines":
        print(f"gateway explain: source {source.name!r} is a {source.kind} source; explain takes Pipelines calls "
              "(give --source)", file=sys.stderr)
        return 2
    kind, why = _explain_kind(args, doc)
    if kind is None:
        print(f"gateway explain: {why}", file=sys.stderr)
        return 2
    ingest = Ingest(cfg, built.source_transforms)
    try:
        prepared = ingest.prepare(kind, raw, {"Authorization": f"Bearer {source.write_keys[0]}"}, "127.0.0.1",
                                  datetime.now(timezone.utc))
    except RequestRejected as e:
        _print_json({"stored": False, "rejected": e.rejection})
        return 1
    mode = "strict" if strict_for(cfg, source) else "lax"
    print(f"gateway explain: read as {kind if kind in BATCH_PATHS else PATH_TYPES[kind]} ({why}), with the "
          f"rules of source {source.name!r} ({mode})", file=sys.stderr)
    out: dict[str, Any] = {"source": source.name, "mode": mode,
                           "rejected": prepared.rejections, "dropped_by_source_transforms": prepared.dropped,
                           "calls": []}
    planners = [(b.config, b.destination, Planner(b.config, b.destination, b.transforms)) for b in built.destinations]
    for row in prepared.rows:
        call = msgspec.json.decode(row)
        dests = []
        for dc, dest, planner in planners:
            plan = planner.plan(row, source.name)
            entry: dict[str, Any] = {"destination": dc.name, "type": dc.type}
            if not dc.enabled:
                entry.update(sends=False, why="the destination is disabled")
            elif plan.payload is not None:
                request = dest.batch_body([plan.payload])
                entry.update(sends=True, why="routed", payload=msgspec.json.decode(plan.payload),
                             request_body=msgspec.json.decode(request) if request.lstrip()[:1] in (b"{", b"[")
                             else request.decode())
            elif plan.error is not None:
                entry.update(sends=False, why="dead letter", error=plan.error)
            else:
                entry.update(sends=False, why=plan.refused or plan.dropped)
            dests.append(entry)
        out["calls"].append({"stored_as": call, "destinations": dests})
    _print_json(out)
    return 0


def _explain_kind(args: argparse.Namespace, doc: Any) -> tuple[str | None, str]:
    """The ingest endpoint a call is read as, and why: ``--path`` as ingest
    reads it, ``--type``, a ``batch`` key, or the call's own ``type``."""
    from gateway.events import BATCH_PATHS, PATH_TYPES

    if args.path:
        parts = args.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "v1" and (parts[1] in PATH_TYPES or parts[1] in BATCH_PATHS):
            return parts[1], f"--path {args.path}"
        return None, (f"--path {args.path!r} is no ingest endpoint (/v1/track, /v1/identify, ..., "
                      "/v1/batch, or the short /v1/t, /v1/b, ...)")
    if args.type:
        if args.type in PATH_TYPES or args.type in BATCH_PATHS:
            return args.type, f"--type {args.type}"
        return None, f"--type {args.type!r} is no call type (identify, track, page, screen, group, alias, batch)"
    if isinstance(doc, dict) and "batch" in doc:
        return "batch", "it has a batch"
    t = doc.get("type") if isinstance(doc, dict) else None
    if t in PATH_TYPES:
        return t, "its type"
    return None, ("the call has no \"type\": say how it is sent with --type track (or identify, page, ...) "
                  "or --path /v1/track, as ingest reads the type from the path")


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.cli_output import Progress
    from gateway.spool import ReplayFilter, StorageFailed, open_archive

    cfg = _load(args.config)
    if not any(d.name == args.destination for d in cfg.destinations):
        names = ", ".join(repr(d.name) for d in cfg.destinations) or "none"
        print(f"gateway replay: no destination is named {args.destination!r} (the config has {names})",
              file=sys.stderr)
        return 2
    now = time.time()
    try:
        since = parse_when(args.since, now) if args.since else 0.0
        until = parse_when(args.until, now) if args.until else now
    except ValueError as e:
        print(f"gateway replay: {e}", file=sys.stderr)
        return 2
    f = ReplayFilter(since=since, until=until, source=args.source,
                     types=frozenset(args.type or ()), events=frozenset(args.event or ()))
    try:
        archive = open_archive(cfg.storage)
    except (FileNotFoundError, StorageFailed) as e:  # nothing stored yet; the NATS cluster does not answer
        print(f"gateway replay: {e}", file=sys.stderr)
        return 1
    try:
        held, oldest, newest = archive.held()
        span = f"from {_when(since)} to {_when(until)}" + (f" from source {args.source!r}" if args.source else "")
        if archive.cursor(args.destination) is None:
            print(f"gateway replay: {args.destination!r} has not read the spool yet: nothing was delivered to "
                  "it to replay", file=sys.stderr)
            return 1
        total = archive.candidates(f)
        if not total:
            if not held:
                why = (f"the spool holds no calls (storage.retention is {cfg.storage.retention:g}s: "
                       "delivered calls are removed that long after every destination read them)")
            else:
                why = f"the spool holds {held:,} calls, received from {_when(oldest)} to {_when(newest)}"
            print(f"gateway replay: nothing retained {span}: {why}", file=sys.stderr)
            return 1
        progress = Progress("looked at" if args.dry_run else "queued", total)
        result = archive.replay(args.destination, f, args.dry_run, lambda done, seen: progress.update(seen))
        progress.finish()
    finally:
        archive.close()
    verb = "would queue" if args.dry_run else "queued"
    print(f"{verb} {result.matched:,} call(s) {span} for {args.destination!r}"
          + ("" if args.dry_run else " (delivered again now, also while the server runs)"))
    if result.not_yet_delivered:
        print(f"left {result.not_yet_delivered:,} matching call(s) that {args.destination!r} has not reached "
              "yet: they will be delivered once, in order", file=sys.stderr)
    return 0 if result.matched else 1


def parse_when(value: str, now: float) -> float:
    """An ISO-8601 time, or a duration back from now (``90m``, ``24h``, ``7d``)."""
    from gateway.config import parse_duration

    try:
        return now - float(parse_duration(value))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither an ISO-8601 time (2026-11-30T14:00:00Z) nor a duration back "
                         "from now (90m, 24h, 7d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t or 0, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_dlq(args: argparse.Namespace) -> int:
    from gateway.cli_output import Progress
    from gateway.spool import StorageFailed, open_dead_letters

    cfg = _load(args.config)
    try:
        store = open_dead_letters(cfg.storage)
    except (FileNotFoundError, StorageFailed) as e:  # nothing stored yet; the NATS cluster does not answer
        print(f"gateway dlq: {e}", file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            letters = store.list(args.destination, args.id)
            for x in letters:
                when = datetime.fromtimestamp(x.at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                print(f"{x.id}\t{x.message_id}\t{x.destination}\t{x.status if x.status is not None else '-'}\t"
                      f"{when}\t{x.reason}")
            print(f"{len(letters)} dead letter(s)", file=sys.stderr)
        elif args.action == "show":
            letters = store.list(args.destination, args.id)
            _print_json([{**msgspec.structs.asdict(x), "data": msgspec.json.decode(x.data)} for x in letters])
        else:
            progress = Progress("replayed")
            letters = store.replay(args.destination, args.id, lambda done, total: progress.update(done, total))
            progress.finish()
            print(f"replayed {len(letters)} dead letter(s): queued for delivery now")
        if not letters and args.action != "list":
            return 1
    finally:
        store.close()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Segment-style event ingestion gateway")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
        return sp

    p.add_argument("--version", action="version", version=f"gateway {version()}")
    s = with_config(sub.add_parser("serve", help="run the HTTP server and the delivery workers"))
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--quiet", action="store_true", help="print nothing but errors (for scripts)")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes on the port (SO_REUSEPORT), one a core at most (default: 1)")
    s.set_defaults(func=cmd_serve)
    c = with_config(sub.add_parser("check", help="validate the config and list what it uses"))
    c.set_defaults(func=cmd_check)
    e = with_config(sub.add_parser("explain", help="show what each destination would receive for one call"))
    e.add_argument("file", nargs="?", help="a JSON call (or batch); - or nothing reads standard input")
    e.add_argument("--source", help="the source the call comes from (default: the first)")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--type", help="the call's type when its body has none (track, identify, ..., batch)")
    how.add_argument("--path", help="the endpoint it is sent to, read as ingest does (/v1/track, /v1/b, ...)")
    e.set_defaults(func=cmd_explain)
    d = with_config(sub.add_parser("dlq", help="inspect and replay dead letters"))
    d.add_argument("action", choices=["list", "show", "replay"])
    d.add_argument("--destination")
    d.add_argument("--id", help="a messageId")
    d.set_defaults(func=cmd_dlq)
    r = with_config(sub.add_parser("replay", help="queue the calls the spool still holds again for one destination"))
    r.add_argument("--destination", required=True)
    r.add_argument("--since", help="ISO-8601 time or a duration back from now (90m, 24h, 7d); default: the oldest")
    r.add_argument("--until", help="ISO-8601 time or a duration back from now; default: now")
    r.add_argument("--source")
    r.add_argument("--type", action="append", help="a call type; may be given more than once")
    r.add_argument("--event", action="append", help="a track event name; may be given more than once")
    r.add_argument("--dry-run", action="store_true", help="print how many calls would be queued; queue nothing")
    r.set_defaults(func=cmd_replay)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"gateway: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
