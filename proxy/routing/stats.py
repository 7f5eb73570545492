"""Routing counters (decisions by backend and reason, pins by cause, read failovers, flips followed):
plain data the admin API exports to Prometheus; tests read them directly."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RoutingStats:
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (backend, reason)
    pins: Counter[str] = field(default_factory=Counter)  # cause
    failovers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (backend, cause)
    replays: Counter[str] = field(default_factory=Counter)  # backend: settings/statements injected
    moves: Counter[str] = field(default_factory=Counter)  # new primary: sessions that followed a flip
