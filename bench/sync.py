"""`pgshift sync` measured: backfill throughput against `pgcopydb clone`, and the stream under pgbench TPC-B.

Throw-away clusters "old" and "new" on this machine. ``pgbench -i -s SCALE`` on old (plus
``hid bigserial primary key`` on pgbench_history, which a sync needs), then, in the same run and in
an order alternated round by round, the same data copied to a fresh database on new by:

* ``pgcopydb``: ``pgcopydb clone --table-jobs 4 --index-jobs 4`` (schema, data, indexes, vacuum);
* ``pgshift sync``: ``python -m proxy sync start --schema --workers 4`` into an empty database, like
  pgcopydb clone: the source's schema (pg_dump pre-data), the copy, then the keys and indexes
  (post-data), timed until ``sync status`` reports phase streaming;
* ``pgshift copy+pk``: like with like for pgcopydb: the tables created without indexes, pgshift's copy
  (the very function ``sync start`` runs), then the primary keys built afterwards.

Then the stream: with a sync streaming, ``pgbench -c 8 -j 2 -T SECONDS`` (TPC-B) on old, its lag sampled
every second; the time until new holds every transaction after pgbench ends (the issue: lag < 1 s at the
end); old and new compared row by row (md5 over the 4 tables in key order). Exit code 1 if they differ or a
run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/sync.py` from a checkout: make `proxy` importable without installing it.
sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
from common import exit_cleanly_on_signals, log, read_tail, stop_process  # noqa: E402
from run import client_env, cpu_seconds, make_workdir  # noqa: E402

from proxy.cdc.backfill import backfill  # noqa: E402
from proxy.cdc.sqlconn import Endpoint, resolve_endpoint  # noqa: E402
from proxy.cdc.sync import sync_status  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.errors import ClusterError, PgShiftError  # noqa: E402
from proxy.localpg import LocalCluster, create_cluster  # noqa: E402

PGCOPYDB, SYNC, COPYPK = "pgcopydb", "pgshift sync", "pgshift copy+pk"
TOOLS = (PGCOPYDB, COPYPK, SYNC)
DB_OLD = "bench"
DATABASES = {PGCOPYDB: "bench_pgcopydb", SYNC: "bench_sync", COPYPK: "bench_copypk"}
KEYS = {"pgbench_accounts": "aid", "pgbench_branches": "bid", "pgbench_tellers": "tid", "pgbench_history": "hid"}
EXPECT_RATIO = 1.0  # the issue: backfill throughput >= 1.0 x pgcopydb
EXPECT_LAG = 1.0  # the issue: lag under 1 s at the end of pgbench
INSTALL_PGCOPYDB = (
    "pgcopydb not found on PATH. Install it: `apt-get install -y pgcopydb` (Debian 12 / Ubuntu 22.04 and later "
    "package it; it needs pg_dump/pg_restore of the server's major version), or see "
    "https://github.com/dimitri/pgcopydb. Or run with --skip-pgcopydb to measure pgshift alone."
)

# What `sync start` says when `sync stop --force` terminates its walsender: expected here, not a problem.
FORCED = "terminating connection due to administrator command"
_TPS_RE = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding)", re.MULTILINE)
_TXNS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
# "4 table(s): 5000550 rows, 608.2 MB in 14.2 s (352,154 rows/s, 42.8 MB/s)"
_BACKFILL_RE = re.compile(r"^(\d+) table\(s\): (\d+) rows, ([0-9.]+) MB in ([0-9.]+) s", re.MULTILINE)
# pgcopydb's summary: "  COPY (cumulative)    both    423ms    4"
_STEP_RE = re.compile(r"^\s*(.+?)\s{2,}(source|target|both)\s+(\S+)\s+(.+?)\s*$", re.MULTILINE)
# pgcopydb's per-table lines: " 16390 | public | pgbench_accounts | 370ms | 1 | 163ms"
_TABLE_RE = re.compile(r"^\s*\d+\s*\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*(\S+)\s*$", re.MULTILINE)


def pg_duration(text: str) -> float | None:
    """pgcopydb's durations ("621ms", "1s035", "2m03s", "1h02m") in seconds."""
    if m := re.fullmatch(r"(\d+)ms", text):
        return int(m.group(1)) / 1000
    if m := re.fullmatch(r"(\d+)s(\d+)", text):
        return int(m.group(1)) + int(m.group(2)) / 1000
    if m := re.fullmatch(r"(\d+)s", text):  # from 10 s on, whole seconds
        return int(m.group(1))
    if m := re.fullmatch(r"(\d+)m(\d+)s", text):
        return int(m.group(1)) * 60 + int(m.group(2))
    if m := re.fullmatch(r"(\d+)h(\d+)m", text):
        return int(m.group(1)) * 3600 + int(m.group(2)) * 60
    return None


