"""pgbench through pgshift vs PgBouncer vs direct, in one run, on one throw-away cluster."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/run.py` from a checkout: make `proxy` importable without installing it.
sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
from common import STARTUP_TIMEOUT, exit_cleanly_on_signals, log, read_tail, start_pgshift, stop_process, wait_for_port  # noqa: E402

from proxy.errors import ClusterError  # noqa: E402
from proxy.localpg import LocalCluster, create_cluster, free_port  # noqa: E402

# pgshift: the default (live control plane: every session can follow a flip); static: routing fixed at
# startup ([control] live = false), plain relays; routed: live, reads 50/50 over two clusters.
TARGETS = ("direct", "pgbouncer", "static", "pgshift", "routed")
PROXIES = ("pgbouncer", "static", "pgshift", "routed")
MODES = ("simple", "extended", "prepared")

_TPS_RE = re.compile(r"^tps = ([0-9.]+) \((?:without|excluding)", re.MULTILINE)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)


@dataclass
class Result:
    mode: str
    clients: int
    target: str
    tps: float | None = None
    latency_ms: float | None = None
    cpu_us_per_tx: float | None = None  # the proxy process's own CPU time per transaction
    error: str | None = None


# --- helpers ---


def client_env() -> dict[str, str]:
    # Inherited PGHOST/PGSSLMODE/... must not change what we measure.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def make_workdir() -> Path:
    # Under /tmp (every parent traversable) and later chowned to the cluster's OS user:
    # PgBouncer refuses to run as root and writes its log and pid file here.
    workdir = Path(tempfile.mkdtemp(prefix="pgshift-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    return workdir


def chown_to(path: Path, os_user: str | None) -> None:
    if os_user is None:
        return
    entry = pwd.getpwnam(os_user)
    for item in (path, *path.rglob("*")):
        os.chown(item, entry.pw_uid, entry.pw_gid)


# --- targets ---


@contextlib.contextmanager
def pgbouncer(cluster: LocalCluster, workdir: Path, pool_size: int) -> Iterator[tuple[int | None, str]]:
    """Yield (port, "") with PgBouncer running in session mode, or (None, reason)."""
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
    if binary is None:
        yield None, "pgbouncer not installed"
        return
    bdir = workdir / "pgbouncer"
    bdir.mkdir()
    port = free_port()
    (bdir / "userlist.txt").write_text('"postgres" ""\n')
    (bdir / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"postgres = host=127.0.0.1 port={cluster.port} dbname=postgres",
                "",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                f"unix_socket_dir = {bdir}",
                "pool_mode = session",
                # trust still needs the user listed in auth_file.
                "auth_type = trust",
                f"auth_file = {bdir / 'userlist.txt'}",
                f"default_pool_size = {pool_size}",
                f"max_client_conn = {max(100, pool_size)}",
                f"logfile = {bdir / 'pgbouncer.log'}",
                f"pidfile = {bdir / 'pgbouncer.pid'}",
                "",
            ]
        )
    )
    chown_to(workdir, cluster.os_user)
    stderr_path = bdir / "stderr.log"
    with stderr_path.open("wb") as stderr:
        # Own session: Ctrl-C in the terminal reaches only us, and we stop it in order.
        proc = subprocess.Popen(
            cluster.as_os_user([binary, str(bdir / "pgbouncer.ini")]),
            cwd=bdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        if wait_for_port(port, proc):
            PIDS["pgbouncer"] = _pgbouncer_pid(bdir / "pgbouncer.pid", proc)
            yield port, ""
        else:
            reason = read_tail(stderr_path) or read_tail(bdir / "pgbouncer.log")
            yield None, f"pgbouncer did not start: {reason}"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def pgshift(
    cluster: LocalCluster, workdir: Path, second: LocalCluster | None = None, *, live: bool = True
) -> Iterator[tuple[int | None, str]]:
    """Yield (port, "") with `python -m proxy serve` running, or (None, reason).

    With ``second``, reads are split 50/50 between the two clusters (statement analysis on);
    ``live=False`` fixes routing at startup (plain relays).
    """
    label = "routed" if second is not None else ("pgshift" if live else "static")
    sdir = workdir / label
    sdir.mkdir()
    port = free_port()
    config = sdir / "pgshift.toml"
    text = (
        "[listen]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        "\n"
        f"[admin]\nport = {free_port()}\n"
        f"[control]\nlive = {'true' if live else 'false'}\n"
        "\n"
        "[backends.main]\n"
        f'dsn = "postgresql://127.0.0.1:{cluster.port}?sslmode=disable"\n'
    )
    if second is not None:
        text += f'[backends.second]\ndsn = "postgresql://127.0.0.1:{second.port}?sslmode=disable"\n'
    text += '\n[routing]\nprimary = "main"\n'
    if second is not None:
        text += "reads = { main = 50, second = 50 }\n"
    config.write_text(text)
    stderr_path = sdir / "stderr.log"
    proc = start_pgshift(config, stderr_path)
    try:
        if wait_for_port(port, proc):
            PIDS[label] = proc.pid
            yield port, ""
        else:
            state = "exited" if proc.poll() is not None else f"no listener after {STARTUP_TIMEOUT:.0f}s"
            yield None, f"pgshift did not start ({state}): {read_tail(stderr_path).strip()}"
    finally:
        stop_process(proc)


# --- measuring ---

# Process ids of the proxies under test, for their CPU time per transaction (what limits a proxy
# on a small machine is the CPU it takes away from Postgres and pgbench).
PIDS: dict[str, int] = {}


def _pgbouncer_pid(pidfile: Path, proc: subprocess.Popen[bytes]) -> int:
    for _ in range(50):
        with contextlib.suppress(OSError, ValueError):
            return int(pidfile.read_text().strip())
        time.sleep(0.1)
    return proc.pid


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5); here shifted by the two we split off.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_pgbench(port: int, mode: str, clients: int, seconds: int) -> tuple[float, float]:
    argv = ["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2))]
    argv += ["-T", str(seconds), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=client_env(), timeout=seconds + 120, check=False)
    tps, lat = _TPS_RE.search(proc.stdout), _LAT_RE.search(proc.stdout)
    if proc.returncode != 0 or tps is None or lat is None:
        raise RuntimeError(f"pgbench exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return float(tps.group(1)), float(lat.group(1))


def machine_info() -> dict[str, str]:
    def version(argv: Sequence[str]) -> str:
        try:
            out = subprocess.run(list(argv), capture_output=True, text=True, check=False).stdout
        except OSError:
            return "n/a"
        return out.splitlines()[0].strip() if out else "n/a"

    return {
        **common.machine_info(),
        "pgbench": version(["pgbench", "--version"]),
        "pgbouncer": version([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"]),
    }


# --- reporting ---


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _added_us(lat: float | None, base: float | None) -> float | None:
    return None if lat is None or base is None else (lat - base) * 1000.0


def table_rows(results: list[Result], modes: Sequence[str], clients: Sequence[int]) -> list[list[str]]:
    by_key = {(r.mode, r.clients, r.target): r for r in results}
    rows = []
    for mode in modes:
        for c in clients:
            cell = {t: by_key.get((mode, c, t)) or Result(mode, c, t) for t in TARGETS}
            tps = {t: cell[t].tps for t in TARGETS}
            lat = {t: cell[t].latency_ms for t in TARGETS}
            cpu = {t: cell[t].cpu_us_per_tx for t in PROXIES}
            rows.append(
                [mode, str(c)]
                + [_fmt(tps[t], ".0f") for t in TARGETS]
                + [_fmt(lat[t], ".3f") for t in TARGETS]
                + [
                    _fmt(_ratio(tps["static"], tps["pgbouncer"]), ".2f"),
                    _fmt(_ratio(tps["pgshift"], tps["pgbouncer"]), ".2f"),
                    _fmt(_ratio(tps["routed"], tps["pgbouncer"]), ".2f"),
                    _fmt(_added_us(lat["pgbouncer"], lat["direct"]), "+.0f"),
                    _fmt(_added_us(lat["static"], lat["direct"]), "+.0f"),
                    _fmt(_added_us(lat["pgshift"], lat["direct"]), "+.0f"),
                ]
                + [_fmt(cpu[t], ".1f") for t in PROXIES]
            )
    return rows


HEADERS = [
    "mode", "clients",
    "tps direct", "tps pgbouncer", "tps static", "tps pgshift", "tps routed 50/50",
    "lat direct ms", "lat pgbouncer ms", "lat static ms", "lat pgshift ms", "lat routed ms",
    "static/pgbouncer", "pgshift/pgbouncer", "routed/pgbouncer",
    "+µs pgbouncer", "+µs static", "+µs pgshift",
    "cpu µs/tx pgbouncer", "cpu µs/tx static", "cpu µs/tx pgshift", "cpu µs/tx routed",
]  # fmt: skip


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(HEADERS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def render_markdown(rows: list[list[str]], info: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        f"pgbench -S (select-only), {args.seconds}s per cell, scale {args.scale}; "
        f"{info['date']}, {info['machine']}, {info['nproc']} CPUs ({info['cpu']}).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADERS) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- main ---


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T per cell (default 10)")
    parser.add_argument("--clients", default="1,8", help="comma-separated client counts (default 1,8)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated pgbench -M modes")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument("--json", action="store_true", help="print results as JSON instead of tables")
    args = parser.parse_args(argv)
    common.client_and_mode_lists(parser, args, MODES)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_cleanly_on_signals()
    info = machine_info()
    results: list[Result] = []

    with contextlib.ExitStack() as stack:
        log("creating cluster ...")
        try:
            cluster = stack.enter_context(create_cluster("bench"))
        except ClusterError as exc:
            log(f"cluster failed: {exc}\n{exc.detail or ''}")
            return 1
        info["postgres"] = cluster.psql("SHOW server_version").strip()
        second = stack.enter_context(create_cluster("bench2"))
        for target_cluster in (cluster, second):
            log(f"pgbench -i -s {args.scale} on port {target_cluster.port} ...")
            init_argv = [
                "pgbench",
                "-i",
                "-q",
                "-s",
                str(args.scale),
                "-h",
                "127.0.0.1",
                "-p",
                str(target_cluster.port),
            ]
            init = subprocess.run(
                [*init_argv, "-U", "postgres", "postgres"],
                capture_output=True,
                text=True,
                env=client_env(),
                check=False,
            )
            if init.returncode != 0:
                log(f"pgbench -i failed:\n{init.stderr}")
                return 1

        workdir = make_workdir()
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        ports: dict[str, int | None] = {"direct": cluster.port}
        errors: dict[str, str] = {}
        for target, manager in (
            ("pgbouncer", pgbouncer(cluster, workdir, max(args.client_list))),
            ("static", pgshift(cluster, workdir, live=False)),
            ("pgshift", pgshift(cluster, workdir)),
            ("routed", pgshift(cluster, workdir, second)),
        ):
            port, why = stack.enter_context(manager)
            ports[target] = port
            if port is None:
                errors[target] = why
                log(why)

        cells = [(m, c) for m in args.mode_list for c in args.client_list]
        for n, (mode, clients) in enumerate(cells, 1):
            # Targets back to back within each cell, so drift (thermal, noisy neighbours) hits all.
            for target in TARGETS:
                result = Result(mode, clients, target)
                port = ports[target]
                if port is None:
                    result.error = errors[target]
                else:
                    try:
                        before = cpu_seconds(PIDS.get(target))
                        result.tps, result.latency_ms = run_pgbench(port, mode, clients, args.seconds)
                        after = cpu_seconds(PIDS.get(target))
                        if before is not None and after is not None and result.tps:
                            result.cpu_us_per_tx = (after - before) * 1e6 / (result.tps * args.seconds)
                        log(f"[{n}/{len(cells)}] {mode:<8} c={clients:<3} {target:<9} {result.tps:10.0f} tps")
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        result.error = str(exc)
                        log(f"[{n}/{len(cells)}] {mode:<8} c={clients:<3} {target:<9} FAILED: {exc}")
                results.append(result)

    rows = table_rows(results, args.mode_list, args.client_list)
    if args.json:
        print(json.dumps({"info": info, "args": vars(args), "results": [asdict(r) for r in results]}, indent=2))
        return 0
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print()
    print(render_text(rows))
    print()
    print(render_markdown(rows, info, args))
    for target, why in errors.items():
        print(f"\nnote: {target} not measured: {why}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
