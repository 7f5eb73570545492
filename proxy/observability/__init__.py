"""Measurements the data path records cheaply and the admin API exports (no module globals)."""

from proxy.observability.requests import LATENCY_BUCKETS, SUM, RequestStats

__all__ = ["LATENCY_BUCKETS", "SUM", "RequestStats"]
