"""Process helpers shared by the benchmark scripts (start, wait for a port, stop, read a log tail)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

STARTUP_TIMEOUT = 20.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = STARTUP_TIMEOUT) -> bool:
    """True once 127.0.0.1:port accepts connections; False if proc exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        time.sleep(0.05)
    return False


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (runuser + its child), then SIGKILL after a grace period; always reaped."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def read_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def machine_info() -> dict[str, str]:
    """Where a figure was measured: date, architecture, CPUs, CPU model, Python."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "cpu model"):
                cpu = value.strip()
                break
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_cleanly_on_signals() -> None:
    """SIGTERM/SIGHUP become SystemExit, so every `finally` and context manager cleans up
    (clusters and proxies are never left behind)."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


REPO_ROOT = Path(__file__).resolve().parent.parent


def start_pgshift(config: Path, stderr_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m proxy serve --config CONFIG` from this checkout, in its own session (Ctrl-C in
    the terminal reaches only the benchmark, which stops the proxy in order); stderr to a file."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra_env or {})
    with stderr_path.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def client_and_mode_lists(parser: argparse.ArgumentParser, args: argparse.Namespace, modes: Sequence[str]) -> None:
    """--clients and --modes (comma-separated) as ``args.client_list`` / ``args.mode_list``;
    a bad value is a usage error naming the option."""
    try:
        args.client_list = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        parser.error("--clients must be comma-separated integers")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.client_list or min(args.client_list) < 1:
        parser.error("--clients needs at least one positive integer")
    if unknown := set(args.mode_list) - set(modes):
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(modes)}")
