"""Continuous sampling inside the proxy ([verify] interval > 0): a sample-mode verification every
``interval`` seconds, its results kept per table for /api/state, ``pgshift status`` and /metrics.

One ``Verifier`` (three connections: source, target, and the source's planner) stays open between
rounds; it talks to the backends directly, never through a client session, so sessions do not
notice it. A round that fails (a backend down, a lost connection, a statement error) is recorded
with its error, the connections are closed, and the next round opens them again: the proxy never
stops because of it.

Which backends: a backend named in ``[verify] source`` / ``target`` is fixed. A side left to the
default follows the live routing at the start of every round: the source is the primary, the
target the first mirror that is not the source. So after ``pgshift flip --primary new`` (the old
primary becomes a mirror) the sampler compares new -> old, the direction the writes now flow. When
the live routing offers no such backend (no mirrors any more, or a fixed target the flip made
primary), a defaulted side takes the other backend of the pair chosen at startup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.cdc.sqlconn import Endpoint, resolve_endpoint
from proxy.config import Config, RoutingConfig, VerifyConfig
from proxy.errors import PgShiftError
from proxy.verify.report import TableResult, VerifyReport
from proxy.verify.verify import Verifier, VerifyOptions

log = logging.getLogger(__name__)

RoundResult = Literal["clean", "differences", "unsettled", "error"]
RESULTS: tuple[RoundResult, ...] = ("clean", "differences", "unsettled", "error")
KEYS_SHOWN = 10  # differing keys kept per table for the summary

# Every metric, with its help text (the README's metric table is checked against this: test).
HELP: dict[str, str] = {
    "pgshift_verify_rows_checked": "Rows compared by continuous sampling ([verify]), by table",
    "pgshift_verify_differences": "Confirmed differences the last sampling round found in a table (after the recheck)",
    "pgshift_verify_differences_found": "Confirmed differences found by sampling, by table (a difference that "
    "persists counts again in every round that finds it)",
    "pgshift_verify_last_clean_timestamp_seconds": "When sampling last found a table clean (0: not yet)",
    "pgshift_verify_rounds": "Sampling rounds, by result (clean, differences, unsettled, error)",
}


@dataclass
class TableStats:
    """What sampling knows about one table (cumulative over rounds, or from the last round)."""

    rows_checked: int = 0  # cumulative
    differences: int = 0  # confirmed, last round
    unsettled: int = 0  # last round
    differences_found: int = 0  # cumulative
    status: str = "clean"  # last round: clean, differs, error, not_compared
    checked_at: float | None = None
    last_clean_at: float | None = None
    error: str | None = None  # last round: why the table could not be compared
    keys: list[dict[str, Any]] = field(default_factory=list)  # the last round's differing keys (a few)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "rows_checked": self.rows_checked,
            "differences": self.differences,
            "unsettled": self.unsettled,
            "differences_found_total": self.differences_found,
            "checked_at": self.checked_at,
            "last_clean_at": self.last_clean_at,
            "error": self.error,
            "differing_keys": self.keys,
        }


def _table_error(result: TableResult) -> str | None:
    if result.error is not None:
        return result.error
    problems = [n.message for n in result.notes if n.problem]
    return "; ".join(problems) if problems else None


class Sampler:
    """Runs sampling rounds in the proxy's event loop until ``stop()``.

    ``config`` and ``routing`` are read at the start of every round (the running config, which a
    reload may replace, and the live routing); ``settings`` are fixed at startup."""

    def __init__(
        self,
        settings: VerifyConfig,
        config: Callable[[], Config],
        routing: Callable[[], RoutingConfig],
    ) -> None:
        self.settings = settings
        self._config = config
        self._routing = routing
        source, target = settings.pair(config().routing)
        self._initial = (source, target)  # checked at load (config.py): both set, different backends
        self._verifier: Verifier | None = None
        self._task: asyncio.Task[None] | None = None
        self.source: str | None = None
        self.target: str | None = None
        self.tables: dict[str, TableStats] = {}
        self.rounds: dict[RoundResult, int] = dict.fromkeys(RESULTS, 0)
        self.last_round_at: float | None = None
        self.last_round_seconds: float | None = None
        self.last_result: RoundResult | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="verify-sampler")

    async def stop(self) -> None:
        """Cancel a round in progress and close the connections."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # (the loop catches everything; never turn a shutdown into a crash)
                log.exception("verify sampler failed")
        await self._close()

    async def _close(self) -> None:
        verifier, self._verifier = self._verifier, None
        if verifier is not None:
            await verifier.close()

    async def _run(self) -> None:
        interval = self.settings.interval
        while True:
            await self.round()
            await asyncio.sleep(interval)

    # --- one round ----------------------------------------------------------------------------

    def pair(self, routing: RoutingConfig) -> tuple[str, str]:
        """(source, target) for the live routing (see the module's docstring)."""
        initial = [n for n in self._initial if n is not None]
        source, target = self.settings.pair(routing)
        if target is None or target == source:
            if self.settings.source is None and target is not None:
                source = next((n for n in initial if n != target), source)  # a fixed target is now primary
            else:
                target = next((n for n in initial if n != source), None)
        if target is None or source == target:
            raise PgShiftError(f"no backend to compare {source!r} with: set [verify] target")
        return source, target

    async def round(self) -> RoundResult:
        """One sampling round; records and returns its result (never raises but CancelledError)."""
        began, started_at = time.monotonic(), time.time()
        try:
            verifier = await self._verifier_for(self._routing())
            report = await verifier.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._close()  # reopened next round
            message = exc.message if isinstance(exc, PgShiftError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, PgShiftError) and exc.hint:
                message += f" ({exc.hint})"
            if message != self.last_error or self.last_result != "error":  # (not again every round)
                unexpected = not isinstance(exc, PgShiftError | OSError)
                log.warning(
                    "verify sampling %s -> %s failed: %s", self.source, self.target, message, exc_info=unexpected
                )
            self._finish("error", started_at, began, message)
            return "error"
        result = self._record(report)
        error = next((s.error for s in self.tables.values() if s.error), None) if result == "error" else None
        self._finish(result, started_at, began, error)
        return result

    def _finish(self, result: RoundResult, started_at: float, began: float, error: str | None) -> None:
        if error is None and self.last_result == "error":
            log.info("verify sampling %s -> %s works again", self.source, self.target)
        self.rounds[result] += 1
        self.last_result = result
        self.last_round_at = started_at
        self.last_round_seconds = time.monotonic() - began
        if error is not None:
            self.last_error, self.last_error_at = error, started_at

    async def _verifier_for(self, routing: RoutingConfig) -> Verifier:
        source, target = self.pair(routing)
        if self._verifier is not None and (source, target) == (self.source, self.target):
            return self._verifier
        if self._verifier is not None:
            log.info("verify sampling now compares %s -> %s (routing changed)", source, target)
            await self._close()
        self.source, self.target = source, target
        config = self._config()
        endpoints: tuple[Endpoint, Endpoint] = (resolve_endpoint(config, source), resolve_endpoint(config, target))
        settings = self.settings
        options = VerifyOptions(
            mode="sample",
            tables=list(settings.tables) or None,
            sample=settings.sample,
            workers=1,
            recheck_after=settings.recheck_after,
            rechecks=settings.rechecks,
            max_differences=2 * settings.sample,
        )
        verifier = Verifier(*endpoints, options)
        await verifier.open()
        self._verifier = verifier
        return verifier

    def _record(self, report: VerifyReport) -> RoundResult:
        every = bool(self.settings.tables)  # listed tables are shown even without a primary key
        seen = set()
        differences = unsettled = errors = 0
        for result in report.tables:
            if not result.key and not every and result.comparable:
                continue  # no primary key: sampling cannot name rows (verify --mode checksum can)
            seen.add(result.table)
            stats = self.tables.setdefault(result.table, TableStats())
            before = (stats.differences, stats.unsettled)
            stats.rows_checked += result.rows_compared
            stats.differences = len(result.differences)
            stats.unsettled = len(result.unsettled)
            stats.differences_found += stats.differences
            stats.checked_at = result.checked_at or time.time()
            stats.error = _table_error(result)
            if stats.error is None and not result.key:
                stats.error = f"{result.table} has no primary key: sampling cannot compare it"
            stats.status = "error" if stats.error is not None and result.status == "clean" else result.status
            found = result.differences + result.unsettled
            stats.keys = [d.as_dict(result.key) for d in found[:KEYS_SHOWN]]
            if stats.status == "clean":
                stats.last_clean_at = stats.checked_at
            elif (stats.differences or stats.unsettled) and (stats.differences, stats.unsettled) != before:
                # (logged when the counts change: a difference that stays is not logged every round)
                log.warning(
                    "verify sampling %s -> %s: %s has %d difference(s), %d unsettled",
                    self.source, self.target, result.table, stats.differences, stats.unsettled,
                )  # fmt: skip
            differences += stats.differences
            unsettled += stats.unsettled
            errors += stats.status in ("error", "not_compared")
        for gone in set(self.tables) - seen:  # dropped tables (or no longer listed)
            del self.tables[gone]
        if differences:
            return "differences"
        if errors:
            return "error"
        return "unsettled" if unsettled else "clean"

    # --- what it found ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """JSON for GET /api/state ("verify")."""
        settings = self.settings
        return {
            "enabled": True,
            "interval": settings.interval,
            "sample": settings.sample,
            "tables_configured": list(settings.tables),
            "source": self.source,
            "target": self.target,
            "running": self._task is not None and not self._task.done(),
            "rounds": dict(self.rounds),
            "last_round": {
                "at": self.last_round_at,
                "seconds": None if self.last_round_seconds is None else round(self.last_round_seconds, 3),
                "result": self.last_result,
                "error": self.last_error if self.last_result == "error" else None,
            },
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "tables": {name: stats.as_dict() for name, stats in sorted(self.tables.items())},
            "differences": sum(s.differences for s in self.tables.values()),
        }

    def collector(self) -> SamplerCollector:
        return SamplerCollector(self)


