"""What dual write costs the client: pgbench TPC-B through pgshift with and without an async mirror.

Two throw-away clusters, "old" and "new", on this machine. Three targets, measured in the same run
and alternated round by round: ``direct`` (pgbench straight at old), ``pgshift`` (the proxy, primary
old, no mirrors) and ``pgshift+mirror`` (the same with ``mirrors = ["new"]``, async). Reports tps,
mean latency, the mirror/pgshift latency ratio (the issue expects <= 1.10 at 1 client), the proxy's
own CPU time per transaction, and the mirror's state after each mirrored run; at the end, old and
new must hold the same pgbench data (exit code 1 if not, or if any divergence was journaled).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/mirror.py` from a checkout: make `proxy` importable without installing it.
sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
from common import STARTUP_TIMEOUT, exit_cleanly_on_signals, log, read_tail, start_pgshift, stop_process, wait_for_port  # noqa: E402
from run import client_env, cpu_seconds, make_workdir  # noqa: E402

from proxy.errors import ClusterError  # noqa: E402
from proxy.localpg import LocalCluster, create_cluster, free_port  # noqa: E402

DIRECT, PGSHIFT, MIRROR = "direct", "pgshift", "pgshift+mirror"
TARGETS = (DIRECT, PGSHIFT, MIRROR)
MODES = ("simple", "extended", "prepared")
# One database per target, all initialised alike (pgbench -i is deterministic): writes of the
# unmirrored targets never reach "new", so the mirrored database stays comparable row for row.
DATABASES = {DIRECT: "bench_direct", PGSHIFT: "bench_pgshift", MIRROR: "bench_mirror"}
TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
BALANCE = {"pgbench_accounts": "abalance", "pgbench_branches": "bbalance", "pgbench_tellers": "tbalance"}
EXPECT_RATIO = 1.10  # the issue: the async mirror adds <= 10 % to the mean latency at 1 client

_TPS_RE = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding)", re.MULTILINE)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_TXNS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


@dataclass
class MirrorRun:
    """The mirror's state around one mirrored pgbench run (deltas over the run, levels at its end)."""

    committed: int = 0  # transactions the proxy handed to the mirrors
    applied: int = 0
    failed: int = 0
    diverged: int = 0
    unmirrored: int = 0  # journal entries of kind unmirrored + transactions a mirror did not get
    queued_at_end: int = 0  # when pgbench exited
    lag_at_end_s: float = 0.0
    drain_s: float | None = None  # from pgbench's exit until the queue was empty (None: timed out)
    max_queued: int = 0  # sampled during the run (--sample)
    max_lag_s: float = 0.0
    state: str = ""


@dataclass
class Run:
    round: int
    mode: str
    clients: int
    target: str
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    cpu_us_per_tx: float | None = None  # the proxy process: utime+stime over the run (+ drain) / transactions
    cpu_us_per_tx_run_only: float | None = None  # the same up to pgbench's exit (mirror: drain excluded)
    mirror: MirrorRun | None = None
    error: str | None = None


@dataclass
class Proxy:
    label: str
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def mirror_status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/api/mirror"
        with urllib.request.urlopen(url, timeout=10) as response:
            data: dict[str, Any] = json.load(response)
        return data


@dataclass
class Summary:
    mode: str
    clients: int
    tps: dict[str, float | None] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    cpu_us_per_tx: dict[str, float | None] = field(default_factory=dict)
    ratio: float | None = None  # median latency pgshift+mirror / median latency pgshift
    round_ratios: list[float] = field(default_factory=list)  # the same per round (paired runs)


# --- processes ---


def proxy_config(port: int, admin_port: int, old: LocalCluster, new: LocalCluster, *, mirrored: bool) -> str:
    # The two proxies differ only in [routing] mirrors; backends without a dbname: the client's
    # database passes through (and names the mirror's database too).
    lines = [
        "[listen]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "",
        "[admin]",
        'host = "127.0.0.1"',
        f"port = {admin_port}",
        "",
        "[proxy]",
        "shutdown_grace = 5",
        "",
    ]
    for name, cluster in (("old", old), ("new", new)):
        lines += [
            f"[backends.{name}]",
            f'dsn = "postgresql://127.0.0.1:{cluster.port}?sslmode=disable"',
            'mirror_user = "postgres"',
            "",
        ]
    lines += ["[routing]", 'primary = "old"', f"mirrors = {json.dumps(['new'] if mirrored else [])}", ""]
    if mirrored:
        lines += ["[mirror]", 'mode = "async"', ""]
    return "\n".join(lines)