@dataclass
class BackfillRun:
    round: int
    tool: str
    seconds: float | None = None  # wall clock of the whole tool run, as a user waits for it
    rows: int = 0  # source rows (the same for every tool)
    mb: float = 0.0  # source heap size, MB (pg_table_size of the 4 tables: data + TOAST, no indexes)
    rows_per_s: float | None = None
    mb_per_s: float | None = None
    phases: dict[str, float | None] = field(default_factory=dict)  # seconds of parts of the run
    target_rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Sample:
    t: float  # seconds since pgbench started
    lag_bytes: int | None  # slot: source WAL end - confirmed_flush_lsn (confirmed every ~1 s)
    lag_seconds: float | None  # as the sync last recorded it (age of the oldest unapplied commit)
    behind: int | None  # pgbench_history rows on old minus on new (= TPC-B transactions not yet on new)


@dataclass
class Streaming:
    clients: int
    seconds: int
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    samples: list[Sample] = field(default_factory=list)
    max_lag_bytes: int | None = None
    max_lag_seconds: float | None = None
    max_behind: int | None = None
    sync_cpu_percent: float | None = None  # the sync process's CPU over pgbench's run, % of one CPU
    new_cpu_percent: float | None = None  # the new cluster's server processes (the apply's backend), the same
    old_cpu_percent: float | None = None  # the old cluster's (pgbench's backends and the walsender), the same
    end_lag_bytes: int | None = None
    end_lag_seconds: float | None = None  # the sync's own figure when pgbench exited
    end_behind: int | None = None
    catchup_s: float | None = None  # pgbench's exit -> new holds every transaction (None: timed out)
    lag_zero_s: float | None = None  # pgbench's exit -> the slot's lag reads 0 bytes
    met: bool = False
    error: str | None = None


# --- processes ---


