"""`pgshift sync start | status | stop`: check, publish, copy, then stream — resumably, leaving nothing behind.

start:
  1. the prerequisite check (checks.run_check): any problem stops it before anything is created;
  2. on the source, the publication (FOR TABLE the selected tables) if it is missing, and the
     logical slot with an exported snapshot if it is missing (a persistent slot);
  3. the backfill under the slot's snapshot, while the replication connection that exported it
     stays idle (the snapshot lives only that long);
  4. the stream from the slot's confirmed position, applied by ChangeApplier, until SIGINT/SIGTERM.

A restart finds the slot there: no new slot is created, the backfill resumes its unfinished chunks
under a fresh snapshot of its own, and the stream resumes from the slot's confirmed position. That
is consistent because every change applied from the slot is idempotent by primary key: the stream
replays every change since the slot's first snapshot over rows that are older or already newer,
and ends at the source's state (see backfill's module docstring).

A fresh start (no slot) needs empty target tables: rows there would either collide with the copy
or survive as rows the source never had; and progress rows left from an earlier sync (whose slot
is gone, with the changes it held) are discarded, so every chunk is copied again.

The sync's state lives on the target in ``pgshift_sync_state`` (one row per slot), so that
``status`` reads it from another process: phase, heartbeat (updated_at), confirmed position,
counters, last error.

--schema (a new sync into a database without the selected tables): the source's schema with the
OS's pg_dump of the source's major version — pre-data (tables, sequences, types, functions) applied
before the copy, post-data (primary keys, indexes, constraints, triggers) after it and before the
stream, whose upserts need the primary keys. Each script runs as one simple query, so one implicit
transaction: all or nothing. The post-data waits in the state row (schema_post_data) until applied,
so a run resumed after an interrupted copy applies it too. A failed start says what the schema
created; it is not dropped.

--metrics-port: Prometheus metrics of the run (SyncCollector, pgshift_sync_*) served by aiohttp on
127.0.0.1, on the run's own event loop and registry.

Failures: before streaming began, a run that created the slot/publication drops them again, and
empties what it copied (the tables were empty when it started), so a failed start leaves nothing
behind. Later failures (and any failure of a resumed run) keep them: resume with ``sync start``,
or clean up with ``sync stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from proxy.cdc.backfill import DEFAULT_CHUNK_ROWS, PROGRESS_TABLE, BackfillReport, TableProgress, backfill
from proxy.cdc.changes import ChangeApplier
from proxy.cdc.checks import CheckReport, run_check
from proxy.cdc.pgoutput import format_lsn, parse_lsn
from proxy.cdc.replication import ReplicationConnection
from proxy.cdc.sqlconn import Endpoint, SqlConnection, quote_ident, quote_literal
from proxy.errors import PgShiftError

log = logging.getLogger(__name__)

STATE_TABLE = "pgshift_sync_state"
DEFAULT_SLOT = "pgshift_sync"
DEFAULT_PUBLICATION = "pgshift_sync"
STATUS_INTERVAL = 5.0  # seconds between status lines (and state updates) while streaming
HEARTBEAT_STALE = 30.0  # a state not updated for this long belongs to no running process
HANDOVER_GRACE = 2.5  # seconds a resumed stream waits for proxies to stop mirroring to its target
ACTIVE_WAIT = 10.0  # how long a start waits for a dying walsender (a killed sync's) to release the slot

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # interrupted during the copy: start again to resume

_STATE_DDL = f"""
create table if not exists {STATE_TABLE} (
  slot text primary key,
  source text not null,
  target text not null,
  publication text not null,
  tables text,                  -- JSON array of the synced tables (quoted, schema-qualified)
  phase text not null,          -- backfill | streaming | stopped | released (by a rollback: start again)
  started_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),  -- heartbeat of the running process
  process text,                 -- host:pid of the running process; NULL when none
  confirmed_lsn pg_lsn,
  transactions bigint not null default 0,
  lag_bytes bigint,
  lag_seconds double precision,
  last_error text,
  schema_post_data text);       -- --schema: the indexes/constraints to apply once the copy is done