@contextlib.contextmanager
def pgshift(label: str, workdir: Path, old: LocalCluster, new: LocalCluster, *, mirrored: bool) -> Iterator[Proxy]:
    pdir = workdir / label.replace("+", "_")
    pdir.mkdir()
    port, admin_port = free_port(), free_port()
    config = pdir / "pgshift.toml"
    config.write_text(proxy_config(port, admin_port, old, new, mirrored=mirrored))
    stderr_path = pdir / "stderr.log"
    proc = start_pgshift(config, stderr_path)
    try:
        for p in (port, admin_port):
            if not wait_for_port(p, proc):
                state = "exited" if proc.poll() is not None else f"no listener after {STARTUP_TIMEOUT:.0f}s"
                raise ClusterError(f"pgshift ({label}) did not start ({state})", detail=read_tail(stderr_path))
        yield Proxy(label, port, admin_port, proc, stderr_path)
    finally:
        stop_process(proc)


def pgbench_binary(cluster: LocalCluster) -> str:
    candidate = cluster.bindir / "pgbench"
    if candidate.exists():
        return str(candidate)
    return shutil.which("pgbench") or "pgbench"


# --- measuring ---


@dataclass
class PgbenchResult:
    tps: float
    latency_ms: float
    transactions: int
    failed: int


def run_pgbench(pgbench: str, port: int, dbname: str, mode: str, clients: int, seconds: int) -> PgbenchResult:
    # -n: no vacuum, and above all no TRUNCATE of pgbench_history through the proxy (we vacuum
    # directly on the backends before each run instead). Default script: TPC-B (sort of).
    argv = [pgbench, "-n", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds)]
    argv += ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", dbname]
    proc = subprocess.run(argv, capture_output=True, text=True, env=client_env(), timeout=seconds + 120, check=False)
    out = proc.stdout
    tps, lat, txns = _TPS_RE.search(out), _LAT_RE.search(out), _TXNS_RE.search(out)
    if proc.returncode != 0 or tps is None or lat is None or txns is None:
        raise RuntimeError(f"pgbench exit {proc.returncode}: {(proc.stderr or out).strip()[-800:]}")
    failed = _FAILED_RE.search(out)
    return PgbenchResult(
        float(tps.group(1)), float(lat.group(1)), int(txns.group(1)), int(failed.group(1)) if failed else 0
    )


def pgbench_init(pgbench: str, cluster: LocalCluster, dbname: str, scale: int) -> None:
    argv = [pgbench, "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", dbname]
    init = subprocess.run(argv, capture_output=True, text=True, env=client_env(), check=False)
    if init.returncode != 0:
        raise ClusterError(f"pgbench -i on {cluster.name}/{dbname} failed", detail=init.stderr.strip())


def vacuum(cluster: LocalCluster, dbname: str) -> None:
    """What pgbench itself does before a run (without -n), straight on the backend: vacuum the
    small hot tables so every run starts from the same state (history is not truncated)."""
    cluster.psql("vacuum pgbench_branches; vacuum pgbench_tellers;", dbname=dbname)


def fingerprint(cluster: LocalCluster, dbname: str) -> dict[str, str]:
    """Per table: row count, balance sum, and md5 of every row in a total order."""
    out = {}
    for table in TABLES:
        total = f"sum({BALANCE[table]})" if table in BALANCE else "sum(delta)"
        sql = (
            f"select count(*) || ' rows, sum ' || coalesce({total}, 0) || ', md5 ' || "
            f"md5(coalesce(string_agg(t::text, E'\\n' order by t::text), '')) from {table} t"
        )
        out[table] = cluster.psql(sql, dbname=dbname).strip()
    return out


