"""How fast a routing change takes effect: from the admin API call to the first reply from the new backend.

Single instance (a flip, and a change of read weights) and three instances sharing one control
store (a flip sent to one of them), on throw-away clusters. Measured on the client side only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/switch.py` from a checkout: make `proxy` importable without installing it.
sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
import psycopg  # noqa: E402
from common import STARTUP_TIMEOUT, exit_cleanly_on_signals, log, read_tail, start_pgshift, stop_process, wait_for_port  # noqa: E402

from proxy.errors import ClusterError  # noqa: E402
from proxy.localpg import LocalCluster, create_cluster, free_port  # noqa: E402

TOKEN_VAR = "PGSHIFT_BENCH_TOKEN"
QUERY = "select current_setting('port')"  # a read; its answer names the backend that served it
EXPECT_SINGLE_MS = 10.0
EXPECT_MULTI_MS = 1000.0
INSTANCES = ("p1", "p2", "p3")  # the flip is sent to the first one's API
MULTI_SLOWEST = "3 instances flip: slowest instance"
BASE_HTTP = "baseline: GET /healthz round trip"
BASE_FSYNC = "baseline: fsync of one line (state_file dir)"


def multi_case(instance: str) -> str:
    return f"3 instances flip: {instance}" + (" (API)" if instance == INSTANCES[0] else "")


# --- processes ---


class ProxyFailed(RuntimeError):
    pass


@dataclass
class Proxy:
    name: str
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    token: str

    def wait_ready(self) -> None:
        for port in (self.port, self.admin_port):
            if not wait_for_port(port, self.proc):
                state = "exited" if self.proc.poll() is not None else f"no listener after {STARTUP_TIMEOUT:.0f}s"
                raise ProxyFailed(f"proxy {self.name} did not start ({state}):\n{read_tail(self.stderr_path)}")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One admin API call on a fresh connection, as `curl` or the CLI would make it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            headers = {"Authorization": f"Bearer {self.token}", "X-Pgshift-Caller": "bench/switch.py"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, raw.decode(errors="replace")


def proxy_config(
    name: str, port: int, admin_port: int, old: LocalCluster, new: LocalCluster, control: dict[str, str]
) -> str:
    lines = [
        "[listen]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "",
        "[proxy]",
        "shutdown_grace = 2",
        "",
        "[admin]",
        'host = "127.0.0.1"',
        f"port = {admin_port}",
        f'token = "env:{TOKEN_VAR}"',
        "",
        "[control]",
        f'instance = "{name}"',
        *(f'{key} = "{value}"' for key, value in control.items()),
        "",
    ]
    for label, cluster in (("old", old), ("new", new)):
        lines += [f"[backends.{label}]", f'dsn = "postgresql://127.0.0.1:{cluster.port}?sslmode=disable"', ""]
    lines += ["[routing]", 'primary = "old"', ""]
    return "\n".join(lines)


def launch_proxy(
    stack: contextlib.ExitStack, workdir: Path, name: str, old: LocalCluster, new: LocalCluster,
    control: dict[str, str], token: str,
) -> Proxy:  # fmt: skip
    """Start `python -m proxy serve` (not yet waited for); its stop is registered on ``stack``."""
    pdir = workdir / name
    pdir.mkdir()
    port, admin_port = free_port(), free_port()
    config = pdir / "pgshift.toml"
    config.write_text(proxy_config(name, port, admin_port, old, new, control))
    stderr_path = pdir / "stderr.log"
    proc = start_pgshift(config, stderr_path, {TOKEN_VAR: token})
    stack.callback(stop_process, proc)
    return Proxy(name, port, admin_port, proc, stderr_path, token)


# --- the client side ---


class Watcher(threading.Thread):
    """One connection to a proxy running QUERY back to back; records when the answering backend changes.

    Every reply is stamped with time.perf_counter() as soon as it is read; only changes of port
    are kept (``changes``), so memory stays flat however long the run.
    """

    def __init__(self, name: str, port: int) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.label = name
        self.conn = psycopg.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres", sslmode="disable",
            connect_timeout=10, autocommit=True,
            # No server-side prepare: every execution is one simple-protocol Query, routed on its own.
            prepare_threshold=None,
        )  # fmt: skip
        self.cond = threading.Condition()
        self.changes: list[tuple[float, int]] = []
        self.replies = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._began = 0.0

    @property
    def port_now(self) -> int | None:
        with self.cond:
            return self.changes[-1][1] if self.changes else None

    def run(self) -> None:
        cur = self.conn.cursor()
        last = None
        self._began = time.perf_counter()
        try:
            while not self._halt.is_set():
                cur.execute(QUERY)
                row = cur.fetchone()
                now = time.perf_counter()
                port = int(row[0]) if row else -1
                self.replies += 1
                if port != last:
                    last = port
                    with self.cond:
                        self.changes.append((now, port))
                        self.cond.notify_all()
        except BaseException as exc:  # reported by wait_for; the thread must not die silently
            self.error = exc
            with self.cond:
                self.cond.notify_all()

    def wait_for(self, port: int, after: float, timeout: float) -> float | None:
        """perf_counter() of the first reply from ``port`` later than ``after``; None on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                # Only changes of backend are kept, so this list is short (about two per round).
                first = next((t for t, p in self.changes if t > after and p == port), None)
                if first is not None:
                    return first
                if self.error is not None:
                    raise RuntimeError(f"client of {self.label} failed: {self.error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def transitions_since(self, after: float) -> int:
        with self.cond:
            return sum(1 for t, _ in self.changes if t > after)

    def round_trip_ms(self) -> float | None:
        """Mean time per query so far (the loop never idles, so this is one round trip)."""
        if not self.replies:
            return None
        return (time.perf_counter() - self._began) * 1000 / self.replies

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        with contextlib.suppress(Exception):
            self.conn.close()


@contextlib.contextmanager
def watchers(proxies: Sequence[Proxy]) -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    try:
        for proxy in proxies:
            watcher = Watcher(proxy.name, proxy.port)
            started.append(watcher)
            watcher.start()
        yield started
    finally:
        for watcher in started:
            watcher.stop()


# --- measuring ---


@dataclass
class Case:
    name: str
    samples_ms: list[float | None] = field(default_factory=list)  # None: no switch within --timeout
    warmup_ms: list[float | None] = field(default_factory=list)

    def values(self) -> list[float]:
        return sorted(v for v in self.samples_ms if v is not None)

    @property
    def failures(self) -> int:
        return sum(1 for v in self.samples_ms if v is None)

    def stats(self) -> dict[str, float | None]:
        values = self.values()
        if not values:
            return {"min": None, "median": None, "p95": None, "max": None}
        # p95 by nearest rank: with fewer than 20 samples it is the maximum.
        p95 = values[max(0, math.ceil(0.95 * len(values)) - 1)]
        return {"min": values[0], "median": statistics.median(values), "p95": p95, "max": values[-1]}


def settle(ws: Sequence[Watcher], port: int, timeout: float) -> None:
    """Wait until every client is being answered by ``port``."""
    deadline = time.monotonic() + timeout
    for w in ws:
        while w.port_now != port and time.monotonic() < deadline:
            if w.error is not None:
                raise RuntimeError(f"client of {w.label} failed: {w.error}")
            time.sleep(0.01)
        if w.port_now != port:
            raise RuntimeError(f"client of {w.label} is answered by port {w.port_now}, expected {port}")


def switch_round(
    api: Proxy, method: str, path: str, body: Any, ws: Sequence[Watcher], from_port: int, to_port: int,
    timeout: float,
) -> tuple[float, list[float | None]]:  # fmt: skip
    """One change: (HTTP round trip ms, per-client ms from just before the request to the first new reply)."""
    for w in ws:
        if w.port_now != from_port:
            raise RuntimeError(f"client of {w.label} is on port {w.port_now} before the round, expected {from_port}")
    t0 = time.perf_counter()
    status, reply = api.call(method, path, body)
    http_ms = (time.perf_counter() - t0) * 1000
    if status != 200 or not isinstance(reply, dict) or not reply.get("changed"):
        raise RuntimeError(f"{method} {path} {json.dumps(body)} -> HTTP {status}: {reply}")
    seen = [w.wait_for(to_port, after=t0, timeout=timeout) for w in ws]
    for w, t in zip(ws, seen, strict=True):
        if t is not None and w.transitions_since(t0) != 1:
            log(f"warning: client of {w.label} changed backend {w.transitions_since(t0)} times in one round")
    return http_ms, [None if t is None else (t - t0) * 1000 for t in seen]


def run_rounds(
    label: str, api: Proxy, ws: Sequence[Watcher], steps: Sequence[tuple[str, str, Any, int, int]],
    rounds: int, warmup: int, timeout: float, cases: dict[str, Case], names: Sequence[str],
) -> None:  # fmt: skip
    """``steps`` alternate (method, path, body, from_port, to_port); ``names`` = [http case, per-client
    cases..., slowest case (multi only)]."""
    for n in range(warmup + rounds):
        method, path, body, from_port, to_port = steps[n % len(steps)]
        http_ms, per = switch_round(api, method, path, body, ws, from_port, to_port, timeout)
        slowest = None if any(v is None for v in per) else max(v for v in per if v is not None)
        values = [http_ms, *per] + ([slowest] if len(names) > len(per) + 1 else [])
        for name, value in zip(names, values, strict=True):
            target = cases[name].warmup_ms if n < warmup else cases[name].samples_ms
            target.append(value)
        shown = ", ".join("timeout" if v is None else f"{v:.2f}" for v in per)
        tag = "warm-up" if n < warmup else f"{n - warmup + 1}/{rounds}"
        log(f"  {label} [{tag}] -> {to_port}: {shown} ms (HTTP {http_ms:.2f} ms)")
        if any(v is None for v in per):
            # Some client never saw the change: wait for it before the next round, or give up.
            settle(ws, to_port, timeout)
        # A random pause, so changes do not line up with the heartbeat or the health probes.
        time.sleep(random.uniform(0.05, 0.25))


def single_instance(
    stack: contextlib.ExitStack, workdir: Path, old: LocalCluster, new: LocalCluster, args: argparse.Namespace,
    cases: dict[str, Case], notes: dict[str, Any],
) -> None:  # fmt: skip
    token = secrets.token_hex(16)
    proxy = launch_proxy(
        stack, workdir, "single", old, new, {"state_file": str(workdir / "single" / "state.jsonl")}, token
    )
    proxy.wait_ready()
    with watchers([proxy]) as ws:
        settle(ws, old.port, args.timeout)
        log(f"single instance: {args.rounds} flips (+{args.warmup} warm-up)")
        flip = [
            ("POST", "/api/flip", {"primary": "new"}, old.port, new.port),
            ("POST", "/api/flip", {"primary": "old"}, new.port, old.port),
        ]
        names = ["single flip: HTTP round trip", "single flip: first reply from new"]
        run_rounds("flip", proxy, ws, flip, args.rounds, args.warmup, args.timeout, cases, names)
        if ws[0].port_now != old.port:  # an odd number of rounds ended on "new"
            proxy.call("POST", "/api/flip", {"primary": "old"})
            settle(ws, old.port, args.timeout)

        log(f"single instance: {args.rounds} read-weight changes (+{args.warmup} warm-up)")
        status, reply = proxy.call("PATCH", "/api/routing", {"reads": {"old": 100, "new": 0}})
        if status != 200:
            raise RuntimeError(f"PATCH /api/routing -> HTTP {status}: {reply}")
        settle(ws, old.port, args.timeout)
        reads = [
            ("PATCH", "/api/routing", {"reads": {"old": 0, "new": 100}}, old.port, new.port),
            ("PATCH", "/api/routing", {"reads": {"old": 100, "new": 0}}, new.port, old.port),
        ]
        names = ["single reads: HTTP round trip", "single reads: first reply from new"]
        run_rounds("reads", proxy, ws, reads, args.rounds, args.warmup, args.timeout, cases, names)
        notes["query_round_trip_ms"] = ws[0].round_trip_ms()
        # Baselines, to read the numbers above: an admin call that changes nothing, and what a
        # change costs before it is installed with a state_file (one appended line, fsynced).
        probe = workdir / "single" / "fsync-probe"
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            status, _reply = proxy.call("GET", "/healthz")
            cases[BASE_HTTP].samples_ms.append((time.perf_counter() - t0) * 1000 if status == 200 else None)
            t0 = time.perf_counter()
            fd = os.open(probe, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b'{"version": 0}\n')
                os.fsync(fd)
            finally:
                os.close(fd)
            cases[BASE_FSYNC].samples_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(random.uniform(0.01, 0.05))
    stop_process(proxy.proc)


def three_instances(
    stack: contextlib.ExitStack, workdir: Path, old: LocalCluster, new: LocalCluster, store: LocalCluster,
    args: argparse.Namespace, cases: dict[str, Case], notes: dict[str, Any],
) -> None:  # fmt: skip
    token = secrets.token_hex(16)
    # heartbeat stays at its default (1 s): the fallback poll when a NOTIFY is missed.
    control = {"store": f"{store.dsn()}?sslmode=disable"}
    # Started together, as a deployment would: they settle version 1 in the store between them.
    proxies = [launch_proxy(stack, workdir, name, old, new, control, token) for name in INSTANCES]
    for proxy in proxies:
        proxy.wait_ready()
    with watchers(proxies) as ws:
        settle(ws, old.port, args.timeout)
        log(f"three instances: {args.rounds} flips sent to {proxies[0].name} (+{args.warmup} warm-up)")
        flip = [
            ("POST", "/api/flip", {"primary": "new"}, old.port, new.port),
            ("POST", "/api/flip", {"primary": "old"}, new.port, old.port),
        ]
        names = ["3 instances flip: HTTP round trip", *(multi_case(p.name) for p in proxies), MULTI_SLOWEST]
        run_rounds("flip x3", proxies[0], ws, flip, args.rounds, args.warmup, args.timeout, cases, names)
        notes["query_round_trip_ms_x3"] = [w.round_trip_ms() for w in ws]
        status, state = proxies[0].call("GET", "/api/state")
        if status == 200 and isinstance(state, dict):
            notes["store"] = state.get("store", {}).get("location")
            notes["instances_seen_by_p1"] = [i.get("instance") for i in state.get("instances", [])]


# --- reporting ---


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


HEADERS = ["case", "n", "failed", "min ms", "median ms", "p95 ms", "max ms", "warm-up ms"]


def render(cases: dict[str, Case]) -> str:
    rows = []
    for case in cases.values():
        s = case.stats()
        warm = ", ".join(_fmt(v) for v in case.warmup_ms) or "-"
        rows.append(
            [case.name, str(len(case.samples_ms)), str(case.failures)]
            + [_fmt(s[k]) for k in ("min", "median", "p95", "max")]
            + [warm]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    just = [str.ljust] + [str.rjust] * (len(HEADERS) - 1)
    lines = ["  ".join(j(h, w) for j, h, w in zip(just, HEADERS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(j(v, w) for j, v, w in zip(just, r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def verdict(cases: dict[str, Case]) -> tuple[str, dict[str, bool | None]]:
    def check(labelled: dict[str, str], limit: float) -> tuple[bool | None, str]:
        """Met when every measured round of every case is under ``limit`` (the max, not a percentile)."""
        present = {label: cases[n] for label, n in labelled.items() if n in cases and cases[n].samples_ms}
        if not present:
            return None, "not measured"
        stats = {label: c.stats() for label, c in present.items()}
        failed = sum(c.failures for c in present.values())
        ok = failed == 0 and all(s["max"] is not None and s["max"] < limit for s in stats.values())
        detail = ", ".join(
            f"{label} median {_fmt(s['median'])} / max {_fmt(s['max'])} ms" for label, s in stats.items()
        )
        if failed:
            detail += f", {failed} round(s) timed out"
        return ok, detail

    single_ok, single = check(
        {"flip": "single flip: first reply from new", "reads": "single reads: first reply from new"}, EXPECT_SINGLE_MS
    )
    multi_ok, multi = check({"slowest instance": MULTI_SLOWEST}, EXPECT_MULTI_MS)

    def word(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    line = (
        f"summary: single instance < {EXPECT_SINGLE_MS:.0f} ms: {word(single_ok)} ({single}); "
        f"three instances < {EXPECT_MULTI_MS / 1000:.0f} s: {word(multi_ok)} ({multi})"
    )
    return line, {"single_under_10ms": single_ok, "three_instances_under_1s": multi_ok}


def machine_info() -> dict[str, str]:
    return {**common.machine_info(), "psycopg": psycopg.__version__}


# --- main ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="measured changes per case (default 20)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured changes first (default 1)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a switch (default 5)")
    parser.add_argument("--skip-multi", action="store_true", help="only the single-instance cases")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--rounds must be at least 1, --warmup at least 0, --timeout above 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_signals()
    # Threads hand the GIL over sooner: a reply is stamped as soon as its thread is scheduled.
    sys.setswitchinterval(0.0005)
    info = machine_info()
    cases: dict[str, Case] = {}
    notes: dict[str, Any] = {}
    for name in (
        "single flip: first reply from new", "single flip: HTTP round trip",
        "single reads: first reply from new", "single reads: HTTP round trip",
        BASE_HTTP, BASE_FSYNC,
        MULTI_SLOWEST,
        *(multi_case(p) for p in INSTANCES),
        "3 instances flip: HTTP round trip",
    ):  # fmt: skip
        cases[name] = Case(name)
    error: str | None = None

    with contextlib.ExitStack() as stack:
        log("creating clusters old, new and store ...")
        try:
            old = stack.enter_context(create_cluster("switch-old"))
            new = stack.enter_context(create_cluster("switch-new"))
            store = None
            if not args.skip_multi:
                small = {"shared_buffers": "16MB", "max_connections": "50"}
                store = stack.enter_context(create_cluster("switch-store", settings=small))
        except ClusterError as exc:
            log(f"cluster failed: {exc}\n{exc.detail or ''}")
            return 1
        info["postgres"] = old.psql("SHOW server_version").strip()
        workdir = Path(tempfile.mkdtemp(prefix="pgshift-switch-", dir="/tmp"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        try:
            single_instance(stack, workdir, old, new, args, cases, notes)
            if store is not None:
                three_instances(stack, workdir, old, new, store, args, cases, notes)
        except (ProxyFailed, RuntimeError, psycopg.Error) as exc:
            error = str(exc)
            log(f"FAILED: {error}")

    cases = {k: v for k, v in cases.items() if v.samples_ms or v.warmup_ms}
    line, met = verdict(cases)
    rtt = notes.get("query_round_trip_ms")
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print()
    print(
        f"Each case: {args.rounds} measured changes (+{args.warmup} warm-up), alternating old -> new -> old.\n"
        "Times are client-side: from just before the HTTP request is sent (fresh connection) to the first\n"
        f"reply from the new backend on a connection that runs `{QUERY}` back to back.\n"
        f"They include up to one query round trip (measured here: {_fmt(rtt)} ms per query, single instance).\n"
        "'HTTP round trip' is the admin call alone; a change is installed once it is persisted (single\n"
        "instance: state_file line fsynced; three instances: INSERT + NOTIFY committed in the store).\n"
        "The baselines are an admin call that changes nothing and one fsynced append in the state_file\n"
        "directory. p95 is nearest-rank (= max below 20 rounds); warm-up rounds are not in the stats.\n"
        "Three instances share a Postgres control store (LISTEN/NOTIFY; heartbeat poll 1 s as fallback);\n"
        "the flip goes to p1's API, 'slowest instance' is when all three clients have seen the change."
    )
    print()
    print(render(cases))
    print()
    print(line)
    if error is not None:
        print(f"\nerror: {error}")
    if args.json is not None:
        payload = {
            "info": info,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "notes": notes,
            "expectations_met": met,
            "error": error,
            "cases": {n: {"samples_ms": c.samples_ms, "warmup_ms": c.warmup_ms, **c.stats()} for n, c in cases.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if error is not None else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