class Children:
    """Every child process in its own session (Ctrl-C reaches only us); all stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], *, stdout: Any, stderr: Any, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env=env, cwd=cwd, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> tuple[int, str, str]:  # fmt: skip
        proc = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            stop_process(proc)
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def pgshift_env() -> dict[str, str]:
    env = client_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def tool(cluster: LocalCluster, name: str) -> str:
    candidate = cluster.bindir / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def sync_argv(config: Path, action: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "sync", action, "--from", "old", "--to", "new", "--config", str(config),
            *args]  # fmt: skip


def write_config(path: Path, old: LocalCluster, new: LocalCluster) -> None:
    """Backends old (bench), new (the sync's database) and newpk (copy+pk's), as `sync` reads them."""
    dsns = {"old": old.dsn(dbname=DB_OLD), "new": new.dsn(dbname=DATABASES[SYNC]),
            "newpk": new.dsn(dbname=DATABASES[COPYPK])}  # fmt: skip
    text = "".join(f'[backends.{name}]\ndsn = "{dsn}"\nmirror_user = "postgres"\n\n' for name, dsn in dsns.items())
    path.write_text(text + '[routing]\nprimary = "old"\n')


def endpoints(config: Path, target: str = "new") -> tuple[Endpoint, Endpoint]:
    cfg = load_config(config)
    return resolve_endpoint(cfg, "old"), resolve_endpoint(cfg, target)


def status(config: Path) -> dict[str, Any]:
    """`sync status --json`, in-process (the same report, without an interpreter start per sample)."""
    source, target = endpoints(config)
    report = asyncio.run(sync_status(source, target))
    result: dict[str, Any] = report.as_dict()
    return result


def recreate(cluster: LocalCluster, dbname: str) -> None:
    cluster.psql(f"drop database if exists {dbname} with (force)")
    cluster.psql(f"create database {dbname}")


def make_schema(children: Children, cluster: LocalCluster, dbname: str, *, keys: bool) -> None:
    """The pgbench tables (as on old, hid included), with or without their primary keys."""
    argv = [tool(cluster, "pgbench"), "-i", "-q", "-I", "dtp" if keys else "dt", cluster.dsn(dbname=dbname)]
    code, _, err = children.run(argv, timeout=120, env=client_env())
    if code != 0:
        raise ClusterError(f"pgbench -i -I on {cluster.name}/{dbname} failed", detail=err)
    hid = "hid bigserial primary key" if keys else "hid bigserial"
    cluster.psql(f"alter table pgbench_history add column {hid}", dbname=dbname)


def add_keys_sql() -> str:
    return "".join(f"alter table {t} add primary key ({k});\n" for t, k in KEYS.items())


def counts(cluster: LocalCluster, dbname: str) -> dict[str, int]:
    sql = " union all ".join(f"select '{t}', count(*) from {t}" for t in KEYS)
    out = cluster.psql(sql, dbname=dbname)
    return {t: int(n) for t, n in (line.split("|") for line in out.split())}


def fingerprint(cluster: LocalCluster, dbname: str) -> dict[str, str]:
    """Per table: rows, and md5 over every row in key order (md5 of per-100,000-key group md5s, so no
    single string grows past memory limits)."""
    out = {}
    for table, key in KEYS.items():
        sql = (
            f"select sum(n) || ' rows, md5 ' || md5(coalesce(string_agg(h, '' order by g), '')) from ("
            f"select {key} / 100000 g, count(*) n, md5(string_agg(t::text, E'\\n' order by {key})) h "
            f"from {table} t group by 1) s"
        )
        text = cluster.psql(sql, dbname=dbname).strip()
        out[table] = text if text and not text.startswith(" rows") else "0 rows"
    return out


# --- the three backfills ---


def run_pgcopydb(run: BackfillRun, children: Children, old: LocalCluster, new: LocalCluster, workdir: Path,
                 extra: Sequence[str]) -> list[str]:  # fmt: skip
    dbname = DATABASES[PGCOPYDB]
    recreate(new, dbname)
    work = workdir / f"pgcopydb-{run.round}"
    argv = ["pgcopydb", "clone", "--source", old.dsn(dbname=DB_OLD), "--target", new.dsn(dbname=dbname),
            "--table-jobs", "4", "--index-jobs", "4", *extra, "--dir", str(work)]  # fmt: skip
    env = client_env()
    env["PATH"] = os.pathsep.join([str(old.bindir), env.get("PATH", "")])  # pg_dump/pg_restore of the server
    began = time.monotonic()
    code, out, err = children.run(argv, timeout=3600, env=env)
    run.seconds = time.monotonic() - began
    shutil.rmtree(work, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"pgcopydb exit {code}: {(err or out).strip()[-1500:]}")
    steps = {m.group(1).strip(): pg_duration(m.group(3)) for m in _STEP_RE.finditer(out)}
    copies = [pg_duration(m.group(3)) for m in _TABLE_RE.finditer(out)]
    run.phases = {
        "pgcopydb total (own)": steps.get("Total Wall Clock Duration"),
        "dump+prepare schema": sum(steps.get(k) or 0 for k in ("Dump Schema", "Prepare Schema")) or None,
        "copy+index+vacuum wall": steps.get("COPY, INDEX, CONSTRAINTS, VACUUM (wall clock)"),
        "longest table copy": max((c for c in copies if c is not None), default=None),
        "copy cumulative": steps.get("COPY (cumulative)"),
        "index cumulative": steps.get("CREATE INDEX, CONSTRAINTS (cumulative)"),
        "finalize schema": steps.get("Finalize Schema"),
    }
    return argv


SYNC_ARGS = ("start", "--schema", "--workers", "4", "--status-interval", "1")


def start_sync(children: Children, config: Path, logfile: Path) -> subprocess.Popen[bytes]:
    with logfile.open("wb") as err:
        return children.spawn(sync_argv(config, *SYNC_ARGS),
                              stdout=subprocess.DEVNULL, stderr=err, env=pgshift_env(), cwd=REPO_ROOT)  # fmt: skip


def wait_streaming(proc: subprocess.Popen[bytes], config: Path, logfile: Path, timeout: float) -> dict[str, Any]:
    """Poll `sync status` (every 0.25 s) until phase streaming with the slot active."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sync start ended (exit {proc.returncode}):\n{read_tail(logfile)}")
        with contextlib.suppress(PgShiftError, OSError):
            report = status(config)
            if report["phase"] == "streaming" and report["slot"] and report["slot"]["active"]:
                return report
        time.sleep(0.25)
    raise RuntimeError(f"sync not streaming after {timeout:.0f} s:\n{read_tail(logfile)}")