def mirror_totals(status: dict[str, Any]) -> dict[str, Any]:
    """Counters of mirror "new" summed over its databases, and the levels of its queue."""
    totals: dict[str, Any] = {"committed": status.get("committed", 0)}
    mirror = next((m for m in status.get("mirrors", []) if m["name"] == "new"), None)
    dbs = mirror["databases"] if mirror else []
    totals["applied"] = sum(d["applied"] for d in dbs)
    totals["stream_failed"] = sum(d["failed"] for d in dbs)
    totals["queued"] = sum(d["queued"] for d in dbs)
    totals["lag"] = max((d["lag_seconds"] for d in dbs), default=0.0)
    totals["state"] = ",".join(sorted({d["state"] for d in dbs})) or "none"
    totals["detached"] = [d["detached"] for d in dbs if d["detached"]]
    totals["last_error"] = "; ".join(d["last_error"] for d in dbs if d["last_error"])
    for key in ("diverged", "failed", "unmirrored", "unmirrored_txns"):
        totals[key] = mirror[key] if mirror else 0
    totals["out_of_sync"] = mirror["out_of_sync"] if mirror else []
    return totals


class Sampler(threading.Thread):
    """GET /api/mirror every ``interval`` seconds while a run lasts: the largest queue and lag seen."""

    def __init__(self, proxy: Proxy, interval: float) -> None:
        super().__init__(name="mirror-sampler", daemon=True)
        self.proxy, self.interval = proxy, interval
        self.max_queued, self.max_lag = 0, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            with contextlib.suppress(OSError, ValueError):
                totals = mirror_totals(self.proxy.mirror_status())
                self.max_queued = max(self.max_queued, totals["queued"])
                self.max_lag = max(self.max_lag, totals["lag"])

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)


def wait_drained(proxy: Proxy, timeout: float) -> tuple[float | None, dict[str, Any]]:
    """Seconds until the mirror queue is empty (None on timeout), and the totals then. Polls
    every 10 ms at first, then every 50 ms (each poll costs the proxy a little CPU)."""
    began = time.monotonic()
    while True:
        totals = mirror_totals(proxy.mirror_status())
        waited = time.monotonic() - began
        if totals["queued"] == 0:
            return waited, totals
        if waited > timeout:
            return None, totals
        time.sleep(0.01 if waited < 0.2 else 0.05)


def measure(
    run: Run, pgbench: str, port: int, proxy: Proxy | None, seconds: int, drain_timeout: float, sample: float
) -> None:
    dbname = DATABASES[run.target]
    pid = proxy.proc.pid if proxy is not None else None
    before_totals = mirror_totals(proxy.mirror_status()) if run.target == MIRROR and proxy is not None else None
    sampler = Sampler(proxy, sample) if before_totals is not None and proxy is not None and sample > 0 else None
    cpu_before = cpu_seconds(pid)
    if sampler is not None:
        sampler.start()
    try:
        result = run_pgbench(pgbench, port, dbname, run.mode, run.clients, seconds)
    finally:
        if sampler is not None:
            sampler.stop()
    cpu_end = cpu_seconds(pid)
    run.tps, run.latency_ms = result.tps, result.latency_ms
    run.transactions, run.failed_transactions = result.transactions, result.failed
    cpu_after = cpu_end
    if before_totals is not None and proxy is not None:
        at_end = mirror_totals(proxy.mirror_status())
        drain, after = wait_drained(proxy, drain_timeout)
        cpu_after = cpu_seconds(pid)
        run.mirror = MirrorRun(
            committed=after["committed"] - before_totals["committed"],
            applied=after["applied"] - before_totals["applied"],
            failed=sum(after[k] - before_totals[k] for k in ("failed", "stream_failed")),
            diverged=after["diverged"] - before_totals["diverged"],
            unmirrored=sum(after[k] - before_totals[k] for k in ("unmirrored", "unmirrored_txns")),
            queued_at_end=at_end["queued"],
            lag_at_end_s=at_end["lag"],
            drain_s=drain,
            max_queued=max(sampler.max_queued if sampler else 0, at_end["queued"]),
            max_lag_s=max(sampler.max_lag if sampler else 0.0, at_end["lag"]),
            state=after["state"],
        )
        if after["last_error"]:
            log(f"    mirror last_error: {after['last_error']}")
    if result.transactions:
        if cpu_before is not None and cpu_end is not None:
            run.cpu_us_per_tx_run_only = (cpu_end - cpu_before) * 1e6 / result.transactions
        if cpu_before is not None and cpu_after is not None:
            run.cpu_us_per_tx = (cpu_after - cpu_before) * 1e6 / result.transactions


