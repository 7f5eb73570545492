"""Named prepared statements of one session, and which backend has which (re-Parsed lazily)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from proxy.sql import Analysis
from proxy.wire.messages import SYNC, Close


class PreparedStatements:
    """The client's view (name → Parse frame and its analysis) and each backend's actual set.

    A statement the client prepared on one backend and now uses on another is re-Parsed there
    first; one the client closed is closed lazily on the other backends that still have it, so
    a later Parse of the same name does not fail with "already exists".
    """

    __slots__ = ("_on", "_stale", "analyses", "frames")

    def __init__(self) -> None:
        self.frames: dict[str, bytes] = {}
        self.analyses: dict[str, Analysis] = {}
        self._on: defaultdict[str, set[str]] = defaultdict(set)
        self._stale: defaultdict[str, set[str]] = defaultdict(set)

    def parsed(self, name: str, parse_frame: bytes, analysis: Analysis, backend: str) -> None:
        self.frames[name] = parse_frame
        self.analyses[name] = analysis
        self._on[backend].add(name)

    def closed(self, name: str, backend: str) -> None:
        self.frames.pop(name, None)
        self.analyses.pop(name, None)
        for other, names in self._on.items():
            if name in names:
                names.discard(name)
                if other != backend:
                    self._stale[other].add(name)

    def replace(self, name: str, parse_frame: bytes) -> None:
        """The statement ``name`` is to be prepared as ``parse_frame`` from now on: every backend
        that has it closes it and Parses the new frame before its next use."""
        self.frames[name] = parse_frame
        for backend, names in self._on.items():
            if name in names:
                names.discard(name)
                self._stale[backend].add(name)

    def has(self, backend: str, name: str) -> bool:
        return name in self._on[backend]

    def stale_on(self, backend: str) -> bool:
        """Whether ``backend`` holds statements the client closed elsewhere (to be closed first)."""
        return bool(self._stale.get(backend))

    def injections(self, backend: str, needed: Iterable[str]) -> list[bytes]:
        """Frames to send ahead of a request on ``backend`` (replies swallowed): Close for stale
        names about to be re-used or parsed, Parse for names the request uses but the backend
        lacks, then Sync so the injected work completes (and reports) on its own."""
        out: list[bytes] = []
        stale = self._stale.get(backend)
        if stale:
            out.extend(Close(b"S", n).encode() for n in sorted(stale))
            stale.clear()
        on = self._on[backend]
        for name in needed:
            if name not in on and name in self.frames:
                out.append(self.frames[name])
                on.add(name)
        if out:
            out.append(SYNC)
        return out

    def forget_backend(self, backend: str) -> None:
        """The connection is gone: a new one starts with no statements."""
        self._on.pop(backend, None)
        self._stale.pop(backend, None)