def stop_sync(children: Children, proc: subprocess.Popen[bytes], config: Path) -> tuple[int, str]:
    """`sync stop --force` (terminates the walsender, drops slot and publication), then the process ends."""
    code, out, err = children.run(sync_argv(config, "stop", "--force"), timeout=120, env=pgshift_env(), cwd=REPO_ROOT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop_process(proc)
    if code != 0:
        raise RuntimeError(f"sync stop --force exit {code}: {(err or out).strip()}")
    return proc.returncode, out.strip()


def run_sync(run: BackfillRun, children: Children, new: LocalCluster, config: Path, workdir: Path,
             timeout: float) -> tuple[subprocess.Popen[bytes], Path]:  # fmt: skip
    dbname = DATABASES[SYNC]
    recreate(new, dbname)  # empty: --schema copies the schema
    logfile = workdir / f"sync-{run.round}.log"
    began = time.monotonic()
    proc = start_sync(children, config, logfile)
    wait_streaming(proc, config, logfile, timeout)
    run.seconds = time.monotonic() - began
    cpu = cpu_seconds(proc.pid)
    summary = _BACKFILL_RE.search(logfile.read_text(errors="replace"))
    copy = float(summary.group(4)) if summary else None
    run.phases = {
        "copy (its own report)": copy,
        "check, schema, slot, keys, stream start": run.seconds - copy if copy is not None else None,
        "copy MB (binary COPY payload)": float(summary.group(3)) if summary else None,
        "pgshift process CPU": cpu,
    }
    return proc, logfile


def run_copypk(run: BackfillRun, children: Children, new: LocalCluster, config: Path) -> None:
    dbname = DATABASES[COPYPK]
    recreate(new, dbname)
    began = time.monotonic()
    make_schema(children, new, dbname, keys=False)
    schema = time.monotonic()
    source, target = endpoints(config, "newpk")
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    report = asyncio.run(backfill(source, target, None, workers=4))
    copied = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_SELF)
    new.psql(add_keys_sql(), dbname=dbname)
    done = time.monotonic()
    run.seconds = done - began
    used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    run.phases = {"create tables": schema - began, "copy": copied - schema, "add primary keys": done - copied,
                  "copy MB (binary COPY payload)": report.bytes / 1e6, "pgshift CPU during the copy": used}  # fmt: skip


# --- the stream under load ---


class Sampler(threading.Thread):
    """Every ``interval`` s: `sync status` (slot lag bytes, the sync's lag seconds) and how many
    pgbench_history rows new still lacks (each TPC-B transaction inserts one)."""

    def __init__(self, config: Path, old: LocalCluster, new: LocalCluster, interval: float = 1.0) -> None:
        super().__init__(name="lag-sampler", daemon=True)
        self.config, self.interval = config, interval
        self.old_dsn, self.new_dsn = old.dsn(dbname=DB_OLD), new.dsn(dbname=DATABASES[SYNC])
        self.samples: list[Sample] = []
        self.began = time.monotonic()
        self._halt = threading.Event()

    def sample(self) -> Sample:
        import psycopg

        lag_bytes = lag_seconds = behind = None
        with contextlib.suppress(PgShiftError, OSError):
            report = status(self.config)
            lag_bytes, lag_seconds = report["lag_bytes"], report["lag_seconds"]
        with contextlib.suppress(psycopg.Error):
            # new first: rows reach new only after old, so the difference is never understated.
            with psycopg.connect(self.new_dsn, autocommit=True) as conn:
                on_new = conn.execute("select count(*) from pgbench_history").fetchone()
            with psycopg.connect(self.old_dsn, autocommit=True) as conn:
                on_old = conn.execute("select count(*) from pgbench_history").fetchone()
            if on_new and on_old:
                behind = on_old[0] - on_new[0]
        return Sample(round(time.monotonic() - self.began, 2), lag_bytes, lag_seconds, behind)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.samples.append(self.sample())

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def cluster_cpu(cluster: LocalCluster) -> float | None:
    """CPU seconds of the cluster: its postmaster's own and its reaped children's (cutime+cstime: backends
    that exited, pgbench's among them), plus the children alive now."""
    try:
        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if pid == postmaster:
                total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
            if pid == postmaster or int(fields[1]) == postmaster:
                total += cpu_seconds(pid) or 0.0
    return total


