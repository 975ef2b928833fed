"""``gateway serve|check|explain|dlq``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

import msgspec

from gateway import config as config_mod
from gateway.config import Config, ConfigError

if TYPE_CHECKING:
    from aiohttp import web

_pretty = msgspec.json.format


def _load(path: str) -> Config:
    return config_mod.load(path)


def _print_json(obj: Any) -> None:
    sys.stdout.write(_pretty(msgspec.json.encode(obj), indent=2).decode() + "\n")


async def _serve(app: "web.Application", host: str, port: int, cfg: Config) -> None:
    import asyncio
    import signal

    from aiohttp import web

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # lingering_time=0: a body refused before it was read is not drained.
    runner = web.AppRunner(app, shutdown_timeout=cfg.server.shutdown_timeout, lingering_time=0,
                           access_log=logging.getLogger("aiohttp.access") if cfg.server.access_log else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
        await site.start()
        print(f"gateway: listening on http://{host}:{port} (spool {os.path.abspath(cfg.storage.path)})",
              flush=True)
        await stop.wait()
        print("gateway: stopping: no new connections; finishing requests and sends", flush=True)
    finally:
        await runner.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.app import create_app

    cfg = _load(args.config)
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    app = create_app(cfg)
    try:
        import uvloop  # optional: the [fast] extra
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    from gateway.spool import StorageFailed

    with runner:
        try:
            runner.run(_serve(app, host, port, cfg))
        except (OSError, StorageFailed) as e:  # the port is taken, the spool cannot be opened
            print(f"gateway: cannot start: {e}", file=sys.stderr, flush=True)
            return 1
    print("gateway: stopped", flush=True)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.plugins import build

    cfg = _load(args.config)
    built = build(cfg)
    print(f"config {args.config}: OK")
    print(f"server: http://{cfg.server.host}:{cfg.server.port}  spool: {cfg.storage.path} "
          f"(max {cfg.storage.max_bytes} bytes)")
    print("sources:")
    for s in cfg.sources:
        print(f"  {s.name}: {len(s.write_keys)} write key(s), {'strict' if s.strict else 'lax'}")
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
    kind = "batch" if isinstance(doc, dict) and "batch" in doc else (doc.get("type") if isinstance(doc, dict) else None)
    if kind not in PATH_TYPES and kind not in BATCH_PATHS:
        print("gateway explain: give one call with a \"type\" (or a batch)", file=sys.stderr)
        return 2
    ingest = Ingest(cfg, built.source_transforms)
    try:
        prepared = ingest.prepare(kind, raw, {"Authorization": f"Bearer {source.write_keys[0]}"}, "127.0.0.1",
                                  datetime.now(timezone.utc))
    except RequestRejected as e:
        _print_json({"stored": False, "rejected": e.rejection})
        return 1
    out: dict[str, Any] = {"source": source.name,
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


def cmd_dlq(args: argparse.Namespace) -> int:
    from gateway.spool import open_dead_letters

    cfg = _load(args.config)
    try:
        store = open_dead_letters(cfg.storage)
    except FileNotFoundError as e:
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
            letters = store.replay(args.destination, args.id)
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

    s = with_config(sub.add_parser("serve", help="run the HTTP server and the delivery workers"))
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)
    c = with_config(sub.add_parser("check", help="validate the config and list what it uses"))
    c.set_defaults(func=cmd_check)
    e = with_config(sub.add_parser("explain", help="show what each destination would receive for one call"))
    e.add_argument("file", nargs="?", help="a JSON call (or batch); - or nothing reads standard input")
    e.add_argument("--source", help="the source the call comes from (default: the first)")
    e.set_defaults(func=cmd_explain)
    d = with_config(sub.add_parser("dlq", help="inspect and replay dead letters"))
    d.add_argument("action", choices=["list", "show", "replay"])
    d.add_argument("--destination")
    d.add_argument("--id", help="a messageId")
    d.set_defaults(func=cmd_dlq)
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
