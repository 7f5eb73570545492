"""Run a verification: plan the tables, compare them (checksum | sample | full), recheck candidates, report.

Modes:

* ``checksum``: every row, through chunk digests computed in both databases (checksum.py) over
  primary-key ranges of about ``chunk_rows`` source rows; a mismatching range is split (the key
  every ``rows / 10`` rows) and its parts compared again, down to ranges of ``leaf_rows`` rows,
  whose per-row hashes are fetched and diffed by key; only the rows that differ are then read in
  full, to name the differing columns.
* ``full``: every row fetched from both sides (as canonical text) and compared by key here.
* ``sample``: ``sample`` random rows from each side (TABLESAMPLE), looked up by key on the other.

Every difference found is a *candidate* until rechecked (compare.judge): after the lag window the
candidate keys are read again on both sides; a key still differing while its source row stayed
the same over the window is confirmed, one whose source row changed is looked at again after
another window, up to ``rechecks`` times (then reported as unsettled). So writes in flight
through the proxy (dual write) or the CDC stream never surface as differences.

Load is bounded: ``workers`` connections per side, ``rate_limit`` rows/s, ``statement_timeout``
on every statement, sessions read-only, the source side optionally read from a replica; and the
run is time-boxed (``max_duration``: no new chunk starts after it) and resumable (state.py).

For a caller inside the proxy (continuous sampling), ``Verifier`` keeps its connections open
between runs: ``async with Verifier(source, target, VerifyOptions(mode="sample", sample=100,
tables=[...])) as v: report = await v.run()``; the report has per table ``rows_compared``,
``differences`` (confirmed) and ``clean_at``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from proxy.cdc.sqlconn import Endpoint, SqlConnection, SqlError
from proxy.errors import PgShiftError
from proxy.verify.canonical import SESSION_SETTINGS
from proxy.verify.catalog import SERVER_INFO, Side, TablePlan, plan_tables
from proxy.verify.checksum import chunk_digest_sql, row_hashes_sql, rows_by_key_sql, rows_sql, sample_sql
from proxy.verify.chunks import Key, KeyRange, boundary_sql, key_aliases, key_texts, range_where
from proxy.verify.compare import Row, RowDifference, Verdict, diff_hashes, diff_one, judge, sort_key, split_rows
from proxy.verify.report import Mode, TableResult, VerifyReport
from proxy.verify.state import Progress, TableProgress

APPLICATION_NAME = "pgshift-verify"
DEFAULT_CHUNK_ROWS = 10_000
DEFAULT_LEAF_ROWS = 1_000
DEFAULT_WORKERS = 2
DEFAULT_SAMPLE = 1_000
DEFAULT_RECHECK_AFTER = 2.0
DEFAULT_RECHECKS = 3
DEFAULT_STATEMENT_TIMEOUT = 60.0
DEFAULT_MAX_DIFFERENCES = 10_000
FANOUT = 10  # a mismatching range is split in about this many parts
MAX_DEPTH = 8
KEY_BATCH = 500  # keys per lookup statement
MIN_SERVER_VERSION = 130000  # trim_scale() (canonical numerics) is Postgres 13+
SYNC_LAG_FRESH = 60  # seconds: a pgshift_sync_state row updated this recently describes a running sync


class VerifyError(PgShiftError):
    """A verification could not be run (unsupported server, bad options)."""


@dataclass(frozen=True)
class VerifyOptions:
    mode: Mode = "checksum"
    tables: list[str] | None = None  # names as in SQL (schema-qualified or on the search_path); None: all
    sample: int = DEFAULT_SAMPLE  # sample mode: random rows per side and table
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    leaf_rows: int = DEFAULT_LEAF_ROWS
    workers: int = DEFAULT_WORKERS
    rate_limit: float | None = None  # source rows per second over all workers
    statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT  # seconds
    max_duration: float | None = None  # seconds: no new chunk starts after this
    recheck_after: float | None = None  # seconds; None: DEFAULT_RECHECK_AFTER, or more if a sync lags
    rechecks: int = DEFAULT_RECHECKS
    state_file: Path | None = None
    max_differences: int = DEFAULT_MAX_DIFFERENCES  # per table


@dataclass
class _Pair:
    src: SqlConnection
    tgt: SqlConnection


@dataclass
class _Candidate:
    source: Row | None  # the last look at each side (None: no such row)
    target: Row | None
    observed: bool = True  # False: a key carried over from an earlier run, not looked at yet


@dataclass
class _Table:
    plan: TablePlan
    result: TableResult
    progress: TableProgress
    candidates: dict[Key, _Candidate] = field(default_factory=dict)
    digest_candidate: bool = False  # no primary key: the whole-table digest differed
    source_digest: Any = None  # its source digest at the last look
    stop: bool = False


class _Pace:
    """At most ``rate`` rows per second, over every worker (rows are accounted after each chunk)."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._start = time.monotonic()
        self._rows = 0

    async def account(self, rows: int) -> None:
        if not self._rate:
            return
        self._rows += rows
        delay = self._start + self._rows / self._rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def _session(conn: SqlConnection, options: VerifyOptions, *, read_only: bool = True) -> None:
    settings = SESSION_SETTINGS
    if read_only:
        settings += "; set default_transaction_read_only = on"
    await conn.query(settings)