def stream_under_load(result: Streaming, children: Children, old: LocalCluster, new: LocalCluster, config: Path,
                      timeout: float, sync_pid: int) -> list[str]:  # fmt: skip
    import psycopg

    # What pgbench does itself without -n (vacuum the small hot tables), straight on old.
    old.psql("vacuum pgbench_branches; vacuum pgbench_tellers;", dbname=DB_OLD)
    argv = [tool(old, "pgbench"), "-n", "-c", str(result.clients), "-j", "2", "-T", str(result.seconds),
            "-h", "127.0.0.1", "-p", str(old.port), "-U", "postgres", DB_OLD]  # fmt: skip
    sampler = Sampler(config, old, new)
    sampler.start()
    cpu_before, new_before, started = cpu_seconds(sync_pid), cluster_cpu(new), time.monotonic()
    old_before = cluster_cpu(old)
    try:
        code, out, err = children.run(argv, timeout=result.seconds + 300, env=client_env())
        ended = time.monotonic()
        cpu_after, new_after, old_after = cpu_seconds(sync_pid), cluster_cpu(new), cluster_cpu(old)
        at_end = sampler.sample()
    finally:
        sampler.stop()
    tps, txns, lat = _TPS_RE.search(out), _TXNS_RE.search(out), _LAT_RE.search(out)
    if code != 0 or tps is None or txns is None:
        raise RuntimeError(f"pgbench exit {code}: {(err or out).strip()[-800:]}")
    result.tps, result.transactions = float(tps.group(1)), int(txns.group(1))
    result.latency_ms = float(lat.group(1)) if lat else None
    result.samples = [*sampler.samples, at_end]
    if cpu_before is not None and cpu_after is not None:
        result.sync_cpu_percent = 100 * (cpu_after - cpu_before) / (ended - started)
    if new_before is not None and new_after is not None:
        result.new_cpu_percent = 100 * (new_after - new_before) / (ended - started)
    if old_before is not None and old_after is not None:
        result.old_cpu_percent = 100 * (old_after - old_before) / (ended - started)
    result.end_lag_bytes, result.end_lag_seconds, result.end_behind = (
        at_end.lag_bytes,
        at_end.lag_seconds,
        at_end.behind,
    )
    result.max_lag_bytes = max((s.lag_bytes for s in result.samples if s.lag_bytes is not None), default=None)
    result.max_lag_seconds = max((s.lag_seconds for s in result.samples if s.lag_seconds is not None), default=None)
    result.max_behind = max((s.behind for s in result.samples if s.behind is not None), default=None)

    # Data-level catch-up: pgbench has exited, so old's history count is final.
    final = counts(old, DB_OLD)["pgbench_history"]
    deadline = ended + timeout
    with psycopg.connect(new.dsn(dbname=DATABASES[SYNC]), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("select count(*) from pgbench_history").fetchone()
            if row and row[0] >= final:
                result.catchup_s = time.monotonic() - ended
                break
            time.sleep(0.02)
    while time.monotonic() < deadline:
        report = status(config)
        if report["lag_bytes"] == 0:
            result.lag_zero_s = time.monotonic() - ended
            break
        time.sleep(0.1)
    result.met = result.catchup_s is not None and result.catchup_s < EXPECT_LAG
    return argv


# --- reporting ---


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(headers) - left)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def summarise(runs: list[BackfillRun], tools: Sequence[str]) -> list[dict[str, Any]]:
    base = _median([r.seconds for r in runs if r.tool == PGCOPYDB and r.error is None])
    out = []
    for name in tools:
        mine = [r for r in runs if r.tool == name and r.error is None]
        seconds = _median([r.seconds for r in mine])
        rows, mb = (mine[0].rows, mine[0].mb) if mine else (0, 0.0)
        ratio = base / seconds if base and seconds else None
        out.append({"tool": name, "runs": len(mine), "seconds": seconds,
                    "rows_per_s": rows / seconds if seconds else None, "mb_per_s": mb / seconds if seconds else None,
                    "throughput_vs_pgcopydb": ratio,
                    "per_round": [base / r.seconds if base and r.seconds else None for r in mine]})  # fmt: skip
    return out


