"""The D1 feed measured: rows/s into the local D1 for a 10,000-row backfill, and change-to-visible latency.

A throw-away Postgres cluster and the local D1 server (d1local/: workerd's D1 behind Cloudflare's REST
API, on this machine). A reference table of ``--rows`` rows (bigint key, text, a number-like text,
numeric, timestamptz, boolean, NULLs) is created on the source and in D1 (``apply_schema``), then:

* backfill: ``D1Feed.run()`` from its start (checks, publication, slot with exported snapshot, copy)
  until it streams; the copy's own seconds and rows/s are reported apart (the table's progress);
* latency: ``--updates`` single-row updates on the source, one at a time, each timed from the
  moment its COMMIT returned until D1 answers the new value for that key (polled by key every
  ``--poll-ms`` ms through the D1 API; the poll's own round trip is part of the figure);
* then the feed is stopped and its slot and publication dropped, and D1 is compared with the
  source row by row.

Prints the machine/date line and a README-ready markdown table; exit 1 if a run failed or D1 differs.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from common import exit_cleanly_on_signals, log, machine_info  # noqa: E402

from proxy.cdc.d1feed import D1Feed, FeedOptions, TableProgress, feed_stop  # noqa: E402
from proxy.cdc.sqlconn import Endpoint, SqlConnection, resolve_endpoint  # noqa: E402
from proxy.config import parse_config  # noqa: E402
from proxy.d1.client import D1Client  # noqa: E402
from proxy.d1.local import LocalD1  # noqa: E402
from proxy.d1.schema import apply_schema, read_pg_tables, to_d1  # noqa: E402
from proxy.d1.writes import encode_row, read_keys, read_rows  # noqa: E402
from proxy.localpg import create_cluster  # noqa: E402

TABLE = "bench_cities"
SCHEMA = """
CREATE TABLE bench_cities (id int8 PRIMARY KEY, name text NOT NULL, code text, population int8,
                           area numeric(12, 2), founded timestamptz, capital bool, note text);
INSERT INTO bench_cities
SELECT 9007199254740000 + g, 'city ' || g, lpad((g % 1000)::text, 3, '0'), g * 1000, g * 1.25,
       '1900-01-01 00:00+00'::timestamptz + g * interval '1 day', CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END,
       CASE WHEN g % 4 = 0 THEN NULL ELSE 'note ' || md5(g::text) END
