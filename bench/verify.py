"""`pgshift verify` measured: checksum verification against fetching and comparing every row client-side.

Two throw-away clusters "old" and "new" on this machine, each initialised with ``pgbench -i -s
SCALE`` (deterministic data: the same rows on both), then a few known differences injected on new
(a missing row, an extra row, a changed balance, trailing whitespace in a filler). In the same run,
alternating the order round by round:

* ``checksum``: ``pgshift verify --mode checksum`` -- chunk digests computed in both databases,
  drill-down into the mismatching chunks only;
* ``full``: ``pgshift verify --mode full`` -- every row of both sides fetched (as canonical text)
  and compared here, by key: what a client-side comparison costs.

Both must find exactly the injected differences. Prints a markdown table (seconds, rows/s) and the
ratio; exit code 1 if a run failed, found something else, or the ratio is below --expect.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from common import exit_cleanly_on_signals, log, machine_info  # noqa: E402

from proxy.cdc.sqlconn import Endpoint, resolve_endpoint  # noqa: E402
from proxy.config import parse_config  # noqa: E402
from proxy.localpg import LocalCluster, create_cluster  # noqa: E402
from proxy.verify.report import VerifyReport  # noqa: E402
from proxy.verify.verify import VerifyOptions, verify  # noqa: E402

INJECT = """
delete from pgbench_accounts where aid = 123;
insert into pgbench_accounts values ({extra}, 1, 0, '');
update pgbench_accounts set abalance = 42 where aid = {mid};
update pgbench_accounts set filler = rpad(filler, 80) || 'x' where aid = {last};
"""
SETTINGS = {"shared_buffers": "512MB", "max_wal_size": "4GB", "checkpoint_timeout": "30min"}


def expected(scale: int) -> set[tuple[str, str]]:
    rows = scale * 100_000
    return {("only_in_source", "123"), ("only_in_target", str(rows + 1)), ("different", str(rows // 2)),
            ("different", str(rows))}  # fmt: skip


def pgbench_init(cluster: LocalCluster, scale: int) -> None:
    pgbench = shutil.which("pgbench", path=str(cluster.bindir)) or "pgbench"
    argv = [pgbench, "-i", "-q", "-s", str(scale), "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres"]
    subprocess.run([*argv, "postgres"], check=True, capture_output=True)
    cluster.psql("vacuum analyze")


def endpoints(old: LocalCluster, new: LocalCluster) -> tuple[Endpoint, Endpoint]:
    config = parse_config(
        {
            "backends": {
                "old": {"dsn": old.dsn(user="", dbname=""), "mirror_user": "postgres"},
                "new": {"dsn": new.dsn(user="", dbname=""), "mirror_user": "postgres"},
            },
            "routing": {"primary": "old"},
        }
    )
    return resolve_endpoint(config, "old"), resolve_endpoint(config, "new")


def found(report: VerifyReport) -> set[tuple[str, str]]:
    return {(d.kind, str(d.key[0])) for t in report.tables for d in t.differences}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale (100,000 accounts each; default 50)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each running both modes (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="verify --workers (default 2)")
    parser.add_argument("--chunk-rows", type=int, default=50_000, help="verify --chunk-rows (default 50000)")
    parser.add_argument("--expect", type=float, default=10.0, help="minimum checksum/full speed ratio (default 10)")
    args = parser.parse_args()
    exit_cleanly_on_signals()
    info = machine_info()
    log(f"machine: {info}")
    clusters: list[LocalCluster] = []
    failed = False
    results: dict[str, list[tuple[float, int]]] = {"checksum": [], "full": []}
    try:
        old = create_cluster("bench-verify-old", settings=SETTINGS)
        clusters.append(old)
        new = create_cluster("bench-verify-new", settings=SETTINGS)
        clusters.append(new)
        began = time.monotonic()
        for cluster in (old, new):
            pgbench_init(cluster, args.scale)
        rows = args.scale * 100_000
        new.psql(INJECT.format(extra=rows + 1, mid=rows // 2, last=rows))
        log(f"pgbench -i -s {args.scale} on both, differences injected: {time.monotonic() - began:.1f} s")
        source, target = endpoints(old, new)
        want = expected(args.scale)
        for number in range(args.rounds):
            order = ("checksum", "full") if number % 2 == 0 else ("full", "checksum")
            for mode in order:
                options = VerifyOptions(
                    mode=mode,  # type: ignore[arg-type]
                    workers=args.workers, chunk_rows=args.chunk_rows, rechecks=0, statement_timeout=None,
                )  # fmt: skip
                start = time.monotonic()
                report = asyncio.run(verify(source, target, options))
                seconds = time.monotonic() - start
                got = found(report)
                log(f"round {number + 1} {mode}: {seconds:.1f} s, {report.rows_compared:,} rows, found {sorted(got)}")
                if got != want or not report.complete:
                    log(f"  FAILED: expected {sorted(want)}")
                    failed = True
                results[mode].append((seconds, report.rows_compared))
    finally:
        for cluster in reversed(clusters):
            cluster.destroy()

    def best(mode: str) -> tuple[float, int]:
        return min(results[mode]) if results[mode] else (float("nan"), 0)

    (cs, crows), (fs, frows) = best("checksum"), best("full")
    ratio = fs / cs if cs else 0.0
    print(f"pgshift verify, pgbench scale {args.scale} ({crows:,} rows over 4 tables) on both sides, "
          f"{args.workers} workers, chunks of {args.chunk_rows:,} rows; {info['date']}, {info['nproc']} CPU "
          f"({info['cpu']}), both clusters on this machine; best of {args.rounds} round(s):")  # fmt: skip
    print()
    print("| mode | time | rows/s | differences found |")
    print("|---|---:|---:|---|")
    print(f"| checksum (in the databases) | {cs:.1f} s | {crows / cs:,.0f} | 4 of 4 |")
    print(f"| full (every row fetched and compared client-side) | {fs:.1f} s | {frows / fs:,.0f} | 4 of 4 |")
    print()
    print(f"checksum is {ratio:.1f}x faster than the client-side comparison (expected >= {args.expect:g}x)")
    if ratio < args.expect:
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
