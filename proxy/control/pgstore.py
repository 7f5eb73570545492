"""Routing versions in a Postgres table shared by every pgshift instance; changes spread by NOTIFY.

One asyncpg connection per instance does everything: it LISTENs on ``pgshift_routing`` (a change
arrives within milliseconds), and every ``heartbeat`` seconds it records this instance's applied
version and checks the newest version (so a notification lost while disconnected is caught up on
within one heartbeat). When the store is unreachable the instance keeps its last version, reports
that, refuses changes, and reconnects on the next heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.control.versions import RoutingVersion
from proxy.errors import StoreUnavailable, VersionConflict

log = logging.getLogger(__name__)

CHANNEL = "pgshift_routing"
_TIMEOUT = 5.0  # seconds for any one store operation

_SCHEMA = """
create table if not exists pgshift_routing_versions (
    version int primary key,
    routing jsonb not null,
    source text not null,
    caller text not null,
    note text not null default '',
    parent int,
    created_at double precision not null
);
create table if not exists pgshift_instances (
    instance text primary key,
    version int not null,
    host text not null,
    admin text not null,
    store_ok boolean not null default true,
    started_at timestamptz not null default now(),
    heartbeat timestamptz not null default now()
);
"""


@dataclass(frozen=True, slots=True)
class InstanceRow:
    instance: str
    version: int
    host: str
    admin: str
    age: float  # seconds since its last heartbeat


class PgStore:
    kind = "postgres"

    def __init__(self, dsn: str, password: str | None, on_notify: Callable[[], None]) -> None:
        self.dsn = dsn
        self.location = _redact(dsn)
        self._password = password
        self._on_notify = on_notify
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one operation at a time on the one connection

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def open(self) -> None:
        async with self._lock:
            await self._connect()

    async def _connect(self) -> None:
        if self.connected:
            return
        try:
            conn = await asyncpg.connect(self.dsn, password=self._password, timeout=_TIMEOUT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StoreUnavailable(f"control store {self.location} is unreachable: {exc}") from None
        try:
            async with conn.transaction():
                # Instances starting together must not race on CREATE TABLE (pg_type conflicts).
                await conn.execute("select pg_advisory_xact_lock(hashtext('pgshift_control'))")
                await conn.execute(_SCHEMA)
            await conn.add_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            await conn.close(timeout=1)
            raise StoreUnavailable(f"control store {self.location} cannot be set up: {exc}") from None
        self._conn = conn

    def _notified(self, *_args: Any) -> None:
        self._on_notify()

    async def _run(self, op: str, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        async with self._lock:
            await self._connect()
            assert self._conn is not None
            try:
                return await asyncio.wait_for(fn(self._conn), _TIMEOUT)
            except asyncpg.UniqueViolationError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                await self._drop()
                raise StoreUnavailable(f"control store {self.location}: {op} failed: {exc}") from None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def load(self, after: int = 0) -> list[RoutingVersion]:
        rows = await self._run(
            "reading routing versions",
            lambda c: c.fetch(
                "select version, routing::text, source, caller, note, parent, created_at"
                " from pgshift_routing_versions where version > $1 order by version",
                after,
            ),
        )
        return [RoutingVersion.from_json({**dict(row), "routing": json.loads(row["routing"])}) for row in rows]

    async def append(self, version: RoutingVersion) -> None:
        data = version.to_json()

        async def insert(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    "insert into pgshift_routing_versions"
                    " (version, routing, source, caller, note, parent, created_at)"
                    " values ($1, $2::jsonb, $3, $4, $5, $6, $7)",
                    version.version,
                    json.dumps(data["routing"]),
                    version.source,
                    version.caller,
                    version.note,
                    version.parent,
                    version.created_at,
                )
                # Delivered to every listener when (and only if) the insert commits.
                await conn.execute("select pg_notify($1, $2)", CHANNEL, str(version.version))

        try:
            await self._run("writing a routing version", insert)
        except asyncpg.UniqueViolationError:
            raise VersionConflict(
                f"routing version {version.version} was just made by another change; "
                "read the current state (pgshift status) and try again"
            ) from None

    async def heartbeat(self, instance: str, version: int, host: str, admin: str) -> int:
        """Record this instance's applied version; return the newest version in the store."""

        async def beat(conn: asyncpg.Connection) -> int:
            await conn.execute(
                "insert into pgshift_instances (instance, version, host, admin) values ($1, $2, $3, $4)"
                " on conflict (instance) do update set version = excluded.version, host = excluded.host,"
                " admin = excluded.admin, store_ok = true, heartbeat = now()",
                instance,
                version,
                host,
                admin,
            )
            newest = await conn.fetchval("select coalesce(max(version), 0) from pgshift_routing_versions")
            return int(newest)

        result: int = await self._run("heartbeat", beat)
        return result

    async def instances(self) -> list[InstanceRow]:
        rows = await self._run(
            "listing instances",
            lambda c: c.fetch(
                "select instance, version, host, admin, extract(epoch from now() - heartbeat)::float8 as age"
                " from pgshift_instances order by instance"
            ),
        )
        return [InstanceRow(r["instance"], r["version"], r["host"], r["admin"], r["age"]) for r in rows]

    async def leave(self, instance: str) -> None:
        """A clean shutdown removes this instance from the list (a crashed one shows as stale)."""
        await self._run(
            "removing this instance", lambda c: c.execute("delete from pgshift_instances where instance = $1", instance)
        )

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()


def _redact(dsn: str) -> str:
    """The DSN without its password (it is shown in status)."""
    scheme, _, rest = dsn.partition("://")
    if "@" not in rest:
        return dsn
    auth, _, host = rest.rpartition("@")
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}@{host}" if user else f"{scheme}://{host}"
