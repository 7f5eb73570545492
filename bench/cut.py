"""The cut-over under load: pgshift's guarded cut against a naive flip, pgbench TPC-B at 8 clients.

Every run gets two fresh throw-away clusters, "old" and "new", on this machine: ``pgbench -i`` on
old (plus ``hid bigserial primary key`` on pgbench_history, which a sync needs), the same empty
tables on new, ``pgshift sync start`` (backfill + change stream) in the background, one proxy
(``python -m proxy serve``) in front, moved by ``migrate advance --to read-shift:100`` to dual write
with every read on new. Then ``pgbench -c 8 -j 2 -T SECONDS`` (TPC-B, per-transaction log) runs
through the proxy and, half-way, the primary moves to new:

* ``guarded``: ``migrate advance`` (the cut: pause, drain, catch-up, sequences, swap, resume), once
  its guards hold;
* ``naive``: ``flip --primary new`` (no pause, drain, catch-up or sequences; the stream keeps running);
* ``naive+seq``: the same flip right after new's sequences were set past old's (the cut's step 4 alone):
  pgbench's clients survive the flip, so what the missing pause, drain and catch-up do to the data shows.

The admin calls go through pgshift's own client (proxy.admin.client: the HTTP calls of ``pgshift migrate
advance`` and ``pgshift flip``) from this process, so no CLI start-up falls into the measured window.

Reported per run: the cut's own figures (pause, requests held, their wait p50/p99/max), the
client's view from pgbench's log (latency of the transactions that overlapped the cut against
the baseline before it; tps before, in the worst 1-s window around the cut, after), pgbench client
errors, and, once load stopped and every queue drained, the rows that differ between old and new
(row by row, by key, in all four tables). The issue's expectations for the guarded cut: wait p99
< 100 ms, 0 client errors (and here: 0 diverged rows). Exit code 1 if the guarded cut misses one.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/cut.py` from a checkout: make `proxy` importable without installing it.
sys.path.insert(0, str(REPO_ROOT))

from common import STARTUP_TIMEOUT, exit_cleanly_on_signals, log, read_tail, start_pgshift, stop_process, wait_for_port  # noqa: E402
from mirror import machine_info, markdown, pgbench_binary, render  # noqa: E402
from run import client_env, make_workdir  # noqa: E402

from proxy.admin.client import AdminClient, AdminError, AdminTarget  # noqa: E402
from proxy.cdc import handover  # noqa: E402
from proxy.cdc.sequences import sync_sequences  # noqa: E402
from proxy.cdc.sqlconn import Endpoint, SqlConnection, resolve_endpoint  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.errors import ClusterError, PgShiftError  # noqa: E402
from proxy.localpg import LocalCluster, create_cluster, free_port  # noqa: E402

GUARDED, NAIVE, NAIVE_SEQ = "guarded", "naive", "naive+seq"
METHODS = (GUARDED, NAIVE, NAIVE_SEQ)
MODES = ("simple", "extended", "prepared")
KEYS = {"pgbench_accounts": "aid", "pgbench_branches": "bid", "pgbench_tellers": "tid", "pgbench_history": "hid"}
SLOT = "pgshift_sync"
SEQUENCE_MARGIN = 1000  # [migrate] sequence_margin's default: what the cut leaves free above old's values
TOKEN_ENV = "PGSHIFT_ADMIN_TOKEN"
EXPECT_P99_MS = 100.0  # the issue: pause p99 < 100 ms (per held request), 0 client errors
WARMUP_S = 2.0  # the first seconds of pgbench (connections, caches) are left out of the baseline

_TPS_RE = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding)", re.MULTILINE)
_TXNS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
# PG 15: "pgbench: error: client 3 script 0 aborted in command 8 query 0: ERROR:  duplicate key ..."
# (older: "client 3 aborted in command 8 (SQL) of script 0; ERROR:  ...")
_ABORT_RE = re.compile(r"client (\d+) (?:script \d+ )?aborted in command[^\n]*?(?:ERROR:\s+(.*))?$", re.MULTILINE)


@dataclass
class Latency:
    n: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


@dataclass
class TableDiff:
    old_rows: int = 0
    new_rows: int = 0
    only_old: int = 0
    only_new: int = 0
    differ: int = 0
    examples: list[str] = field(default_factory=list)  # a few keys, for a first look

    @property
    def diverged(self) -> int:
        return self.only_old + self.only_new + self.differ


@dataclass
class CutRun:
    round: int
    method: str
    result: str = ""  # guarded: done / aborted / blocked (a guard did not hold); naive: flipped / failed
    reason: str | None = None
    # the cut's own figures (guarded; from its answer)
    pause_ms: float | None = None
    drain_ms: float | None = None  # from the pause until nothing ran on the primary (the cut's answer)
    held_requests: int | None = None
    wait_p50_ms: float | None = None
    wait_p99_ms: float | None = None
    wait_max_ms: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    answer: dict[str, Any] | None = None  # taken[0] of the cut, or the flip's answer
    admin_ms: float | None = None  # the admin call's round trip, client-side
    window_ms: float | None = None  # the window the client figures look at (see client_view)
    guards_wait_s: float | None = None  # from the planned time until every guard of the cut held
    sync_lag_s: float | None = None  # the change stream's lag (its own figure) just before the cut
    # the client's view (pgbench)
    transactions: int | None = None
    tps_pgbench: float | None = None
    errors: int = 0  # clients aborted by an error (pgbench ends a client at its first error)
    error_messages: list[str] = field(default_factory=list)
    baseline: Latency = field(default_factory=Latency)  # transactions completed before the cut began
    overlap: Latency = field(default_factory=Latency)  # transactions in flight at any time of the cut
    tps_before: float | None = None  # median of the 1-s windows before the cut
    tps_min_before: float | None = None  # the worst 1-s window before the cut (noise for comparison)
    tps_min_cut: float | None = None  # the worst 1-s window overlapping the cut
    tps_dip_pct: float | None = None  # 1 - tps_min_cut / tps_before
    tps_after: float | None = None  # median of the 1-s windows after the cut
    per_second: dict[str, int] = field(default_factory=dict)  # completions per second, relative to the cut
    # the data afterwards
    tables: dict[str, TableDiff] = field(default_factory=dict)
    diverged_rows: int | None = None
    # TPC-B's invariant per side: sum(abalance) = sum(bbalance) = sum(tbalance) = sum(history.delta);
    # a lost or doubled update breaks it even where old and new agree
    balances: dict[str, dict[str, int]] = field(default_factory=dict)
    unbalanced: list[str] = field(default_factory=list)  # the sides whose sums differ
    mirror: dict[str, Any] = field(default_factory=dict)  # the mirror's journal counters at the end
    sync_exit: int | None = None
    proxy_log: list[str] = field(default_factory=list)
    error: str | None = None  # the harness failed (not a measurement)


# --- processes ---


def pgshift_env(token: str) -> dict[str, str]:
    env = client_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env[TOKEN_ENV] = token
    return env


def write_config(path: Path, workdir: Path, port: int, admin_port: int, old: LocalCluster, new: LocalCluster,
                 args: argparse.Namespace) -> None:  # fmt: skip
    """One file for the proxy and `sync start`: backends without a database (the client's passes
    through; the sync and the cut use the user's, postgres), the migration old -> new."""
    lines = [
        "[listen]", 'host = "127.0.0.1"', f"port = {port}", "",
        "[admin]", 'host = "127.0.0.1"', f"port = {admin_port}", f'token = "env:{TOKEN_ENV}"', "",
        "[proxy]", "shutdown_grace = 5", "",
        "[control]", f'state_file = "{workdir / "state.jsonl"}"', 'instance = "bench"', "",
        "[mirror]", f'journal = "{workdir / "mirror.jsonl"}"', "",
    ]  # fmt: skip
    for name, cluster in (("old", old), ("new", new)):
        lines += [f"[backends.{name}]", f'dsn = "postgresql://127.0.0.1:{cluster.port}?sslmode=disable"',
                  'mirror_user = "postgres"', ""]  # fmt: skip
    lines += ["[routing]", 'primary = "old"', ""]
    lines += [
        "[migrate]", 'source = "old"', 'target = "new"', "read_steps = [100]",
        f"drain_timeout = {args.drain_timeout}", f"pause_max = {args.pause_max}",
        f"catchup_timeout = {args.catchup_timeout}", f"max_sync_lag = {args.max_sync_lag}",
        "verify_max_age = 0", "quiet_period = 0", f'report_dir = "{workdir}"', "",
    ]  # fmt: skip
    path.write_text("\n".join(lines))


def prepare_data(pgbench: str, old: LocalCluster, new: LocalCluster, scale: int) -> None:
    """pgbench's tables with rows on old, without on new (the sync copies them); a key on history."""
    for cluster, steps in ((old, ["-s", str(scale)]), (new, ["-I", "dtp"])):
        argv = [pgbench, "-i", "-q", *steps, "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "postgres"]
        init = subprocess.run(argv, capture_output=True, text=True, env=client_env(), check=False)
        if init.returncode != 0:
            raise ClusterError(f"pgbench -i on {cluster.name} failed", detail=init.stderr.strip())
        cluster.psql("alter table pgbench_history add column hid bigserial primary key")


@contextlib.contextmanager
def spawned(
    argv: Sequence[str], stderr_path: Path, env: dict[str, str], cwd: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session (Ctrl-C reaches only us), stopped on the way out."""
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=env, cwd=cwd, start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        stop_process(proc)


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise RuntimeError(f"{what}: not within {timeout:g} s (last: {json.dumps(last, default=str)[:1500]})")


def next_ready(client: AdminClient, step: str) -> dict[str, Any] | None:
    status = client.migrate_status()
    nxt = status.get("next") or {}
    return status if nxt.get("step") == step and nxt.get("ready") else None


def sync_guard(status: dict[str, Any]) -> dict[str, Any] | None:
    guards = (status.get("next") or {}).get("guards") or []
    return next((g for g in guards if g["name"] == "sync"), None)


def mirror_counters(client: AdminClient) -> dict[str, Any]:
    """The proxy's mirrors summed: queue, and the journal's counters (diverged, failed, ...)."""
    status = client.mirror()
    out: dict[str, Any] = {"queued": 0, "applied": 0, "diverged": 0, "failed": 0, "unmirrored": 0,
                           "out_of_sync_tables": 0, "detached": 0, "last_error": ""}  # fmt: skip
    errors = []
    for m in status.get("mirrors", []):
        for d in m.get("databases", []):
            out["queued"] += d.get("queued", 0)
            out["applied"] += d.get("applied", 0)
            out["detached"] += 1 if d.get("detached") else 0
            if d.get("last_error"):
                errors.append(f"{m['name']}: {d['last_error']}")
        for key in ("diverged", "failed", "unmirrored"):
            out[key] += int(m.get(key, 0) or 0)
        out["out_of_sync_tables"] += len(m.get("out_of_sync", []) or [])
    out["last_error"] = "; ".join(errors)[:500]
    return out


def proxy_log_problems(path: Path, limit: int = 12) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [line for line in lines if re.search(r"ERROR|WARNING|CRITICAL|Traceback|Exception", line)]
    return hits[:limit] + ([f"... and {len(hits) - limit} more"] if len(hits) > limit else [])


# --- the client's view: pgbench's per-transaction log ---


def read_pgbench_log(prefix: Path) -> list[tuple[float, float]]:
    """(end, latency) in seconds of every transaction pgbench logged (-l; one file per thread).
    Lines: client_id transaction_no time_us script_no epoch_s epoch_us [...]; a failed one's time
    is not a number (PG 15 logs "failed"), and is left out."""
    out = []
    for path in prefix.parent.glob(prefix.name + ".*"):
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) < 6 or not parts[2].isdigit():
                continue
            out.append((int(parts[4]) + int(parts[5]) / 1e6, int(parts[2]) / 1e6))
    out.sort()
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q % of the values at or below it."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def latency(values: list[float]) -> Latency:
    if not values:
        return Latency()
    v = sorted(x * 1000 for x in values)
    return Latency(len(v), round(percentile(v, 50), 2), round(percentile(v, 99), 2), round(v[-1], 2))


def client_view(run: CutRun, txns: list[tuple[float, float]], began: float, cut_start: float, cut_end: float,
                ended: float) -> None:  # fmt: skip
    """Latency and throughput around the cut window [cut_start, cut_end]: the cut's first to last step
    (its journal's times), for a flip the admin call's round trip."""
    ends = [e for e, _ in txns]
    run.baseline = latency([lat for e, lat in txns if began + WARMUP_S <= e < cut_start])
    run.overlap = latency([lat for e, lat in txns if e > cut_start and e - lat < cut_end])

    def count(a: float, b: float) -> int:
        return bisect.bisect_left(ends, b) - bisect.bisect_left(ends, a)

    def windows(a: float, b: float, step: float) -> list[int]:
        """Completions in every 1-s window [x, x+1) for x from a to b (inclusive) by step."""
        n = int((b - a) / step + 1e-9)
        return [count(a + i * step, a + i * step + 1.0) for i in range(n + 1)] if b >= a else []

    before = [count(cut_start - k - 1, cut_start - k) for k in range(int(cut_start - began - WARMUP_S))]
    run.tps_before = statistics.median(before) if before else None
    sliding = windows(began + WARMUP_S, cut_start - 1.0, 0.05)
    run.tps_min_before = min(sliding) if sliding else None
    around = windows(cut_start - 1.0, cut_end, 0.05)
    run.tps_min_cut = min(around) if around else None
    if run.tps_before and run.tps_min_cut is not None:
        run.tps_dip_pct = round(100 * (1 - run.tps_min_cut / run.tps_before), 1)
    after = [count(cut_end + 1 + k, cut_end + 2 + k) for k in range(int(ended - cut_end - 2))]
    run.tps_after = statistics.median(after) if after else None
    series: dict[str, int] = {}
    for e in ends:
        second = int((e - cut_start) // 1)
        series[str(second)] = series.get(str(second), 0) + 1
    run.per_second = series


def pgbench_outcome(run: CutRun, rc: int, out: str, err: str) -> None:
    tps, txns, failed = _TPS_RE.search(out), _TXNS_RE.search(out), _FAILED_RE.search(out)
    aborts = _ABORT_RE.findall(err)
    run.errors = len({client for client, _ in aborts}) + (int(failed.group(1)) if failed else 0)
    messages: dict[str, int] = {}
    for _, message in aborts:
        text = (message or "(no message)").strip()
        messages[text] = messages.get(text, 0) + 1
    run.error_messages = [f"{n}x {text}" for text, n in sorted(messages.items(), key=lambda x: -x[1])][:5]
    run.tps_pgbench = float(tps.group(1)) if tps else None
    run.transactions = int(txns.group(1)) if txns else None
    if txns is None or (rc != 0 and not aborts):
        raise RuntimeError(f"pgbench exit {rc}: {(err or out).strip()[-800:]}")


# --- the data afterwards ---


def diff_table(old: LocalCluster, new: LocalCluster, table: str, key: str) -> TableDiff:
    """Row by row in key order (two server-side cursors, merged): rows only on one side, and rows
    whose values differ. Memory stays flat whatever the scale."""
    import psycopg

    diff = TableDiff()
    sql = f"select {key}, md5(t::text) from {table} t order by {key}"
    with psycopg.connect(old.dsn()) as a, psycopg.connect(new.dsn()) as b:
        for conn in (a, b):
            conn.execute("set timezone = 'UTC'")
        ca, cb = a.cursor(name="cmp"), b.cursor(name="cmp")
        ca.itersize = cb.itersize = 20_000
        ca.execute(sql)
        cb.execute(sql)
        ia, ib = iter(ca), iter(cb)
        ra, rb = next(ia, None), next(ib, None)
        while ra is not None or rb is not None:
            if rb is None or (ra is not None and ra[0] < rb[0]):
                assert ra is not None
                diff.old_rows += 1
                diff.only_old += 1
                if len(diff.examples) < 3:
                    diff.examples.append(f"{key}={ra[0]} only on old")
                ra = next(ia, None)
            elif ra is None or rb[0] < ra[0]:
                diff.new_rows += 1
                diff.only_new += 1
                if len(diff.examples) < 3:
                    diff.examples.append(f"{key}={rb[0]} only on new")
                rb = next(ib, None)
            else:
                diff.old_rows += 1
                diff.new_rows += 1
                if ra[1] != rb[1]:
                    diff.differ += 1
                    if len(diff.examples) < 3:
                        diff.examples.append(f"{key}={ra[0]} differs")
                ra, rb = next(ia, None), next(ib, None)
    return diff


def endpoints(config: Path, token: str) -> tuple[Endpoint, Endpoint]:
    """Backends old and new as the sync sees them (the config names the admin token by env:VAR)."""
    os.environ[TOKEN_ENV] = token
    try:
        cfg = load_config(config)
    finally:
        del os.environ[TOKEN_ENV]
    return resolve_endpoint(cfg, "old"), resolve_endpoint(cfg, "new")


def balances(cluster: LocalCluster) -> dict[str, int]:
    sql = (
        "select (select coalesce(sum(abalance), 0) from pgbench_accounts) || ' ' || "
        "(select coalesce(sum(bbalance), 0) from pgbench_branches) || ' ' || "
        "(select coalesce(sum(tbalance), 0) from pgbench_tellers) || ' ' || "
        "(select coalesce(sum(delta), 0) from pgbench_history)"
    )
    values = [int(v) for v in cluster.psql(sql).split()]
    return dict(zip(("accounts", "branches", "tellers", "history"), values, strict=True))


def wait_drained(client: AdminClient, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        counters = mirror_counters(client)
        if counters["queued"] == 0 or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


# --- one run ---


async def _caught_up(source: Endpoint, within: float) -> dict[str, Any]:
    """The cut's own catch-up check (cdc/handover.py), on a connection of its own."""
    async with await SqlConnection.connect(source, "pgshift-bench") as src:
        return await handover.caught_up(src, SLOT, within)


def one_run(run: CutRun, args: argparse.Namespace, info: dict[str, str]) -> None:
    token = secrets.token_hex(16)
    env = pgshift_env(token)
    with contextlib.ExitStack() as stack:
        old = stack.enter_context(create_cluster("cut-old"))
        new = stack.enter_context(create_cluster("cut-new"))
        pgbench = pgbench_binary(old)
        if not info.get("postgres"):
            info.update(machine_info(old, pgbench))
        workdir = make_workdir()
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        log(f"  pgbench -i -s {args.scale} on old, the empty tables on new ...")
        prepare_data(pgbench, old, new, args.scale)

        port, admin_port = free_port(), free_port()
        config = workdir / "pgshift.toml"
        write_config(config, workdir, port, admin_port, old, new, args)
        proxy_log = workdir / "proxy.log"
        proxy = start_pgshift(config, proxy_log, extra_env={TOKEN_ENV: token})
        stack.callback(stop_process, proxy)
        for p in (port, admin_port):
            if not wait_for_port(p, proxy):
                state = "exited" if proxy.poll() is not None else f"no listener after {STARTUP_TIMEOUT:.0f}s"
                raise ClusterError(f"pgshift did not start ({state})", detail=read_tail(proxy_log))
        client = stack.enter_context(
            AdminClient(AdminTarget(f"http://127.0.0.1:{admin_port}", token), timeout=30, caller="bench/cut.py")
        )

        # The migration up to the cut: sync streaming, dual write, every read on new.
        sync_argv = [sys.executable, "-m", "proxy", "sync", "start", "--from", "old", "--to", "new",
                     "--config", str(config), "--status-interval", "1"]  # fmt: skip
        sync_log = workdir / "sync.log"
        sync = stack.enter_context(spawned(sync_argv, sync_log, env, REPO_ROOT))
        log("  sync start (backfill, then the change stream) ...")
        try:
            wait_for("the sync streaming", lambda: next_ready(client, "dual-write"), args.setup_timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nsync log:\n{read_tail(sync_log)}") from None
        moved = client.migrate_advance("read-shift:100", None)
        if any(t["result"] != "done" for t in moved["taken"]) or moved["status"]["read_percent"] != 100:
            raise RuntimeError(f"advance --to read-shift:100: {json.dumps(moved['taken'])}")
        log("  dual write on, reads 100 % on new; pgbench ...")

        # The load, and the cut (or the flip) in its middle.
        prefix = workdir / "pgbench_log" / "tx"
        prefix.parent.mkdir()
        argv = [pgbench, "-n", "-M", args.mode, "-c", str(args.clients), "-j", str(min(args.clients, 2)),
                "-T", str(args.seconds), "-P", "1", "-l", f"--log-prefix={prefix}",
                "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"]  # fmt: skip
        began = time.time()
        bench = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(),
                                 cwd=workdir, start_new_session=True)  # fmt: skip
        stack.callback(stop_process, bench)
        planned = began + args.seconds * args.cut_at
        time.sleep(max(0.0, planned - time.time()))
        status = client.migrate_status()
        if run.method == GUARDED:
            # As an operator would: once every guard of the cut holds (stream lag, mirror, ...).
            last_possible = began + args.seconds - 2.0
            while not (status.get("next") or {}).get("ready") and time.time() < last_possible:
                time.sleep(0.2)
                status = client.migrate_status()
            run.guards_wait_s = round(time.time() - planned, 2)
        guard = sync_guard(status)
        run.sync_lag_s = guard["value"] if guard and isinstance(guard.get("value"), int | float) else None
        cut_start = time.time()
        if run.method == GUARDED:
            try:
                answer = client.migrate_advance(None, None)
                cut = answer["taken"][0]
                run.answer = cut
                run.result, run.reason = cut.get("result", "?"), cut.get("reason")
                for key in ("pause_ms", "held_requests", "wait_p50_ms", "wait_p99_ms", "wait_max_ms"):
                    setattr(run, key, cut.get(key))
                run.timings_ms = cut.get("timings_ms", {})
                run.drain_ms = cut.get("drain_ms")  # (the slowest instance's, from the cut's answer)
            except AdminError as exc:  # 409: a guard does not hold (blocked), or another refusal
                run.result, run.reason = "blocked", str(exc)
                run.answer = getattr(exc, "data", None)
        else:
            if run.method == NAIVE_SEQ:
                # The cut's step 4 alone, just before the flip: new's sequences past old's.
                report = asyncio.run(sync_sequences(*endpoints(config, token), margin=SEQUENCE_MARGIN))
                if not report.ok:
                    raise RuntimeError(f"sequences before the flip: {report.counts()}")
                cut_start = time.time()
            try:
                run.answer = client.flip("new", note=f"bench/cut.py: {run.method} flip")
                run.result = "flipped"
            except AdminError as exc:
                run.result, run.reason = "failed", str(exc)
        cut_end = time.time()
        run.admin_ms = round((cut_end - cut_start) * 1000, 2)
        if run.method == GUARDED and run.answer and run.answer.get("id"):
            # The pause itself, not the admin call around it (guards before, status after): the
            # journal's wall-clock times of the cut's first and last steps.
            journal = [e for e in client.migrate_status().get("journal", []) if e.get("cut") == run.answer["id"]]
            at = {e["step"]: float(e["at"]) for e in journal}
            last = at.get("resumed", at.get("aborted"))
            if "begin" in at and last is not None:
                cut_start, cut_end = at["begin"], last
        run.window_ms = round((cut_end - cut_start) * 1000, 2)
        log(f"  {run.method}: {run.result} in {run.admin_ms:.0f} ms" + (f" ({run.reason})" if run.reason else ""))
        out, err = bench.communicate(timeout=args.seconds + 120)
        ended = time.time()
        (workdir / "pgbench.out").write_text(out.decode(errors="replace"))
        (workdir / "pgbench.err").write_text(err.decode(errors="replace"))
        pgbench_outcome(run, bench.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        # (after the cut until the planned end: clients an error ended count as 0 tps there)
        client_view(run, read_pgbench_log(prefix), began, cut_start, cut_end, max(ended, began + args.seconds))

        # Settle, then compare: every queue empty, the stream caught up (naive) or over (guarded).
        run.mirror = wait_drained(client, args.settle_timeout)
        if run.method != GUARDED or run.result != "done":
            # The stream still runs old -> new: let it catch up, then stop it (SIGTERM: a clean stop).
            with contextlib.suppress(PgShiftError):
                source = endpoints(config, token)[0]
                caught = asyncio.run(_caught_up(source, args.settle_timeout))
                if not caught["ok"]:
                    log(f"  the change stream did not catch up: {caught}")
            time.sleep(1.0)  # (what it received, applied: one status interval)
            run.mirror = wait_drained(client, args.settle_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sync.pid, signal.SIGTERM)
        try:
            run.sync_exit = sync.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("  the sync did not end within 30 s after the cut")
            stop_process(sync)
            run.sync_exit = sync.returncode
        log("  comparing old and new row by row ...")
        run.tables = {table: diff_table(old, new, table, key) for table, key in KEYS.items()}
        run.diverged_rows = sum(d.diverged for d in run.tables.values())
        run.balances = {"old": balances(old), "new": balances(new)}
        run.unbalanced = [side for side, sums in run.balances.items() if len(set(sums.values())) > 1]
        stop_process(proxy)
        run.proxy_log = proxy_log_problems(proxy_log)
        if args.keep:
            kept = Path(f"/tmp/pgshift-cut-r{run.round}-{run.method}")
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("pgbench_log"))
            log(f"  logs kept in {kept}")


# --- output ---


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


RUN_HEADERS = [
    "round", "method", "result", "pause ms", "drain ms", "held", "wait p50 ms", "wait p99 ms", "wait max ms",
    "lat p50 ms", "lat p99 ms", "cut txns", "cut p50 ms", "cut p99 ms", "cut max ms",
    "tps before", "min 1s before", "min 1s cut", "dip %", "tps after", "errors", "diverged rows", "unbalanced",
]  # fmt: skip


def run_rows(runs: list[CutRun]) -> list[list[str]]:
    rows = []
    for r in runs:
        if r.error is not None:
            rows.append([str(r.round), r.method, "FAILED", *[""] * (len(RUN_HEADERS) - 3)])
            continue
        rows.append(
            [str(r.round), r.method, r.result, _fmt(r.pause_ms, ".1f"), _fmt(r.drain_ms, ".1f"),
             _fmt(r.held_requests, "d"),
             _fmt(r.wait_p50_ms, ".1f"), _fmt(r.wait_p99_ms, ".1f"), _fmt(r.wait_max_ms, ".1f"),
             _fmt(r.baseline.p50_ms, ".1f"), _fmt(r.baseline.p99_ms, ".1f"), str(r.overlap.n),
             _fmt(r.overlap.p50_ms, ".1f"), _fmt(r.overlap.p99_ms, ".1f"), _fmt(r.overlap.max_ms, ".1f"),
             _fmt(r.tps_before, ".0f"), _fmt(r.tps_min_before, ".0f"), _fmt(r.tps_min_cut, ".0f"),
             _fmt(r.tps_dip_pct, ".1f"), _fmt(r.tps_after, ".0f"), str(r.errors), _fmt(r.diverged_rows, "d"),
             ",".join(r.unbalanced) or "-"]
        )  # fmt: skip
    return rows


SUMMARY_HEADERS = [
    "method", "runs", "pause ms", "drain ms", "wait p50 ms", "wait p99 ms", "cut max lat ms", "tps before",
    "min 1s cut", "dip %", "tps after", "errors", "diverged rows", "unbalanced runs",
]  # fmt: skip


def summary_rows(runs: list[CutRun]) -> list[list[str]]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r.method == method and r.error is None]
        if not mine:
            continue
        rows.append(
            [method, str(len(mine)), _fmt(_median([r.pause_ms for r in mine]), ".1f"),
             _fmt(_median([r.drain_ms for r in mine]), ".1f"),
             _fmt(_median([r.wait_p50_ms for r in mine]), ".1f"), _fmt(_median([r.wait_p99_ms for r in mine]), ".1f"),
             _fmt(_median([r.overlap.max_ms for r in mine]), ".1f"), _fmt(_median([r.tps_before for r in mine]), ".0f"),
             _fmt(_median([r.tps_min_cut for r in mine]), ".0f"), _fmt(_median([r.tps_dip_pct for r in mine]), ".1f"),
             _fmt(_median([r.tps_after for r in mine]), ".0f"), str(sum(r.errors for r in mine)),
             str(sum(r.diverged_rows or 0 for r in mine)), str(sum(1 for r in mine if r.unbalanced))]
        )  # fmt: skip
    return rows


def guarded_ok(r: CutRun) -> bool:
    return (
        r.error is None
        and r.result == "done"
        and r.wait_p99_ms is not None
        and r.wait_p99_ms < EXPECT_P99_MS
        and r.errors == 0
        and r.diverged_rows == 0
        and not r.unbalanced
    )


# --- main ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument("--seconds", type=int, default=20, help="pgbench -T around the cut (default 20)")
    parser.add_argument("--cut-at", type=float, default=0.5, help="when to cut, as a fraction of --seconds (0.5)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8; -j min(clients, 2))")
    parser.add_argument("--mode", choices=MODES, default="simple", help="pgbench -M (default simple)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every method, order rotated (default 3)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {', '.join(METHODS)}")
    parser.add_argument("--drain-timeout", type=float, default=5.0, help="[migrate] drain_timeout (default 5)")
    parser.add_argument("--pause-max", type=float, default=30.0, help="[migrate] pause_max (default 30)")
    parser.add_argument("--catchup-timeout", type=float, default=10.0, help="[migrate] catchup_timeout (default 10)")
    parser.add_argument("--max-sync-lag", type=float, default=5.0, help="[migrate] max_sync_lag (default 5)")
    parser.add_argument("--setup-timeout", type=float, default=300.0, help="max wait for the sync to stream")
    parser.add_argument("--settle-timeout", type=float, default=60.0, help="max wait for queues and the stream")
    parser.add_argument("--keep", action="store_true", help="keep each run's logs in /tmp/pgshift-cut-R-METHOD")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON instead of tables")
    args = parser.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.method_list or set(args.method_list) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    if args.rounds < 1 or args.scale < 1 or args.clients < 1 or args.seconds < 8:
        parser.error("--rounds, --scale and --clients must be at least 1, --seconds at least 8")
    if not 0.2 <= args.cut_at <= 0.8:
        parser.error("--cut-at must be from 0.2 to 0.8 (a baseline before, load after)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_signals()
    began = time.monotonic()
    info: dict[str, str] = {}
    runs: list[CutRun] = []
    total = args.rounds * len(args.method_list)
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(args.method_list)  # the order rotated round by round
        order = args.method_list[shift:] + args.method_list[:shift]
        for method in order:
            run = CutRun(rnd, method)
            log(f"[{len(runs) + 1}/{total}] round {rnd}, {method}: fresh clusters old and new ...")
            try:
                one_run(run, args, info)
            except (RuntimeError, OSError, ClusterError, PgShiftError, AdminError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "detail", None)
                run.error = f"{type(exc).__name__}: {exc}" + (f"\n{detail}" if detail else "")
                log(f"  FAILED: {run.error}")
            else:
                log(
                    f"  {run.result}: pause {_fmt(run.pause_ms, '.1f')} ms, wait p99 {_fmt(run.wait_p99_ms, '.1f')} ms,"
                    f" cut max latency {_fmt(run.overlap.max_ms, '.1f')} ms, tps {_fmt(run.tps_before, '.0f')} -> "
                    f"{_fmt(run.tps_min_cut, '.0f')} (1 s) -> {_fmt(run.tps_after, '.0f')}, errors {run.errors}, "
                    f"diverged rows {run.diverged_rows}"
                )
            runs.append(run)

    info["wall time"] = f"{time.monotonic() - began:.0f} s"
    with contextlib.suppress(OSError):
        info["load average (end)"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    guarded = [r for r in runs if r.method == GUARDED]
    ok = all(guarded_ok(r) for r in guarded) and not any(r.error for r in runs)

    if args.json:
        out = {
            "info": info,
            "args": {k: v for k, v in vars(args).items() if k != "method_list"},
            "runs": [asdict(r) for r in runs],
            "expect": {"wait_p99_ms_below": EXPECT_P99_MS, "client_errors": 0, "diverged_rows": 0},
            "ok": ok,
        }
        print(json.dumps(out, indent=2, default=str))
        return 0 if ok else 1

    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(
        f"pgbench TPC-B (default script), -M {args.mode}, -c {args.clients} -j {min(args.clients, 2)}, scale "
        f"{args.scale}, -T {args.seconds} through pgshift (dual write, reads on new), cut at "
        f"{args.seconds * args.cut_at:g} s; {args.rounds} round(s), fresh clusters per run"
    )
    print()
    rows = run_rows(runs)
    print(render(RUN_HEADERS, rows))
    print()
    srows = summary_rows(runs)
    print(render(SUMMARY_HEADERS, srows))
    print()
    print(markdown(SUMMARY_HEADERS, srows, text_columns=1))
    print()
    print("pause/drain/held/wait: the cut's answer (wait = per held request); lat: pgbench's latency before the cut;")
    print("cut txns/p50/p99/max: the transactions in flight at any time of the cut (its journal's first to last")
    print("step; a flip: the admin call); min 1s: the worst 1-s window (sliding by 50 ms) before / around the cut;")
    print("dip = 1 - min 1s cut / tps before (the median 1-s window before the cut); tps after: the median after it.")
    print("errors: pgbench clients ended by an error; diverged rows: rows only on one side or different, by key;")
    print("unbalanced: the side(s) where sum(abalance), sum(bbalance), sum(tbalance), sum(delta) are not all equal.")
    for r in runs:
        head = f"r{r.round} {r.method}"
        if r.error is not None:
            print(f"{head}: FAILED: {r.error}")
            continue
        if r.reason:
            print(f"{head}: {r.result}: {r.reason}")
        if r.timings_ms:
            print(f"{head}: steps (ms since the cut began): {json.dumps(r.timings_ms)}")
        if r.guards_wait_s:
            print(f"{head}: waited {r.guards_wait_s:.1f} s for the cut's guards (sync lag {r.sync_lag_s} s)")
        for message in r.error_messages:
            print(f"{head}: client error: {message}")
        for table, d in r.tables.items():
            if d.diverged:
                print(
                    f"{head}: {table}: {d.only_old} only on old, {d.only_new} only on new, {d.differ} different "
                    f"(rows old {d.old_rows}, new {d.new_rows}; e.g. {', '.join(d.examples)})"
                )
        for side in r.unbalanced:
            print(f"{head}: {side}: TPC-B sums differ: {r.balances[side]}")
        journal = {k: r.mirror.get(k) for k in ("diverged", "failed", "unmirrored", "out_of_sync_tables")}
        if any(journal.values()):
            print(f"{head}: mirror journal: {journal}")
        for line in r.proxy_log:
            print(f"{head}: proxy log: {line}")
    print()
    for r in guarded:
        if r.error is None:
            met = guarded_ok(r)
            print(
                f"r{r.round} guarded: result {r.result}, wait p99 {_fmt(r.wait_p99_ms, '.1f')} ms "
                f"(< {EXPECT_P99_MS:g}), {r.errors} client error(s), {r.diverged_rows} diverged row(s), "
                f"balanced {'no: ' + ','.join(r.unbalanced) if r.unbalanced else 'yes'} "
                f"-> {'MET' if met else 'NOT MET'}"
            )
    for r in runs:
        if r.method != GUARDED and r.error is None:
            print(
                f"r{r.round} {r.method}: {r.errors} client error(s), {r.diverged_rows} diverged row(s), "
                f"balanced {'no: ' + ','.join(r.unbalanced) if r.unbalanced else 'yes'}"
            )
    print()
    print("VERDICT: " + ("guarded cut met every expectation" if ok else "FAILED or NOT MET (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
