"""Per-backend request latency histograms and error counts, kept as plain lists for the hot path.

prometheus-client's Histogram.observe takes a lock and walks the buckets in Python on every call;
the relay instead resolves a series once per request and, on completion, does one C bisect and
two list updates. The admin API turns these into metric families only when scraped (as PgBouncer
keeps counters and SHOW STATS reads them).
"""

from __future__ import annotations

import bisect
from collections import Counter

# Seconds. A proxied request on loopback takes ~100 µs; a slow analytical read, seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SUM = len(LATENCY_BUCKETS) + 1  # index of the running sum in a series


class RequestStats:
    """``latency[(backend, kind)]`` = a series: per-bucket counts (non-cumulative, +Inf last), then
    the sum of the observed seconds; ``errors[(backend, sqlstate)]`` counts the ErrorResponses
    backends sent to clients."""

    __slots__ = ("errors", "latency")

    def __init__(self) -> None:
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.errors: Counter[tuple[str, str]] = Counter()

    def series(self, backend: str, kind: str) -> list[float]:
        key = (backend, kind)
        found = self.latency.get(key)
        if found is None:
            found = self.latency[key] = [0] * SUM + [0.0]
        return found

    def observe(self, backend: str, kind: str, seconds: float) -> None:
        """One observation (the routed relay inlines these two lines on a series it resolved)."""
        series = self.series(backend, kind)
        series[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series[SUM] += seconds

    def error(self, backend: str, sqlstate: str) -> None:
        self.errors[(backend, sqlstate)] += 1

    def totals(self, backend: str) -> tuple[int, float, int]:
        """(requests, seconds spent, errors) for one backend, over every kind."""
        requests = seconds = 0.0
        for (name, _), series in self.latency.items():
            if name == backend:
                requests += sum(series[:SUM])
                seconds += series[SUM]
        errors = sum(n for (name, _), n in self.errors.items() if name == backend)
        return int(requests), seconds, errors
