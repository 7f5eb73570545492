"""Backend health for status: a TCP probe per backend, and request/error rates over the last minute."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from proxy.config import BackendAddress
from proxy.observability import RequestStats

_WINDOW = 60.0  # seconds the rates in status cover


@dataclass(frozen=True, slots=True)
class Probe:
    up: bool
    seconds: float  # how long the TCP connect took (or until it failed)
    error: str | None
    at: float  # time.time() of the probe


_PROBE_TIMEOUT = 2.0


async def probe(address: BackendAddress) -> Probe:
    """Can a connection be opened at all? (A login needs the client's credentials; the sessions'
    own connect failures show up as read failovers and client errors.)"""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            if address.is_unix:
                _, writer = await asyncio.open_unix_connection(f"{address.host}/.s.PGSQL.{address.port}")
            else:
                _, writer = await asyncio.open_connection(address.host, address.port)
        writer.close()
        return Probe(True, time.perf_counter() - started, None, time.time())
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Probe(False, time.perf_counter() - started, reason, time.time())


@dataclass(frozen=True, slots=True)
class Rates:
    requests_per_s: float
    mean_latency_ms: float | None
    errors_per_s: float
    error_ratio: float | None  # errors / requests over the window


class RateWindow:
    """Samples of the cumulative counters; rates are differences across the window."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[tuple[float, int, float, int]]] = {}

    def sample(self, stats: RequestStats, backends: list[str]) -> None:
        now = time.monotonic()
        for name in backends:
            samples = self._samples.setdefault(name, deque())
            samples.append((now, *stats.totals(name)))
            while len(samples) > 2 and now - samples[1][0] >= _WINDOW:
                samples.popleft()

    def rates(self, stats: RequestStats, name: str) -> Rates:
        now = time.monotonic()
        current = (now, *stats.totals(name))
        samples = self._samples.get(name)
        first = samples[0] if samples else current
        span = now - first[0]
        requests = current[1] - first[1]
        seconds = current[2] - first[2]
        errors = current[3] - first[3]
        if span <= 0:
            return Rates(0.0, None, 0.0, None)
        return Rates(
            requests / span,
            seconds / requests * 1000 if requests else None,
            errors / span,
            errors / requests if requests else None,
        )
