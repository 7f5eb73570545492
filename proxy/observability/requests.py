"""Per-backend request latency histograms and error counts, kept as plain lists for the hot path.

prometheus-client's Histogram.observe takes a lock and walks the buckets in Python on every call;
the relay instead does one C bisect and one list increment, and the admin API turns these into
metric families only when scraped (as PgBouncer keeps counters and SHOW STATS reads them).
"""

from __future__ import annotations

import bisect
from collections import Counter

# Seconds. A proxied request on loopback takes ~100 µs; a slow analytical read, seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class RequestStats:
    """``latency[(backend, kind)]`` = per-bucket counts (non-cumulative, +Inf last) and their sum;
    ``errors[(backend, sqlstate)]`` counts ErrorResponses the backends sent."""

    __slots__ = ("errors", "latency", "sums")

    def __init__(self) -> None:
        self.latency: dict[tuple[str, str], list[int]] = {}
        self.sums: dict[tuple[str, str], float] = {}
        self.errors: Counter[tuple[str, str]] = Counter()

    def observe(self, backend: str, kind: str, seconds: float) -> None:
        key = (backend, kind)
        counts = self.latency.get(key)
        if counts is None:
            counts = self.latency[key] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.sums[key] = 0.0
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[key] += seconds

    def error(self, backend: str, sqlstate: str) -> None:
        self.errors[(backend, sqlstate)] += 1

    def totals(self, backend: str) -> tuple[int, float, int]:
        """(requests, seconds spent, errors) for one backend, over every kind."""
        requests = sum(sum(c) for (b, _), c in self.latency.items() if b == backend)
        seconds = sum(s for (b, _), s in self.sums.items() if b == backend)
        errors = sum(n for (b, _), n in self.errors.items() if b == backend)
        return requests, seconds, errors
