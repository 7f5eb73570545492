"""Durable appends to local files (the routing state, the mirror journal, the migration journal)."""

from __future__ import annotations

import os
from pathlib import Path


def append_synced(path: Path, text: str) -> None:
    """Append ``text`` and fsync before returning: a line that was reported written survives a
    crash (a torn last line is what a reader must expect instead). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
