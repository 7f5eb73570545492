"""Where routing versions are kept: the VersionStore protocol, in memory or in a JSON-lines file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Protocol

from proxy.control.versions import RoutingVersion
from proxy.errors import ConfigError, StoreUnavailable, VersionConflict
from proxy.fileio import append_synced


class VersionStore(Protocol):
    """Append-only history of routing versions. ``append`` fails with VersionConflict when the
    version number is taken (another writer was first) and StoreUnavailable when it cannot write."""

    kind: str
    location: str

    async def open(self) -> None: ...

    async def load(self, after: int = 0) -> list[RoutingVersion]:
        """Versions numbered above ``after``, oldest first."""
        ...

    async def append(self, version: RoutingVersion) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Versions that last as long as the process (tests; a config without a state file)."""

    kind = "memory"
    location = "(memory: lost at restart)"

    def __init__(self) -> None:
        self._versions: list[RoutingVersion] = []

    async def open(self) -> None:
        return None

    async def load(self, after: int = 0) -> list[RoutingVersion]:
        return [v for v in self._versions if v.version > after]

    async def append(self, version: RoutingVersion) -> None:
        if any(v.version == version.version for v in self._versions):
            raise VersionConflict(f"routing version {version.version} exists already")
        self._versions.append(version)

    async def close(self) -> None:
        return None


class FileStore:
    """One JSON object per line, appended and fsynced before a change takes effect, so a crash
    never loses a version that was applied (and a torn last line is reported, not guessed at)."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._last = 0

    async def open(self) -> None:
        return None

    async def load(self, after: int = 0) -> list[RoutingVersion]:
        versions = await asyncio.to_thread(self._read)
        self._last = max(self._last, versions[-1].version if versions else 0)
        return [v for v in versions if v.version > after]

    def _read(self) -> list[RoutingVersion]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read routing state {self.path}: {exc.strerror}") from None
        versions = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"routing state {self.path} line {number} is not valid JSON ({exc.msg}); "
                    "repair or remove that line (every line is one routing version)"
                ) from None
            versions.append(RoutingVersion.from_json(data))
        return versions

    async def append(self, version: RoutingVersion) -> None:
        if version.version <= self._last:
            raise VersionConflict(f"routing version {version.version} exists already")
        line = json.dumps(version.to_json(), sort_keys=True) + "\n"
        await asyncio.to_thread(_append_synced, self.path, line)
        self._last = version.version

    async def close(self) -> None:
        return None


def _append_synced(path: Path, line: str) -> None:
    try:
        append_synced(path, line)
    except OSError as exc:
        raise StoreUnavailable(f"cannot write routing state {path}: {exc.strerror}; the change was not made") from None
