"""What deduplication adds to the spool writer's commit (issue 13), against
a yardstick measured in the same run: one table keyed by messageId with a
time index, claimed with an upsert in the commit of the calls (what the
spool did before gateway/spool/message_ids.py).

    python bench/dedup.py [--ids 1000000] [--groups 20]

For a spool that already holds ``--ids`` messageIds, prints the median time
of one commit claiming a group of new ids (10: a turn of single calls; 3,000:
thirty 100-call batches), and the CPU a claimed id costs in all, with the
indexer's share for this design.  Each commit is fsync'd, as the writer's are."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.spool.message_ids import MessageIds  # noqa: E402
from gateway.spool.store import FILE, connect  # noqa: E402

WINDOW = 86400.0
GROUPS = (10, 3000)
FILL = 100_000  # ids a transaction while filling
_json = msgspec.json.Encoder()


def new_ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def yardstick(directory: Path, fill: int, groups: int) -> dict[int, tuple[float, float]]:
    conn = connect(directory / "table.sqlite3")
    conn.executescript("CREATE TABLE ids (id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;"
                       "CREATE INDEX ids_by_time ON ids (at);")
    for _ in range(0, fill, FILL):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO ids SELECT value, ?1 FROM json_each(?2) WHERE true",
                     (time.time() - 3600, _json.encode(new_ids(FILL))))
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    claim = ("INSERT INTO ids (id, at) SELECT value, ?1 FROM json_each(?2) WHERE true "
             "ON CONFLICT(id) DO UPDATE SET at = excluded.at WHERE ids.at < ?3 RETURNING id")
    out = {}
    for size in GROUPS:
        times, cpu = [], 0.0
        for _ in range(groups):
            ids = new_ids(size)
            c0, t0 = time.process_time(), time.perf_counter()
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(claim, (now, _json.encode(ids), now - WINDOW)).fetchall()
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
        out[size] = (statistics.median(times), cpu / (groups * size))
    conn.close()
    return out


def this_design(directory: Path, fill: int, groups: int) -> tuple[dict[int, tuple[float, float]], float]:
    file = directory / FILE
    conn = connect(file)
    known = MessageIds(conn, file)
    known.indexer.window = WINDOW
    for _ in range(0, fill, FILL):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO message_id_log (at, ids) VALUES (?, ?)", (time.time() - 3600,
                                                                              _json.encode(new_ids(FILL))))
        conn.execute("COMMIT")
        known.indexer.step()
    conn.execute("BEGIN")
    known.purge(WINDOW)
    conn.execute("COMMIT")
    out = {}
    for size in GROUPS:
        times, cpu = [], 0.0
        for _ in range(groups):
            ids: list[str | None] = list(new_ids(size))
            c0, t0 = time.process_time(), time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            known.claim(ids, time.time(), WINDOW)
            conn.execute("COMMIT")
            known.committed()
            times.append(time.perf_counter() - t0)
            cpu += time.process_time() - c0
        out[size] = (statistics.median(times), cpu / (groups * size))
    c0 = time.process_time()
    known.indexer.step()  # what the indexer thread does with them all, on its own connection and lock
    indexing = (time.process_time() - c0) / (groups * sum(GROUPS))
    known.close()
    conn.close()
    return out, indexing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=1_000_000, help="messageIds the spool holds already")
    ap.add_argument("--groups", type=int, default=20, help="commits measured for each group size")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gateway-dedup-bench-") as tmp:
        before = yardstick(Path(tmp), a.ids, a.groups)
        now, indexing = this_design(Path(tmp), a.ids, a.groups)
    print(f"spool holding {a.ids:,} messageIds; {a.groups} commits a group size, each fsync'd")
    print(f"{'':22} {'table keyed by id':>29} {'log + index (this design)':>30}")
    print(f"{'ids claimed a commit':22} {'commit ms':>12} {'CPU us an id':>16} {'commit ms':>12} "
          f"{'CPU us an id':>16} {'commit time ratio':>18}")
    for size in GROUPS:
        (t0, c0), (t1, c1) = before[size], now[size]
        print(f"{size:<22,} {t0 * 1000:12.2f} {c0 * 1e6:16.1f} {t1 * 1000:12.2f} {c1 * 1e6:16.1f} {t1 / t0:18.2f}")
    print(f"this design's indexer, later and beside the commits: {indexing * 1e6:.1f} us CPU an id "
          f"({a.groups * sum(GROUPS):,} ids in one transaction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
