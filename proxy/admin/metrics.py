"""Prometheus metrics: a collector that reads the proxy's own counters when scraped.

Nothing on the data path touches prometheus-client: sessions bump plain counters and lists
(RoutingStats, RequestStats, the analysis cache) and this collector turns them into metric
families on each scrape, on an injected CollectorRegistry (no module globals).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.control.plane import ControlPlane
from proxy.migrate.migrator import Migrator
from proxy.observability import LATENCY_BUCKETS, SUM
from proxy.server import Server

# Every metric, with its help text: the README's metric table is checked against this (test).
HELP: dict[str, str] = {
    "pgshift_request_duration_seconds": "Time from forwarding a request to its backend's ReadyForQuery, by backend and "
    "statement kind (read, write, ddl, transaction, session, copy_in, …)",
    "pgshift_backend_errors": "ErrorResponses backends sent to clients, by backend and SQLSTATE class (first two "
    "characters: 23 integrity, 40 rollback/serialization, 42 syntax/access, 57 operator intervention, …)",
    "pgshift_routing_decisions": "Requests routed by a fresh decision, by backend and reason",
    "pgshift_session_pins": "Sessions pinned to their primary, by cause (counted once per session and cause)",
    "pgshift_sessions_pinned": "Sessions now pinned to their primary, by cause",
    "pgshift_read_failovers": "Reads sent to the primary because their backend failed, by backend and cause",
    "pgshift_replays": "Session settings and prepared statements replayed on a backend before a request",
    "pgshift_session_moves": "Sessions that followed a primary change (flip/rollback) to the new primary",
    "pgshift_sessions": "Client sessions: state=active (relaying) or starting (in the handshake)",
    "pgshift_sessions_in_transaction": "Sessions with an open transaction",
    "pgshift_sessions_by_primary": "Sessions by the backend their writes go to (after a flip, pinned sessions stay "
    "on the previous primary until they end)",
    "pgshift_backend_connections": "Open backend connections, by backend",
    "pgshift_backend_up": "1 if the last TCP probe of the backend succeeded",
    "pgshift_backend_probe_seconds": "Duration of the last TCP probe of the backend",
    "pgshift_routing_version": "Routing version this instance runs",
    "pgshift_routing_primary": "1 for the backend that is primary in the running routing version",
    "pgshift_routing_read_weight": 'Read weight per backend in the running routing version, by rule (default: rule="")',
    "pgshift_routing_applied_timestamp_seconds": "When this instance installed its running routing version",
    "pgshift_control_store_up": "1 if the control store (state file or shared Postgres table) is reachable",
    "pgshift_control_instances": "Instances seen in the shared control store, by the version they run",
    "pgshift_admin_changes": "Routing versions this instance made, by source (config, reload, put, patch, flip, "
    "rollback)",
    "pgshift_mirror_queue_transactions": "Committed transactions waiting for (or in flight to) a mirror, by mirror "
    "and database",
    "pgshift_mirror_queue_bytes": "Bytes held for a mirror's apply queue (bounded by mirror.queue_bytes)",
    "pgshift_mirror_lag_seconds": "Age of the oldest transaction a mirror has not applied yet",
    "pgshift_mirror_applied": "Transactions a mirror applied with every statement matching the primary",
    "pgshift_mirror_failed": "Transactions a mirror did not apply (error, unknown outcome): journaled",
    "pgshift_mirror_journal_entries": "Divergence journal entries, by mirror and kind (diverged, failed, unmirrored, "
    "out_of_sync, ddl, late)",
    "pgshift_mirror_unmirrored_transactions": "Committed transactions a mirror did not get (detached or dropped)",
    "pgshift_mirror_out_of_sync_tables": "Tables on a mirror that need repair (see pgshift mirror status)",
    "pgshift_mirror_detached": "1 while capture for a mirror (and database) is stopped until an operator resumes it",
    "pgshift_mirror_covered_transactions": "Committed transactions a mirror left to the change stream that also "
    "feeds it (the migration's target while `pgshift sync` streams: the stream is its only writer)",
    "pgshift_mirror_covered": "1 while a change stream, not the proxy, writes the mirror",
    "pgshift_migrate_cuts": "Cut-overs (forward) and their way back (back) run by this migration, by result (done, "
    "aborted)",
    "pgshift_migrate_last_pause_seconds": "How long writes were paused by the last cut, on the slowest instance",
    "pgshift_migrate_last_pause_wait_seconds": "How long requests held by the last cut waited, by quantile (0.5, 0.99, "
    "1 = the longest)",
    "pgshift_migrate_cut_in_progress": "1 while a cut (or its way back) is under way",
    "pgshift_analysis_cache_hits": "Statement analyses served from the cache",
    "pgshift_analysis_cache_misses": "Statements parsed with pglast (not in the cache)",
}


class ProxyCollector(Collector):
    def __init__(self, server: Server, plane: ControlPlane) -> None:
        self.server = server
        self.plane = plane

    def collect(self) -> Iterator[Metric]:
        ctx = self.server.ctx
        stats, requests = ctx.stats, ctx.requests

        latency = HistogramMetricFamily(
            "pgshift_request_duration_seconds", HELP["pgshift_request_duration_seconds"], labels=["backend", "kind"]
        )
        for key, series in sorted(requests.latency.items()):
            buckets, running = [], 0.0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), series[:SUM], strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric(list(key), buckets, series[SUM])
        yield latency

        errors = CounterMetricFamily(
            "pgshift_backend_errors", HELP["pgshift_backend_errors"], labels=["backend", "class"]
        )
        classes: dict[tuple[str, str], int] = {}
        for (backend, sqlstate), n in requests.errors.items():
            classes[(backend, sqlstate[:2])] = classes.get((backend, sqlstate[:2]), 0) + n
        for key, n in sorted(classes.items()):
            errors.add_metric(list(key), n)
        yield errors

        yield _counter("pgshift_routing_decisions", ["backend", "reason"], stats.decisions.items())
        yield _counter("pgshift_session_pins", ["cause"], [((k,), v) for k, v in stats.pins.items()])
        yield _counter("pgshift_read_failovers", ["backend", "cause"], stats.failovers.items())
        yield _counter("pgshift_replays", ["backend"], [((k,), v) for k, v in stats.replays.items()])
        yield _counter("pgshift_session_moves", ["backend"], [((k,), v) for k, v in stats.moves.items()])

        summary = self.server.sessions()
        sessions = GaugeMetricFamily("pgshift_sessions", HELP["pgshift_sessions"], labels=["state"])
        sessions.add_metric(["active"], summary.active)
        sessions.add_metric(["starting"], summary.starting)
        yield sessions
        yield _gauge("pgshift_sessions_in_transaction", [], [((), summary.in_transaction)])
        yield _gauge("pgshift_sessions_pinned", ["cause"], [((k,), v) for k, v in summary.pinned_by_cause.items()])
        yield _gauge("pgshift_sessions_by_primary", ["backend"], [((k,), v) for k, v in summary.by_primary.items()])
        backends = list(self.plane.config.backends)
        yield _gauge("pgshift_backend_connections", ["backend"], [((b,), summary.connections[b]) for b in backends])

        probes = self.plane.probes
        yield _gauge("pgshift_backend_up", ["backend"], [((b,), int(p.up)) for b, p in probes.items()])
        yield _gauge("pgshift_backend_probe_seconds", ["backend"], [((b,), p.seconds) for b, p in probes.items()])

        live = self.plane.live
        yield _gauge("pgshift_routing_version", [], [((), live.version)])
        yield _gauge("pgshift_routing_primary", ["backend"], [((b,), int(b == live.routing.primary)) for b in backends])
        weights: list[tuple[tuple[str, ...], float]] = []
        for rule, reads in [
            ("", live.routing.reads or {live.routing.primary: 1}),
            *((r.name or "", r.reads) for r in live.routing.rules),
        ]:
            total = sum(reads.values()) or 1
            weights.extend(((rule, b), reads.get(b, 0) / total * 100) for b in backends)
        yield _gauge("pgshift_routing_read_weight", ["rule", "backend"], weights)
        yield _gauge("pgshift_routing_applied_timestamp_seconds", [], [((), self.plane.applied_at)])
        yield _gauge("pgshift_control_store_up", [], [((), int(self.plane.store_health.ok))])
        versions: dict[int, int] = {}
        for row in self.plane.instances:
            versions[row.version] = versions.get(row.version, 0) + 1
        yield _gauge("pgshift_control_instances", ["version"], [((str(v),), n) for v, n in sorted(versions.items())])
        yield _counter("pgshift_admin_changes", ["source"], [((k,), v) for k, v in self.plane.changes.items()])

        cache = ctx.analysis
        yield from self._mirror()
        yield _counter("pgshift_analysis_cache_hits", [], [((), cache.hits)])
        yield _counter("pgshift_analysis_cache_misses", [], [((), cache.misses)])

    def _mirror(self) -> Iterator[Metric]:
        manager = self.server.mirror
        keyed = ["mirror", "database"]
        streams = sorted(manager.streams.items())
        yield _gauge("pgshift_mirror_queue_transactions", keyed, [(k, s.queued) for k, s in streams])
        yield _gauge("pgshift_mirror_queue_bytes", keyed, [(k, s.queued_bytes) for k, s in streams])
        yield _gauge("pgshift_mirror_lag_seconds", keyed, [(k, s.lag_seconds) for k, s in streams])
        yield _counter("pgshift_mirror_applied", keyed, [(k, s.applied) for k, s in streams])
        yield _counter("pgshift_mirror_failed", keyed, [(k, s.failed) for k, s in streams])
        journal = manager.journal
        yield _counter("pgshift_mirror_journal_entries", ["mirror", "kind"], sorted(journal.counts.items()))
        unmirrored = [((m,), n) for (m, event), n in sorted(manager.counts.items()) if event == "unmirrored_txns"]
        yield _counter("pgshift_mirror_unmirrored_transactions", ["mirror"], unmirrored)
        tables = Counter(m for m, _, _ in journal.out_of_sync)
        mirrors = sorted(set(self.plane.live.routing.mirrors) | set(tables))
        yield _gauge("pgshift_mirror_out_of_sync_tables", ["mirror"], [((m,), tables[m]) for m in mirrors])
        yield _gauge("pgshift_mirror_detached", keyed, [(k, 1) for k in sorted(manager.detached)])
        covered = [((m,), n) for (m, event), n in sorted(manager.counts.items()) if event == "covered"]
        yield _counter("pgshift_mirror_covered_transactions", ["mirror"], covered)
        yield _gauge("pgshift_mirror_covered", ["mirror"], [((m,), 1) for m in sorted(manager.covered)])


Samples = Iterable[tuple[tuple[str, ...], float]]


def _counter(name: str, labels: list[str], items: Samples) -> CounterMetricFamily:
    family = CounterMetricFamily(name, HELP[name], labels=labels)
    for key, value in sorted(items):
        family.add_metric(list(key), value)
    return family


def _gauge(name: str, labels: list[str], items: Samples) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, HELP[name], labels=labels)
    for key, value in sorted(items):
        family.add_metric(list(key), value)
    return family


class MigrationCollector(Collector):
    """The migration's cuts and what their pauses cost (from the state the migrator holds)."""

    def __init__(self, migrator: Migrator) -> None:
        self.migrator = migrator

    def collect(self) -> Iterator[Metric]:
        state = self.migrator.state
        cuts = state.get("cuts") or []
        counts = Counter((str(c.get("direction")), str(c.get("result"))) for c in cuts)
        yield _counter("pgshift_migrate_cuts", ["direction", "result"], counts.items())
        last = cuts[-1] if cuts else None
        yield _gauge("pgshift_migrate_last_pause_seconds", [], [((), last["pause_ms"] / 1000)] if last else [])
        waits = (
            [(("0.5",), last["wait_p50_ms"] / 1000), (("0.99",), last["wait_p99_ms"] / 1000),
             (("1",), last["wait_max_ms"] / 1000)]
            if last else []
        )  # fmt: skip
        yield _gauge("pgshift_migrate_last_pause_wait_seconds", ["quantile"], waits)
        yield _gauge("pgshift_migrate_cut_in_progress", [], [((), 1 if state.get("cut") else 0)])


def build_registry(server: Server, plane: ControlPlane, migrator: Migrator | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(server, plane))
    if migrator is not None:
        registry.register(MigrationCollector(migrator))
    return registry