FROM generate_series(1, {rows}) g;
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def measure(endpoint: Endpoint, d1: LocalD1, rows: int, updates: int, poll: float) -> dict[str, float]:
    async with (
        D1Client(
            account_id=d1.account_id, database_id=d1.database_ids[0], token=d1.token, api_base=d1.api_base
        ) as client,
        await SqlConnection.connect(endpoint) as conn,
    ):
        (table,) = to_d1(await read_pg_tables(conn, [TABLE]))
        assert (await apply_schema(client, [table])).ok
        progress: list[TableProgress] = []
        feed = D1Feed("bench", [TABLE], endpoint, client, FeedOptions(), say=log, progress=progress.append)
        started = time.monotonic()
        task = asyncio.ensure_future(feed.run())
        while feed.phase != "streaming":
            if task.done():
                raise RuntimeError(f"the feed ended: {task.result().as_dict()}")
            await asyncio.sleep(0.005)
        to_streaming = time.monotonic() - started
        copy = progress[-1]
        assert copy.done and copy.rows == rows, copy
        log(f"backfill: {copy.rows:,} rows in {copy.seconds:.2f} s ({copy.rows_per_second:,.0f} rows/s); "
            f"start to streaming {to_streaming:.2f} s")  # fmt: skip

        latencies: list[float] = []
        keys = random.Random(8).sample(range(1, rows + 1), updates)
        name_at = table.position("name")
        for i, g in enumerate(keys):
            key = str(9007199254740000 + g)
            value = f"updated {i}"
            await conn.query(f"update {TABLE} set name = '{value}' where id = {key}")
            committed = time.monotonic()
            while True:
                found = (await read_keys(client, table, [[key]])).get((key,))
                if found is not None and found[name_at] == value:
                    break
                if time.monotonic() - committed > 30:
                    raise RuntimeError(f"update {i} not visible in D1 after 30 s")
                await asyncio.sleep(poll)
            latencies.append(time.monotonic() - committed)
        feed.request_stop()
        result = await task
        if result.exit_code != 0:
            raise RuntimeError(f"the feed failed: {result.error}")
        stopped = await feed_stop("bench", endpoint, client)
        if not stopped.ok:
            raise RuntimeError("; ".join(stopped.lines))

        cols = ", ".join(f'"{c.name}"::text' for c in table.columns)
        source = sorted(
            tuple(encode_row(table, r)) for r in await conn.query(f"select {cols} from {TABLE}")
        )  # (DateStyle ISO, the server default)
        target = sorted(await read_rows(client, table, limit=rows + 10))
        if source != target:
            raise RuntimeError(f"D1 differs from the source: {len(target)} rows vs {len(source)}")
    return {
        "rows": float(rows),
        "copy_s": copy.seconds,
        "copy_rows_per_s": copy.rows_per_second,
        "to_streaming_s": to_streaming,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "max_ms": max(latencies) * 1000,
        "min_ms": min(latencies) * 1000,
        "updates": float(len(latencies)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the reference table (default 10000)")
    parser.add_argument("--updates", type=int, default=50, help="single-row updates timed (default 50)")
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="synchronous_commit = off on the source (latency then includes the WAL writer's delay)",
    )
    parser.add_argument("--poll-ms", type=float, default=5.0, help="D1 poll interval while waiting (default 5 ms)")
    args = parser.parse_args()
    if args.rows < 1 or not 1 <= args.updates <= args.rows:
        parser.error("--rows must be at least 1 and --updates between 1 and --rows")
    exit_cleanly_on_signals()
    info = machine_info()
    # synchronous_commit on (Postgres' default; proxy.localpg turns it off for tests): with it off, a
    # commit reaches the WAL sender only when the WAL writer flushes (wal_writer_delay, 200 ms).
    settings = {"synchronous_commit": "on" if not args.async_commit else "off"}
    with create_cluster("bench-d1", settings=settings) as cluster, LocalD1.start() as d1:
        info["postgres"] = cluster.psql("show server_version").strip()
        cluster.psql(SCHEMA.format(rows=args.rows))
        config = parse_config({"backends": {"old": {"dsn": cluster.dsn()}}, "routing": {"primary": "old"}})
        endpoint = resolve_endpoint(config, "old")
        try:
            r = asyncio.run(measure(endpoint, d1, args.rows, args.updates, args.poll_ms / 1000))
        except RuntimeError as exc:
            log(f"FAILED: {exc}")
            return 1
    print()
    print(f"machine: {info['date']}, {info['machine']}, {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
          f"PostgreSQL {info['postgres']} (synchronous_commit {settings['synchronous_commit']}), local D1 "
          "(miniflare/workerd) on the same machine")  # fmt: skip
    print()
    print("| D1 feed, local D1 | figure |")
    print("|---|---:|")
    print(f"| backfill of {int(r['rows']):,} rows: copy | {r['copy_s']:.2f} s ({r['copy_rows_per_s']:,.0f} rows/s) |")
    print(f"| backfill: `d1 sync` start until streaming | {r['to_streaming_s']:.2f} s |")
    print(f"| change → visible in D1, {int(r['updates'])} single-row updates: p50 | {r['p50_ms']:.0f} ms |")
    print(f"| … p95 | {r['p95_ms']:.0f} ms |")
    print(f"| … max (min {r['min_ms']:.0f} ms) | {r['max_ms']:.0f} ms |")
    print()
    print("D1 equals the source row by row after the run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