def machine_info(old: LocalCluster) -> dict[str, str]:
    info = common.machine_info()
    info["postgres"] = old.psql("show server_version").strip()

    def version(argv: list[str]) -> str:
        with contextlib.suppress(OSError):
            out = subprocess.run(argv, capture_output=True, text=True, check=False)
            return (out.stdout.strip() or out.stderr.strip()).splitlines()[0] if (out.stdout or out.stderr) else "n/a"
        return "not installed"

    info["pgbench"] = version([tool(old, "pgbench"), "--version"])
    info["pgcopydb"] = (
        version(["pgcopydb", "--version"]).split(" from ")[0] if shutil.which("pgcopydb") else "not installed"
    )
    info["pg_dump"] = version([tool(old, "pg_dump"), "--version"])
    with contextlib.suppress(OSError):
        info["load average (start)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return info


def log_problems(path: Path, limit: int = 12) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [
        f"{path.name}: {line}"
        for line in lines
        if re.search(r"ERROR|WARNING|CRITICAL|Traceback|failed", line) and FORCED not in line
    ]
    return hits[:limit] + ([f"... and {len(hits) - limit} more"] if len(hits) > limit else [])


# --- main ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=50, help="pgbench -i -s on old (default 50: 5,000,000 accounts)")
    parser.add_argument("--rounds", type=int, default=1, help="backfill rounds, order alternated (default 1)")
    parser.add_argument("--seconds", type=int, default=30, help="pgbench -T of the streaming test (default 30)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c of the streaming test (default 8)")
    parser.add_argument("--skip-pgcopydb", action="store_true", help="measure pgshift only (no pgcopydb installed)")
    parser.add_argument("--pgcopydb-args", default="", help="extra pgcopydb clone arguments, e.g. "
                        "'--split-tables-larger-than 100MB' (default none)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="max seconds for a sync to reach streaming")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON instead of tables")
    args = parser.parse_args(argv)
    if min(args.scale, args.rounds, args.seconds, args.clients) < 1:
        parser.error("--scale, --rounds, --seconds and --clients must be at least 1")
    return args


def order(rnd: int, tools: Sequence[str]) -> list[str]:
    """Odd rounds pgcopydb first and the sync last, even rounds the reverse."""
    return list(tools) if rnd % 2 else list(reversed(tools))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_pgcopydb and shutil.which("pgcopydb") is None:
        log(INSTALL_PGCOPYDB)
        return 2
    exit_cleanly_on_signals()
    tools = [t for t in TOOLS if not (args.skip_pgcopydb and t == PGCOPYDB)]
    runs: list[BackfillRun] = []
    problems: list[str] = []
    commands: dict[str, str] = {}
    pgshift_log: list[str] = []
    streaming = Streaming(args.clients, args.seconds)
    old_data: dict[str, str] = {}
    new_data: dict[str, str] = {}
    began = time.monotonic()
    children = Children()
    sync_proc: subprocess.Popen[bytes] | None = None

    with contextlib.ExitStack() as stack:
        stack.callback(children.stop_all)
        log("creating clusters old and new ...")
        try:
            old = stack.enter_context(create_cluster("sync-old"))
            new = stack.enter_context(create_cluster("sync-new"))
        except ClusterError as exc:
            log(f"cluster failed: {exc}\n{exc.detail or ''}")
            return 1
        info = machine_info(old)
        workdir = make_workdir()
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        config = workdir / "pgshift.toml"
        write_config(config, old, new)

        @stack.callback
        def _drop_sync() -> None:  # Ctrl-C or a failure while a sync runs: no slot left (the clusters go anyway)
            if sync_proc is not None and sync_proc.poll() is None:
                stop_process(sync_proc)
                with contextlib.suppress(Exception):
                    children.run(sync_argv(config, "stop", "--force"), timeout=60, env=pgshift_env(), cwd=REPO_ROOT)

        try:
            old.psql(f"create database {DB_OLD}")
            init = [tool(old, "pgbench"), "-i", "-q", "-s", str(args.scale), old.dsn(dbname=DB_OLD)]
            commands["init"] = (
                " ".join(init[:-1]) + f" {DB_OLD}; alter table pgbench_history add column hid bigserial primary key"
            )
            log(f"pgbench -i -s {args.scale} on old ...")
            t0 = time.monotonic()
            code, _, err = children.run(init, timeout=3600, env=client_env())
            if code != 0:
                raise ClusterError("pgbench -i on old failed", detail=err)
            old.psql("alter table pgbench_history add column hid bigserial primary key; analyze", dbname=DB_OLD)
            log(f"  done in {time.monotonic() - t0:.1f} s")
            source_rows = counts(old, DB_OLD)
            total_rows = sum(source_rows.values())
            size = old.psql("select sum(pg_table_size(c)) from unnest(array['" + "','".join(KEYS) + "']::regclass[]) c",
                            dbname=DB_OLD)  # fmt: skip
            total_mb = int(size) / 1e6
        except ClusterError as exc:
            log(f"{exc}\n{exc.detail or ''}")
            return 1
        info["data"] = f"pgbench scale {args.scale}: {total_rows:,} rows, {total_mb:,.1f} MB of table data (no indexes)"

        extra = args.pgcopydb_args.split()
        total = args.rounds * len(tools)
        n = 0
        for rnd in range(1, args.rounds + 1):
            for name in order(rnd, tools):
                n += 1
                last = n == total
                run = BackfillRun(rnd, name, rows=total_rows, mb=total_mb)
                log(f"[{n}/{total}] round {rnd}: {name} ...")
                try:
                    if name == PGCOPYDB:
                        commands[PGCOPYDB] = " ".join(run_pgcopydb(run, children, old, new, workdir, extra))
                    elif name == COPYPK:
                        run_copypk(run, children, new, config)
                        commands[COPYPK] = (
                            "pgbench -i -I dt + add column hid bigserial; proxy.cdc.backfill.backfill(old, newpk, "
                            "workers=4); alter table … add primary key"
                        )
                    else:
                        sync_proc, logfile = run_sync(run, children, new, config, workdir, args.timeout)
                        commands[SYNC] = " ".join(sync_argv(Path("pgshift.toml"), *SYNC_ARGS)[1:])
                        commands["sync stop"] = " ".join(sync_argv(Path("pgshift.toml"), "stop", "--force")[1:])
                        if not last:
                            stop_sync(children, sync_proc, config)
                            sync_proc = None
                    run.target_rows = counts(new, DATABASES[name])
                    if run.target_rows != source_rows:
                        raise RuntimeError(f"target rows {run.target_rows} != source rows {source_rows}")
                    seconds = max(run.seconds or 0.0, 1e-9)
                    run.rows_per_s, run.mb_per_s = total_rows / seconds, total_mb / seconds
                    phases = ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in run.phases.items())
                    log(f"  {run.seconds:.1f} s, {run.rows_per_s:,.0f} rows/s, {run.mb_per_s:.1f} MB/s ({phases})")
                except (RuntimeError, subprocess.TimeoutExpired, OSError, PgShiftError) as exc:
                    detail = getattr(exc, "detail", None) or ""
                    run.error = f"{exc} {detail}".strip()
                    problems.append(f"{name} round {rnd}: {run.error}")
                    log(f"  FAILED: {run.error}")
                runs.append(run)

        # The stream: reuse the last sync if it ran last, else start one (not timed).
        try:
            if sync_proc is None or sync_proc.poll() is not None:
                log("starting a sync for the streaming test ...")
                sync_proc, _ = run_sync(BackfillRun(0, SYNC), children, new, config, workdir, args.timeout)
            log(f"streaming: pgbench -c {args.clients} -j 2 -T {args.seconds} on old, lag sampled every second ...")
            argv_pgbench = stream_under_load(streaming, children, old, new, config, timeout=180, sync_pid=sync_proc.pid)
            commands["pgbench (streaming)"] = " ".join(argv_pgbench)
            log(f"  {streaming.tps:.0f} tps; catch-up after pgbench {_fmt(streaming.catchup_s, '.3f')} s, "
                f"slot lag 0 after {_fmt(streaming.lag_zero_s, '.3f')} s")  # fmt: skip
        except (RuntimeError, subprocess.TimeoutExpired, OSError, PgShiftError) as exc:
            streaming.error = str(exc)
            problems.append(f"streaming: {exc}")
            log(f"  FAILED: {exc}")
        if sync_proc is not None:
            try:
                code, _ = stop_sync(children, sync_proc, config)
                info["sync start exit code after sync stop --force"] = f"{code} (1 expected: --force ends its stream)"
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                problems.append(f"sync stop: {exc}")
            sync_proc = None
        for logfile in sorted(workdir.glob("sync-*.log")):
            pgshift_log += log_problems(logfile)
        log("comparing old and new (md5 of every row in key order) ...")
        with ThreadPoolExecutor(2) as pool:
            fut_old = pool.submit(fingerprint, old, DB_OLD)
            fut_new = pool.submit(fingerprint, new, DATABASES[SYNC])
            old_data, new_data = fut_old.result(), fut_new.result()

    info["load average (end)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info["wall time"] = f"{time.monotonic() - began:.0f} s"
    same = {t: old_data.get(t) == new_data.get(t) and t in old_data for t in KEYS}
    summary = summarise(runs, tools)
    ok = all(same.values()) and not problems
    pgshift_log = list(dict.fromkeys(pgshift_log))

    if args.json:
        print(json.dumps({
            "info": info, "args": vars(args), "commands": commands, "runs": [asdict(r) for r in runs],
            "summary": summary, "streaming": asdict(streaming),
            "data": {"old": old_data, "new": new_data, "same": same},
            "pgshift_log": pgshift_log, "problems": problems, "ok": ok,
        }, indent=2, default=str))  # fmt: skip
        return 0 if ok else 1

    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print()
    print("commands:")
    print("\n".join(f"  {k}: {v}" for k, v in commands.items()))
    print()
    print(f"backfill, {args.rounds} round(s), order alternated (odd rounds: {' -> '.join(order(1, tools))}):")
    headers = ["round", "tool", "seconds", "rows/s", "MB/s"]
    rows = [
        [str(r.round), r.tool, "FAILED", "", ""] if r.error
        else [str(r.round), r.tool, _fmt(r.seconds, ".1f"), _fmt(r.rows_per_s, ",.0f"), _fmt(r.mb_per_s, ".1f")]
        for r in runs
    ]  # fmt: skip
    print(render(headers, rows, left=2))
    print("parts of each run (s, from the tool's own output where named so):")
    for r in runs:
        parts = r.error or ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in r.phases.items())
        print(f"  round {r.round} {r.tool}: {parts}")
    print()
    sheaders = ["tool", "seconds", "rows/s", "MB/s", "throughput vs pgcopydb", "per round"]
    srows = [[s["tool"], _fmt(s["seconds"], ".1f"), _fmt(s["rows_per_s"], ",.0f"), _fmt(s["mb_per_s"], ".1f"),
              _fmt(s["throughput_vs_pgcopydb"], ".2f"), " ".join(_fmt(x, ".2f") for x in s["per_round"])]
             for s in summary]  # fmt: skip
    print(render(sheaders, srows))
    print()
    print(markdown(sheaders, srows))
    print()
    print(f"MB/s: of the source's table data ({total_mb:,.1f} MB, pg_table_size, indexes excluded); the same rows and")
    print("MB for every tool. Seconds: wall clock of the whole tool run. pgcopydb clone creates the schema, copies,")
    print("builds the indexes and VACUUM ANALYZEs; `pgshift sync` copies into tables whose primary keys exist (a sync")
    print("needs them: its stream upserts by key), and includes its check, publication and slot; `pgshift copy+pk`")
    print("is like with like for pgcopydb: tables created without indexes, the same copy, primary keys added after.")
    print("pgcopydb's own data-copy timing ('longest table copy'; 'copy cumulative' sums its 4 jobs) is in the parts.")
    if PGCOPYDB in tools:
        for s in summary:
            if s["tool"] != PGCOPYDB:
                ratio = s["throughput_vs_pgcopydb"]
                met = ratio is not None and ratio >= EXPECT_RATIO
                print(f"{s['tool']}: {_fmt(ratio, '.2f')} x pgcopydb clone throughput -> "
                      f"expectation >= {EXPECT_RATIO:.1f} {'MET' if met else 'NOT MET'}")  # fmt: skip
    print()
    st = streaming
    print(f"streaming: pgbench TPC-B -c {st.clients} -j 2 -T {st.seconds} on old while a sync streams to new")
    if st.error:
        print(f"  FAILED: {st.error}")
    else:
        lheaders = ["t s", "slot lag bytes", "sync lag s", "txns behind"]
        lrows = [[_fmt(s.t, ".1f"), _fmt(s.lag_bytes, ","), _fmt(s.lag_seconds, ".3f"), _fmt(s.behind, ",")]
                 for s in st.samples]  # fmt: skip
        print(render(lheaders, lrows, left=0))
        print()
        print(f"  pgbench: {_fmt(st.tps, '.0f')} tps, {_fmt(st.latency_ms, '.3f')} ms, {st.transactions} transactions")
        print(
            f"  CPU while pgbench ran, % of one CPU: the sync process {_fmt(st.sync_cpu_percent, '.0f')}, the new "
            f"cluster (the apply's backend) {_fmt(st.new_cpu_percent, '.0f')}, the old cluster (pgbench's backends, "
            f"the walsender) {_fmt(st.old_cpu_percent, '.0f')}, of {os.cpu_count()} CPUs"
        )
        print(f"  max during the run: slot lag {_fmt(st.max_lag_bytes, ',')} bytes, sync lag "
              f"{_fmt(st.max_lag_seconds, '.3f')} s, {_fmt(st.max_behind, ',')} transactions behind")  # fmt: skip
        print(f"  at pgbench's exit: slot lag {_fmt(st.end_lag_bytes, ',')} bytes, sync lag "
              f"{_fmt(st.end_lag_seconds, '.3f')} s, {_fmt(st.end_behind, ',')} transactions behind")  # fmt: skip
        print(f"  new holds every transaction {_fmt(st.catchup_s, '.3f')} s after pgbench's exit; slot lag 0 bytes "
              f"after {_fmt(st.lag_zero_s, '.3f')} s")  # fmt: skip
        print("  (slot lag bytes: the source's WAL end minus the slot's confirmed position, which the sync confirms")
        print("  every second, so it reads >0 while writes go on even when nothing waits; sync lag s: the age of the")
        print("  oldest received, unapplied commit as the sync records it each second; txns behind: pgbench_history")
        print("  rows on old minus on new. The verdict uses the data: time until new has all of pgbench's rows.)")
        print(f"  lag at the end: {_fmt(st.catchup_s, '.3f')} s -> expectation < {EXPECT_LAG:.0f} s "
              f"{'MET' if st.met else 'NOT MET'}")  # fmt: skip
    print()
    print(f"data old ({DB_OLD}) vs new ({DATABASES[SYNC]}) after the stream:")
    for table in KEYS:
        print(f"  {table:<17} {'same' if same[table] else 'DIFFERENT'}  old {old_data.get(table, '-')}")
        if not same[table]:
            print(f"  {'':<17}            new {new_data.get(table, '-')}")
    if pgshift_log:
        print("\npgshift sync logs (errors/warnings):")
        print("\n".join(f"  {line}" for line in pgshift_log))
    for problem in problems:
        print(f"problem: {problem}")
    print()
    print("VERDICT: " + ("old and new identical" if ok else "FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; sync stopped, clusters removed")
        sys.exit(130)
