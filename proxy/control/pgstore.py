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
-- The migration (issue 9): its state (one row, compare-and-set on revision), the step journal,
-- and the write pause every instance obeys during a cut (one row) with each instance's answers.
create table if not exists pgshift_migration (
    id int primary key default 1 check (id = 1),
    state jsonb not null,
    revision int not null,
    updated_at timestamptz not null default now()
);
create table if not exists pgshift_migration_journal (
    seq bigserial primary key,
    at double precision not null,
    cut text,
    step text not null,
    detail jsonb not null
);
create table if not exists pgshift_pause (
    id int primary key default 1 check (id = 1),
    cut text not null,
    action text not null,
    request jsonb not null,
    at double precision not null
);
create table if not exists pgshift_pause_acks (
    instance text not null,
    cut text not null,
    action text not null,
    ok boolean not null,
    detail jsonb not null,
    at double precision not null,
    primary key (instance, cut, action)
);
"""
PAUSE_CHANNEL = "pgshift_pause"


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
        self.on_pause: Callable[[], None] | None = None  # set by the instance's pause agent (migrate layer)
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
            await conn.add_listener(PAUSE_CHANNEL, self._pause_notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            await conn.close(timeout=1)
            raise StoreUnavailable(f"control store {self.location} cannot be set up: {exc}") from None
        self._conn = conn

    def _notified(self, *_args: Any) -> None:
        self._on_notify()

    def _pause_notified(self, *_args: Any) -> None:
        if self.on_pause is not None:
            self.on_pause()

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

    # --- the migration (issue 9) ---------------------------------------------------------------

    async def load_migration(self) -> tuple[dict[str, Any] | None, int]:
        row = await self._run(
            "reading the migration state",
            lambda c: c.fetchrow("select state::text, revision from pgshift_migration where id = 1"),
        )
        return (None, 0) if row is None else (json.loads(row["state"]), int(row["revision"]))

    async def save_migration(self, state: dict[str, Any], revision: int) -> int:
        """Write ``state`` if the stored revision is still ``revision`` (VersionConflict if another
        instance wrote meanwhile); returns the new revision."""

        async def save(conn: asyncpg.Connection) -> bool:
            if revision == 0:
                done = await conn.execute(
                    "insert into pgshift_migration (id, state, revision) values (1, $1::jsonb, 1)"
                    " on conflict (id) do nothing", json.dumps(state),
                )  # fmt: skip
            else:
                done = await conn.execute(
                    "update pgshift_migration set state = $1::jsonb, revision = revision + 1, updated_at = now()"
                    " where id = 1 and revision = $2", json.dumps(state), revision,
                )  # fmt: skip
            return str(done).endswith(" 1")

        if not await self._run("writing the migration state", save):
            raise VersionConflict("the migration state was changed by another instance; read it again")
        return revision + 1

    async def append_journal(self, at: float, cut: str | None, step: str, detail: dict[str, Any]) -> None:
        await self._run(
            "writing the migration journal",
            lambda c: c.execute(
                "insert into pgshift_migration_journal (at, cut, step, detail) values ($1, $2, $3, $4::jsonb)",
                at, cut, step, json.dumps(detail),
            ),
        )  # fmt: skip

    async def journal(self, limit: int) -> list[dict[str, Any]]:
        rows = await self._run(
            "reading the migration journal",
            lambda c: c.fetch(
                "select at, cut, step, detail::text from (select * from pgshift_migration_journal"
                " order by seq desc limit $1) j order by seq", limit,
            ),
        )  # fmt: skip
        return [{"at": r["at"], "cut": r["cut"], "step": r["step"], **json.loads(r["detail"])} for r in rows]

    async def request_pause(self, cut: str, action: str, request: dict[str, Any], at: float) -> None:
        """Ask every instance to pause (action "pause") or resume ("resume") for ``cut``."""

        async def write(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    "insert into pgshift_pause (id, cut, action, request, at) values (1, $1, $2, $3::jsonb, $4)"
                    " on conflict (id) do update set cut = excluded.cut, action = excluded.action,"
                    " request = excluded.request, at = excluded.at", cut, action, json.dumps(request), at,
                )  # fmt: skip
                await conn.execute("select pg_notify($1, $2)", PAUSE_CHANNEL, f"{action} {cut}")

        await self._run("writing the pause request", write)

    async def pause_request(self) -> dict[str, Any] | None:
        row = await self._run(
            "reading the pause request",
            lambda c: c.fetchrow("select cut, action, request::text, at from pgshift_pause where id = 1"),
        )
        if row is None:
            return None
        return {"cut": row["cut"], "action": row["action"], "at": row["at"], **json.loads(row["request"])}

    async def ack_pause(
        self, instance: str, cut: str, action: str, ok: bool, detail: dict[str, Any], at: float
    ) -> None:
        await self._run(
            "answering the pause request",
            lambda c: c.execute(
                "insert into pgshift_pause_acks (instance, cut, action, ok, detail, at)"
                " values ($1, $2, $3, $4, $5::jsonb, $6)"
                " on conflict (instance, cut, action) do update set ok = excluded.ok, detail = excluded.detail,"
                " at = excluded.at", instance, cut, action, ok, json.dumps(detail), at,
            ),
        )  # fmt: skip

    async def pause_acks(self, cut: str, action: str) -> list[dict[str, Any]]:
        rows = await self._run(
            "reading the answers to the pause request",
            lambda c: c.fetch(
                "select instance, ok, detail::text, at from pgshift_pause_acks where cut = $1 and action = $2",
                cut, action,
            ),
        )  # fmt: skip
        return [{"instance": r["instance"], "ok": r["ok"], "at": r["at"], **json.loads(r["detail"])} for r in rows]

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
