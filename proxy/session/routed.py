"""A session whose reads may be served by several backends: requests, decisions, replay, failover.

The request path, in order (DESIGN.md §3):
1. frame the client's bytes and collect whole requests (up to Sync, Query, Flush, FunctionCall,
   CopyDone/CopyFail); a request that must follow an earlier one (open transaction, replies still
   in flight, an extended-protocol sequence not yet synced, a pinned session) goes where that one
   went, at once;
2. otherwise analyse its SQL (cached) and ``decide()`` the backend;
3. open that backend lazily; bring it up to date (session settings, prepared statements), with
   the replies to what the proxy injects swallowed through the expected-reply FIFO;
4. forward the request's frames as they arrived;
5. a read served by a non-primary backend is held back until it completes: if it failed before
   anything reached the client, it is sent again to the primary.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from proxy.backends.connection import BackendConnection
from proxy.errors import PgShiftError, ProtocolViolation
from proxy.mirror.capture import Capture, Rejected
from proxy.mirror.manager import TARGETS_SQL
from proxy.mirror.settings import REPORTED, SessionSettings, from_startup
from proxy.observability import LATENCY_BUCKETS, SUM
from proxy.routing import Plan, Reason, RoutingTable, needs_catalog, plan
from proxy.session.catalog import lookup_sql
from proxy.session.client import ClientConnection
from proxy.session.requests import RawFrame, RequestInfo, scan
from proxy.session.session import Session, SessionContext, SessionInfo, SessionState
from proxy.session.settings import SettingsLog
from proxy.session.statements import PreparedStatements
from proxy.sql import Analysis, Pin
from proxy.wire.codes import FrontendCode, TxStatus
from proxy.wire.messages import FLUSH, SYNC, Parse, Query

log = logging.getLogger(__name__)

_TERMINATE = FrontendCode.TERMINATE.value
_SYNC = FrontendCode.SYNC.value
# Messages that end a request: the client waits for an answer after them.
_BOUNDARY = frozenset(
    c.value
    for c in (
        FrontendCode.SYNC,
        FrontendCode.QUERY,
        FrontendCode.FLUSH,
        FrontendCode.FUNCTION_CALL,
        FrontendCode.COPY_DONE,
        FrontendCode.COPY_FAIL,
    )
)
# Extended-protocol messages: from the first of them to Sync, one backend serves them all. (Not
# Flush: alone, as psycopg sends it after a pipeline's Sync, it starts nothing.)
_EXTENDED = frozenset(
    c.value
    for c in (
        FrontendCode.PARSE,
        FrontendCode.BIND,
        FrontendCode.DESCRIBE,
        FrontendCode.EXECUTE,
        FrontendCode.CLOSE,
    )
)
_IDLE = TxStatus.IDLE.value
_PARSE = FrontendCode.PARSE.value
_PRIMARY_ONLY = Reason.PRIMARY_ONLY.value
_SUM = SUM
# A request that must follow the previous one is forwarded once this much of it is buffered
# (COPY data streams through; it is never accumulated whole).
_STREAM_AFTER = 64 * 1024
# A held read is released to the client once its reply grows past this: failover is only for
# reads that fail before anything reached the client, and memory stays bounded.
HOLD_LIMIT = 256 * 1024
# Routing plans memoised per session (statements an application uses repeat).
_PLAN_MEMO = 1024


@dataclass
class _Held:
    """A read on a non-primary backend whose reply is held back until it is known to succeed."""

    conn: BackendConnection
    frames: list[RawFrame]
    errors_before: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    released: bool = False


class RoutedSession(Session):
    def __init__(self, ctx: SessionContext, client: ClientConnection) -> None:
        super().__init__(ctx, client)
        self.backends: dict[str, BackendConnection] = {}
        self.pinned: set[Pin] = set()
        self._pending: list[RawFrame] = []
        self._pending_size = 0
        self._requests: deque[list[RawFrame]] = deque()
        self._current: BackendConnection | None = None  # where the last request went
        self._tx_on: BackendConnection | None = None  # where the open transaction runs
        self._extended_open = False  # extended-protocol messages sent since the last Sync
        self._unnamed_at: str | None = None  # backend holding the unnamed prepared statement
        self._blocked = False  # waiting for a backend connection to open
        self._decided: str | None = None  # the head request's backend, decided before it was opened
        self._hold: _Held | None = None
        self._down: set[str] = set()  # backends this session could not reach
        self._sticky: dict[str, str] = {}
        self._settings = SettingsLog()
        self._statements = PreparedStatements()
        self._tasks: set[asyncio.Task[None]] = set()
        self._plans: dict[int, tuple[Analysis, Plan]] = {}
        self._plans_for: RoutingTable | None = None  # the routing table the memoised plans came from
        self._unnamed_parse: bytes | None = None  # re-sent when the unnamed statement must move
        self._busy: dict[str, tuple[float, list[float]]] = {}  # backend → (request start, latency series)
        self._lookups: set[str] = set()  # function names to ask the primary's pg_proc about
        # What to do with the answers of the proxy's own queries on the primary, in order
        # (function volatility lookups; dual write's probe of the targets it may rewrite).
        self._asked: deque[Callable[[list[bytes]], None]] = deque()
        self._capture: Capture | None = None  # dual write: set once mirroring reaches this session
        self._captured_on: BackendConnection | None = None  # the primary connection it taps
        self._rewritten: dict[str, bytes] = {}  # Parse frames capture rewrote, by statement name
        self._refused = False  # the request being forwarded was replaced by a policy's refusal
        self._targets_seen = -1  # the mirror's targets_generation this session knows its targets for

    # --- lifecycle hooks ------------------------------------------------------------------

    @property
    def _database(self) -> str:
        """The database the backends serve (a DSN may pin it; else the client's, default user)."""
        backend = self.ctx.live.config.backends.get(self.primary)  # (a reload may have removed it)
        pinned = backend.address.dbname if backend is not None else None
        return pinned or self.client_params.get("database") or self.user

    def _all_backends(self) -> list[BackendConnection]:
        return list(self.backends.values())

    def _start_relay(self, backend: BackendConnection) -> None:
        self._to(SessionState.RELAY)
        client = self.client
        assert client.transport is not None
        self._to_client = client.transport.write
        self._adopt(backend)
        self._current = backend
        self._listen_to_client()

    def _adopt(self, conn: BackendConnection) -> None:
        self.backends[conn.name] = conn
        conn.scanner.on_capture = self._catalog_answer  # only the primary is ever asked
        self._count_errors(conn)
        # A C-level partial, not a Python adapter: one interpreter frame less per reply.
        early = conn.attach(self, functools.partial(self.backend_reply, conn))
        if early:
            self.backend_reply(conn, early)

    # --- client → backends ----------------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        try:
            buf, frames = self.client.reader.feed(data)
        except ProtocolViolation as exc:
            self.client.send_error(exc)
            self._finish()
            return
        if not frames:
            return
        if not self._pending and not self._requests and frames[-1][0] in _BOUNDARY and self._ready():
            # The usual case: the chunk holds exactly one whole request and nothing waits before
            # it. Routed straight away, and sent as the very bytes that arrived.
            for code, _, _ in frames[:-1]:
                if code in _BOUNDARY or code == _TERMINATE:
                    break
            else:
                request = [(code, buf[start:end]) for code, start, end in frames]
                whole = buf if frames[0][1] == 0 and frames[-1][2] == len(buf) else None
                self._route(request, whole)
                return
        for code, start, end in frames:
            if code == _TERMINATE:
                self._finish()
                return
            self._pending.append((code, buf[start:end]))
            self._pending_size += end - start
            if code in _BOUNDARY:
                self._requests.append(self._pending)
                self._pending = []
                self._pending_size = 0
        if self._pending_size > _STREAM_AFTER and not self._requests and self._ready():
            target = self._follow()
            if target is not None:  # COPY data and other long requests stream through
                pending, self._pending, self._pending_size = self._pending, [], 0
                self._forward(target, pending)
        self._pump()

    def _ready(self) -> bool:
        return (
            not self._blocked
            and self._hold is None
            and self.state is not SessionState.CLOSED
            and not self._done.done()
            # Sync dual write: the primary's answer to a COMMIT waits for the mirrors; nothing
            # may overtake it (a read answered by another backend would reach the client first).
            and (self._capture is None or not self._capture.holding)
        )

    def _follow(self) -> BackendConnection | None:
        """The backend the next request must go to because of what came before, if any."""
        if self._tx_on is not None:
            return self._tx_on
        current = self._current
        if current is not None and (self._extended_open or not current.scanner.idle):
            return current
        if self.pinned:
            return self.backends[self.primary]
        return None

    def _move(self, primary: str) -> None:
        """The routing's primary changed (a flip or a rollback) and this session stands between
        requests, outside any transaction and unpinned: its writes go to the new primary from
        now on. Its settings and prepared statements follow lazily, as for any backend."""
        log.info('session %s: primary "%s" -> "%s"', self.client.peer, self.primary, primary)
        if self._unnamed_at == self.primary:
            self._unnamed_at = None  # re-sent from _unnamed_parse if the client binds it again
        self.primary = primary
        self.ctx.stats.moves[primary] += 1
        if self._capture is not None:
            self._adopt_statements(self._capture)

    def _adopt_statements(self, capture: Capture) -> None:
        """Dual write began, or the primary changed: statements prepared without a row image are
        prepared again with one (Close + Parse, injected before their next use) so that their
        writes are mirrored like any other."""
        for name, raw in list(self._statements.frames.items()):
            rewritten = capture.adopt(name, raw)
            if rewritten is not None:
                self._statements.replace(name, rewritten)

    def writing(self) -> bool:
        """Work under way on the primary that a cut-over's drain must wait for: an open
        transaction there, or a request it has not answered yet."""
        if self._tx_on is not None:
            return self._tx_on.name == self.primary
        conn = self.backends.get(self.primary)
        return conn is not None and not conn.scanner.idle

    def describe(self) -> SessionInfo:
        return SessionInfo(
            self.primary,
            frozenset(p.value for p in self.pinned),
            tuple(self.backends),
            self._tx_on is not None,
        )

    def _pump(self) -> None:
        requests = self._requests
        while requests and self._ready():
            if not self._route(requests[0]):
                return
            requests.popleft()

    def _route(self, request: list[RawFrame], whole: bytes | None = None) -> bool:
        """Send ``request`` where it must or may go; False if it has to wait (or the session
        ends). ``whole``: the request's bytes as they arrived, when they are nothing else."""
        target = self._follow()
        info: RequestInfo | None = None
        hold = False
        if target is None:
            primary = self.ctx.live.table.primary
            if primary != self.primary:
                self._move(primary)
            mirror = self.ctx.mirror
            if mirror.targets_generation != self._targets_seen and mirror.active():
                if mirror.rewritable(self._database, self.user) is not None:
                    self._targets_seen = mirror.targets_generation  # (known: not looked at again)
                else:
                    conn = self.backends.get(self.primary)
                    if conn is not None:
                        self._probe_targets(conn)
                        if whole is not None:  # it came by the fast lane: it waits in line like the rest
                            self._requests.append(request)
                        return False
            try:
                info = scan(request, self.ctx.analysis, self._statements.analyses)
            except ProtocolViolation as exc:
                self.client.send_error(exc)
                self._finish()
                return False
            # A request that leaves an extended-protocol sequence open (it ends with Flush,
            # not Sync) binds what follows to its backend: only the primary may serve it.
            open_ended = request[-1][0] != _SYNC and any(code in _EXTENDED for code, _ in request)
            # Decided once: not drawn again (nor counted again) once its backend is open.
            name = self._decided or self._choose(info, open_ended=open_ended)
            self._decided = None
            pause = self.ctx.pause
            if pause.since is not None and name == self.primary:
                # A cut-over has paused new work on the primary (session/pause.py): the request
                # waits in line, and is routed afresh on resume (to the new primary after a swap).
                if whole is not None:
                    self._requests.append(request)
                pause.hold(self, self._pump)
                return False
            conn = self.backends.get(name)
            if conn is None:
                self._decided = name
                if whole is not None:  # it came by the fast lane: it waits in line like the rest
                    self._requests.append(request)
                self._open_later(name)
                return False
            target = conn
            hold = name != self.primary
        self._forward(target, request, info, hold=hold, whole=whole)
        return True

    def _choose(self, info: RequestInfo, *, open_ended: bool = False) -> str:
        """``open_ended``: what the client sends next up to Sync must run on the same backend (same
        implicit transaction) and may write, so only the primary can serve this request."""
        table = self.ctx.live.table
        primary = self.primary  # == table.primary: an unpinned session moves before choosing
        stats = self.ctx.stats
        analyses = info.analyses
        if info.unnamed_used and self._unnamed_at is not None:
            return self._unnamed_at
        if table.primary_only and (
            analyses[0].hint is None if len(analyses) == 1 else not any(a.hint for a in analyses)
        ):
            # Every read goes to the primary (the usual state before a read switch starts): only a
            # routing hint could send a request elsewhere, so there is nothing to plan or draw.
            stats.decisions[(primary, _PRIMARY_ONLY)] += 1
            return primary
        if (
            not analyses
            or open_ended
            # A named statement is parsed on the primary first, whatever it is: transactions run
            # there, and a lazy re-Parse inside a failed transaction would fail ("current
            # transaction is aborted"), leaving the statement missing. Other backends re-Parse it.
            or info.parses
            or info.function_call
            or info.unnamed_used
            or any(name not in self._statements.analyses for name in info.needs)
        ):
            stats.decisions[(primary, Reason.NOT_A_READ.value)] += 1
            return primary
        analysis = analyses[0] if len(analyses) == 1 else _merge(analyses)
        if analysis is None:
            stats.decisions[(primary, Reason.NOT_A_READ.value)] += 1
            return primary
        if table is not self._plans_for:  # a new routing version: plans are redrawn from it
            self._plans.clear()
            self._plans_for = table
        # The plan for a statement is the same every time in this session: memoised by the
        # (cached, shared) analysis object; only the weighted draw happens per request.
        memo = self._plans.get(id(analysis))
        if memo is None or memo[0] is not analysis:
            functions_safe = False
            if needs_catalog(analysis):
                verdict = self.ctx.catalog.verdict(self._database, analysis.unknown_functions)
                if verdict is None:
                    # Not known yet: this one runs on the primary, which is asked alongside.
                    self._lookups |= self.ctx.catalog.claim(self._database, analysis.unknown_functions)
                    stats.decisions[(primary, Reason.NOT_A_READ.value)] += 1
                    return primary
                functions_safe = verdict
            route = plan(analysis, self.user, self.client_params.get("application_name", ""), table, functions_safe)
            if len(self._plans) > _PLAN_MEMO:
                self._plans.clear()
            self._plans[id(analysis)] = (analysis, route)
        else:
            route = memo[1]
        decision = route.draw(self.ctx.rng, self._sticky)
        target = decision.target
        if decision.sticky and decision.rule is not None:
            self._sticky[decision.rule] = target
        if target in self._down:
            stats.failovers[(target, "unreachable")] += 1
            stats.decisions[(primary, decision.reason.value)] += 1
            return primary
        stats.decisions[decision.stat_key] += 1
        return target

    def _forward(
        self,
        target: BackendConnection,
        frames: list[RawFrame],
        info: RequestInfo | None = None,
        *,
        hold: bool = False,
        whole: bytes | None = None,
    ) -> None:
        """Bring ``target`` up to date, then send the request's frames as they arrived."""
        if info is None:
            try:
                info = scan(frames, self.ctx.analysis, self._statements.analyses)
            except ProtocolViolation as exc:
                self.client.send_error(exc)
                self._finish()
                return
        name = target.name
        if name == self.primary and (self._capture is not None or self.ctx.mirror.active()):
            captured = self._capture_request(target, frames)
            if captured is not frames:
                if not captured:
                    return  # the session is ending (a malformed message)
                frames = captured
                whole = None
                if self._refused:  # what runs now is the replacement: nothing of the original
                    self._refused = False
                    info = scan(frames, self.ctx.analysis, self._statements.analyses)
        expected = target.expected
        out: list[bytes] = []
        replay = self._settings.missing(name) if self._settings.owes(name) else []
        if info.needs or self._statements.stale_on(name):
            replay += self._statements.injections(name, info.needs)
        if replay:
            self.ctx.stats.replays[name] += len(replay)
            for injected in replay:
                expected.push_frontend(injected[0], swallow=True)
            out.extend(replay)
        # (A simple Query would destroy the unnamed statement a Bind of this request may use.)
        if self._lookups and name == self.primary and not info.unnamed_used:
            names, self._lookups = self._lookups, set()
            self._asked.append(functools.partial(self.ctx.catalog.learn, self._database, names))
            expected.push_frontend(FrontendCode.QUERY, capture=True)
            out.append(Query(lookup_sql(names)).encode())
        if info.unnamed_used and self._unnamed_at is None and self._unnamed_parse is not None:
            # The unnamed statement stayed on the previous primary: parse it here again.
            for injected in (self._unnamed_parse, SYNC):
                expected.push_frontend(injected[0], swallow=True)
                out.append(injected)
            self.ctx.stats.replays[name] += 1
            self._unnamed_at = name
        if name not in self._busy:  # (an entry lives from a request's start until its backend is idle)
            kind = info.analyses[0].label if info.analyses else "other"
            self._busy[name] = (time.perf_counter(), self.ctx.requests.series(name, kind))
        expected.push_raw(frames)
        # Open until the last Sync; opened by an extended-protocol message after it.
        for code, _ in reversed(frames):
            if code == _SYNC:
                self._extended_open = False
                break
            if code in _EXTENDED:
                self._extended_open = True
                break
        if hold:
            self._hold = _Held(target, frames, target.scanner.errors)
        if out:
            out.extend([raw for _, raw in frames])
            target.send(b"".join(out))
        else:
            target.send(whole if whole is not None else b"".join([raw for _, raw in frames]))
        self._current = target
        self._after_forward(name, info)

    def _capture_request(self, target: BackendConnection, frames: list[RawFrame]) -> list[RawFrame]:
        """Dual write: plan the request's statements; the frames to send (rewritten where a row
        image is added, replaced when a policy refuses one)."""
        capture = self._capture
        if capture is None:
            if self._tx_on is not None or not target.scanner.idle:
                return frames  # capture starts at a transaction boundary, never halfway through one
            capture = self._capture = self._start_capture(target)
            self._adopt_statements(capture)
        if self._captured_on is not target:
            self._captured_on = target  # (a flip moved the session: its FIFO is empty by now)
            capture.primary = target.name
        try:
            edited = capture.request(frames)
        except Rejected as exc:
            return self._reject(target, frames, exc)
        except ProtocolViolation as exc:  # a malformed Bind/Execute: as Postgres would, end the session
            self.client.send_error(exc)
            self._finish()
            return []
        if edited is None:
            return frames
        self._rewritten.clear()
        for code, raw in edited:
            if code == _PARSE:
                self._rewritten[raw[5 : raw.index(b"\x00", 5)].decode(errors="replace")] = raw
        return edited

    def _start_capture(self, target: BackendConnection) -> Capture:
        startup = from_startup(self.client_params)
        if target.startup is not None:
            startup.update({k: v for k, v in target.startup.parameters.items() if k in REPORTED})
        return Capture(
            self.ctx.mirror,
            session=f"{self.client.peer}",
            database=self._database,
            user=self.user,
            application_name=self.client_params.get("application_name", ""),
            settings=SessionSettings(startup),
            write=self._client_write,
            known=self._statements.frames.get,
        )

    def _client_write(self, data: bytes) -> None:
        """Replies capture held back (sync mode) are released: send them, then what waited."""
        self._to_client(data)
        if self._requests:
            self._pump()

    def _reject(self, target: BackendConnection, frames: list[RawFrame], exc: Rejected) -> list[RawFrame]:
        """Refuse a request without running any of it, so that the client and the transaction
        see exactly a failed statement: the primary itself raises the error (a transaction in
        progress is aborted, as it would be by any failing statement)."""
        assert self._capture is not None
        error = exc.error
        raise_sql = (
            "DO $pgshift$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = "
            f"{_quote(error.message)}, HINT = {_quote(error.hint or '')}; END$pgshift$"
        )
        log.info("session %s: statement refused: %s", self.client.peer, error.message)
        if frames[-1][0] == _SYNC or frames[-1][0] == FrontendCode.QUERY.value:
            replacement = [Query(raise_sql).encode()]
        else:  # open-ended (…, Flush): Postgres answers an error, then skips to the client's Sync
            replacement = [Parse("", f"SELECT {_quote('pgshift: ' + error.message)}::int4").encode(), FLUSH]
        frames = [(raw[0], raw) for raw in replacement]
        self._capture.refused(frames)
        self._refused = True
        return frames

    def _after_forward(self, name: str, info: RequestInfo) -> None:
        rewritten = self._rewritten
        if rewritten:
            # The statements as the server has them (with the row-image column): a flip re-Parses
            # these on the new primary, and capture expects that column from it.
            info.parses = [(stmt, rewritten.get(stmt, raw), analysis) for stmt, raw, analysis in info.parses]
            if info.unnamed_parsed and "" in rewritten:
                info.unnamed_parse = rewritten[""]
            self._rewritten = {}
        for stmt, raw, analysis in info.parses:
            self._statements.parsed(stmt, raw, analysis, name)
        for stmt in info.closes:
            self._statements.closed(stmt, name)
        if info.unnamed_parsed:
            self._unnamed_at = name
            self._unnamed_parse = info.unnamed_parse
        for sql, analysis in info.texts:
            if analysis.deallocates:
                gone = list(self._statements.frames) if "*" in analysis.deallocates else analysis.deallocates
                for stmt in gone:
                    self._statements.closed(stmt, name)
            if analysis.pins:
                self._pin(analysis.pins)
            elif analysis.session_setting:
                if self._tx_on is not None or analysis.tx_op is not None or analysis.statement_count > 1:
                    # A setting inside a transaction may yet be rolled back: it cannot be replayed
                    # elsewhere faithfully, so the session stays where the setting lives.
                    self._pin({Pin.UNKNOWN_SESSION_STATE})
                else:
                    self._settings.record(sql, name)

    def _catalog_answer(self, replies: list[bytes]) -> None:
        if self._asked:
            self._asked.popleft()(replies)

    def _probe_targets(self, primary: BackendConnection) -> None:
        """Dual write needs to know, before it rewrites a write to return its row image, which
        tables that would break for this user (no SELECT privilege, row security, rules, foreign
        tables): asked once per database and user, with the session's requests waiting."""
        database, user = self._database, self.user
        self._asked.append(functools.partial(self._targets_known, database, user))
        primary.expected.push_frontend(FrontendCode.QUERY, capture=True)
        primary.send(Query(TARGETS_SQL).encode())
        self._blocked = True

    def _targets_known(self, database: str, user: str, replies: list[bytes]) -> None:
        self.ctx.mirror.learn_targets(database, user, replies)
        self._blocked = False
        # (Not from inside the reply scanner that delivered the answer: on the next loop turn.)
        asyncio.get_running_loop().call_soon(self._pump)

    def _pin(self, causes: set[Pin] | frozenset[Pin]) -> None:
        for cause in causes - self.pinned:
            self.ctx.stats.pins[cause.value] += 1
        self.pinned |= causes

    # --- opening other backends -------------------------------------------------------------

    def _open_later(self, name: str) -> None:
        self._blocked = True
        self.client.pause_reading()  # requests wait, in order, until the backend is there
        task = asyncio.get_running_loop().create_task(self._open(name), name=f"open-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, name: str) -> None:
        try:
            conn = await self._open_backend(name)
        except PgShiftError as exc:
            if name == self.primary:
                # Writes cannot go anywhere else: like a server that went away, end the session.
                log.warning('session %s: primary "%s" unavailable: %s', self.client.peer, name, exc.message)
                self.client.send_error(exc)
                self._finish()
                return
            # The read goes to the primary instead; the backend is not tried again this session.
            log.warning('session %s: backend "%s" unavailable for reads: %s', self.client.peer, name, exc.message)
            self._down.add(name)
            self._decided = self.primary
            self.ctx.stats.failovers[(name, "connect")] += 1
        except Exception as exc:  # a bug: end this session (not a reconnect loop, not a hang)
            self._decided = None
            self.relay_failed(exc)
        else:
            if self.state in (SessionState.RELAY, SessionState.DRAINING):
                self._adopt(conn)
            else:
                conn.terminate()
        finally:
            self._blocked = False
            if not self.client.closed:
                self.client.resume_reading()
            self._pump()

    # --- backends → client ------------------------------------------------------------------

    def backend_data(self, data: bytes) -> None:
        raise AssertionError("a routed session takes replies through backend_reply (see _adopt)")

    def backend_reply(self, conn: BackendConnection, data: bytes) -> None:
        if conn is self._captured_on and data:
            assert self._capture is not None
            data = self._capture.feed(data)
        held = self._hold
        if held is not None and held.conn is conn and not held.released:
            if data:
                held.chunks.append(data)
                held.size += len(data)
            if conn.scanner.idle:
                self._hold = None
                if conn.scanner.errors != held.errors_before:
                    self._retry_on_primary(held, "error")
                else:
                    self._to_client(b"".join(held.chunks))
            elif held.size > HOLD_LIMIT and conn.scanner.errors == held.errors_before:
                held.released = True
                self._to_client(b"".join(held.chunks))
                held.chunks.clear()
        elif conn.name != self.primary and (held is None or held.conn is not conn):
            # A read backend serves only held reads; anything else it sends (the FATAL of its
            # shutdown while idle, a notice) is not the client's, and says nothing about the
            # session's transaction.
            if data:
                log.info('session %s: dropped %d unsolicited bytes from backend "%s"', self.client.peer, len(data),
                         conn.name)  # fmt: skip
            return
        elif data:
            self._to_client(data)
        if conn.scanner.idle:
            busy = self._busy.pop(conn.name, None)
            if busy is not None:  # (observations inlined: this runs for every request)
                seconds = time.perf_counter() - busy[0]
                series = busy[1]
                series[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                series[_SUM] += seconds
            if held is not None and held.released and held.conn is conn:
                self._hold = None
            self._tx_on = conn if conn.scanner.tx_status != _IDLE else None
            if self._requests:
                self._pump()
        if self._draining:
            self._end_if_drained()

    def _retry_on_primary(self, held: _Held, cause: str) -> None:
        self.ctx.stats.failovers[(held.conn.name, cause)] += 1
        log.info('session %s: read on backend "%s" failed (%s); retrying on the primary', self.client.peer,
                 held.conn.name, cause)  # fmt: skip
        primary = self.backends.get(self.primary)
        if primary is not None:
            self._forward(primary, held.frames)
        else:  # after a flip the new primary may not be connected yet: open it, then send
            self._requests.appendleft(held.frames)
            self._decided = self.primary
            self._pump()

    def backend_lost(self, conn: BackendConnection, exc: BaseException | None) -> None:
        if self.state is SessionState.CLOSED or self._done.done():
            return
        held = self._hold
        self._busy.pop(conn.name, None)
        if conn.name != self.primary:
            self.backends.pop(conn.name, None)
            self._statements.forget_backend(conn.name)
            self._settings.forget(conn.name)  # a new connection starts from scratch
            if self._unnamed_at == conn.name:
                self._unnamed_at = None  # its unnamed statement went with it
            if self._tx_on is conn:
                self._tx_on = None
            if held is not None and held.conn is conn and not held.released:
                self._hold = None
                self._retry_on_primary(held, "connection lost")
                return
            if conn.scanner.idle and (held is None or held.conn is not conn):
                return  # an idle read backend went away: the next read reconnects
        super().backend_lost(conn, exc)


def _merge(analyses: list[Analysis]) -> Analysis | None:
    """One analysis for a request of several statements: a read only if every one is."""
    if not all(a.is_read for a in analyses):
        return None
    tables: frozenset[str] = frozenset().union(*(a.tables_read for a in analyses))
    hint = next((a.hint for a in analyses if a.hint), None)
    return replace(analyses[0], tables_read=tables, hint=hint)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
