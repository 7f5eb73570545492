"""Live sessions of one proxy: cancel keys handed to clients, and the set drained at shutdown."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.session.session import Session


class SessionRegistry:
    """Owned by the server (no module globals); sessions add and remove themselves."""

    def __init__(self) -> None:
        self._sessions: set[Session] = set()
        self._keys: dict[tuple[int, int], Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions))  # a copy: sessions remove themselves while we iterate

    def add(self, session: Session) -> None:
        self._sessions.add(session)

    def remove(self, session: Session) -> None:
        self._sessions.discard(session)
        if session.cancel_key is not None:
            self._keys.pop(session.cancel_key, None)

    def issue_key(self, session: Session, pid: int) -> int:
        """A random secret, unique with ``pid``: the key the client uses to cancel its query.

        The pid is the real primary backend's (drivers pass it to pg_terminate_backend and
        match pg_stat_activity on it); only the secret is ours, so a key is never forgeable
        from what the database shows.
        """
        while True:
            secret = secrets.randbits(32) - (1 << 31)
            if (pid, secret) not in self._keys:
                self._keys[(pid, secret)] = session
                session.cancel_key = (pid, secret)
                return secret

    def by_key(self, pid: int, secret: int) -> Session | None:
        return self._keys.get((pid, secret))
