"""Function volatility from the primary's pg_proc, looked up once per database and shared.

A SELECT calling a function the analyzer cannot vouch for (a user function) may still be a
read: it is if every function of that name is STABLE or IMMUTABLE. The first such statement
goes to the primary, with a lookup query injected ahead of it whose answer the proxy keeps
(CAPTURE in the expected-reply FIFO); later ones are routed by the answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from proxy.wire.codes import BackendCode
from proxy.wire.messages import decode_data_row

# A lookup whose answer never came (the session ended first) may be asked again after this.
RETRY_AFTER = 30.0


def bare(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def lookup_sql(names: Iterable[str]) -> str:
    quoted = ", ".join("'" + n.replace("'", "''") + "'" for n in sorted(names))
    # Every function of that name, whatever its schema or arguments: one volatile overload is
    # enough to keep the statement on the primary (search_path decides which one runs).
    return (
        "SELECT p.proname, bool_and(p.provolatile <> 'v' AND p.prokind = 'f') "
        f"FROM pg_catalog.pg_proc p WHERE p.proname = ANY (ARRAY[{quoted}]::name[]) GROUP BY 1"
    )


class FunctionCatalog:
    """database → function name → safe (non-volatile). Shared by the sessions of one server."""

    def __init__(self) -> None:
        self._safe: dict[str, dict[str, bool]] = {}
        self._pending: dict[tuple[str, str], float] = {}
        self.lookups = 0

    def verdict(self, database: str, functions: Iterable[str]) -> bool | None:
        """True: all safe; False: one is volatile or unknown to the catalog; None: not known yet."""
        known = self._safe.get(database, {})
        result = True
        for name in functions:
            safe = known.get(bare(name))
            if safe is None:
                return None
            result = result and safe
        return result

    def claim(self, database: str, functions: Iterable[str]) -> set[str]:
        """Names this caller should look up now (not known, not being looked up)."""
        now = time.monotonic()
        known = self._safe.get(database, {})
        names = set()
        for name in map(bare, functions):
            if name in known:
                continue
            asked = self._pending.get((database, name))
            if asked is None or now - asked > RETRY_AFTER:
                self._pending[(database, name)] = now
                names.add(name)
        return names

    def learn(self, database: str, names: set[str], replies: list[bytes]) -> None:
        """Record the answer; a failed lookup or a name pg_proc lacks counts as unsafe."""
        self.lookups += 1
        found: dict[str, bool] = {}
        failed = any(m[:1] == bytes([BackendCode.ERROR_RESPONSE]) for m in replies)
        if not failed:
            for message in replies:
                if message[:1] == bytes([BackendCode.DATA_ROW]):
                    row = decode_data_row(message[5:])
                    if len(row) == 2 and row[0] is not None:
                        found[row[0].decode(errors="replace")] = row[1] == b"t"
        known = self._safe.setdefault(database, {})
        for name in names:
            known[name] = found.get(name, False)
            self._pending.pop((database, name), None)
