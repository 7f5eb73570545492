"""Session settings (SET, RESET, SET ROLE …) made on the primary, replayed to other backends before use."""

from __future__ import annotations

from proxy.wire.messages import Query


class SettingsLog:
    """An append-only log of setting statements and, per backend, how much of it that backend ran.

    A backend opened later logs in with the same startup parameters and then gets the whole log,
    so every backend of a session means the same thing by search_path, TimeZone, role, ….
    """

    __slots__ = ("_applied", "_frames")

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._applied: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._frames)

    def record(self, sql: str, ran_on: str) -> None:
        """``sql`` has just been sent to backend ``ran_on``; every other backend still owes it."""
        missing = self.missing(ran_on)  # keep ran_on's position consistent before appending
        assert not missing, "a backend must be caught up before it runs a new setting"
        self._frames.append(Query(sql).encode())
        self._applied[ran_on] = len(self._frames)

    def owes(self, backend: str) -> bool:
        """Whether ``backend`` has settings to catch up on (the cheap check before ``missing``)."""
        return self._applied.get(backend, 0) != len(self._frames)

    def missing(self, backend: str) -> list[bytes]:
        """Query frames ``backend`` has not run yet; they count as sent once returned."""
        start = self._applied.get(backend, 0)
        self._applied[backend] = len(self._frames)
        return self._frames[start:]

    def forget(self, backend: str) -> None:
        """``backend``'s connection is gone; a new one starts from the beginning of the log."""
        self._applied.pop(backend, None)
