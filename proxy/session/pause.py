"""The write pause of a cut-over: requests that would start work on the primary wait; reads go on.

A guarded cut-over (issue 9) swaps the primary while applications stay connected. It first
pauses: from then on, a request that is not part of a transaction already running, and that a
session would send to the primary, is held in that session's queue. No error is sent; the client
simply waits for its answer. Reads the routing sends to another backend are not held, and
transactions already open run to their end (the drain waits for them). Resuming hands every held
request back to its session, which routes it again: after a swap, to the new primary.

The pause is a state of one proxy instance, shared by all its sessions (the SessionContext holds
it). It never outlives ``max_seconds``: an orchestrator that dies mid-cut cannot leave clients
waiting forever. Waiting is measured per held request, so the cut can report what it cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_MAX_SECONDS = 30.0


class WritePause:
    """Paused or not; the sessions holding a request; what the pauses cost."""

    def __init__(self) -> None:
        self.since: float | None = None  # monotonic time the pause began; None: not paused
        self.reason = ""
        self.pauses = 0
        self.held_total = 0  # requests held, over all pauses
        self.last_seconds = 0.0  # how long the last pause lasted
        self.last_held = 0  # requests the last pause held
        self.last_max_wait = 0.0  # the longest any request of the last pause waited (s)
        self.last_waits: list[float] = []  # how long each request of the last pause waited (s)
        self._waiting: dict[int, tuple[float, Callable[[], None]]] = {}  # session id → (since, wake)
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def begin(self, reason: str, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        """Pause (again: the same pause goes on, its expiry moved)."""
        if self.since is None:
            self.since = time.monotonic()
            self.pauses += 1
            self.last_held = 0
            self.last_max_wait = 0.0
            self.last_waits = []
            log.warning("write pause: %s", reason)
        self.reason = reason
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = asyncio.get_running_loop().call_later(max_seconds, self._expired, max_seconds)

    def hold(self, session: object, wake: Callable[[], None]) -> None:
        """``session`` holds a request until the pause ends; then ``wake()`` is called (soon,
        on the event loop, not from inside end())."""
        key = id(session)
        if key not in self._waiting:
            self._waiting[key] = (time.monotonic(), wake)
            self.held_total += 1
            self.last_held += 1

    def forget(self, session: object) -> None:
        """A session that ends while holding a request (its client left)."""
        self._waiting.pop(id(session), None)

    @property
    def holding(self) -> int:
        return len(self._waiting)

    def end(self) -> float:
        """Resume: every held request goes on. Returns how long the pause lasted (s)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.since is None:
            return 0.0
        now = time.monotonic()
        lasted = now - self.since
        self.since = None
        self.last_seconds = lasted
        waiting, self._waiting = self._waiting, {}
        loop = asyncio.get_running_loop()
        for since, wake in waiting.values():
            self.last_waits.append(now - since)
            loop.call_soon(wake)
        self.last_max_wait = max(self.last_waits, default=0.0)
        log.warning("write pause ended after %.3f s (%d request(s) held)", lasted, len(waiting))
        return lasted

    def _expired(self, max_seconds: float) -> None:
        self._expiry = None
        log.error("write pause (%s) lasted its maximum of %.1f s: resumed", self.reason, max_seconds)
        self.end()

    def summary(self) -> dict[str, object]:
        return {
            "paused": self.active,
            "reason": self.reason if self.active else "",
            "paused_for_s": round(time.monotonic() - self.since, 3) if self.since is not None else 0.0,
            "holding": self.holding,
            "pauses": self.pauses,
            "held_total": self.held_total,
            "last_seconds": round(self.last_seconds, 4),
            "last_held": self.last_held,
            "last_max_wait_s": round(self.last_max_wait, 4),
            "last_wait_p50_s": round(percentile(self.last_waits, 50), 4),
            "last_wait_p99_s": round(percentile(self.last_waits, 99), 4),
        }


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil
    return ordered[int(rank) - 1]
