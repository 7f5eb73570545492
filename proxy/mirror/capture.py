"""One session's dual-write capture: plan each write, tap the primary's replies, hand committed transactions on.

Request side (``request``): every statement sent to the primary is planned (mirror/plan.py). A
write that computes values is rewritten to return its row image as one extra, last column; its
Bind gets a result format for that column. Reply side (``feed``): an expected-reply FIFO of its
own, pushed per frontend message exactly like the connection's, tells which statement each reply
belongs to. The tap takes the image column out of RowDescription and DataRow (NoData for a
Describe of a statement that had no RETURNING) so the client sees exactly what it asked for, and
collects each statement's CommandComplete tag. Transaction logic follows the replies: a write
joins the open transaction's buffer when it completes; SAVEPOINT / ROLLBACK TO trim it; a COMMIT
(or ReadyForQuery 'I' after an autocommit statement or implicit transaction without error) hands
the buffer to the mirrors; ROLLBACK or an error discards it.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.errors import FeatureNotSupported, ProtocolViolation
from proxy.mirror import wireedit
from proxy.mirror.model import Image, ImageOp, Write, WriteKind
from proxy.mirror.plan import Action, StatementPlan
from proxy.mirror.settings import SessionSettings, changes
from proxy.sql import TxOp
from proxy.wire.codes import FrontendCode

if TYPE_CHECKING:
    from proxy.mirror.manager import MirrorManager, Policy

log = logging.getLogger(__name__)

_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
RawFrame = tuple[int, bytes]

# FIFO entry kinds (one per frontend message that gets an answer).
_PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC, _QUERY, _FCALL = range(8)
_FRONT = {
    FrontendCode.PARSE.value: _PARSE,
    FrontendCode.BIND.value: _BIND,
    FrontendCode.DESCRIBE.value: _DESCRIBE,
    FrontendCode.EXECUTE.value: _EXECUTE,
    FrontendCode.CLOSE.value: _CLOSE,
    FrontendCode.SYNC.value: _SYNC,
    FrontendCode.QUERY.value: _QUERY,
    FrontendCode.FUNCTION_CALL.value: _FCALL,
}
_COPY_DATA = FrontendCode.COPY_DATA.value
_COPY_DONE = FrontendCode.COPY_DONE.value
_COPY_FAIL = FrontendCode.COPY_FAIL.value
# Backend message codes the tap acts on.
_ROW_DESC, _DATA_ROW, _NO_DATA, _COMPLETE, _EMPTY, _SUSPENDED = (ord(c) for c in "TDnCIs")
_ERROR, _READY, _COPY_IN, _PARAM_STATUS, _FUNCTION_RESULT = (ord(c) for c in "EZGSV")
_SIMPLE_DONE = frozenset(ord(c) for c in "123")  # ParseComplete, BindComplete, CloseComplete
# Messages the tap must see whole (small ones, and DataRows carrying a row image).
_WHOLE = frozenset({_ROW_DESC, _COMPLETE, _ERROR, _READY, _COPY_IN, _PARAM_STATUS, _NO_DATA})
_IDLE = ord("I")


class Rejected(Exception):
    """A statement the configured policy refuses (mirror.unsafe / mirror.ddl = "reject")."""

    def __init__(self, error: FeatureNotSupported) -> None:
        super().__init__(error.message)
        self.error = error


class _Run:
    """One execution of one statement: its plan, how it is replayed, its row images so far."""

    __slots__ = ("bind", "copy", "done", "leftover", "mode", "parse", "plan", "rewritten", "rows", "rows_size")

    def __init__(
        self, plan: StatementPlan, mode: str, *, rewritten: bool, parse: bytes = b"", bind: bytes = b""
    ) -> None:
        self.plan = plan
        self.mode = mode  # "replay" | "image" | "note" | "none" (after policies)
        self.rewritten = rewritten  # the primary returns the row-image column for this one
        self.parse = parse
        self.bind = bind
        self.rows: list[bytes] = []
        self.rows_size = 0
        self.copy: list[bytes] | None = [] if plan.copy_in else None
        self.done = False  # its CommandComplete was seen (a portal's later Executes add nothing)
        self.leftover: list[bytes] = []  # rows fetched past the client's row limit, as it will see them


class _Entry:
    __slots__ = ("index", "kind", "limit", "plain_rows", "plan", "prepared", "runs", "sent")

    def __init__(self, kind: int, runs: list[_Run] | None = None, plan: StatementPlan | None = None) -> None:
        self.kind = kind
        self.runs = runs  # QUERY: one per statement; EXECUTE: the portal's run
        self.index = 0  # QUERY: the statement the next reply belongs to
        self.plan = plan  # DESCRIBE: the plan described (None: nothing to trim)
        self.limit = 0  # EXECUTE: the client's row limit (the server was asked for every row)
        self.sent = 0  # EXECUTE with a limit: rows passed to the client
        # No DataRow of this entry is edited (no image column, no lifted limit): they pass as
        # they are, without a call per row (a large SELECT result through a mirroring session).
        self.plain_rows = not runs or (not runs[0].rewritten if len(runs) == 1 else not any(r.rewritten for r in runs))
        self.prepared: tuple[str, _Prepared] | None = None  # PARSE: the statement it makes


class _Prepared:
    __slots__ = ("parse", "plan", "rewritten")

    def __init__(self, plan: StatementPlan, parse: bytes, rewritten: bool) -> None:
        self.plan = plan
        self.parse = parse  # the unnamed-statement Parse a mirror replays (the client's SQL)
        self.rewritten = rewritten


class Capture:
    """Per session; lives as long as the session once mirroring touched it (statements it rewrote
    keep their extra column on the server, so their replies must keep being trimmed)."""

    def __init__(
        self,
        manager: MirrorManager,
        *,
        session: str,
        database: str,
        user: str,
        application_name: str,
        settings: SessionSettings,
        write: Callable[[bytes], object],
        known: Callable[[str], bytes | None],
    ) -> None:
        self.manager = manager
        self.primary = ""  # the backend this session's writes run on (the session keeps it current)
        self.session = session
        self.database = database
        self.user = user
        self.application_name = application_name
        self.settings = settings
        self._write = write  # to the client (held bytes are released through it)
        self._known = known  # a named statement's Parse frame, prepared before capture began
        self._policy: Policy | None = None
        self._policy_for: object = None
        self._fifo: deque[_Entry] = deque()
        self._skip_until_sync = False  # an error emptied the FIFO before the request's Sync came
        self._prepared: dict[str, _Prepared] = {}
        self._parsing: dict[str, _Prepared] = {}  # sent, ParseComplete not seen yet
        self._portals: dict[str, _Run] = {}
        self._copy_run: _Run | None = None
        self._pending = b""
        self._skip = 0
        # the open transaction
        # writes, and notes (kind, plan, reason) of what is not mirrored (journaled at commit)
        self._buffer: list[Write | tuple[str, StatementPlan, str]] = []
        # savepoint, buffer length, size then, settings then
        self._marks: list[tuple[str, int, int, tuple[dict[str, str | None], dict[str, str | None]]]] = []
        self._size = 0
        self._failed = False
        self._tx_settings: tuple[tuple[str, str], ...] | None = None
        self._last_settings: tuple[tuple[str, str], ...] = ()
        # sync mode: replies held until the mirrors confirmed
        self._arm: asyncio.Future[str | None] | None = None  # a commit waits: hold at the next ReadyForQuery
        self._held: list[bytes] | None = None
        self._waits = 0
        self._warnings: list[bytes] = []

    # --- request side ----------------------------------------------------------------------------

    def refused(self, frames: list[RawFrame]) -> None:
        """The proxy's replacement for a refused request (it raises the refusal on the primary):
        tracked for its replies, never planned (it writes nothing)."""
        self._fifo.extend(_Entry(_FRONT[code], [] if code == FrontendCode.QUERY.value else None) for code, _ in frames
                          if code in _FRONT)  # fmt: skip

    def _current_policy(self) -> Policy:
        config = self.manager.config
        policy = self._policy
        if policy is None or self._policy_for is not config:  # (once per session and config)
            policy = self._policy = self.manager.policy(self.user, self.application_name)
            self._policy_for = config
        return policy

    def adopt(self, name: str, raw: bytes) -> bytes | None:
        """A named statement the session prepared before capture began, or on another primary:
        its Parse as capture would have sent it, when capture adds a row image to it (it is then
        recorded here as rewritten, and the session must Parse it again on the primary before its
        next use); None when it stays as it is. Without this, every write through a statement
        prepared before dual write began (a pool's long-lived connections) would go unmirrored."""
        existing = self._prepared.get(name) or self._parsing.get(name)
        if existing is not None and existing.rewritten:
            return None
        codec = self.settings.codec()
        if codec is None or not self.settings.exact_floats():
            return None
        _, sql, _ = wireedit.parse_parts(raw, codec)
        plans = self.manager.plans.get(sql)
        plan = plans[0] if len(plans) == 1 else _NOT_MIRRORED
        try:
            run = self._run_for(plan, self._current_policy())
        except Rejected:
            return None  # refused at its Bind, as any other write of that kind
        if not (run.rewritten and plan.rewritten):
            return None
        self._prepared[name] = _Prepared(plan, b"", True)
        self._parsing.pop(name, None)
        return self.manager.rewritten_parse(raw, plan.rewritten, codec)

    def request(self, frames: list[RawFrame]) -> list[RawFrame] | None:
        """Plan the request's statements and push their FIFO entries; the frames to send instead,
        or None if they go as they are. Raises Rejected (nothing pushed) when a policy refuses one."""
        policy = self._current_policy()
        changed = False
        out: list[RawFrame] = []
        entries: list[_Entry] = []
        # SQL text arrives in the session's client encoding; a text whose encoding Python cannot
        # read is planned (read as latin-1: bytes kept) but never rewritten.
        codec = self.settings.codec()
        read_as = codec or "latin-1"
        # (Row images are the server's text output: with extra_float_digits below 1 it rounds
        # float8 values, so such a session's writes are not rewritten.)
        images = codec is not None and self.settings.exact_floats()
        for code, raw in frames:
            kind = _FRONT.get(code)
            if self._skip_until_sync:
                # After an error Postgres discards every message up to Sync: no answer to expect,
                # nothing prepared, nothing run.
                if kind == _SYNC:
                    self._skip_until_sync = False
                    entries.append(_Entry(_SYNC))
                out.append((code, raw))
                continue
            if kind is None:
                if self._copy_run is not None and code in (_COPY_DATA, _COPY_DONE, _COPY_FAIL):
                    run = self._copy_run
                    if code == _COPY_DATA and run.copy is not None:
                        run.copy.append(raw)
                        run.rows_size += len(raw)
                    elif code != _COPY_DATA:
                        self._copy_run = None
                out.append((code, raw))
                continue
            if kind == _QUERY:
                sql = raw[5:-1].decode(read_as, errors="replace")
                plans = self.manager.plans.get(sql)
                runs = [self._run_for(plan, policy, rewritten=None if images else False) for plan in plans]
                if any(r.rewritten for r in runs) and codec is not None:
                    # (each on its own line: a statement may end in a -- comment)
                    text = "\n;\n".join(
                        (r.plan.rewritten if r.rewritten and r.plan.rewritten else r.plan.sql) for r in runs
                    )
                    raw = _frame(b"Q", text.encode(codec) + b"\x00")
                    changed = True
                for r in runs:
                    if r.copy is not None:
                        self._copy_run = r
                entries.append(_Entry(_QUERY, runs))
            elif kind == _PARSE:
                name, sql, _ = wireedit.parse_parts(raw, read_as)
                plans = self.manager.plans.get(sql)
                plan = plans[0] if len(plans) == 1 else _NOT_MIRRORED
                # (checks the policies now: before anything runs)
                run = self._run_for(plan, policy, rewritten=None if images else False)
                if run.rewritten and plan.rewritten and codec is not None:
                    raw = self.manager.rewritten_parse(raw, plan.rewritten, codec)
                    changed = True
                # (A rewritten statement is applied from its row images, never replayed.)
                prepared = _Prepared(plan, b"" if run.rewritten else wireedit.unnamed_parse(raw), run.rewritten)
                # It replaces the statement of that name only once the server says ParseComplete
                # (a Parse that fails leaves the old one); until then what follows uses it.
                self._parsing[name] = prepared
                entry = _Entry(_PARSE)
                entry.prepared = (name, prepared)
                entries.append(entry)
            elif kind == _BIND:
                portal, stmt = wireedit.bind_names(raw)
                target = self._statement(stmt)
                if target is None:
                    run = _Run(_NOT_MIRRORED, "none", rewritten=False)
                else:
                    run = self._run_for(target.plan, policy, rewritten=target.rewritten)
                    if run.mode == "replay":
                        run.parse = target.parse
                        run.bind = wireedit.bind_for_replay(raw)
                    if target.rewritten:
                        edited = wireedit.bind_with_image_format(raw, target.plan.returning)
                        if edited is not raw:
                            raw = edited
                            changed = True
                self._portals[portal] = run
                entries.append(_Entry(_BIND))
            elif kind == _DESCRIBE:
                what, name = raw[5:6], raw[6:-1].decode(errors="replace")
                described: StatementPlan | None = None
                if what == b"S":
                    target = self._statement(name)
                    described = target.plan if target is not None and target.rewritten else None
                else:
                    portal_run = self._portals.get(name)
                    described = portal_run.plan if portal_run is not None and portal_run.rewritten else None
                entries.append(_Entry(_DESCRIBE, plan=described))
            elif kind == _EXECUTE:
                stop = raw.find(b"\x00", 5)
                if stop < 0 or len(raw) != stop + 5:
                    raise ProtocolViolation("malformed Execute message")
                name = raw[5:stop].decode(errors="replace")
                portal_run = self._portals.get(name) or _Run(_NOT_MIRRORED, "none", rewritten=False)
                if portal_run.copy is not None:
                    self._copy_run = portal_run
                entry = _Entry(_EXECUTE, [portal_run])
                (limit,) = _I32.unpack_from(raw, stop + 1)
                if limit > 0 and portal_run.mode in ("image", "replay"):
                    # A write runs whole at its first Execute whatever the row limit, but its tag
                    # (and the rows past the limit) would only come with later Executes the client
                    # may never send (asyncpg's fetchrow). Fetch everything; the tap hands the
                    # client its rows in the portions it asked for.
                    raw = raw[: stop + 1] + b"\x00\x00\x00\x00"
                    changed = True
                    entry.limit = limit
                    entry.plain_rows = False
                entries.append(entry)
            elif kind == _CLOSE:
                name = raw[6:-1].decode(errors="replace")
                if raw[5:6] == b"S":
                    self._prepared.pop(name, None)
                    self._parsing.pop(name, None)
                else:
                    self._portals.pop(name, None)
                entries.append(_Entry(_CLOSE))
            elif kind == _FCALL:
                # The fast-path call protocol names a function by OID: what it writes is unknown.
                entries.append(_Entry(kind, [_Run(_FUNCTION_CALL, "note", rewritten=False)]))
            else:
                entries.append(_Entry(kind))
            out.append((code, raw))
        self._fifo.extend(entries)
        return out if changed else None

    def _parsed(self, name: str, prepared: _Prepared) -> None:
        self._prepared[name] = prepared
        if self._parsing.get(name) is prepared:
            del self._parsing[name]

    def _statement(self, name: str) -> _Prepared | None:
        prepared = self._parsing.get(name) or self._prepared.get(name)
        if prepared is None:
            raw = self._known(name)
            if raw is None:
                return None
            # Prepared before this session's capture began: as the server has it, unrewritten.
            _, sql, _ = wireedit.parse_parts(raw, self.settings.codec() or "latin-1")
            plans = self.manager.plans.get(sql)
            plan = plans[0] if len(plans) == 1 else _NOT_MIRRORED
            prepared = _Prepared(plan, wireedit.unnamed_parse(raw), rewritten=False)
            self._prepared[name] = prepared
        return prepared

    def _unrewritable(self, table: str | None) -> bool:
        """Whether appending RETURNING to a write on ``table`` would break it for this user."""
        names = self.manager.rewritable(self.database, self.user)
        if not names or not table:
            return False
        bare = table.rsplit(".", 1)[-1]
        return table.replace('"', "") in names or bare.strip('"') in names

    def _run_for(self, plan: StatementPlan, policy: Policy, *, rewritten: bool | None = None) -> _Run:
        action = plan.action
        if action is Action.IMAGE:
            if rewritten is None:
                rewritten = plan.rewritten is not None and not self._unrewritable(plan.table)
            if rewritten:
                return _Run(plan, "image", rewritten=True)
            return _Run(plan, "note", rewritten=False)  # prepared before capture: no image column
        if action is Action.REPLAY:
            return _Run(plan, "replay", rewritten=False)
        if action is Action.UNSAFE:
            if policy.unsafe == "reject":
                raise Rejected(
                    FeatureNotSupported(
                        f"pgshift refused a write it cannot mirror faithfully: {plan.reason}",
                        hint='Dual write is on and mirror.unsafe = "reject". Rewrite the statement, or set '
                        'mirror.unsafe = "record" to run it on the primary and journal its tables for repair.',
                    )
                )
            return _Run(plan, "replay" if policy.unsafe == "replay" else "note", rewritten=False)
        if action is Action.DDL:
            ddl = self.manager.config.ddl
            if ddl == "reject":
                raise Rejected(
                    FeatureNotSupported(
                        "pgshift refused DDL during dual write",
                        hint='mirror.ddl = "reject": run schema changes on each database directly, or set '
                        'mirror.ddl = "mirror" (apply on the mirrors too) or "primary_only".',
                    )
                )
            return _Run(plan, "replay" if ddl == "mirror" else "note", rewritten=False)
        return _Run(plan, "none", rewritten=False)

    # --- reply side ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """The client-bound bytes of the primary, edited where a row image must come out. In sync
        mode the ReadyForQuery after a commit, and whatever follows it, is held back until the
        mirrors confirmed (``_release`` sends it)."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        n = len(data)
        pos = 0
        if self._skip:  # the rest of a large message that streams through untouched
            take = min(self._skip, n)
            self._skip -= take
            pos = take
        out: list[bytes] = []
        run_start = 0
        hold_index = -1
        while n - pos >= 5:
            code = data[pos]
            (length,) = _U32.unpack_from(data, pos + 1)
            end = pos + 1 + length
            if end > n:
                if code in _WHOLE or (code == _DATA_ROW and self._image_rows()):
                    break  # small, or carrying an image: wait for the rest
                self._skip = end - n  # streams through as it comes
                pos = n
                break
            if code == _DATA_ROW:
                fifo = self._fifo
                if not fifo or fifo[0].plain_rows:
                    pos = end
                    continue
            elif code in _SIMPLE_DONE:  # ParseComplete, BindComplete, CloseComplete: the most common
                fifo = self._fifo
                if fifo and fifo[0].kind in (_PARSE, _BIND, _CLOSE):
                    done = fifo.popleft()
                    if done.prepared is not None:
                        self._parsed(*done.prepared)
                pos = end
                continue
            replacement = self._on_message(code, data, pos, end)
            if replacement is not None:
                if pos > run_start:
                    out.append(data[run_start:pos])
                if replacement:
                    out.append(replacement)
                run_start = end
            elif code == _READY and self._arm is not None:
                # Sync mode: this ReadyForQuery (and all after it) waits for the mirrors.
                if pos > run_start:
                    out.append(data[run_start:pos])
                run_start = pos
                hold_index = len(out)
                self._hold(self._arm)
                self._arm = None
            pos = end
        tail_end = n
        if pos < n and not self._skip:
            self._pending = data[pos:]
            tail_end = pos
        if not out and run_start == 0 and hold_index < 0:
            result = data if tail_end == n else data[:tail_end]
            if self._held is None:
                return result
            self._held.append(result)
            return b""
        if tail_end > run_start:
            out.append(data[run_start:tail_end])
        if hold_index >= 0:
            assert self._held is not None
            self._held.extend(out[hold_index:])
            return b"".join(out[:hold_index])
        if self._held is not None:
            self._held.extend(out)
            return b""
        return b"".join(out)

    def _limited_complete(self, head: _Entry, message: bytes) -> bytes:
        """CommandComplete of an Execute whose row limit the proxy lifted: the client gets at most
        its limit of rows, and PortalSuspended instead when that many were sent (as Postgres does)."""
        self._fifo.popleft()
        assert head.runs is not None
        run = head.runs[0]
        if not run.done:
            self._completed(run, wireedit.command_tag(message))
        out: list[bytes] = []
        if run.leftover and head.sent < (head.limit or len(run.leftover) + head.sent):
            room = (head.limit - head.sent) if head.limit else len(run.leftover)
            out.extend(run.leftover[:room])
            del run.leftover[:room]
            head.sent += min(room, len(out))
        if head.limit and head.sent >= head.limit:
            out.append(wireedit.PORTAL_SUSPENDED)
        else:
            # The last portion: Postgres counts the rows of this Execute in its tag.
            out.append(wireedit.with_row_count(message, head.sent))
        return b"".join(out)

    def _image_rows(self) -> bool:
        """Whether a DataRow of the head entry must be seen whole (to take its image column out,
        or to hold it back past a lifted row limit)."""
        return bool(self._fifo) and not self._fifo[0].plain_rows

    def _current_run(self, head: _Entry) -> _Run | None:
        runs = head.runs
        if not runs:
            return None
        if head.kind == _QUERY:
            return runs[head.index] if head.index < len(runs) else None
        return runs[0]

    def _on_message(self, code: int, data: bytes, pos: int, end: int) -> bytes | None:
        """Act on one whole backend message; bytes to send instead of it (b"": drop it), or None."""
        fifo = self._fifo
        head = fifo[0] if fifo else None
        if code == _DATA_ROW:
            if head is None:
                return None
            run = self._current_run(head)
            if run is None:
                return None
            row: bytes | None = None
            if run.rewritten:
                row, value = wireedit.split_last_column(data[pos:end])
                if value is not None and run.mode == "image":
                    run.rows.append(value)
                    run.rows_size += len(value)
                    if run.rows_size + self._size > self.manager.config.queue_bytes:
                        run.mode = "overflow"  # memory stays bounded; the tables are journaled
                        run.rows = []
                if not run.plan.returning:
                    return b""
            if head.limit:
                if head.sent >= head.limit:
                    run.leftover.append(row if row is not None else data[pos:end])
                    return b""
                head.sent += 1
            return row
        if (
            code == _COMPLETE
            and head is not None
            and head.kind == _EXECUTE
            and (head.limit or (head.runs and head.runs[0].leftover))
        ):
            return self._limited_complete(head, data[pos:end])
        if code == _COMPLETE:
            if head is not None:
                run = self._current_run(head)
                if head.kind == _EXECUTE:
                    fifo.popleft()
                elif head.kind == _QUERY:
                    head.index += 1
                if run is not None and not run.done:
                    self._completed(run, wireedit.command_tag(data[pos:end]))
            return None
        if code == _ROW_DESC:
            if head is None:
                return None
            if head.kind == _DESCRIBE:
                fifo.popleft()
                if head.plan is not None:
                    trimmed, left = wireedit.drop_last_field(data[pos:end])
                    return trimmed if head.plan.returning and left else wireedit.NO_DATA
                return None
            run = self._current_run(head)
            if run is not None and run.rewritten:
                trimmed, left = wireedit.drop_last_field(data[pos:end])
                return trimmed if run.plan.returning and left else b""
            return None
        if code == _NO_DATA:
            if head is not None and head.kind == _DESCRIBE:
                fifo.popleft()
            return None
        if code == _EMPTY:
            if head is not None:
                if head.kind == _EXECUTE:
                    fifo.popleft()
                elif head.kind == _QUERY:
                    head.index += 1
            return None
        if code == _SUSPENDED:
            if head is not None and head.kind == _EXECUTE:
                fifo.popleft()  # the portal's run keeps its rows: the next Execute continues it
            return None
        if code == _ERROR:
            self._failed = True
            if head is not None and head.kind in (_PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE):
                # Postgres skips every message up to Sync after an error in the extended protocol.
                while fifo and fifo[0].kind not in (_SYNC, _QUERY, _FCALL):
                    dropped = fifo.popleft()
                    if dropped.prepared is not None:
                        name, prepared = dropped.prepared
                        if self._parsing.get(name) is prepared:
                            del self._parsing[name]  # never made: the old statement stays
                if not fifo:
                    self._skip_until_sync = True  # (its Sync has not been sent yet)
            self._copy_run = None
            return None
        if code == _FUNCTION_RESULT:
            if head is not None and head.kind == _FCALL and head.runs:
                self._completed(head.runs[0], "")
            return None
        if code == _READY:
            if head is not None and head.kind in (_SYNC, _QUERY, _FCALL):
                fifo.popleft()
            self._ready(data[pos + 5])
            return None
        if code == _COPY_IN:
            # Postgres ignores Sync in copy-in mode: Syncs queued behind this COPY get no answer
            # (the same rule as ExpectedReplies.copy_in_started).
            if len(fifo) > 1:
                first = fifo.popleft()
                rest = [e for e in fifo if e.kind != _SYNC]
                fifo.clear()
                fifo.append(first)
                fifo.extend(rest)
            return None
        if code == _PARAM_STATUS:
            body = data[pos + 5 : end]
            parts = body.split(b"\x00")
            if len(parts) >= 2:
                self.settings.reported(parts[0].decode(errors="replace"), parts[1].decode(errors="replace"))
            return None
        return None

    # --- transactions ----------------------------------------------------------------------------

    def _completed(self, run: _Run, tag: str) -> None:
        run.done = True
        plan = run.plan
        if plan.action is Action.TX:
            self._transaction_step(plan, tag)
            return
        if plan.action is Action.NONE:
            if tag in ("SET", "RESET", "DISCARD ALL", "DISCARD") or (tag == "SELECT 1" and "set_config" in plan.sql):
                for change in changes(plan.sql):
                    self.settings.apply(change)
            return
        if run.mode == "none":
            return
        if plan.action is Action.DDL:
            self.manager.forget_targets()  # (privileges, rules, policies may have changed)
        if run.mode in ("note", "overflow"):
            if run.mode == "overflow":
                reason = "transaction larger than mirror.queue_bytes: not mirrored"
            elif plan.action is Action.IMAGE:
                reason = (
                    "no row images: RETURNING would fail or change the statement for this role (no SELECT "
                    "privilege, row security, rules, a foreign table), the statement was prepared before dual "
                    "write began, or the session's client_encoding is one pgshift cannot read; not mirrored"
                )
            elif plan.action is Action.DDL:
                reason = 'DDL ran on the primary only (mirror.ddl = "primary_only")'
            else:
                reason = f"not mirrored: {plan.reason}"
            self._buffer.append(("ddl" if plan.action is Action.DDL else "unmirrored", plan, reason))
            return
        settings = self.settings.effective()
        if self._tx_settings is None:
            self._tx_settings = settings
            self._last_settings = settings
        elif settings != self._last_settings:
            # A setting changed inside the transaction: the writes after it mean something else.
            self._append(_settings_write(settings))
            self._last_settings = settings
        if run.mode == "image":
            op = plan.op or ImageOp.INSERT
            image = Image(op, plan.table or "", plan.conflict, tuple(run.rows))
            self._append(Write(WriteKind.IMAGE, plan.sql, tag, plan.fingerprint, plan.tables, image=image))
        elif run.copy is not None:
            self._append(
                Write(
                    WriteKind.COPY, plan.sql, tag, plan.fingerprint, plan.tables, copy_data=tuple(run.copy),
                    copy_table=plan.tables[0] if plan.tables else "", copy_columns=plan.copy_columns,
                )
            )  # fmt: skip
        elif run.bind:
            self._append(
                Write(WriteKind.EXTENDED, plan.sql, tag, plan.fingerprint, plan.tables, parse=run.parse, bind=run.bind)
            )
        else:
            self._append(Write(WriteKind.QUERY, plan.sql, tag, plan.fingerprint, plan.tables))
        run.rows = []
        if run.copy is not None:
            run.copy = []

    def _append(self, write: Write) -> None:
        self._size += write.size
        if self._size > self.manager.config.queue_bytes:
            # Too big to hold: keep only what the journal needs (the tables), never the memory.
            kept: list[Write | tuple[str, StatementPlan, str]] = []
            for item in [*self._buffer, write]:
                if isinstance(item, Write):
                    plan = StatementPlan(Action.REPLAY, item.sql[:200], item.fingerprint, item.tables)
                    kept.append(("unmirrored", plan, "transaction larger than mirror.queue_bytes: not mirrored"))
                else:
                    kept.append(item)
            self._buffer = kept
            self._size = 0
            return
        self._buffer.append(write)

    def _transaction_step(self, plan: StatementPlan, tag: str) -> None:
        op = plan.tx_op
        if op is TxOp.COMMIT:
            if tag == "COMMIT" and not self._failed:
                self._commit()
            else:
                self._discard()
        elif op is TxOp.ROLLBACK:
            self._discard()
        elif op is TxOp.SAVEPOINT and plan.savepoint is not None:
            self._marks.append((plan.savepoint, len(self._buffer), self._size, self.settings.savepoint()))
        elif op is TxOp.RELEASE and plan.savepoint is not None:
            index = self._mark(plan.savepoint)
            if index is not None:
                del self._marks[index:]
        elif op is TxOp.ROLLBACK_TO and plan.savepoint is not None:
            index = self._mark(plan.savepoint)
            if index is not None:
                _, length, size, saved = self._marks[index]
                del self._marks[index + 1 :]
                self.settings.rollback_to(saved)
                del self._buffer[length:]
                self._size = size
                self._failed = False
        elif op is TxOp.PREPARE:
            # Two-phase commit: COMMIT PREPARED may come from anywhere, later. Not mirrored: said so.
            tables = self._tables()
            if tables:
                self.manager.unmirrored(self, tables, "PREPARE TRANSACTION: two-phase transactions are not mirrored")
            self._discard()

    def _mark(self, name: str) -> int | None:
        for index in range(len(self._marks) - 1, -1, -1):
            if self._marks[index][0] == name:
                return index
        return None

    def _ready(self, status: int) -> None:
        if status != _IDLE:
            return
        if self._buffer and not self._failed:
            self._commit()
        else:
            # (No writes: still the end of a transaction, for the settings it changed.)
            self._buffer = []
            self._reset(committed=not self._failed)
        self._failed = False

    def _tables(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for item in self._buffer:
            tables = item.tables if isinstance(item, Write) else item[1].tables
            for table in tables:
                seen[table] = None
        return tuple(seen)

    def _commit(self) -> None:
        buffer, self._buffer = self._buffer, []
        size = self._size
        settings = self._tx_settings or ()
        self._reset(committed=True)
        writes = [w for w in buffer if isinstance(w, Write)]
        for item in buffer:
            if not isinstance(item, Write):
                self.manager.note(self, *item)
        if not writes:
            return
        wait = self.manager.commit(self, settings, tuple(writes), size)
        if wait is not None:
            self._arm = wait

    def _discard(self) -> None:
        self._buffer = []
        self._reset(committed=False)

    def _reset(self, *, committed: bool) -> None:
        self._marks.clear()
        self._size = 0
        self._failed = False
        self._tx_settings = None
        self.settings.end_transaction(committed)

    # --- sync mode ---------------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """Replies are held back until the mirrors confirm a commit (sync mode)."""
        return self._held is not None

    def _hold(self, wait: asyncio.Future[str | None]) -> None:
        if self._held is None:
            self._held = []
        self._waits += 1
        wait.add_done_callback(self._release)

    def _release(self, wait: asyncio.Future[str | None]) -> None:
        warning = None if wait.cancelled() else wait.result()
        if warning:
            self._warnings.append(wireedit.notice("WARNING", "01000", warning))
        self._waits -= 1
        if self._waits:
            return  # a later commit's answer is among the held bytes: it waits for its mirrors too
        held, self._held = self._held or [], None
        warnings, self._warnings = self._warnings, []
        self._write(b"".join(warnings + held))  # (even empty: what waited behind it goes on)


_NOT_MIRRORED = StatementPlan(Action.NONE, "", "", ())
_FUNCTION_CALL = StatementPlan(Action.UNSAFE, "(FunctionCall message)", "", (), reason="a fast-path FunctionCall")


def _frame(code: bytes, body: bytes) -> bytes:
    return code + _U32.pack(len(body) + 4) + body


def _settings_write(settings: tuple[tuple[str, str], ...]) -> Write:
    calls = ", ".join(f"set_config({_literal(k)}, {_literal(v)}, true)" for k, v in settings)
    return Write(WriteKind.QUERY, f"SELECT {calls}", "SELECT 1", "", ())


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


__all__ = ["Capture", "ProtocolViolation", "Rejected"]