def timeout_sql(options: VerifyOptions) -> str:
    """statement_timeout for the data statements (catalog reads run before it is set)."""
    milliseconds = max(1, round(options.statement_timeout * 1000)) if options.statement_timeout else 0
    return f"set statement_timeout = {milliseconds}"


async def connect(endpoint: Endpoint, options: VerifyOptions, *, read_only: bool = True) -> SqlConnection:
    conn = await SqlConnection.connect(endpoint, APPLICATION_NAME)
    try:
        await _session(conn, options, read_only=read_only)
    except BaseException:
        await conn.close()
        raise
    return conn


class Verifier:
    """Compares the tables of ``source`` (read from ``source_read`` when given: a replica) with
    ``target``. ``run()`` may be called again and again while it is open."""

    def __init__(
        self,
        source: Endpoint,
        target: Endpoint,
        options: VerifyOptions | None = None,
        *,
        source_read: Endpoint | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.source_read = source_read
        self.options = options or VerifyOptions()
        self._say = say or (lambda line: None)
        self._pairs: list[_Pair] = []
        self._planner: SqlConnection | None = None
        self._deadline: float | None = None
        self._stopped: str | None = None
        self._pace = _Pace(None)
        self._last_look = 0.0

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if self._pairs:
            return
        reader = self.source_read or self.source
        opened: list[SqlConnection] = []
        try:
            for _ in range(max(1, self.options.workers)):
                both = await asyncio.gather(
                    connect(reader, self.options), connect(self.target, self.options), return_exceptions=True
                )
                opened += [c for c in both if isinstance(c, SqlConnection)]
                for outcome in both:
                    if isinstance(outcome, BaseException):
                        raise outcome
                src, tgt = both
                assert isinstance(src, SqlConnection) and isinstance(tgt, SqlConnection)
                self._pairs.append(_Pair(src, tgt))
            self._planner = await connect(reader, self.options)
            opened.append(self._planner)
        except BaseException:
            self._pairs = []
            self._planner = None
            await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)
            raise

    async def close(self) -> None:
        conns = [c for p in self._pairs for c in (p.src, p.tgt)]
        if self._planner is not None:
            conns.append(self._planner)
        self._pairs = []
        self._planner = None
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    # --- one run -----------------------------------------------------------------------------

    async def run(self) -> VerifyReport:
        await self.open()
        options = self.options
        started = time.monotonic()
        self._deadline = started + options.max_duration if options.max_duration else None
        self._stopped = None
        self._pace = _Pace(options.rate_limit)
        pair = self._pairs[0]
        warnings = await self._server_checks(pair)
        window = await self._window(pair.tgt)
        report = VerifyReport(
            self.source, self.target, options.mode, [], recheck_after=window, rechecks=options.rechecks,
            source_read=self.source_read, warnings=warnings,
        )  # fmt: skip
        plans = await plan_tables(pair.src, pair.tgt, options.tables)
        conns = [c for p in self._pairs for c in (p.src, p.tgt)] + ([self._planner] if self._planner else [])
        await asyncio.gather(*(c.query(timeout_sql(options)) for c in conns))
        progress = self._progress(plans)
        if progress is not None and progress.resumed:
            self._say(f"resuming from {progress.path}")
        tables: list[_Table] = []
        for plan in plans:
            result = TableResult(plan.name, plan.key, plan.columns, list(plan.notes))
            table_progress = progress.table(plan.name) if progress is not None else TableProgress()
            tables.append(_Table(plan, result, table_progress))
            report.tables.append(result)
        for table in tables:
            await self._table(table, progress)
        report.rechecked = await self._recheck(tables, window)
        for table in tables:
            # Differences found so far are looked at again by a resumed run (and reported by it).
            found = table.result.differences + table.result.unsettled
            table.progress.candidates = [list(d.key) for d in found]
        report.stopped = self._stopped
        report.seconds = time.monotonic() - started
        if progress is not None:
            progress.save(finished=report.complete, force=True)
        return report

    async def _server_checks(self, pair: _Pair) -> list[str]:
        src, tgt = await asyncio.gather(pair.src.json(SERVER_INFO), pair.tgt.json(SERVER_INFO))
        for info, endpoint in ((src, self.source_read or self.source), (tgt, self.target)):
            if info["version_num"] < MIN_SERVER_VERSION:
                raise VerifyError(
                    f"{endpoint.label()} runs Postgres {info['version']}: verify needs 13 or later (trim_scale)"
                )
        warnings = []
        if src["encoding"] != tgt["encoding"]:
            warnings.append(
                f"server encodings differ ({src['encoding']} on the source, {tgt['encoding']} on the target): "
                "checksums hash encoded bytes, so every non-ASCII text differs in checksum mode; use --mode full"
            )
        return warnings

    async def _window(self, tgt: SqlConnection) -> float:
        """The lag window: --recheck-after, else the default, widened to twice a running sync's lag."""
        if self.options.recheck_after is not None:
            return self.options.recheck_after
        window = DEFAULT_RECHECK_AFTER
        try:
            rows = await tgt.query(
                "select max(lag_seconds) from pgshift_sync_state where to_regclass('pgshift_sync_state') is not null "
                f"and phase = 'streaming' and updated_at > now() - interval '{SYNC_LAG_FRESH} seconds'"
            )
        except SqlError:  # no such table (to_regclass does not stop the planner resolving it)
            return window
        if rows and rows[0][0] is not None:
            window = max(window, math.ceil(2 * float(rows[0][0])))
        return window

    def _progress(self, plans: list[TablePlan]) -> Progress | None:
        options = self.options
        if options.state_file is None or options.mode == "sample":
            return None
        identity = {
            "source": self.source.describe(),
            "target": self.target.describe(),
            "mode": options.mode,
            "chunk_rows": options.chunk_rows,
            "tables": [p.name for p in plans],
        }
        return Progress.open(options.state_file, identity)

    def _expired(self) -> bool:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._stopped = f"--max-duration {self.options.max_duration:g} s reached"
            return True
        return False

    # --- tables ------------------------------------------------------------------------------

    async def _table(self, table: _Table, progress: Progress | None) -> None:
        plan, result, saved = table.plan, table.result, table.progress
        if not plan.comparable:
            result.complete = True
            return
        # Counts and candidates an earlier run recorded (resume).
        result.rows_compared, result.target_rows = saved.rows, saved.target_rows
        result.chunks, result.chunks_mismatched = saved.chunks, saved.chunks_mismatched
        for key in saved.candidates:
            table.candidates[tuple(key)] = _Candidate(None, None, observed=False)
        if saved.complete:
            result.complete = True
            result.chunks_total = result.chunks
            return
        if self._expired():
            return
        began = time.monotonic()
        try:
            if self.options.mode == "sample":
                await self._sample(table)
            elif not plan.key:
                await self._whole(table)
            else:
                await self._chunks(table, progress)
        except SqlError as exc:
            result.error = exc.message + (f" ({exc.hint})" if exc.hint else "")
        result.seconds += time.monotonic() - began
        result.checked_at = time.time()
        rate = result.rows_compared / result.seconds if result.seconds > 0 else 0
        self._say(
            f"{plan.name}: {result.rows_compared:,} rows, {result.chunks:,} chunk(s), "
            f"{len(table.candidates):,} candidate difference(s), {result.seconds:.1f} s ({rate:,.0f} rows/s)"
        )

    async def _whole(self, table: _Table) -> None:
        """A table without primary key: one digest of the whole table per side."""
        pair, plan, result = self._pairs[0], table.plan, table.result
        assert plan.source is not None and plan.target is not None
        whole = KeyRange()
        (sc, ss), (tc, ts) = await self._digests(pair, plan.source, plan.target, whole)
        result.rows_compared, result.target_rows, result.chunks = sc, tc, 1
        if (sc, ss) != (tc, ts):
            result.chunks_mismatched = 1
            table.digest_candidate = True
            table.source_digest = (sc, ss)
            self._last_look = time.monotonic()
        result.complete = True
        result.chunks_total = 1

    async def _digests(self, pair: _Pair, source: Side, target: Side, chunk: KeyRange) -> tuple[Any, Any]:
        s, t = await asyncio.gather(
            pair.src.query(chunk_digest_sql(source, chunk)), pair.tgt.query(chunk_digest_sql(target, chunk))
        )
        return (int(s[0][0] or 0), s[0][1]), (int(t[0][0] or 0), t[0][1])

    async def _chunks(self, table: _Table, progress: Progress | None) -> None:
        """Chunks of about chunk_rows source rows, planned on the source ahead of the workers."""
        plan, result, saved = table.plan, table.result, table.progress
        assert plan.source is not None and self._planner is not None
        source = plan.source
        queue: asyncio.Queue[tuple[int, KeyRange] | None] = asyncio.Queue(maxsize=2 * len(self._pairs))
        uppers: dict[int, Key | None] = {}
        done: dict[int, tuple[int, int, bool]] = {}
        contiguous = -1
        failures: list[SqlError] = []
        start: Key | None = tuple(saved.done_upto) if saved.done_upto is not None else None
        planner = self._planner
        chunk_rows = self.options.chunk_rows

        stepper = _IntegerSteps.for_side(source, chunk_rows, plan.reltuples)

        async def next_upper(lower: Key | None) -> Key | None:
            if stepper is not None:
                return await stepper.upper(planner, lower)
            rows = await planner.query(boundary_sql(source, lower, chunk_rows))
            return tuple(rows[0]) if rows else None

        async def plan_chunks() -> None:
            lower = start
            number = 0
            try:
                while not table.stop and not self._expired():
                    upper = await next_upper(lower)
                    uppers[number] = upper
                    await queue.put((number, KeyRange(lower, upper)))
                    number += 1
                    if upper is None:
                        return
                    lower = upper
            finally:
                for _ in self._pairs:
                    await queue.put(None)

        async def work(pair: _Pair) -> None:
            nonlocal contiguous
            while (item := await queue.get()) is not None:
                if table.stop or self._expired():
                    continue  # (drain: the planner ends with one None per worker)
                number, chunk = item
                try:
                    sc, tc, mismatched = await self._chunk(pair, table, chunk)
                except SqlError as exc:
                    failures.append(exc)
                    table.stop = True
                    continue
                result.rows_compared += sc
                result.target_rows += tc
                result.chunks += 1
                result.chunks_mismatched += mismatched
                # The progress file records only the contiguous prefix of chunks done (a resumed
                # run starts after it), with the counts of exactly those chunks.
                done[number] = (sc, tc, mismatched)
                if stepper is not None:
                    stepper.observed(chunk, sc)
                while contiguous + 1 in done:
                    contiguous += 1
                    rows, target_rows, differs = done.pop(contiguous)
                    saved.rows += rows
                    saved.target_rows += target_rows
                    saved.chunks += 1
                    saved.chunks_mismatched += differs
                    upper = uppers[contiguous]
                    saved.done_upto = None if upper is None else list(upper)
                    if upper is None:
                        saved.complete = result.complete = True
                        result.chunks_total = result.chunks
                saved.candidates = [list(k) for k in table.candidates]
                if progress is not None:
                    progress.save()
                await self._pace.account(sc)

        tasks = [asyncio.create_task(plan_chunks(), name="verify-plan")]
        tasks += [asyncio.create_task(work(p), name=f"verify-worker-{i}") for i, p in enumerate(self._pairs)]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
        for outcome in results:
            if isinstance(outcome, BaseException):
                raise outcome
        if failures:
            raise failures[0]

    async def _chunk(self, pair: _Pair, table: _Table, chunk: KeyRange) -> tuple[int, int, bool]:
        """Compare one chunk: (source rows, target rows, mismatching)."""
        plan = table.plan
        assert plan.source is not None and plan.target is not None
        if self.options.mode == "full":
            s, t = await asyncio.gather(
                pair.src.query(rows_sql(plan.source, chunk)), pair.tgt.query(rows_sql(plan.target, chunk))
            )
            width = len(plan.key)
            smap, tmap = split_rows(s, width), split_rows(t, width)
            if smap != tmap:
                self._observe(table, smap, tmap, list(smap.keys() | tmap.keys()))
                return len(smap), len(tmap), True
            return len(smap), len(tmap), False
        (sc, ss), (tc, ts) = await self._digests(pair, plan.source, plan.target, chunk)
        if (sc, ss) == (tc, ts):
            return sc, tc, False
        await self._drill(pair, table, chunk, max(sc, tc), sc >= tc, 0)
        return sc, tc, True

    async def _drill(self, pair: _Pair, table: _Table, chunk: KeyRange, rows: int, on_source: bool, depth: int) -> None:
        """A mismatching range: split it and compare the parts, down to leaf ranges, whose row
        hashes are compared."""
        plan = table.plan
        assert plan.source is not None and plan.target is not None
        if rows > self.options.leaf_rows and depth < MAX_DEPTH:
            parts = await self._split(pair, plan.source if on_source else plan.target, chunk, rows, on_source)
            if len(parts) > 1:
                for part in parts:
                    (sc, ss), (tc, ts) = await self._digests(pair, plan.source, plan.target, part)
                    if (sc, ss) != (tc, ts):
                        await self._drill(pair, table, part, max(sc, tc), sc >= tc, depth + 1)
                return
        s, t = await asyncio.gather(
            pair.src.query(row_hashes_sql(plan.source, chunk)), pair.tgt.query(row_hashes_sql(plan.target, chunk))
        )
        width = len(plan.key)
        shash = {tuple(r[:width]): r[width] for r in s}
        thash = {tuple(r[:width]): r[width] for r in t}
        keys = diff_hashes(shash, thash)
        if keys:
            smap, tmap = await self._rows(pair, plan, keys)
            self._observe(table, smap, tmap, keys)

    async def _split(self, pair: _Pair, side: Side, chunk: KeyRange, rows: int, on_source: bool) -> list[KeyRange]:
        """About FANOUT parts of ``chunk``: its key every rows/FANOUT rows on ``side``."""
        step = max(1, math.ceil(rows / FANOUT))
        sql = (
            f"select {key_aliases(side)} from (select {key_texts(side)}, row_number() over (order by "
            f"{side.key_order()}) as pgshift_n from {side.sql}{range_where(side, chunk)}) s "
            f"where pgshift_n % {step} = 1 and pgshift_n > 1 order by pgshift_n"
        )
        conn = pair.src if on_source else pair.tgt
        bounds: list[Key | None] = [chunk.lower, *(tuple(r) for r in await conn.query(sql)), chunk.upper]
        return [KeyRange(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]

    async def _rows(self, pair: _Pair, plan: TablePlan, keys: Sequence[Key]) -> tuple[dict[Key, Row], dict[Key, Row]]:
        """The rows with these keys on both sides (canonical text), in batches."""
        assert plan.source is not None and plan.target is not None
        smap: dict[Key, Row] = {}
        tmap: dict[Key, Row] = {}
        width = len(plan.key)
        for at in range(0, len(keys), KEY_BATCH):
            batch = list(keys[at : at + KEY_BATCH])
            s, t = await asyncio.gather(
                pair.src.query(rows_by_key_sql(plan.source, batch)), pair.tgt.query(rows_by_key_sql(plan.target, batch))
            )
            smap.update(split_rows(s, width))
            tmap.update(split_rows(t, width))
        return smap, tmap

    def _observe(self, table: _Table, smap: dict[Key, Row], tmap: dict[Key, Row], keys: Sequence[Key]) -> None:
        """Record the keys that differ as candidates (to recheck)."""
        self._last_look = time.monotonic()
        for key in keys:
            s, t = smap.get(key), tmap.get(key)
            if s == t:
                continue
            if key not in table.candidates and len(table.candidates) >= self.options.max_differences:
                table.result.differences_truncated = True
                continue
            table.candidates[key] = _Candidate(s, t)

    async def _sample(self, table: _Table) -> None:
        """``sample`` random rows from each side, each looked up by key on the other side."""
        pair, plan, result = self._pairs[0], table.plan, table.result
        assert plan.source is not None and plan.target is not None
        if not plan.key:
            result.complete = True  # (nothing to sample by: the no_primary_key note says so)
            return
        n = self.options.sample
        estimate = plan.reltuples
        percent = 100.0 if not estimate else min(100.0, 100.0 * 3 * n / estimate)
        s, t = await asyncio.gather(
            pair.src.query(sample_sql(plan.source, n, percent)), pair.tgt.query(sample_sql(plan.target, n, percent))
        )
        if percent < 100 and (len(s) < n or len(t) < n):
            # Too few pages sampled (small or skewed table): every page, each row with a probability.
            percent = min(100.0, percent * 4)
            s, t = await asyncio.gather(
                pair.src.query(sample_sql(plan.source, n, percent, "bernoulli")),
                pair.tgt.query(sample_sql(plan.target, n, percent, "bernoulli")),
            )
        width = len(plan.key)
        smap, tmap = split_rows(s, width), split_rows(t, width)
        keys = list(smap.keys() | tmap.keys())
        lookup = [k for k in keys if k not in smap or k not in tmap]
        if lookup:
            more_s, more_t = await self._rows(pair, plan, lookup)
            smap = {**more_s, **smap}
            tmap = {**more_t, **tmap}
        self._observe(table, smap, tmap, keys)
        result.rows_compared = len(keys)
        result.complete = True

    # --- the recheck -------------------------------------------------------------------------

    async def _recheck(self, tables: list[_Table], window: float) -> int:
        """Settle every candidate (see compare.judge); returns how many were rechecked."""
        pending = [t for t in tables if t.candidates or t.digest_candidate]
        total = sum(len(t.candidates) + t.digest_candidate for t in pending)
        if not pending:
            return 0
        pair = self._pairs[0]
        # Keys carried over from an earlier run: a first look now.
        for table in pending:
            unseen = [k for k, c in table.candidates.items() if not c.observed]
            if unseen:
                smap, tmap = await self._rows(pair, table.plan, unseen)
                self._last_look = time.monotonic()
                for key in unseen:
                    s, t = smap.get(key), tmap.get(key)
                    if s == t:
                        del table.candidates[key]
                    else:
                        table.candidates[key] = _Candidate(s, t)
        for _ in range(self.options.rechecks):
            if not any(t.candidates or t.digest_candidate for t in pending):
                break
            await asyncio.sleep(max(0.0, self._last_look + window - time.monotonic()))
            self._last_look = time.monotonic()
            for table in pending:
                await self._recheck_table(pair, table)
        for table in pending:
            columns, result = table.plan.columns, table.result
            for key, cand in table.candidates.items():
                diff = diff_one(columns, key, cand.source, cand.target)
                if diff is not None:
                    # (never rechecked: --rechecks 0; else it kept changing)
                    (result.unsettled if self.options.rechecks else result.differences).append(diff)
            table.candidates.clear()
            if table.digest_candidate:
                result.digest_differs = True
            _sort(result.differences)
            _sort(result.unsettled)
        return total

    async def _recheck_table(self, pair: _Pair, table: _Table) -> None:
        plan = table.plan
        assert plan.source is not None and plan.target is not None
        if table.digest_candidate:
            s, t = await self._digests(pair, plan.source, plan.target, KeyRange())
            if s == t:
                table.digest_candidate = False
            elif s == table.source_digest:  # the recheck rule, for the whole table
                table.digest_candidate = False
                table.result.digest_differs = True
            table.source_digest = s
        if not table.candidates:
            return
        smap, tmap = await self._rows(pair, plan, list(table.candidates))
        for key, cand in list(table.candidates.items()):
            s, t = smap.get(key), tmap.get(key)
            verdict = judge(cand.source, s, t)
            if verdict is Verdict.RESOLVED:
                del table.candidates[key]
            elif verdict is Verdict.CONFIRMED:
                del table.candidates[key]
                diff = diff_one(plan.columns, key, s, t)
                if diff is not None:
                    table.result.differences.append(diff)
            else:
                table.candidates[key] = _Candidate(s, t)


_INT_MAX = {"int2": 2**15 - 1, "int4": 2**31 - 1, "int8": 2**63 - 1}


class _IntegerSteps:
    """Chunk bounds of a single-column integer key by value, not by counting keys.

    ``OFFSET n LIMIT 1`` reads n index entries per chunk: over a table, an index-only scan of
    every key, which costs as much CPU as a quarter of the checksums themselves. For an integer
    key the next bound is instead the next existing key (one index probe, which also skips gaps)
    plus ``chunk_rows`` divided by the key density -- estimated from the table's row estimate and
    key span, then corrected from the rows the finished chunks held. Chunks still tile the key
    space exactly (each starts where the previous one ended); only their sizes are estimates."""

    def __init__(self, side: Side, chunk_rows: int, reltuples: int | None) -> None:
        self._side = side
        self._column = side.key[0]
        self._chunk_rows = chunk_rows
        self._reltuples = reltuples
        self._density: float | None = None  # rows per key value
        self._seen_rows = 0
        self._seen_span = 0

    @classmethod
    def for_side(cls, side: Side, chunk_rows: int, reltuples: int | None) -> _IntegerSteps | None:
        if len(side.key) == 1 and side.key[0].base in _INT_MAX and not side.key_collate_c:
            return cls(side, chunk_rows, reltuples)
        return None

    async def upper(self, conn: SqlConnection, lower: Key | None) -> Key | None:
        k = self._column.sql
        where = f" where {k} >= {int(lower[0] or 0)}" if lower is not None else ""
        if self._density is None:
            row = (await conn.query(f"select min({k})::text, max({k})::text from {self._side.sql}{where}"))[0]
            if row[0] is None or row[1] is None:
                return None
            span = int(row[1]) - int(row[0]) + 1
            self._density = min(1.0, (self._reltuples or span) / span) if self._reltuples else 1.0
            nearest = int(row[0])
        else:
            row = (await conn.query(f"select min({k})::text from {self._side.sql}{where}"))[0]
            if row[0] is None:
                return None  # no source key from here on: the last chunk runs to the end
            nearest = int(row[0])
        step = max(1, round(self._chunk_rows / max(self._density, 1e-12)))
        upper = nearest + step
        return None if upper > _INT_MAX[self._column.base] else (str(upper),)

    def observed(self, chunk: KeyRange, rows: int) -> None:
        """A finished chunk's source rows: the density estimate follows the table's."""
        if chunk.lower is None or chunk.upper is None or chunk.lower[0] is None or chunk.upper[0] is None:
            return
        self._seen_rows += rows
        self._seen_span += int(chunk.upper[0]) - int(chunk.lower[0])
        if self._seen_rows and self._seen_span:
            self._density = self._seen_rows / self._seen_span


def _sort(diffs: list[RowDifference]) -> None:
    diffs.sort(key=lambda d: sort_key(d.key))


async def verify(
    source: Endpoint,
    target: Endpoint,
    options: VerifyOptions | None = None,
    *,
    source_read: Endpoint | None = None,
    say: Callable[[str], None] | None = None,
) -> VerifyReport:
    """One verification run (connections opened and closed)."""
    async with Verifier(source, target, options, source_read=source_read, say=say) as verifier:
        return await verifier.run()


async def sample_tables(
    source: Endpoint,
    target: Endpoint,
    tables: list[str] | None,
    rows: int,
    *,
    recheck_after: float | None = None,
    rechecks: int = DEFAULT_RECHECKS,
) -> VerifyReport:
    """Sample ``rows`` random rows of each table on each side, with the recheck (one call)."""
    options = VerifyOptions(
        mode="sample", tables=tables, sample=rows, workers=1, recheck_after=recheck_after, rechecks=rechecks
    )
    return await verify(source, target, options)
