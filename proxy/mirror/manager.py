"""Dual write for the whole proxy: one ordered apply stream per (mirror, database), bounds, policies, status.

Sessions hand committed transactions to ``commit`` in the order the primary acknowledged them (the
event loop serialises those acknowledgements). Each mirror applies them in that order on its own
stream. A mirror whose queue exceeds ``mirror.queue_bytes``, or that stays unreachable longer than
``mirror.down_after`` with writes waiting, is *detached*: what was queued is dropped, every table
it touched is journaled as out of sync, and until an operator resumes the mirror, each commit
adds its tables to that list instead of queueing. The client path never waits for any of this
(except a COMMIT in sync mode, bounded by its timeout).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.config import MirrorConfig, MirrorMode, UnsafePolicy
from proxy.mirror.apply import ApplyStream, Outcome, StreamState
from proxy.mirror.journal import Journal
from proxy.mirror.model import Divergence, Txn, Write
from proxy.mirror.plan import PlanCache, StatementPlan, rewrite_parse
from proxy.routing import Live
from proxy.wire.messages import decode_data_row

if TYPE_CHECKING:
    from proxy.mirror.capture import Capture

log = logging.getLogger(__name__)

_REWRITTEN_CACHE = 4096
# Tables a write must not be rewritten for (RETURNING of the whole row would fail or change what
# the statement does): no SELECT privilege for the session's role (insert-only audit tables),
# row-level security, rewrite rules other than a view's own (DO INSTEAD), foreign tables.
TARGETS_SQL = (
    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind IN ('r', 'p', 'v', 'f') AND n.nspname <> 'information_schema'"
    " AND n.nspname NOT LIKE 'pg\\_%'"
    " AND (c.relkind = 'f' OR c.relrowsecurity OR NOT pg_catalog.has_table_privilege(c.oid, 'SELECT')"
    " OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r WHERE r.ev_class = c.oid AND r.rulename <> '_RETURN'))"
)
_WATCH_INTERVAL = 0.5
_STATEMENT_CHARS = 500


@dataclass(frozen=True, slots=True)
class Policy:
    mode: MirrorMode
    sync_timeout: float
    unsafe: UnsafePolicy


@dataclass
class _Detached:
    since: float
    reason: str


class MirrorManager:
    def __init__(self, live: Live, journal: Journal) -> None:
        self.live = live
        self.journal = journal
        self.streams: dict[tuple[str, str], ApplyStream] = {}
        self.detached: dict[tuple[str, str], _Detached] = {}
        # (mirror, event): applied, failed, unmirrored_txns, sync_timeouts
        self.counts: Counter[tuple[str, str]] = Counter()
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._seq = 0
        self._plans_for: MirrorConfig | None = None
        self._plans = PlanCache(functions_write=False)
        self._rewritten: OrderedDict[bytes, bytes] = OrderedDict()
        self._unrewritable: dict[tuple[str, str], frozenset[str]] = {}
        self.targets_generation = 0  # bumped when they are to be asked again (sessions check it cheaply)
        self._watch: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.Task[None]] = set()  # sync-mode commits waiting for their mirrors
        self._default = Policy("async", 0.0, "record")
        self._default_for: MirrorConfig | None = None
        self._closing = False
        # Mirrors a change stream feeds (the migration's target while `pgshift sync` streams to
        # it; set by migrate/migrator.py): the stream alone writes them. Two writers would race —
        # a replayed relative UPDATE (n = n + 1) applied after the stream's row image of the same
        # transaction counts twice — so their transactions are counted as "covered", not applied.
        self.covered: frozenset[str] = frozenset()

    # --- what captures ask ----------------------------------------------------------------------

    @property
    def config(self) -> MirrorConfig:
        return self.live.config.mirror

    @property
    def plans(self) -> PlanCache:
        config = self.config
        if config is not self._plans_for:
            if self._plans_for is None or self._plans_for.functions != config.functions:
                self._plans = PlanCache(functions_write=config.functions)
            self._plans_for = config
        return self._plans

    def active(self) -> bool:
        return bool(self.live.table.mirrors)

    def targets(self, writer: str) -> tuple[str, ...]:
        """Where a transaction committed on backend ``writer`` goes: every mirror, and the primary
        too when the writer is not it (a session pinned to the previous primary after a flip
        writes there; the new primary must get those writes, the writer must not get them twice)."""
        table = self.live.table
        if writer == table.primary:
            return table.mirrors
        return tuple(name for name in (table.primary, *table.mirrors) if name != writer)

    def rewritable(self, database: str, user: str) -> frozenset[str] | None:
        """Names of the tables ``user`` must not have writes rewritten for in ``database``
        (bare and schema-qualified); None: not asked yet."""
        return self._unrewritable.get((database, user))

    def learn_targets(self, database: str, user: str, replies: list[bytes]) -> None:
        names: set[str] = set()
        if any(m[:1] == b"E" for m in replies):
            # Could not ask (it should not happen): rewrite as usual; a failure will show.
            log.warning("dual write: cannot list the tables %s may not read in %s", user, database)
        for message in replies:
            if message[:1] == b"D":
                row = decode_data_row(message[5:])
                if len(row) == 2 and row[0] is not None and row[1] is not None:
                    schema, table = row[0].decode(errors="replace"), row[1].decode(errors="replace")
                    names.update((table, f"{schema}.{table}"))
        self._unrewritable[(database, user)] = frozenset(names)

    def forget_targets(self) -> None:
        """After DDL through the proxy: privileges, rules, policies may have changed; ask again."""
        self._unrewritable.clear()
        self.targets_generation += 1

    def rewritten_parse(self, raw: bytes, sql: str, codec: str) -> bytes:
        """The Parse frame with the row-image column added: built once per distinct frame (the
        text encoded in the session's client encoding, as the server reads it)."""
        cached = self._rewritten.get(raw)
        if cached is None:
            cached = rewrite_parse(raw, sql, encoding=codec)
            self._rewritten[raw] = cached
            if len(self._rewritten) > _REWRITTEN_CACHE:
                self._rewritten.popitem(last=False)
        return cached

    def policy(self, user: str, application_name: str, tables: tuple[str, ...] = ()) -> Policy:
        """The first rule matching the session (and, when given, a table the transaction wrote)
        overrides the [mirror] defaults it sets."""
        config = self.config
        if not config.rules:  # (the usual case, on every commit: no new object)
            if self._default_for is not config:
                self._default = Policy(config.mode, config.sync_timeout, config.unsafe)
                self._default_for = config
            return self._default
        mode, timeout, unsafe = config.mode, config.sync_timeout, config.unsafe
        for rule in config.rules:
            if rule.users is not None and user not in rule.users:
                continue
            if rule.application_names is not None and application_name not in rule.application_names:
                continue
            if rule.tables is not None and not _any_table(rule.tables, tables):
                continue
            mode = rule.mode or mode
            timeout = rule.sync_timeout or timeout
            unsafe = rule.unsafe or unsafe
            break
        return Policy(mode, timeout, unsafe)

    def commit(
        self, capture: Capture, settings: tuple[tuple[str, str], ...], writes: tuple[Write, ...], size: int
    ) -> asyncio.Future[str | None] | None:
        """A transaction the primary just committed: queue it on every mirror. Returns what the
        client's answer must wait for in sync mode (its result: a warning to show, or None)."""
        mirrors = self.targets(capture.primary)
        if not mirrors or self._closing:
            return None
        self._seq += 1
        txn = Txn(self._seq, capture.database, capture.session, settings, writes, size)
        waits: list[tuple[str, asyncio.Future[Outcome]]] = []
        limit = self.config.queue_bytes
        for mirror in mirrors:
            if mirror in self.covered:
                self.counts[(mirror, "covered")] += 1
                continue
            key = (mirror, capture.database)
            stream = self.streams.get(key) or self._open(key)
            if key not in self.detached:
                if stream is not None and stream.queued_bytes + size > limit:
                    self._detach(key, f"apply queue above mirror.queue_bytes ({limit} bytes)")
                elif stream is not None and self._down_too_long(stream):
                    self._detach(key, f"unreachable for more than mirror.down_after ({self.config.down_after:g} s)")
            if key in self.detached or stream is None:
                self._unmirrored(key, txn)
                continue
            waits.append((mirror, stream.submit(txn)))
        policy = self.policy(capture.user, capture.application_name, txn.tables)
        if policy.mode != "sync":
            return None
        result: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(
            self._await_sync(txn, waits, mirrors, policy.sync_timeout, result)
        )
        self._waiting.add(task)  # (a reference: the loop keeps only weak ones)
        task.add_done_callback(self._waiting.discard)
        return result

    async def _await_sync(
        self,
        txn: Txn,
        waits: list[tuple[str, asyncio.Future[Outcome]]],
        mirrors: tuple[str, ...],
        limit: float,
        result: asyncio.Future[str | None],
    ) -> None:
        """Resolve ``result`` once every mirror applied ``txn`` or ``limit`` passed — always: a
        client's COMMIT answer waits on it."""
        message = None
        try:
            message = await self._sync_outcome(txn, waits, mirrors, limit)
        except Exception:  # a bug here must not leave a client waiting forever
            log.exception("sync mirror wait failed; answering the client")
            message = "pgshift: committed on the primary; the mirror wait failed (see the proxy log)"
        finally:
            if not result.done():
                result.set_result(message)

    async def _sync_outcome(
        self, txn: Txn, waits: list[tuple[str, asyncio.Future[Outcome]]], mirrors: tuple[str, ...], limit: float
    ) -> str | None:
        problems: list[str] = []
        if waits:
            _, pending = await asyncio.wait([f for _, f in waits], timeout=limit)
            for mirror, future in waits:
                if future in pending:
                    self.counts[(mirror, "sync_timeouts")] += 1
                    problems.append(f'mirror "{mirror}" did not confirm within {limit:g} s')
                    self.journal.record(
                        Divergence(
                            mirror, txn.database, f"sync mode: not confirmed within {limit:g} s (still queued)",
                            txn.tables, seq=txn.seq, kind="late",
                        )
                    )  # fmt: skip
                elif not future.cancelled() and not future.result().applied:
                    problems.append(f'mirror "{mirror}" did not apply it (see pgshift mirror status)')
        for mirror in mirrors:
            if (mirror, txn.database) in self.detached:
                problems.append(f'mirror "{mirror}" is detached (see pgshift mirror status)')
        if problems and self.config.on_timeout == "warn":
            return "pgshift: committed on the primary; " + "; ".join(problems)
        return None

    def note(self, capture: Capture, kind: str, plan: StatementPlan, reason: str) -> None:
        """A statement of a committed transaction that the mirrors do not get (DDL kept on the
        primary, an unsafe write under mirror.unsafe = "record", …): journaled per mirror."""
        for mirror in self.live.table.mirrors:
            if mirror in self.covered:
                continue  # (the change stream carries it)
            self.journal.record(
                Divergence(
                    mirror, capture.database, reason, plan.tables, plan.fingerprint, plan.sql[:_STATEMENT_CHARS],
                    kind=kind,
                )
            )  # fmt: skip

    def unmirrored(self, capture: Capture, tables: tuple[str, ...], reason: str) -> None:
        for mirror in self.targets(capture.primary):
            if mirror not in self.covered:
                self.journal.record(Divergence(mirror, capture.database, reason, tables, kind="unmirrored"))

    # --- streams -------------------------------------------------------------------------------

    def _open(self, key: tuple[str, str]) -> ApplyStream | None:
        mirror, database = key
        backend = self.live.config.backends.get(mirror)
        account = backend.apply_account if backend is not None else None
        if backend is None or account is None:
            if key not in self.detached:
                why = "is not configured" if backend is None else "has no apply account (set mirror_user)"
                self._detach(key, f'backend "{mirror}" {why}')
            return None
        user, password = account
        stream = ApplyStream(
            mirror,
            backend.address.dbname or database,
            backend.address,
            user=user,
            password=password,
            max_message_size=self.live.config.proxy.max_message_size,
            on_outcome=self._on_outcome,
        )
        self.streams[key] = stream
        task = asyncio.get_running_loop().create_task(stream.run(), name=f"mirror-{mirror}-{database}")
        self._tasks[key] = task
        task.add_done_callback(functools.partial(self._stream_ended, key))
        return stream

    def _stream_ended(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self._closing:
            log.error("mirror stream %s/%s failed", *key, exc_info=task.exception())
            self._detach(key, f"apply stream failed: {task.exception()!r}")

    def _down_too_long(self, stream: ApplyStream) -> bool:
        since = stream.down_since
        return (
            since is not None
            and stream.state is not StreamState.RUNNING
            and (time.monotonic() - since > self.config.down_after)
        )

    def _on_outcome(self, txn: Txn, outcome: Outcome) -> None:
        stream_key = None
        for divergence in outcome.divergences:
            stream_key = (divergence.mirror, txn.database)
            if divergence.kind != "out_of_sync":  # (detach journals those once, together)
                self.journal.record(divergence)
        if stream_key is None:
            return
        self.counts[(stream_key[0], "applied" if outcome.applied else "failed")] += 1

    def _detach(self, key: tuple[str, str], reason: str) -> None:
        mirror, database = key
        self.detached[key] = _Detached(time.time(), reason)
        stream = self.streams.get(key)
        dropped = stream.take_queued() if stream is not None else []
        tables: dict[str, None] = {}
        for txn in dropped:
            tables.update(dict.fromkeys(txn.tables))
        self.counts[(mirror, "unmirrored_txns")] += len(dropped)
        log.error('mirror "%s" (database %s) detached: %s; %d queued transactions dropped', mirror, database, reason,
                  len(dropped))  # fmt: skip
        self.journal.record(
            Divergence(
                mirror, database, f"detached: {reason}; {len(dropped)} queued transactions not applied",
                tuple(tables), kind="out_of_sync",
            )
        )  # fmt: skip

    def _unmirrored(self, key: tuple[str, str], txn: Txn) -> None:
        mirror, database = key
        self.counts[(mirror, "unmirrored_txns")] += 1
        new = [t for t in txn.tables if (mirror, database, t) not in self.journal.out_of_sync]
        if new:  # journal each table once per detachment, not once per transaction
            reason = self.detached[key].reason if key in self.detached else "mirror not available"
            self.journal.record(
                Divergence(mirror, database, f"written while detached ({reason})", tuple(new), seq=txn.seq,
                           kind="unmirrored")
            )  # fmt: skip

    def resume(self, mirror: str, *, repaired: bool = False) -> dict[str, Any]:
        """Capture for ``mirror`` starts again (after repair); ``repaired`` also clears its
        out-of-sync tables from the journal."""
        resumed = [db for (m, db) in list(self.detached) if m == mirror]
        for db in resumed:
            del self.detached[(mirror, db)]
        cleared = self.journal.clear(mirror) if repaired else []
        return {"mirror": mirror, "resumed": resumed, "cleared": cleared}

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.journal.load()
        self.journal.start()
        self._watch = asyncio.get_running_loop().create_task(self._watchdog(), name="mirror-watchdog")

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            for key, stream in list(self.streams.items()):
                if key not in self.detached and stream.queued and self._down_too_long(stream):
                    self._detach(key, f"unreachable for more than mirror.down_after ({self.config.down_after:g} s)")

    async def close(self, drain: float) -> None:
        """Give queued writes up to ``drain`` seconds; whatever is left is journaled, not lost silently."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
        streams = list(self.streams.items())
        await asyncio.gather(*(s.stop(drain=drain) for _, s in streams), return_exceptions=True)
        for key, stream in streams:
            left = stream.take_queued()
            if left:
                tables: dict[str, None] = {}
                for txn in left:
                    tables.update(dict.fromkeys(txn.tables))
                self.journal.record(
                    Divergence(key[0], key[1], f"proxy stopped with {len(left)} transactions not applied",
                               tuple(tables), kind="out_of_sync")
                )  # fmt: skip
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.journal.close()

    # --- status ----------------------------------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        """One line per mirror for `pgshift status` (the details: ``status``)."""
        out = []
        for mirror in self.status()["mirrors"]:
            databases = mirror["databases"]
            states = {d["state"] for d in databases}
            state = next((s for s in ("detached", "down", "connecting", "running") if s in states), "idle")
            out.append(
                {
                    "name": mirror["name"],
                    "state": state,
                    "queued": sum(d["queued"] for d in databases),
                    "lag_seconds": max((d["lag_seconds"] for d in databases), default=0.0),
                    "diverged": mirror["diverged"] + mirror["failed"],
                    "out_of_sync_tables": len(mirror["out_of_sync"]),
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        mirrors = []
        configured = set(self.live.table.mirrors)
        names = sorted(configured | {m for m, _ in self.streams} | {m for m, _ in self.detached})
        for mirror in names:
            dbs = sorted({db for m, db in [*self.streams, *self.detached] if m == mirror})
            databases = []
            for db in dbs:
                stream = self.streams.get((mirror, db))
                detached = self.detached.get((mirror, db))
                databases.append(
                    {
                        "database": db,
                        "state": "detached" if detached else (stream.state.value if stream else "none"),
                        "detached": {"since": detached.since, "reason": detached.reason} if detached else None,
                        "queued": stream.queued if stream else 0,
                        "queued_bytes": stream.queued_bytes if stream else 0,
                        "lag_seconds": round(stream.lag_seconds, 3) if stream else 0.0,
                        "applied": stream.applied if stream else 0,
                        "failed": stream.failed if stream else 0,
                        "last_applied_seq": stream.last_applied_seq if stream else 0,
                        "last_error": stream.last_error if stream else "",
                    }
                )
            out_of_sync = [
                {"database": o.database, "table": o.table, "since": o.since, "reason": o.reason}
                for (m, _, _), o in sorted(self.journal.out_of_sync.items())
                if m == mirror
            ]
            mirrors.append(
                {
                    "name": mirror,
                    "configured": mirror in configured,
                    "databases": databases,
                    "diverged": self.journal.counts[(mirror, "diverged")],
                    "failed": self.journal.counts[(mirror, "failed")],
                    "unmirrored": self.journal.counts[(mirror, "unmirrored")],
                    "unmirrored_txns": self.counts[(mirror, "unmirrored_txns")],
                    "sync_timeouts": self.counts[(mirror, "sync_timeouts")],
                    "covered": mirror in self.covered,  # a change stream writes it: nothing applied here
                    "covered_txns": self.counts[(mirror, "covered")],
                    "out_of_sync": out_of_sync,
                }
            )
        config = self.config
        return {
            "mode": config.mode,
            "unsafe": config.unsafe,
            "ddl": config.ddl,
            "queue_bytes_limit": config.queue_bytes,
            "committed": self._seq,
            "journal": str(self.journal.path) if self.journal.path else None,
            "journal_write_errors": self.journal.write_errors,
            "mirrors": mirrors,
            "recent": list(self.journal.recent)[-50:],
        }


def _any_table(wanted: list[str], tables: tuple[str, ...]) -> bool:
    short = {t.rsplit(".", 1)[-1].strip('"') for t in tables}
    return any(w in tables or w in short for w in wanted)
