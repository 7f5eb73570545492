"""The progress file of a time-boxed or interrupted run (``--state FILE``), so the next run resumes.

A local JSON file, not a table: verify only reads both databases (it can run with a read-only
account, or against a replica), so it writes nothing there. Per table it records how far the
chunks are done *contiguously* in key order (chunks finish out of order with several workers),
the counts so far, and the keys of candidate differences not yet settled; a resumed run starts
after that key, rechecks those candidates, and adds the counts. A finished run marks the file
finished: the next run with it starts from the beginning. The file is rewritten atomically
(write, fsync, rename), at most about once a second and at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError

VERSION = 1


@dataclass
class TableProgress:
    done_upto: list[str | None] | None = None  # chunks are done up to this key (exclusive); None: none yet
    complete: bool = False
    rows: int = 0
    target_rows: int = 0
    chunks: int = 0
    chunks_mismatched: int = 0
    candidates: list[list[str | None]] = field(default_factory=list)  # keys of differences to recheck

    def as_dict(self) -> dict[str, Any]:
        return {
            "done_upto": self.done_upto, "complete": self.complete, "rows": self.rows,
            "target_rows": self.target_rows, "chunks": self.chunks, "chunks_mismatched": self.chunks_mismatched,
            "candidates": self.candidates,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableProgress:
        return cls(
            data.get("done_upto"), bool(data.get("complete")), int(data.get("rows", 0)),
            int(data.get("target_rows", 0)), int(data.get("chunks", 0)), int(data.get("chunks_mismatched", 0)),
            [list(k) for k in data.get("candidates") or []],
        )  # fmt: skip


@dataclass
class Progress:
    path: Path
    identity: dict[str, Any]  # what the run compares: a file for another run is refused
    tables: dict[str, TableProgress] = field(default_factory=dict)
    resumed: bool = False
    _saved_at: float = 0.0

    @classmethod
    def open(cls, path: Path, identity: dict[str, Any]) -> Progress:
        """The progress recorded in ``path`` for this run, or a fresh one (no file, or a finished run)."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path, identity)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--state {path}: cannot read it ({exc})", hint="Delete it to start afresh.") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ConfigError(f"--state {path}: not a pgshift verify progress file", hint="Use another path.")
        if data.get("finished"):
            return cls(path, identity)
        if data.get("identity") != identity:
            raise ConfigError(
                f"--state {path}: the progress of another run (other backends, mode, tables or chunk size)",
                detail=json.dumps(data.get("identity")),
                hint="Run with the same options to resume it, or delete the file (or use another) to start afresh.",
            )
        tables = {name: TableProgress.from_dict(t) for name, t in (data.get("tables") or {}).items()}
        return cls(path, identity, tables, resumed=bool(tables))

    def table(self, name: str) -> TableProgress:
        return self.tables.setdefault(name, TableProgress())

    def save(self, *, finished: bool = False, force: bool = False) -> None:
        now = time.monotonic()
        if not force and not finished and now - self._saved_at < 1.0:
            return
        self._saved_at = now
        data = {
            "version": VERSION, "finished": finished, "identity": self.identity, "saved_at": time.time(),
            "tables": {name: t.as_dict() for name, t in self.tables.items()},
        }  # fmt: skip
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
