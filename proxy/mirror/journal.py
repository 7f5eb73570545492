"""The divergence journal: every write a mirror did not get right, durable, and the out-of-sync tables it implies."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proxy.fileio import append_synced
from proxy.mirror.model import Divergence

log = logging.getLogger(__name__)

# Entries kept in memory for status (the file keeps them all).
RECENT = 200
# Kinds that leave the mirror's copy of a table wrong until it is repaired.
_DAMAGING = frozenset({"diverged", "failed", "unmirrored", "out_of_sync"})


@dataclass(frozen=True, slots=True)
class OutOfSync:
    """A table on a mirror that no longer matches the primary: since when, and the first reason."""

    mirror: str
    database: str
    table: str
    since: float
    reason: str


class Journal:
    """Appends one JSON line per entry, fsynced by a background writer in batches: the event loop
    never waits for the disk, and an entry reaches the file within one batch. On start the file is
    read back, so counts and out-of-sync tables survive a restart. ``path`` None: memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.counts: Counter[tuple[str, str]] = Counter()  # (mirror, kind)
        self.out_of_sync: dict[tuple[str, str, str], OutOfSync] = {}
        self.write_errors = 0
        self._unwritten: list[str] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._flushed = asyncio.Event()
        self._flushed.set()

    def load(self) -> None:
        """Read the existing file (a missing file is an empty journal; a torn last line is skipped)."""
        if self.path is None or not self.path.exists():
            return
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except OSError as exc:
            log.error("cannot read the mirror journal %s: %s", self.path, exc.strerror)
            return
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
            except ValueError:
                log.warning("mirror journal %s line %d is not a JSON object; skipped", self.path, number)
                continue
            self._apply(entry)

    def start(self) -> None:
        if self.path is not None and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="mirror-journal")

    async def close(self) -> None:
        if self._writer is not None:
            await self.flush()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None

    async def flush(self) -> None:
        """Wait until every entry recorded so far is on disk."""
        if self._writer is None:
            return
        while self._unwritten or not self._flushed.is_set():
            self._wake.set()
            await asyncio.sleep(0.005)

    # --- recording -----------------------------------------------------------------------------

    def record(self, divergence: Divergence) -> None:
        entry = {"at": round(time.time(), 3), **asdict(divergence)}
        entry["tables"] = list(divergence.tables)
        self._apply(entry)
        self._persist(entry)

    def clear(self, mirror: str, database: str | None = None, note: str = "") -> list[str]:
        """Tables of ``mirror`` declared repaired: no longer listed as out of sync."""
        gone = [k for k in self.out_of_sync if k[0] == mirror and (database is None or k[1] == database)]
        tables = sorted({k[2] for k in gone})
        entry: dict[str, Any] = {
            "at": round(time.time(), 3),
            "kind": "cleared",
            "mirror": mirror,
            "database": database or "",
            "tables": tables,
            "reason": note or "declared repaired by an operator",
        }
        self._apply(entry)
        self._persist(entry)
        return tables

    def _apply(self, entry: dict[str, Any]) -> None:
        kind = str(entry.get("kind", ""))
        mirror = str(entry.get("mirror", ""))
        database = str(entry.get("database", ""))
        tables = [str(t) for t in entry.get("tables") or []]
        self.recent.append(entry)
        if kind == "cleared":
            for key in [k for k in self.out_of_sync if k[0] == mirror and (not database or k[1] == database)]:
                del self.out_of_sync[key]
            return
        self.counts[(mirror, kind)] += 1
        if kind in _DAMAGING:
            for table in tables:
                key = (mirror, database, table)
                if key not in self.out_of_sync:
                    self.out_of_sync[key] = OutOfSync(
                        mirror, database, table, float(entry.get("at", 0)), str(entry.get("reason", ""))
                    )

    def _persist(self, entry: dict[str, Any]) -> None:
        if self.path is None:
            return
        self._unwritten.append(json.dumps(entry, sort_keys=True, default=str))
        self._flushed.clear()
        self._wake.set()

    async def _write_loop(self) -> None:
        assert self.path is not None
        path = self.path
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._unwritten:
                self._flushed.set()
                continue
            batch, self._unwritten = self._unwritten, []
            try:
                await loop.run_in_executor(None, append_synced, path, "".join(line + "\n" for line in batch))
            except OSError as exc:
                # The entries stay in memory (status shows them); the file misses them: say so loudly.
                self.write_errors += 1
                log.error("cannot write the mirror journal %s: %s (%d entries not on disk)", path, exc.strerror,
                          len(batch))  # fmt: skip
            if not self._unwritten:
                self._flushed.set()
