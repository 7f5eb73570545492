"""`sync start --metrics-port`: the run's Prometheus metrics (pgshift_sync_*) served by aiohttp.

A module of its own so that a sync without metrics does not import aiohttp and prometheus_client
(a quarter of a second of start-up)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.cdc.sync import METRICS_HELP, PHASES, SyncError

if TYPE_CHECKING:
    from proxy.cdc.sync import SyncRun


class SyncCollector(Collector):
    """Reads a running SyncRun on each scrape (on the event loop: the aiohttp handler calls it)."""

    def __init__(self, run: SyncRun) -> None:
        self.run = run

    def collect(self) -> Iterator[Metric]:
        run, h = self.run, METRICS_HELP
        phase = GaugeMetricFamily("pgshift_sync_phase", h["pgshift_sync_phase"], labels=["phase"])
        for name in PHASES:
            phase.add_metric([name], 1.0 if run.phase == name else 0.0)
        yield phase
        families = {
            name: (CounterMetricFamily if name.endswith(("copied",)) else GaugeMetricFamily)(
                name, h[name], labels=["table"]
            )
            for name in ("pgshift_sync_table_rows_copied", "pgshift_sync_table_bytes_copied",
                         "pgshift_sync_table_chunks_done", "pgshift_sync_table_chunks")
        }  # fmt: skip
        for table, t in sorted(run.copy_progress.items()):
            families["pgshift_sync_table_rows_copied"].add_metric([table], t.rows_before + t.rows)
            families["pgshift_sync_table_bytes_copied"].add_metric([table], t.bytes)
            families["pgshift_sync_table_chunks_done"].add_metric([table], t.chunks_done + t.chunks_skipped)
            families["pgshift_sync_table_chunks"].add_metric([table], t.chunks)
        yield from families.values()
        applier = run.applier
        stats = applier.stats() if applier is not None else None
        yield CounterMetricFamily(
            "pgshift_sync_transactions_applied", h["pgshift_sync_transactions_applied"],
            value=stats.transactions_applied if stats else 0,
        )  # fmt: skip
        rows = CounterMetricFamily("pgshift_sync_rows_applied", h["pgshift_sync_rows_applied"], labels=["kind"])
        for kind, count in sorted((stats.rows if stats else {}).items()):
            rows.add_metric([kind], count)
        yield rows
        for name, value in (
            ("pgshift_sync_confirmed_lsn", stats.confirmed_lsn if stats else 0),
            ("pgshift_sync_lag_bytes", stats.lag_bytes if stats else 0),
            ("pgshift_sync_lag_seconds", stats.lag_seconds if stats else 0.0),
        ):
            yield GaugeMetricFamily(name, h[name], value=value)


class MetricsServer:
    """/metrics of a SyncRun on 127.0.0.1:PORT (aiohttp on the run's event loop, a registry of its own)."""

    def __init__(self, run: SyncRun, port: int, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SyncCollector(run))
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise SyncError(f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
