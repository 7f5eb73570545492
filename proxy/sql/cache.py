"""Bounded LRU of analyses keyed by the exact SQL text: the per-statement hot path of the proxy."""

from __future__ import annotations

from collections import OrderedDict

from proxy.sql.analysis import Analysis, analyze

__all__ = ["AnalysisCache"]


class AnalysisCache:
    """LRU cache of :func:`analyze` results with hit/miss counters.

    Bounded by entry count AND by the total length of the cached texts: applications that inline values
    (multi-megabyte INSERT ... VALUES) would otherwise pin gigabytes in 10,000 entries. A text longer than
    ``max_text_length`` is analysed but never stored (it is almost certainly one-off).
    """

    __slots__ = ("_chars", "_entries", "capacity", "hits", "max_text_length", "max_total_length", "misses")

    def __init__(
        self, capacity: int = 10_000, *, max_text_length: int = 64 * 1024, max_total_length: int = 64 * 1024 * 1024
    ) -> None:
        if capacity < 1 or max_text_length < 0 or max_total_length < 0:
            raise ValueError("capacity must be >= 1 and the length limits >= 0")
        self.capacity = capacity
        self.max_text_length = max_text_length
        self.max_total_length = max_total_length
        self.hits = 0
        self.misses = 0
        self._chars = 0
        self._entries: OrderedDict[str, Analysis] = OrderedDict()

    def get(self, sql: str) -> Analysis:
        """The analysis of ``sql``; the same object for the same text while it stays cached."""
        entries = self._entries
        found = entries.get(sql)
        if found is not None:
            entries.move_to_end(sql)
            self.hits += 1
            return found
        self.misses += 1
        result = analyze(sql)
        size = len(sql)
        if size <= self.max_text_length and size <= self.max_total_length:
            entries[sql] = result
            self._chars += size
            while len(entries) > self.capacity or self._chars > self.max_total_length:
                evicted, _ = entries.popitem(last=False)
                self._chars -= len(evicted)
        return result

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sql: object) -> bool:
        return sql in self._entries

    def clear(self) -> None:
        """Forget every entry (counters are kept: they are lifetime metrics)."""
        self._entries.clear()
        self._chars = 0