alter table {STATE_TABLE} add column if not exists schema_post_data text;
-- Set by a cut-over (migrate/cut.py): the target is the primary now, and this stream must not run
-- (it would apply the reverse mirror's writes back onto the target, late). Cleared by a rollback.
alter table {STATE_TABLE} add column if not exists hold text
"""

_SLOT = """
select coalesce((select json_build_object(
  'plugin', s.plugin, 'database', s.database, 'active', s.active, 'active_pid', s.active_pid,
  'confirmed_flush_lsn', s.confirmed_flush_lsn::text, 'restart_lsn', s.restart_lsn::text,
  'wal_status', s.wal_status,
  'current_lsn', pg_current_wal_lsn()::text,
  'lag_bytes', pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
  'retained_bytes', pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint)
  from pg_replication_slots s where s.slot_name = {slot}), 'null')
"""


class SyncError(PgShiftError):
    """A sync could not start, or stopped on an error."""


@dataclass
class SyncOptions:
    tables: list[str] | None = None
    workers: int = 4
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    slot: str = DEFAULT_SLOT
    publication: str = DEFAULT_PUBLICATION
    status_interval: float = STATUS_INTERVAL
    schema: bool = False  # copy the schema with pg_dump (pre-data before the copy, post-data after it)
    pg_bindir: Path | None = None  # where pg_dump is looked for first (the CLI's find_bindir())
    pg_bindir_problem: str | None = None  # why there is none (said when no pg_dump is found)
    metrics_port: int | None = None  # serve Prometheus metrics on 127.0.0.1:PORT while it runs


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --- progress display -------------------------------------------------------------------------


class ProgressDisplay:
    """The backfill's progress on stderr: one line redrawn on a TTY, else a line per second."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, interval: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 0.2 if self.tty else interval
        self.tables: dict[str, TableProgress] = {}
        self._last = 0.0
        self._drawn = False

    def update(self, table: TableProgress) -> None:
        self.tables[table.table] = table
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.draw()

    @staticmethod
    def table_text(t: TableProgress) -> str:
        rows = t.rows_before + t.rows + t.in_flight_rows
        total = f"/{t.estimated_rows:,}" if t.estimated_rows else ""
        state = "done" if t.done else f"{t.rows_per_second:,.0f} rows/s, ETA {_duration(t.eta)}"
        size, rate = _mb(t.bytes + t.in_flight_bytes), _mb(t.bytes_per_second)
        return f"{t.table} {rows:,}{total} rows, {size}, {rate}/s, {state}"

    def line(self) -> str:
        tables = list(self.tables.values())
        done = sum(1 for t in tables if t.done)
        busy = [t for t in tables if not t.done] or tables[-1:]
        return f"copy {done}/{len(tables)} tables | " + " | ".join(self.table_text(t) for t in busy)

    def draw(self) -> None:
        if not self.tables:
            return
        text = self.line()
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[K" + text[: width - 1])
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# --- source and target helpers ------------------------------------------------------------------


async def slot_info(src: SqlConnection, slot: str) -> dict[str, Any] | None:
    info: dict[str, Any] | None = await src.json(_SLOT.format(slot=quote_literal(slot)))
    return info


async def publication_exists(src: SqlConnection, publication: str) -> bool:
    rows = await src.query(f"select 1 from pg_publication where pubname = {quote_literal(publication)}")
    return bool(rows)


async def _state_table_exists(conn: SqlConnection) -> bool:
    rows = await conn.query(f"select to_regclass({quote_literal(STATE_TABLE)}) is not null")
    return rows[0][0] == "t"


async def _read_state(tgt: SqlConnection, slot: str) -> dict[str, Any] | None:
    if not await _state_table_exists(tgt):
        return None
    state: dict[str, Any] | None = await tgt.json(
        f"select coalesce((select row_to_json(s) from (select *, extract(epoch from now() - updated_at) as age "
        f"from {STATE_TABLE} where slot = {quote_literal(slot)}) s), 'null')"
    )
    return state


async def _selected_tables(src: SqlConnection, report: CheckReport, all_tables: bool) -> list[str]:
    """The checked tables as quoted schema-qualified names. For "every table", partitions are left
    out (their root is copied and published, changes published via the root)."""
    if not report.tables:
        return []
    array = "array[" + ", ".join(quote_literal(t) for t in report.tables) + "]::text[]"
    partitions = " and not c.relispartition" if all_tables else ""
    names: list[str] = await src.json(
        "select coalesce(json_agg(format('%I.%I', n.nspname, c.relname) order by n.nspname, c.relname), '[]') "
        "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        f"where c.relkind in ('r', 'p') and n.nspname || '.' || c.relname = any({array}){partitions}"
    )
    return names


async def _nonempty(tgt: SqlConnection, tables: list[str]) -> list[str]:
    found: list[str] = []
    for table in tables:
        rows = await tgt.query(f"select exists (select 1 from {table})")
        if rows[0][0] == "t":
            found.append(table)
    return found


def _progress_names(tables: list[str]) -> str:
    """The backfill's table_name values (schema.name, unquoted) of quoted names, as a SQL array."""
    return "array[" + ", ".join(f"(select format('%s.%s', n.nspname, c.relname) from pg_class c join pg_namespace n "
                                f"on n.oid = c.relnamespace where c.oid = to_regclass({quote_literal(t)}))"
                                for t in tables) + "]::text[]"  # fmt: skip


class _State:
    """Writes this run's row of pgshift_sync_state (on its own target connection)."""

    def __init__(self, tgt: SqlConnection, source: Endpoint, target: Endpoint, options: SyncOptions) -> None:
        self.tgt = tgt
        self.source = source
        self.target = target
        self.options = options
        self.process = f"{socket.gethostname()}:{os.getpid()}"

    async def begin(self, tables: list[str], fresh: bool) -> None:
        o = self.options
        started = "now()" if fresh else f"coalesce((select started_at from {STATE_TABLE} where slot = $s$), now())"
        started = started.replace("$s$", quote_literal(o.slot))
        await self.tgt.query(
            f"insert into {STATE_TABLE} (slot, source, target, publication, tables, phase, started_at, updated_at, "
            f"process, last_error) values ({quote_literal(o.slot)}, {quote_literal(self.source.backend)}, "
            f"{quote_literal(self.target.backend)}, {quote_literal(o.publication)}, "
            f"{quote_literal(json.dumps(tables))}, "
            f"'backfill', {started}, now(), {quote_literal(self.process)}, null) "
            "on conflict (slot) do update set source = excluded.source, target = excluded.target, "
            "publication = excluded.publication, tables = excluded.tables, phase = excluded.phase, "
            "started_at = excluded.started_at, updated_at = now(), process = excluded.process, last_error = null"
            + (
                ", confirmed_lsn = null, transactions = 0, lag_bytes = null, lag_seconds = null, "
                "schema_post_data = null"
                if fresh
                else ""
            )
        )

    async def update(self, **values: Any) -> None:
        sets = ["updated_at = now()"]
        for column, value in values.items():
            if value is None:
                sets.append(f"{column} = null")
            elif isinstance(value, bool | int | float):
                sets.append(f"{column} = {value!r}")
            else:
                sets.append(f"{column} = {quote_literal(str(value))}")
        await self.tgt.query(
            f"update {STATE_TABLE} set {', '.join(sets)} where slot = {quote_literal(self.options.slot)}"
        )

    async def try_update(self, **values: Any) -> None:
        """An update that must not end the sync when the target is briefly unreachable: after a
        lost connection (the target restarted), the next update connects again."""
        try:
            if self.tgt.gone:
                self.tgt = await SqlConnection.connect(self.target)
            await self.update(**values)
        except PgShiftError as exc:
            log.warning("could not record the sync's state on the target: %s", exc.message)


# --- --schema: the source's schema with pg_dump ---------------------------------------------------

# pg_dump's options for a schema copy: no owners and no grants (roles are cluster-wide and may not
# exist on the target: the objects belong to the sync's user there), no publications/subscriptions
# (the source's replication setup is not the target's).
_PG_DUMP_OPTIONS = ("--schema-only", "--no-owner", "--no-privileges", "--no-publications", "--no-subscriptions")
# psql meta-commands recent pg_dump releases write around a plain dump (\restrict KEY … \unrestrict KEY).
_META_COMMAND = re.compile(r"^\\(un)?restrict [A-Za-z0-9]+$", re.MULTILINE)

# The target's objects a schema script can create, named for people ("table public.t", …).
_OBJECTS = """
select coalesce(json_agg(o order by o), '[]') from (
  select (case c.relkind when 'S' then 'sequence' when 'v' then 'view' when 'm' then 'materialized view'
          when 'f' then 'foreign table' else 'table' end) || ' ' || format('%I.%I', n.nspname, c.relname) o
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
  where c.relkind in ('r', 'p', 'S', 'v', 'm', 'f') and n.nspname not in ('pg_catalog', 'information_schema')
    and n.nspname !~ '^pg_(toast|temp_)' and c.relname !~ '^pgshift_'
  union all
  select 'schema ' || quote_ident(nspname) from pg_namespace
  where nspname not in ('pg_catalog', 'information_schema') and nspname !~ '^pg_'
  union all
  select 'type ' || format('%I.%I', n.nspname, t.typname) from pg_type t join pg_namespace n on n.oid = t.typnamespace
  where (t.typtype in ('e', 'd', 'r', 'm') or (t.typtype = 'c' and (select relkind from pg_class
         where oid = t.typrelid) = 'c')) and n.nspname not in ('pg_catalog', 'information_schema')
  union all
  select 'function ' || p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
  where n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_'
    and not exists (select 1 from pg_depend d where d.objid = p.oid and d.deptype = 'e')
  union all
  select 'extension ' || quote_ident(extname) from pg_extension where extname <> 'plpgsql') x
"""


def _major(version: str) -> int | None:
    match = re.search(r"\b(\d+)(?:\.\d+)?", version)
    return int(match.group(1)) if match else None


async def _binary_major(path: Path) -> tuple[int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        str(path), "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace").strip()
    return _major(text.split(")", 1)[-1]) if proc.returncode == 0 else None, text


async def find_pg_dump(major: int, bindir: Path | None, bindir_problem: str | None = None) -> Path:
    """pg_dump of the source's major version: in ``bindir`` (find_bindir()), else Debian's directory
    for that version. SyncError saying what was found when there is none."""
    seen: list[str] = []
    for directory in (bindir, Path(f"/usr/lib/postgresql/{major}/bin")):
        if directory is None:
            continue
        path = directory / "pg_dump"
        if not path.is_file() or any(s.startswith(str(path)) for s in seen):
            continue
        found, text = await _binary_major(path)
        if found == major:
            return path
        seen.append(f"{path} is {text or 'unusable'}")
    where = "; ".join(seen) if seen else f"no pg_dump in {bindir or bindir_problem or 'the Postgres bin directory'}"
    raise SyncError(
        f"--schema needs pg_dump of PostgreSQL {major} (the source's major version), and there is none: {where}",
        hint=f"install the PostgreSQL {major} client tools (Debian: apt-get install postgresql-client-{major}), "
        "or set PGSHIFT_PG_BINDIR to the directory holding them",
    )


def _libpq_env(endpoint: Endpoint) -> dict[str, str]:
    a = endpoint.address
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=a.host, PGPORT=str(a.port), PGUSER=endpoint.user, PGDATABASE=endpoint.database,
        PGSSLMODE=a.sslmode, PGCONNECT_TIMEOUT=str(max(1, int(a.connect_timeout))), PGAPPNAME="pgshift-sync-schema",
    )  # fmt: skip
    if endpoint.password is not None:
        env["PGPASSWORD"] = endpoint.password
    if a.sslrootcert:
        env["PGSSLROOTCERT"] = a.sslrootcert
    if "PGPASSFILE" in os.environ:
        env["PGPASSFILE"] = os.environ["PGPASSFILE"]
    return env


async def dump_schema(pg_dump: Path, source: Endpoint, section: str, patterns: list[str] | None) -> str:
    """``pg_dump --schema-only --section=SECTION`` of the source: of the tables matching ``patterns``
    (pg_dump -t patterns), else of the whole database but pgshift's own tables. The script, ready
    to run as one simple query (psql meta-commands removed)."""
    selection = [f"--table={p}" for p in patterns] if patterns is not None else ["--exclude-table=*.pgshift_*"]
    proc = await asyncio.create_subprocess_exec(
        str(pg_dump), *_PG_DUMP_OPTIONS, f"--section={section}", *selection,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_libpq_env(source),
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SyncError(f"pg_dump --section={section} of {source.label()} failed: {err.decode(errors='replace')}")
    return _META_COMMAND.sub("", out.decode())


async def _table_patterns(src: SqlConnection, tables: list[str]) -> list[str]:
    """pg_dump -t patterns matching exactly these (quoted) tables: every part double-quoted."""
    pairs: list[list[str]] = await src.json(
        "select coalesce(json_agg(json_build_array(n.nspname, c.relname)), '[]') from pg_class c "
        "join pg_namespace n on n.oid = c.relnamespace where c.oid = any(array["
        + ", ".join(f"to_regclass({quote_literal(t)})" for t in tables) + "]::regclass[])"
    )  # fmt: skip
    return [f"{quote_ident(schema)}.{quote_ident(name)}" for schema, name in pairs]


async def _objects(conn: SqlConnection) -> set[str]:
    names: list[str] = await conn.json(_OBJECTS)
    return set(names)


async def apply_script(endpoint: Endpoint, script: str) -> None:
    """A schema script as one simple query on a connection of its own (the script sets its own
    search_path): the statements run in one implicit transaction, all or nothing."""
    if not script.strip():
        return
    async with await SqlConnection.connect(endpoint, application_name="pgshift-sync-schema") as conn:
        await conn.query(script)


def _some(names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- metrics --------------------------------------------------------------------------------------

PHASES = ("check", "schema", "backfill", "post_data", "streaming", "stopped", "failed")

# Every metric of `sync start --metrics-port`, with its help text.
METRICS_HELP: dict[str, str] = {
    "pgshift_sync_phase": "1 for the phase the sync is in (check, schema, backfill, post_data, streaming, stopped, "
    "failed), 0 for the others",
    "pgshift_sync_table_rows_copied": "Rows copied into the target per table (chunks finished by earlier runs "
    "included, chunks in flight not)",
    "pgshift_sync_table_bytes_copied": "COPY payload bytes committed on the target per table by this run",
    "pgshift_sync_table_chunks_done": "Copy chunks finished per table (by this run or an earlier one)",
    "pgshift_sync_table_chunks": "Copy chunks planned per table",
    "pgshift_sync_transactions_applied": "Source transactions applied to the target while streaming",
    "pgshift_sync_rows_applied": "Row changes applied to the target while streaming, by kind (insert, update, "
    "delete, truncate)",
    "pgshift_sync_confirmed_lsn": "End LSN of the last source transaction the target committed (confirmed to the "
    "slot), as a number",
    "pgshift_sync_lag_bytes": "Source WAL not yet applied to the target: the source's end of WAL minus the "
    "confirmed LSN",
    "pgshift_sync_lag_seconds": "Age of the oldest source commit not yet applied (0: none pending)",
}


# --- start ----------------------------------------------------------------------------------------


@dataclass
class StartResult:
    exit_code: int
    check: CheckReport | None = None
    problems: list[str] = field(default_factory=list)  # refused before anything was created
    backfill: BackfillReport | None = None
    streamed: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "check": self.check.as_dict() if self.check is not None else None,
            "problems": self.problems,
            "backfill": self.backfill.as_dict() if self.backfill is not None else None,
            "streamed": self.streamed,
            "stats": self.stats,
            "error": self.error,
            "messages": self.messages,
        }


class SyncRun:
    """One ``sync start``: see the module docstring. ``say`` gets the lines for people (stderr)."""

    def __init__(
        self,
        source: Endpoint,
        target: Endpoint,
        options: SyncOptions,
        *,
        say: Callable[[str], None] | None = None,
        display: ProgressDisplay | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.options = options
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.display = display or ProgressDisplay()
        self.stop_requested = asyncio.Event()
        self.result = StartResult(EXIT_OK)
        # What the metrics read: the phase (PHASES), each table's copy, the applier while streaming.
        self.phase = "check"
        self.copy_progress: dict[str, TableProgress] = {}
        self.applier: ChangeApplier | None = None
        self._state: _State | None = None  # this run's state row writer (its connection may be replaced)
        self._schema_missing: set[str] = set()  # --schema: the tables the check found missing on the target
        self.schema_created: list[str] = []  # --schema: the objects this run created on the target
        self._released = False  # a rollback released this stream (migrate): proxies mirror to the target

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def _until_stopped(self, work: asyncio.Future[Any]) -> bool:
        """Wait for ``work``; True if it finished, False if a stop was requested first (it is then cancelled)."""
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            return True
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, PgShiftError):
            await work
        return False

    async def run(self) -> StartResult:
        metrics: Any = None  # a syncmetrics.MetricsServer
        port = self.options.metrics_port
        if port is not None:
            if not 0 < port < 65536:
                raise SyncError(f"--metrics-port {port} is out of range 1-65535")
            from proxy.cdc.syncmetrics import MetricsServer  # (aiohttp and prometheus only when asked for)

            metrics = MetricsServer(self, port)
            await metrics.start()
            self.say(f"metrics on http://{metrics.host}:{port}/metrics")
        try:
            result = await self._checked_run()
        except BaseException:
            self.phase = "failed"
            raise
        finally:
            if metrics is not None:
                await metrics.stop()
        return result

    async def _checked_run(self) -> StartResult:
        o, result = self.options, self.result
        report = await run_check(self.source, self.target, o.tables)
        result.check = report
        if o.schema:
            # --schema creates the tables: missing on the target is what it expects (which of the
            # selected tables exist already is decided once the slot is known: see _run).
            self._schema_missing = {f.table for f in report.findings if f.code == "missing_table" and f.table}
            report.findings = [f for f in report.findings if f.code != "missing_table"]
        if not report.ok:
            result.exit_code = EXIT_FAILED
            self.phase = "failed"
            return result
        src = await SqlConnection.connect(self.source)
        try:
            tgt = await SqlConnection.connect(self.target)
        except BaseException:
            await src.close()
            raise
        try:
            return await self._run(src, tgt, report)
        finally:
            await src.close()
            await tgt.close()
            if self._state is not None and self._state.tgt is not tgt:
                await self._state.tgt.close()  # (reconnected by try_update)

    async def _run(self, src: SqlConnection, tgt: SqlConnection, report: CheckReport) -> StartResult:
        o, result = self.options, self.result
        held = await _read_state(tgt, o.slot)
        self._released = held is not None and held["phase"] == "released"
        if held is not None and held.get("hold"):
            result.problems.append(
                f"this stream is held: {held['hold']}. It must not run while {self.target.backend} is the primary; "
                "`pgshift migrate rollback` releases it"
            )
            result.exit_code = EXIT_FAILED
            return result
        tables = await _selected_tables(src, report, o.tables is None)
        if not tables:
            result.problems.append("no table to sync (the source has none, or --tables selected none)")
            result.exit_code = EXIT_FAILED
            return result
        slot = await self._wait_inactive(src)
        if slot is not None and slot["active"]:
            result.problems.append(
                f'slot "{o.slot}" is in use by process {slot["active_pid"]} on the source: '
                "a sync is already streaming from it (stop it first, or `pgshift sync stop --force`)"
            )
            result.exit_code = EXIT_FAILED
            return result
        if slot is not None and slot["plugin"] != "pgoutput":
            result.problems.append(f'slot "{o.slot}" exists with plugin {slot["plugin"]}, not pgoutput: choose --slot')
            result.exit_code = EXIT_FAILED
            return result
        fresh = slot is None
        post_data: str | None = None
        if o.schema and not fresh:
            if self._schema_missing:
                result.problems.append(
                    "resuming the sync of slot " + quote_ident(o.slot) + ", but these tables are missing on the "
                    f"target: {', '.join(sorted(self._schema_missing))} (the schema is copied only by a new sync: "
                    "`pgshift sync stop`, drop what it created, and start again with --schema)"
                )  # fmt: skip
                result.exit_code = EXIT_FAILED
                return result
            self.say("resuming: --schema is ignored (the schema was copied when the sync began; its indexes and "
                     "constraints, if still pending, are applied after the copy)")  # fmt: skip
        if fresh and o.schema:
            present = [t for t in report.tables if t not in self._schema_missing]
            if present:
                result.problems.append(
                    "--schema creates the tables, and these exist on the target already: " + ", ".join(present)
                    + " (drop them there, or sync into the existing tables without --schema)"
                )  # fmt: skip
                result.exit_code = EXIT_FAILED
                return result
        await tgt.query(_STATE_DDL)
        if fresh and o.schema:
            post_data = await self._copy_schema(src, tgt, tables, report.source_info.get("version", ""))
            if post_data is None:
                return result
        elif fresh:
            busy = await _nonempty(tgt, tables)
            if busy:
                result.problems.append(
                    "a new sync copies into empty tables, and these hold rows on the target: " + ", ".join(busy)
                    + f" (empty them: TRUNCATE {', '.join(busy)}; or resume the sync whose slot they came from)"
                )  # fmt: skip
                result.exit_code = EXIT_FAILED
                return result
            # Progress of an earlier sync (its slot, and the changes it held, are gone): copy again.
            if await tgt.query(f"select to_regclass({quote_literal(PROGRESS_TABLE)}) is not null") == [["t"]]:
                await tgt.query(f"delete from {PROGRESS_TABLE} where table_name = any({_progress_names(tables)})")
        state = self._state = _State(tgt, self.source, self.target, o)
        created_publication = created_slot = False
        repl: ReplicationConnection | None = None
        try:
            await state.begin(tables, fresh)
            if post_data is not None:
                await state.update(schema_post_data=post_data)
            self.phase = "backfill"
            if not await publication_exists(src, o.publication):
                await src.query(
                    f"create publication {quote_ident(o.publication)} for table {', '.join(tables)} "
                    "with (publish_via_partition_root = true)"
                )
                created_publication = True
                self.say(f'created publication "{o.publication}" for {len(tables)} table(s) on {self.source.backend}')
            else:
                await self._complete_publication(src, tables)
            repl = await ReplicationConnection.connect(
                self.source.address, user=self.source.user, database=self.source.database,
                password=self.source.password, source=self.source.backend,
            )  # fmt: skip
            snapshot: str | None = None
            if fresh:
                created = await repl.create_slot(o.slot)
                created_slot = True
                snapshot = created.snapshot_name
                self.say(f'created replication slot "{o.slot}" at {format_lsn(created.consistent_lsn)}')
            else:
                # A restart: the slot keeps its position. The copy resumes its unfinished chunks under
                # a fresh snapshot of its own (newer than the slot's), and the stream replays every
                # change from the slot's confirmed position; the idempotent upserts/deletes by primary
                # key reconcile the two, so nothing is lost and nothing is duplicated.
                self.say(f'resuming: slot "{o.slot}" exists (confirmed {slot["confirmed_flush_lsn"] if slot else "?"})')
            # The copy, while `repl` stays idle: its exported snapshot lives only that long.
            copy = asyncio.ensure_future(
                backfill(self.source, self.target, snapshot, tables, workers=o.workers, chunk_rows=o.chunk_rows,
                         progress=self._progress(state))
            )  # fmt: skip
            try:
                finished = await self._until_stopped(copy)
            finally:
                self.display.finish()
            if not finished:
                result.exit_code = EXIT_INTERRUPTED
                self.phase = "stopped"
                result.messages.append(
                    f'interrupted during the copy: the slot "{o.slot}" and publication "{o.publication}" stay; '
                    "run `pgshift sync start` again to resume (or `pgshift sync stop` to drop them)"
                )
                if post_data is not None:
                    result.messages.append(
                        "the schema's indexes and constraints (pg_dump post-data) are not applied yet: the run that "
                        "finishes the copy applies them (no need to pass --schema again)"
                    )
                await state.try_update(process=None)
                return result
            result.backfill = copy.result()
            for line in result.backfill.lines():
                self.say(line)
            await self._apply_post_data(tgt, state)
            await self._stream(src, repl, state)
            return result
        except BaseException as exc:
            error = exc.message if isinstance(exc, PgShiftError) else f"{type(exc).__name__}: {exc}"
            result.error = error
            result.exit_code = EXIT_FAILED
            self.phase = "failed"
            if repl is not None:
                with contextlib.suppress(Exception):
                    await repl.close()
                repl = None
            cut_hold = await self._held_by_cut(state) if result.streamed else None
            if cut_hold is not None:
                # Not a failure: a cut-over (pgshift migrate) ended the stream on purpose.
                result.error = None
                result.exit_code = EXIT_OK
                self.phase = "stopped"
                await state.try_update(phase="stopped", process=None)
                result.messages.append(
                    f"the stream was stopped by the cut-over ({cut_hold}); the slot stays until `pgshift migrate "
                    "decommission` drops it, and `pgshift migrate rollback` releases the stream again"
                )
            elif result.streamed:
                await state.try_update(last_error=error, process=None)
                result.messages.append(
                    f'the slot "{o.slot}" and publication "{o.publication}" stay: fix the cause and run '
                    "`pgshift sync start` again to resume from the slot, or `pgshift sync stop` to drop them"
                )
            elif created_slot:
                await self._undo(state, tables, created_publication, error)
                if self.schema_created:
                    result.messages.append(
                        f"the schema this run created on {self.target.backend} stays (it is not dropped "
                        f"automatically): {_some(self.schema_created)}. Drop it there before starting again with "
                        "--schema, or start again without --schema once the tables have their primary keys"
                    )
            else:
                await state.try_update(last_error=error, process=None)
                # (A resumed run keeps even a publication it re-created: the slot decodes with it.)
                result.messages.append(
                    "the existing slot and publication stay: fix the cause and run `pgshift sync start` again to "
                    "resume, or `pgshift sync stop` to drop them"
                )
            if isinstance(exc, PgShiftError | OSError):
                return result
            raise
        finally:
            if repl is not None:
                await repl.close()

    async def _held_by_cut(self, state: _State) -> str | None:
        """The hold a cut-over set on this stream (cdc/handover.py), if the stream ended for it."""
        try:
            row = await _read_state(state.tgt, self.options.slot)
        except PgShiftError:
            return None
        return str(row["hold"]) if row is not None and row.get("hold") else None

    async def _copy_schema(self, src: SqlConnection, tgt: SqlConnection, tables: list[str], version: str) -> str | None:
        """--schema on a new sync: dump pre-data and post-data, apply pre-data on the target now.
        The post-data script (None: refused or failed, said in the result; nothing was created)."""
        o, result = self.options, self.result
        self.phase = "schema"
        major = _major(str(version))
        if major is None:
            raise SyncError(f"cannot tell the source's major version from {version!r}")
        pg_dump = await find_pg_dump(major, o.pg_bindir, o.pg_bindir_problem)
        patterns = await _table_patterns(src, tables) if o.tables is not None else None
        pre = await dump_schema(pg_dump, self.source, "pre-data", patterns)
        post = await dump_schema(pg_dump, self.source, "post-data", patterns)
        before = await _objects(tgt)
        what = f"{len(tables)} table(s)" if patterns is not None else "the whole database"
        self.say(f"copying the schema of {what} (pg_dump {pg_dump}, pre-data) to {self.target.backend}")
        try:
            await apply_script(self.target, pre)
        except PgShiftError as exc:
            result.error = f"the schema (pg_dump pre-data) failed on the target: {exc.message}"
            if exc.detail:
                result.error += f" ({exc.detail})"
            result.exit_code = EXIT_FAILED
            result.messages.append("the schema script ran as one transaction and was rolled back: nothing was created")
            self.phase = "failed"
            return None
        self.schema_created = sorted(await _objects(tgt) - before)
        self.say(f"created {len(self.schema_created)} object(s): {_some(self.schema_created)}")
        # Progress of an earlier sync of tables with these names (dropped since): copy again.
        if await tgt.query(f"select to_regclass({quote_literal(PROGRESS_TABLE)}) is not null") == [["t"]]:
            await tgt.query(f"delete from {PROGRESS_TABLE} where table_name = any({_progress_names(tables)})")
        return post

    async def _apply_post_data(self, tgt: SqlConnection, state: _State) -> None:
        """After the copy: the pending post-data of --schema (indexes, primary keys, constraints,
        triggers), before the stream (its upserts need the primary keys). Kept in the state until
        applied, so that a resumed run applies it too."""
        rows = await tgt.query(
            f"select schema_post_data from {STATE_TABLE} where slot = {quote_literal(self.options.slot)}"
        )
        script = rows[0][0] if rows else None
        if not script:
            return
        self.phase = "post_data"
        self.say("applying the schema's indexes and constraints (pg_dump post-data)")
        started = time.monotonic()
        try:
            await apply_script(self.target, script)
        except PgShiftError as exc:
            raise SyncError(
                f"the schema's indexes and constraints (pg_dump post-data) failed on the target: {exc.message}",
                detail=exc.detail,
            ) from None
        await state.update(schema_post_data=None)
        self.say(f"indexes and constraints applied in {time.monotonic() - started:.1f} s")

    async def _wait_inactive(self, src: SqlConnection) -> dict[str, Any] | None:
        """The slot (None: none); when it is active, wait a little in case its walsender is dying
        (the process of a killed sync: the server notices the closed connection shortly)."""
        deadline = time.monotonic() + ACTIVE_WAIT
        while True:
            slot = await slot_info(src, self.options.slot)
            if slot is None or not slot["active"] or time.monotonic() >= deadline:
                return slot
            await asyncio.sleep(0.5)

    async def _complete_publication(self, src: SqlConnection, tables: list[str]) -> None:
        o = self.options
        missing: list[str] = await src.json(
            "select coalesce(json_agg(t), '[]') from unnest(array["
            + ", ".join(quote_literal(t) for t in tables)
            + "]::text[]) t where to_regclass(t) not in (select prrelid from pg_publication_rel r "
            f"join pg_publication p on p.oid = r.prpubid where p.pubname = {quote_literal(o.publication)})"
        )
        if missing:
            await src.query(f"alter publication {quote_ident(o.publication)} add table {', '.join(missing)}")
            self.say(f'added {len(missing)} table(s) to publication "{o.publication}": {", ".join(missing)}')

    def _progress(self, state: _State) -> Callable[[TableProgress], None]:
        last = [0.0]
        beats: set[asyncio.Future[None]] = set()

        def progress(table: TableProgress) -> None:
            self.copy_progress[table.table] = table
            self.display.update(table)
            now = time.monotonic()
            if now - last[0] >= self.options.status_interval and not beats:  # the heartbeat status reads
                last[0] = now
                beat = asyncio.ensure_future(state.try_update())
                beats.add(beat)
                beat.add_done_callback(beats.discard)

        return progress

    async def _stream(self, src: SqlConnection, repl: ReplicationConnection, state: _State) -> None:
        o, result = self.options, self.result
        slot = await slot_info(src, o.slot)
        confirmed = parse_lsn(slot["confirmed_flush_lsn"]) if slot and slot["confirmed_flush_lsn"] else 0
        # 0: the slot's confirmed position (the server never goes back further anyway).
        # advance_when_idle: while the published tables are idle, the slot follows the server's
        # WAL instead of holding it back (and the lag reads 0 once everything is applied).
        if self._released:
            # A proxy that mirrors to the target leaves it to this stream once it sees the stream
            # run (migrate/migrator.py, mirror coverage; it looks every second). Both writing at
            # once would race: the proxy's replay of a relative UPDATE after this stream's row
            # image of the same transaction would count twice. The slot keeps what waits meanwhile.
            self.say(
                f"waiting {HANDOVER_GRACE:g} s for proxies mirroring to {self.target.backend} to leave it to this "
                "stream"
            )
            await asyncio.sleep(HANDOVER_GRACE)
        await repl.start(o.slot, 0, [o.publication], status_interval=1.0, advance_when_idle=True)
        result.streamed = True
        await state.update(phase="streaming", confirmed_lsn=format_lsn(confirmed) if confirmed else None)
        self.say(f'streaming changes from slot "{o.slot}" (from {format_lsn(confirmed)}); Ctrl-C to stop')
        self.phase = "streaming"
        replica = bool(result.check is not None and result.check.target_info.get("superuser"))
        if not replica:
            self.say(
                f"note: {self.target.user} is not a superuser on {self.target.backend}: changes are applied with "
                "the target's triggers and foreign-key checks firing (session_replication_role = replica needs one)"
            )
        applier = ChangeApplier(repl, self.target, start_lsn=confirmed, replica=replica)
        self.applier = applier
        applying = asyncio.ensure_future(applier.run(repl))
        before = 0
        try:
            while True:
                stop = asyncio.ensure_future(self.stop_requested.wait())
                try:
                    await asyncio.wait({applying, stop}, timeout=o.status_interval,
                                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                finally:
                    stop.cancel()
                if applying.done() or self.stop_requested.is_set():
                    break
                before = await self._status(applier, repl, state, before)
        finally:
            # Applier first, then the connection: its stop sends the last confirmation to the slot.
            if not applying.done():
                await applier.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({applying})
            await repl.stop()
            stats = applier.stats()
            result.stats = {
                "transactions_applied": stats.transactions_applied,
                "rows": stats.rows,
                "confirmed_lsn": format_lsn(stats.confirmed_lsn),
                "lag_bytes": stats.lag_bytes,
                "lag_seconds": round(stats.lag_seconds, 3),
            }
        if (exc := applying.exception()) is not None:
            raise exc
        self.phase = "stopped"
        await state.try_update(
            process=None, confirmed_lsn=format_lsn(applier.confirmed_lsn) if applier.confirmed_lsn else None,
            transactions=applier.transactions_applied,
        )  # fmt: skip
        result.messages.append(
            f"stopped after {applier.transactions_applied} transaction(s), "
            f"confirmed {format_lsn(applier.confirmed_lsn)}."
            f' The slot "{o.slot}" keeps its position and retains WAL until `pgshift sync start` resumes'
            " or `pgshift sync stop` drops it"
        )

    async def _status(self, applier: ChangeApplier, repl: ReplicationConnection, state: _State, before: int) -> int:
        stats = applier.stats()
        applied = stats.transactions_applied
        self.say(
            f"streaming: {applied} transaction(s) applied (+{applied - before}), confirmed "
            f"{format_lsn(stats.confirmed_lsn)}, lag {stats.lag_bytes:,} bytes / {stats.lag_seconds:.1f} s, "
            f"{stats.pending} pending"
        )
        await state.try_update(
            confirmed_lsn=format_lsn(stats.confirmed_lsn) if stats.confirmed_lsn else None,
            transactions=applied, lag_bytes=stats.lag_bytes, lag_seconds=round(stats.lag_seconds, 3),
        )  # fmt: skip
        return applied

    async def _undo(self, state: _State, tables: list[str], created_publication: bool, error: str) -> None:
        """A failed start before streaming: drop what this run created, and empty what it copied."""
        o, messages = self.options, self.result.messages
        left: list[str] = []
        try:
            async with await SqlConnection.connect(self.source) as src:
                await src.query(
                    "select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                    f"where slot_name = {quote_literal(o.slot)}"
                )
                messages.append(f'dropped the replication slot "{o.slot}" this run created')
                if created_publication:
                    await src.query(f"drop publication if exists {quote_ident(o.publication)}")
                    messages.append(f'dropped the publication "{o.publication}" this run created')
        except PgShiftError as exc:
            left.append(f"SELECT pg_drop_replication_slot({quote_literal(o.slot)});")
            if created_publication:
                left.append(f"DROP PUBLICATION IF EXISTS {quote_ident(o.publication)};")
            messages.append(f"could not clean up on the source ({exc.message}); on the source run: " + " ".join(left))
        try:
            # The tables were empty when this run started: what they hold now is its partial copy,
            # useless without the slot.
            await state.tgt.query(f"truncate {', '.join(tables)}")
            await state.tgt.query(f"delete from {PROGRESS_TABLE} where table_name = any({_progress_names(tables)})")
            messages.append(f"emptied the {len(tables)} target table(s) this run had started to copy into")
        except PgShiftError as exc:
            messages.append(
                f"could not empty the partial copy on the target ({exc.message}): TRUNCATE {', '.join(tables)} "
                "there before starting again"
            )
        await state.try_update(phase="stopped", last_error=error, process=None)


def install_signal_handlers(run: SyncRun) -> Callable[[], None]:
    """SIGINT/SIGTERM ask the run to stop cleanly; returns the function that removes them."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, run.request_stop)

    def remove() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    return remove


# --- status ---------------------------------------------------------------------------------------


@dataclass
class StatusReport:
    slot_name: str
    publication_name: str
    state: dict[str, Any] | None
    slot: dict[str, Any] | None
    publication: bool
    tables: list[dict[str, Any]]
    warnings: list[str]

    @property
    def running(self) -> bool:
        s = self.state
        return bool(s and s.get("process") and s.get("age") is not None and s["age"] < HEARTBEAT_STALE)

    @property
    def phase(self) -> str:
        if self.state is None:
            return "none" if self.slot is None else "unknown"
        return str(self.state["phase"])

    @property
    def error(self) -> str | None:
        if self.state is None or self.state.get("phase") == "stopped":
            return None
        error = self.state.get("last_error")
        return str(error) if error else None

    @property
    def retaining_without_consumer(self) -> bool:
        slot = self.slot
        if slot is None or slot["active"]:
            return False
        if self.running and self.phase == "backfill":
            return False  # the copy runs: the stream starts from the slot once it is done
        return (slot.get("retained_bytes") or 0) > 0

    @property
    def ok(self) -> bool:
        return not self.retaining_without_consumer and self.error is None

    def as_dict(self) -> dict[str, Any]:
        state = self.state or {}
        slot = self.slot
        return {
            "ok": self.ok,
            "sync": (self.state is not None and self.phase != "stopped") or slot is not None,
            "phase": self.phase,
            "running": self.running,
            "slot_name": self.slot_name,
            "publication_name": self.publication_name,
            "publication": self.publication,
            "source": state.get("source"),
            "target": state.get("target"),
            "started_at": state.get("started_at"),
            "updated_at": state.get("updated_at"),
            "transactions_applied": state.get("transactions"),
            "confirmed_lsn": state.get("confirmed_lsn"),
            "lag_seconds": state.get("lag_seconds"),
            "lag_bytes": slot["lag_bytes"] if slot else None,
            "slot": slot,
            "tables": self.tables,
            "last_error": state.get("last_error"),
            "warnings": self.warnings,
        }

    def lines(self) -> list[str]:
        state, slot = self.state, self.slot
        if (state is None or self.phase == "stopped") and slot is None:
            out = [f'no sync (slot "{self.slot_name}" does not exist on the source)']
            if state is not None:
                last = f"{state['source']} -> {state['target']}"
                out.append(f"  the last one ({last}) was stopped at {state['updated_at']}")
                if state.get("last_error"):
                    out.append(f"  its last error: {state['last_error']}")
            if self.publication:
                out.append(f'  publication "{self.publication_name}" still exists: `pgshift sync stop` drops it')
            return out + [f"WARNING: {w}" for w in self.warnings]
        out = []
        if state is not None:
            run = f"running ({state['process']})" if self.running else "not running"
            out.append(
                f"sync {state['source']} -> {state['target']}: phase {self.phase}, {run}; "
                f"started {state['started_at']}, updated {state['updated_at']}"
            )
            out.append(
                f"  applied {state['transactions']} transaction(s), confirmed {state['confirmed_lsn'] or '-'}, "
                f"lag {state['lag_seconds'] if state['lag_seconds'] is not None else '-'} s (as last recorded)"
            )
        else:
            out.append(f'slot "{self.slot_name}" exists on the source but the target records no sync for it')
        if slot is not None:
            active = f"active (pid {slot['active_pid']})" if slot["active"] else "inactive"
            out.append(
                f'  slot "{self.slot_name}": {active}, confirmed {slot["confirmed_flush_lsn"]}, '
                f"lag {slot['lag_bytes']:,} bytes, retains {slot['retained_bytes']:,} bytes of WAL"
            )
        else:
            out.append(f'  slot "{self.slot_name}": missing on the source')
        out.append(f'  publication "{self.publication_name}": {"exists" if self.publication else "missing"}')
        for t in self.tables:
            mark = "done" if t["chunks_done"] >= t["chunks"] else f"{t['chunks_done']}/{t['chunks']} chunks"
            out.append(f"  {t['table']}: {t['rows']:,} rows copied, {_mb(t['bytes'])}, {mark}")
        if self.error:
            out.append(f"ERROR: {self.error}")
        out += [f"WARNING: {w}" for w in self.warnings]
        return out


async def sync_status(source: Endpoint, target: Endpoint, slot: str = DEFAULT_SLOT) -> StatusReport:
    async with await SqlConnection.connect(target) as tgt:
        state = await _read_state(tgt, slot)
        tables: list[dict[str, Any]] = []
        if await tgt.query(f"select to_regclass({quote_literal(PROGRESS_TABLE)}) is not null") == [["t"]]:
            where = ""
            if state is not None and state.get("tables"):
                where = f"where table_name = any({_progress_names(json.loads(state['tables']))})"
            tables = await tgt.json(
                "select coalesce(json_agg(json_build_object('table', table_name, 'chunks', chunks, "
                "'chunks_done', done, 'rows', rows, 'bytes', bytes) order by table_name), '[]') from ("
                "select table_name, count(*) chunks, count(done_at) done, coalesce(sum(rows) filter (where done_at "
                "is not null), 0) rows, coalesce(sum(bytes) filter (where done_at is not null), 0) bytes "
                f"from {PROGRESS_TABLE} {where} group by table_name) t"
            )
    publication = state["publication"] if state else DEFAULT_PUBLICATION
    async with await SqlConnection.connect(source) as src:
        info = await slot_info(src, slot)
        has_publication = await publication_exists(src, publication)
    report = StatusReport(slot, publication, state, info, has_publication, tables, [])
    if report.retaining_without_consumer and info is not None:
        report.warnings.append(
            f'slot "{slot}" is inactive and retains {info["retained_bytes"]:,} bytes of WAL on the source '
            f"({_mb(info['retained_bytes'])}, growing with every write): resume with `pgshift sync start`, "
            "or drop it with `pgshift sync stop`"
        )
    return report


# --- stop -----------------------------------------------------------------------------------------


@dataclass
class StopResult:
    ok: bool
    lines: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "messages": self.lines}


async def release_slot(src: SqlConnection, slot: str, pid: int, lines: list[str]) -> bool:
    """Terminate the walsender (``pid``) streaming from ``slot`` and wait until the slot is free;
    False (with the reason in ``lines``) if it is still active after ACTIVE_WAIT."""
    await src.query(f"select pg_terminate_backend({pid})")
    lines.append(f'terminated the walsender (pid {pid}) streaming from slot "{slot}"')
    deadline = time.monotonic() + ACTIVE_WAIT
    while (info := await slot_info(src, slot)) is not None and info["active"]:
        if time.monotonic() > deadline:
            lines.append(f'slot "{slot}" is still active; try again')
            return False
        await asyncio.sleep(0.2)
    return True


async def drop_slot_and_publication(
    src: SqlConnection, backend: str, slot: str, publication: str, lines: list[str]
) -> None:
    """Drop ``slot`` and ``publication`` where they exist, saying in ``lines`` what was done."""
    if await slot_info(src, slot) is not None:
        await src.query(
            f"select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = "
            f"{quote_literal(slot)}"
        )
        lines.append(f'dropped replication slot "{slot}" on {backend}')
    else:
        lines.append(f'no replication slot "{slot}" on {backend}: nothing to drop')
    if await publication_exists(src, publication):
        await src.query(f"drop publication {quote_ident(publication)}")
        lines.append(f'dropped publication "{publication}" on {backend}')
    else:
        lines.append(f'no publication "{publication}" on {backend}: nothing to drop')


async def sync_stop(
    source: Endpoint, target: Endpoint, slot: str = DEFAULT_SLOT, publication: str | None = None, *, force: bool = False
) -> StopResult:
    lines: list[str] = []
    async with await SqlConnection.connect(target) as tgt:
        state = await _read_state(tgt, slot)
    if publication is None:
        publication = state["publication"] if state else DEFAULT_PUBLICATION
    async with await SqlConnection.connect(source) as src:
        info = await slot_info(src, slot)
        copying = (
            state is not None and state["phase"] == "backfill" and state.get("process")
            and state["age"] is not None and state["age"] < HEARTBEAT_STALE
        )  # fmt: skip
        if info is not None and (info["active"] or copying):
            who = f"process {info['active_pid']} streams from it" if info["active"] else (
                f"a sync is copying under it ({state['process'] if state else '?'})"
            )  # fmt: skip
            if not force:
                return StopResult(False, [
                    f'slot "{slot}" is in use: {who}. Stop that sync first (Ctrl-C / SIGTERM), or pass --force '
                    "to terminate its walsender and drop the slot anyway"
                ])  # fmt: skip
            if info["active"] and not await release_slot(src, slot, int(info["active_pid"]), lines):
                return StopResult(False, lines)
        await drop_slot_and_publication(src, source.backend, slot, publication, lines)
    if state is not None and state["phase"] != "stopped":
        async with await SqlConnection.connect(target) as tgt:
            await tgt.query(
                f"update {STATE_TABLE} set phase = 'stopped', process = null, updated_at = now() "
                f"where slot = {quote_literal(slot)}"
            )
        lines.append(f"the sync {state['source']} -> {state['target']} is marked stopped on {target.backend}")
    return StopResult(True, lines)