# --- reporting ---


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[Run], modes: Sequence[str], clients: Sequence[int]) -> list[Summary]:
    out = []
    for mode in modes:
        for c in clients:
            cell = [r for r in runs if r.mode == mode and r.clients == c and r.error is None]
            s = Summary(mode, c)
            for target in TARGETS:
                mine = [r for r in cell if r.target == target]
                s.tps[target] = _median([r.tps for r in mine])
                s.latency_ms[target] = _median([r.latency_ms for r in mine])
                s.cpu_us_per_tx[target] = _median([r.cpu_us_per_tx for r in mine])
            base, mirrored = s.latency_ms[PGSHIFT], s.latency_ms[MIRROR]
            s.ratio = mirrored / base if mirrored is not None and base else None
            by_round: dict[int, dict[str, float]] = {}
            for r in cell:
                if r.latency_ms is not None:
                    by_round.setdefault(r.round, {})[r.target] = r.latency_ms
            s.round_ratios = [
                v[MIRROR] / v[PGSHIFT] for _, v in sorted(by_round.items()) if MIRROR in v and v.get(PGSHIFT)
            ]
            out.append(s)
    return out


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 2) -> str:
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(["---"] * text_columns + ["---:"] * (len(headers) - text_columns)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_HEADERS = [
    "mode", "clients",
    "tps direct", "tps pgshift", "tps +mirror",
    "lat direct ms", "lat pgshift ms", "lat +mirror ms", "+mirror/pgshift lat",
    "cpu µs/tx pgshift", "cpu µs/tx +mirror",
]  # fmt: skip


def summary_rows(summaries: list[Summary]) -> list[list[str]]:
    return [
        [s.mode, str(s.clients)]
        + [_fmt(s.tps[t], ".0f") for t in TARGETS]
        + [_fmt(s.latency_ms[t], ".3f") for t in TARGETS]
        + [_fmt(s.ratio, ".3f"), _fmt(s.cpu_us_per_tx[PGSHIFT], ".1f"), _fmt(s.cpu_us_per_tx[MIRROR], ".1f")]
        for s in summaries
    ]


RUN_HEADERS = [
    "round", "mode", "clients", "target", "tps", "lat ms", "txns", "cpu µs/tx",
    "applied", "failed", "diverged", "unmirrored", "queued@end", "lag@end s", "max lag s", "drain s",
]  # fmt: skip


def run_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        if r.error is not None:
            rows.append([str(r.round), r.mode, str(r.clients), r.target, "FAILED", *[""] * (len(RUN_HEADERS) - 5)])
            continue
        m = r.mirror
        mirror_cells = [""] * 8
        if m is not None:
            drain = "TIMEOUT" if m.drain_s is None else f"{m.drain_s:.3f}"
            counts = [m.applied, m.failed, m.diverged, m.unmirrored, m.queued_at_end]
            mirror_cells = [*map(str, counts), f"{m.lag_at_end_s:.3f}", f"{m.max_lag_s:.3f}", drain]
        rows.append(
            [str(r.round), r.mode, str(r.clients), r.target, _fmt(r.tps, ".0f"), _fmt(r.latency_ms, ".3f"),
             str(r.transactions), _fmt(r.cpu_us_per_tx, ".1f"), *mirror_cells]
        )  # fmt: skip
    return rows


def machine_info(cluster: LocalCluster, pgbench: str) -> dict[str, str]:
    info = common.machine_info()
    info["postgres"] = cluster.psql("show server_version").strip()
    pgbench_version = subprocess.run([pgbench, "--version"], capture_output=True, text=True, check=False).stdout
    info["pgbench"] = pgbench_version.strip() or "n/a"
    with contextlib.suppress(OSError):
        info["load average (start)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return info


def proxy_log_problems(proxy: Proxy, limit: int = 12) -> list[str]:
    """Lines of the proxy's log that an operator would look at (errors, warnings, tracebacks)."""
    try:
        lines = proxy.stderr_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [line for line in lines if re.search(r"ERROR|WARNING|CRITICAL|Traceback|Exception", line)]
    return hits[:limit] + ([f"... and {len(hits) - limit} more"] if len(hits) > limit else [])


# --- main ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T per run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every target per cell (default 3)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default 1,8)")
    parser.add_argument("--modes", default="simple", help=f"comma-separated pgbench -M modes of {', '.join(MODES)}")
    parser.add_argument("--scale", type=int, default=1, help="pgbench -i -s (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="1-client pgbench per target first, s (default 2)")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="max wait for the mirror queue to empty")
    parser.add_argument("--sample", type=float, default=1.0, help="poll /api/mirror every N s during a run (0: off)")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON instead of tables")
    args = parser.parse_args(argv)
    common.client_and_mode_lists(parser, args, MODES)
    if args.rounds < 1 or args.seconds < 1 or args.scale < 1:
        parser.error("--rounds, --seconds and --scale must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_signals()
    runs: list[Run] = []
    problems: list[str] = []
    log_problems: dict[str, list[str]] = {}
    began = time.monotonic()

    with contextlib.ExitStack() as stack:
        log("creating clusters old and new ...")
        try:
            old = stack.enter_context(create_cluster("mirror-old"))
            new = stack.enter_context(create_cluster("mirror-new"))
        except ClusterError as exc:
            log(f"cluster failed: {exc}\n{exc.detail or ''}")
            return 1
        pgbench = pgbench_binary(old)
        info = machine_info(old, pgbench)

        try:
            for cluster, dbnames in ((old, list(DATABASES.values())), (new, [DATABASES[MIRROR]])):
                for dbname in dbnames:
                    cluster.psql(f"create database {dbname}")
                    log(f"pgbench -i -s {args.scale} on {cluster.name}/{dbname} ...")
                    pgbench_init(pgbench, cluster, dbname, args.scale)
            initial_old = fingerprint(old, DATABASES[MIRROR])
            initial_new = fingerprint(new, DATABASES[MIRROR])
        except ClusterError as exc:
            log(f"{exc}\n{exc.detail or ''}")
            return 1
        if initial_old != initial_new:
            log(f"pgbench -i gave different data on old and new:\nold {initial_old}\nnew {initial_new}")
            return 1
        log("initial data identical on old and new: " + "; ".join(f"{t} {v}" for t, v in initial_old.items()))

        workdir = make_workdir()
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        try:
            proxies = {
                PGSHIFT: stack.enter_context(pgshift(PGSHIFT, workdir, old, new, mirrored=False)),
                MIRROR: stack.enter_context(pgshift(MIRROR, workdir, old, new, mirrored=True)),
            }
        except ClusterError as exc:
            log(f"{exc}\n{exc.detail or ''}")
            return 1
        ports = {DIRECT: old.port, PGSHIFT: proxies[PGSHIFT].port, MIRROR: proxies[MIRROR].port}

        if args.warmup > 0:
            log(f"warm-up: {args.warmup}s of 1-client pgbench per target ...")
            for target in TARGETS:
                try:
                    run_pgbench(pgbench, ports[target], DATABASES[target], args.mode_list[0], 1, args.warmup)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    log(f"warm-up {target} failed: {exc}")
            wait_drained(proxies[MIRROR], args.drain_timeout)

        cells = [(m, c) for m in args.mode_list for c in args.client_list]
        total = args.rounds * len(cells) * len(TARGETS)
        n = 0
        for rnd in range(1, args.rounds + 1):
            for mode, clients in cells:
                # Targets back to back, in an order rotated every round: drift and "who runs first"
                # hit all three alike.
                shift = (rnd - 1) % len(TARGETS)
                for target in TARGETS[shift:] + TARGETS[:shift]:
                    n += 1
                    run = Run(rnd, mode, clients, target)
                    proxy = proxies.get(target)
                    try:
                        vacuum(old, DATABASES[target])
                        if target == MIRROR:
                            vacuum(new, DATABASES[target])
                        measure(run, pgbench, ports[target], proxy, args.seconds, args.drain_timeout, args.sample)
                        cpu = _fmt(run.cpu_us_per_tx, "6.1f")
                        line = f"{run.tps:8.0f} tps {run.latency_ms:7.3f} ms  cpu {cpu} µs/tx"
                        if run.mirror is not None:
                            m = run.mirror
                            line += (
                                f"  applied {m.applied} failed {m.failed} diverged {m.diverged} "
                                f"queued@end {m.queued_at_end} lag@end {m.lag_at_end_s:.3f}s "
                                f"drain {_fmt(m.drain_s, '.3f')}s"
                            )
                        log(f"[{n}/{total}] r{rnd} {mode:<8} c={clients:<2} {target:<15}{line}")
                    except (RuntimeError, subprocess.TimeoutExpired, OSError, ClusterError) as exc:
                        run.error = str(exc)
                        log(f"[{n}/{total}] r{rnd} {mode:<8} c={clients:<2} {target:<15} FAILED: {exc}")
                        problems.append(f"{target} r{rnd} {mode} c={clients}: {exc}")
                    runs.append(run)

        # The verdict on the data: everything the mirrored proxy committed on old must be on new.
        drain, final = wait_drained(proxies[MIRROR], args.drain_timeout)
        if drain is None:
            problems.append(f"mirror queue not empty after {args.drain_timeout:g}s: {final['queued']} queued")
        final_status = proxies[MIRROR].mirror_status()
        old_data, new_data = fingerprint(old, DATABASES[MIRROR]), fingerprint(new, DATABASES[MIRROR])
        # Stop the proxies now (not at exit) so their shutdown is in the logs we read.
        for proxy in proxies.values():
            stop_process(proxy.proc)
            if proxy.proc.returncode not in (0, None):
                problems.append(f"proxy {proxy.label} exited with code {proxy.proc.returncode}")
            log_problems[proxy.label] = proxy_log_problems(proxy)

    info["load average (end)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info["wall time"] = f"{time.monotonic() - began:.0f} s"
    same = {t: old_data[t] == new_data[t] for t in TABLES}
    journal = {key: final[key] for key in ("diverged", "failed", "unmirrored", "unmirrored_txns")}
    journal["out_of_sync tables"] = len(final["out_of_sync"])
    journal["detached"] = len(final["detached"])
    journal["recent entries"] = len(final_status.get("recent", []))
    journal_clean = not any(journal.values())
    mirrored_txns = sum(r.transactions or 0 for r in runs if r.target == MIRROR)
    applied_runs = sum(r.mirror.applied for r in runs if r.mirror is not None)
    summaries = summarise(runs, args.mode_list, args.client_list)
    ok = all(same.values()) and journal_clean and not problems

    if args.json:
        out = {
            "info": info,
            "args": {k: v for k, v in vars(args).items() if k not in ("client_list", "mode_list")},
            "runs": [asdict(r) for r in runs],
            "summary": [asdict(s) for s in summaries],
            "data": {"old": old_data, "new": new_data, "same": same},
            "mirror_final": {"totals": final, "journal": journal, "recent": final_status.get("recent", [])},
            "problems": problems,
            "proxy_log": log_problems,
            "ok": ok,
        }
        print(json.dumps(out, indent=2, default=str))
        return 0 if ok else 1

    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(
        f"pgbench TPC-B (default script), -M {','.join(args.mode_list)}, scale {args.scale}, "
        f"{args.seconds}s per run, {args.rounds} rounds (medians below); -j min(clients, 2)"
    )
    print()
    print(render(RUN_HEADERS, run_rows(runs)))
    print()
    rows = summary_rows(summaries)
    print(render(SUMMARY_HEADERS, rows))
    print()
    print(markdown(SUMMARY_HEADERS, rows))
    print()
    print("cpu µs/tx: the proxy process's utime+stime (/proc/PID/stat) / pgbench's transactions; for +mirror")
    print("measured until the mirror queue drained, so it includes applying the writes on new.")
    for s in summaries:
        per_round = " ".join(f"{x:.3f}" for x in s.round_ratios)
        line = f"{s.mode} c={s.clients}: +mirror/pgshift latency {_fmt(s.ratio, '.3f')} (per round: {per_round})"
        if s.clients == 1:
            met = s.ratio is not None and s.ratio <= EXPECT_RATIO
            line += f" -> expectation <= {EXPECT_RATIO:.2f} at 1 client {'MET' if met else 'NOT MET'}"
        print(line)
    print()
    print(f"mirror: {mirrored_txns} transactions through the mirrored proxy in measured runs, {applied_runs} applied")
    print(f"mirror journal (final): {', '.join(f'{k} {v}' for k, v in journal.items())}")
    print(f"data old vs new ({DATABASES[MIRROR]}):")
    for table in TABLES:
        print(f"  {table:<17} {'same' if same[table] else 'DIFFERENT'}  old {old_data[table]}")
        if not same[table]:
            print(f"  {'':<17}            new {new_data[table]}")
    for label, hits in log_problems.items():
        if hits:
            print(f"\nproxy {label} log (errors/warnings):")
            print("\n".join(f"  {h}" for h in hits))
    for problem in problems:
        print(f"problem: {problem}")
    print()
    print("VERDICT: " + ("old and new identical, no divergence journaled" if ok else "FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
