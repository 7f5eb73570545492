"""Bounded LRU of analyses keyed by the exact SQL text: the per-statement hot path of the proxy."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Generic, TypeVar

from proxy.sql.analysis import Analysis, analyze

__all__ = ["AnalysisCache", "TextCache"]

V = TypeVar("V")


# Literals the key replaces: single-quoted strings (with '' escapes) and unsigned numbers.
_LITERALS = re.compile(r"'(?:[^']|'')*'|(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
_DO = re.compile(r"\bdo\b")
_DO_START = re.compile(r"\s*do\b")
# Texts whose analysis may depend on a literal's value, or whose literals the regex cannot see
# safely, keep their exact text as key: dollar quotes and $n parameters, quoted identifiers,
# backslash escapes, comments (hints live there), set_config (its is_local argument), EXPLAIN options, DO
# bodies, and prefixed strings (E'', U&'', B'', X'', N''). Plain `in` scans: a regex here costs more.
_UNSAFE_MARKS = ("$", '"', "\\", "--", "/*")


def _prefixed_string(sql: str) -> bool:
    """Whether a string literal opens right after a letter or & (E'…', U&'…', B'…', …)."""
    i = sql.find("'")
    while i >= 0:
        if i and (sql[i - 1].isalpha() or sql[i - 1] == "&"):
            return True
        j = sql.find("'", i + 1)
        while j >= 0 and sql.startswith("''", j):  # '' is an escaped quote inside the literal
            j = sql.find("'", j + 2)
        if j < 0:
            return True  # unterminated: let the parser judge the exact text
        i = sql.find("'", j + 1)
    return False


def literal_free_key(sql: str, *, single: bool = False) -> str | None:
    """A cache key equal for texts that differ only in literal values, or None when unsure.

    ``single``: the caller knows ``sql`` is one statement, so only a text that starts with DO is
    a DO block (``ON CONFLICT … DO UPDATE`` / ``DO NOTHING`` then keep a key)."""
    for mark in _UNSAFE_MARKS:
        if mark in sql:
            return None
    if "'" in sql and _prefixed_string(sql):
        return None
    lowered = sql.lower()
    # set_config(…, is_local), EXPLAIN (ANALYZE 0|1) and DO '…body…' are judged by their literals.
    if "config" in lowered or "explain" in lowered:
        return None
    if "do" in lowered and (_DO_START.match(lowered) if single else _DO.search(lowered)):
        return None
    key = _LITERALS.sub("?", sql)
    return "\x00" + key if key != sql else None  # NUL: never collides with a real SQL text


class TextCache(Generic[V]):
    """LRU of values computed from SQL texts, with hit/miss counters.

    Bounded by entry count AND by the total length of the cached texts: applications that inline values
    (multi-megabyte INSERT ... VALUES) would otherwise pin gigabytes in 10,000 entries. A text longer than
    ``max_text_length`` is computed but never stored (it is almost certainly one-off).
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
        self._entries: OrderedDict[str, V] = OrderedDict()

    def _store(self, sql: str, result: V) -> V:
        entries = self._entries
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


class AnalysisCache(TextCache[Analysis]):
    """:func:`analyze` results, cached (see TextCache for the bounds)."""

    __slots__ = ()

    def get(self, sql: str) -> Analysis:
        """The analysis of ``sql``; the same object for the same text while it stays cached.

        Texts that differ only in numeric and string literals (simple-protocol clients inline
        their values: every pgbench -M simple statement is new text) share one entry under a
        literal-free key, so they cost a regex instead of a parse.
        """
        entries = self._entries
        found = entries.get(sql)
        if found is None:
            key = literal_free_key(sql)
            if key is not None:
                found = entries.get(key)
                if found is None:
                    self.misses += 1
                    return self._store(key, analyze(sql))
                sql = key
        if found is not None:
            entries.move_to_end(sql)
            self.hits += 1
            return found
        self.misses += 1
        return self._store(sql, analyze(sql))
