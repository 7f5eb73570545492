"""Where the migration's state and step journal live: the shared control store, a file, or memory.

The state is one JSON document written with compare-and-set on a revision number, so two
instances (or a restarted one) never both believe they own a cut. The journal is append-only:
every step of a cut is written before the next one starts, which is what lets a restarted pgshift
tell a cut that swapped from one that did not (see cut.py, ``recover``).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Protocol

from proxy.control.pgstore import PgStore
from proxy.errors import ConfigError, StoreUnavailable, VersionConflict
from proxy.fileio import append_synced

JOURNAL_KEEP = 10_000  # journal entries a file or memory store keeps (the oldest go first)


class MigrationStore(Protocol):
    location: str

    async def load(self) -> tuple[dict[str, Any] | None, int]:
        """(state, revision); (None, 0) before the first save."""
        ...

    async def save(self, state: dict[str, Any], revision: int) -> int:
        """Write if the stored revision is ``revision``; the new revision (VersionConflict if not)."""
        ...

    async def append(self, at: float, cut: str | None, step: str, detail: dict[str, Any]) -> None: ...

    async def journal(self, limit: int) -> list[dict[str, Any]]: ...


class MemoryMigrationStore:
    location = "(memory: lost at restart)"

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None
        self._revision = 0
        self._journal: list[dict[str, Any]] = []

    async def load(self) -> tuple[dict[str, Any] | None, int]:
        return (json.loads(json.dumps(self._state)) if self._state is not None else None), self._revision

    async def save(self, state: dict[str, Any], revision: int) -> int:
        if revision != self._revision:
            raise VersionConflict("the migration state was changed meanwhile; read it again")
        self._state = json.loads(json.dumps(state))
        self._revision += 1
        return self._revision

    async def append(self, at: float, cut: str | None, step: str, detail: dict[str, Any]) -> None:
        self._journal.append({"at": at, "cut": cut, "step": step, **detail})
        del self._journal[:-JOURNAL_KEEP]

    async def journal(self, limit: int) -> list[dict[str, Any]]:
        return self._journal[-limit:]


class FileMigrationStore:
    """``path`` holds the state (replaced atomically: write, fsync, rename); ``path``.journal.jsonl
    the journal (appended and fsynced line by line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_path = path.with_name(path.name + ".journal.jsonl")
        self.location = str(path)

    async def load(self) -> tuple[dict[str, Any] | None, int]:
        return await asyncio.to_thread(self._read)

    def _read(self) -> tuple[dict[str, Any] | None, int]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, 0
        except OSError as exc:
            raise ConfigError(f"cannot read the migration state {self.path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
            return data["state"], int(data["revision"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"the migration state {self.path} is not valid ({exc}); restore it from its journal "
                f"{self.journal_path} or move it away to start the migration's bookkeeping again"
            ) from None

    async def save(self, state: dict[str, Any], revision: int) -> int:
        return await asyncio.to_thread(self._write, state, revision)

    def _write(self, state: dict[str, Any], revision: int) -> int:
        _, stored = self._read()
        if stored != revision:
            raise VersionConflict("the migration state was changed meanwhile; read it again")
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"revision": revision + 1, "state": state}, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write the migration state {self.path}: {exc.strerror}") from None
        return revision + 1

    async def append(self, at: float, cut: str | None, step: str, detail: dict[str, Any]) -> None:
        line = json.dumps({"at": at, "cut": cut, "step": step, **detail}, sort_keys=True) + "\n"
        await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        try:
            append_synced(self.journal_path, line)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write the migration journal {self.journal_path}: {exc.strerror}") from None

    async def journal(self, limit: int) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            try:
                lines = self.journal_path.read_text().splitlines()
            except FileNotFoundError:
                return []
            out = []
            for line in lines[-limit:]:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a torn last line (a crash while appending): the state file decides
            return out

        return await asyncio.to_thread(read)


class PgMigrationStore:
    """In the shared control store (tables pgshift_migration and pgshift_migration_journal)."""

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.location = store.location

    async def load(self) -> tuple[dict[str, Any] | None, int]:
        return await self.store.load_migration()

    async def save(self, state: dict[str, Any], revision: int) -> int:
        return await self.store.save_migration(state, revision)

    async def append(self, at: float, cut: str | None, step: str, detail: dict[str, Any]) -> None:
        await self.store.append_journal(at, cut, step, detail)

    async def journal(self, limit: int) -> list[dict[str, Any]]:
        return await self.store.journal(limit)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