class SamplerCollector(Collector):
    """The sampler's results as metric families, built when scraped."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def collect(self) -> Iterator[Metric]:
        tables = sorted(self.sampler.tables.items())
        rows = CounterMetricFamily("pgshift_verify_rows_checked", HELP["pgshift_verify_rows_checked"], labels=["table"])
        now = GaugeMetricFamily("pgshift_verify_differences", HELP["pgshift_verify_differences"], labels=["table"])
        found = CounterMetricFamily(
            "pgshift_verify_differences_found", HELP["pgshift_verify_differences_found"], labels=["table"]
        )
        clean = GaugeMetricFamily(
            "pgshift_verify_last_clean_timestamp_seconds",
            HELP["pgshift_verify_last_clean_timestamp_seconds"],
            labels=["table"],
        )
        for name, stats in tables:
            rows.add_metric([name], stats.rows_checked)
            now.add_metric([name], stats.differences)
            found.add_metric([name], stats.differences_found)
            clean.add_metric([name], stats.last_clean_at or 0)
        rounds = CounterMetricFamily("pgshift_verify_rounds", HELP["pgshift_verify_rounds"], labels=["result"])
        for result in RESULTS:
            rounds.add_metric([result], self.sampler.rounds[result])
        yield from (rows, now, found, clean, rounds)
