"""Control-plane pieces without a proxy: version diffs, the state file, rate windows, SQLSTATEs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import RoutingConfig
from proxy.control.health import RateWindow
from proxy.control.store import FileStore, MemoryStore
from proxy.control.versions import RoutingVersion, describe_change
from proxy.errors import ConfigError, VersionConflict
from proxy.observability import LATENCY_BUCKETS, SUM, RequestStats
from proxy.wire.messages import ErrorResponse
from proxy.wire.replies import error_sqlstate


def routing(**fields: object) -> RoutingConfig:
    return RoutingConfig.model_validate({"primary": "old", **fields})


def test_describe_change_names_every_difference() -> None:
    before = routing(mirrors=["new"], rules=[{"name": "c", "tables": ["cities"], "reads": {"old": 1}}])
    after = routing(
        primary="new",
        mirrors=["old"],
        reads={"old": 90, "new": 10},
        sticky="session",
        rules=[{"name": "c", "tables": ["cities", "x"], "reads": {"new": 1}}, {"users": ["u"], "reads": {"old": 1}}],
    )
    assert describe_change(before, after) == [
        "primary old -> new",
        "mirrors ['new'] -> ['old']",
        "reads (all on primary) -> new=10 old=90",
        "sticky statement -> session",
        "rule c: reads old=1 -> new=1",
        "rule c: criteria changed",
        "rule rule2 added: reads old=1",
    ]
    assert describe_change(after, after) == ["no change"]
    assert describe_change(None, before) == ["initial: primary old, reads (all on primary)"]


def test_version_json_round_trip_is_exact() -> None:
    version = RoutingVersion(7, routing(reads={"old": 1, "new": 3}).named(), "flip", "me (127.0.0.1)", "n", 6, 1.5)
    assert RoutingVersion.from_json(json.loads(json.dumps(version.to_json()))) == version
    with pytest.raises(ConfigError, match="stored routing version is unreadable"):
        RoutingVersion.from_json({"version": "x"})


async def test_file_store_appends_durably_and_refuses_taken_numbers(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.jsonl"
    store = FileStore(path)
    assert await store.load() == []
    first = RoutingVersion(1, routing(), "config", "config.toml")
    second = RoutingVersion(2, routing(primary="new"), "flip", "x", parent=1)
    await store.append(first)
    await store.append(second)
    with pytest.raises(VersionConflict):
        await store.append(RoutingVersion(2, routing(), "put", "y", parent=1))
    again = FileStore(path)
    assert await again.load() == [first, second]
    assert await again.load(after=1) == [second]
    path.write_text(path.read_text() + '{"version": 3, "rou')
    with pytest.raises(ConfigError, match="line 3 is not valid JSON"):
        await FileStore(path).load()


async def test_memory_store_conflicts() -> None:
    store = MemoryStore()
    await store.append(RoutingVersion(1, routing(), "config", "c"))
    with pytest.raises(VersionConflict):
        await store.append(RoutingVersion(1, routing(), "put", "c"))


def test_request_stats_and_rates() -> None:
    stats = RequestStats()
    stats.observe("old", "read", 0.0002)
    stats.observe("old", "read", 20.0)  # past the last bucket: +Inf
    stats.observe("new", "write", 0.001)
    stats.error("old", "22012")
    series = stats.latency[("old", "read")]
    counts, total = series[:SUM], series[SUM]
    assert len(counts) == len(LATENCY_BUCKETS) + 1 and sum(counts) == 2 and counts[-1] == 1
    assert total == pytest.approx(20.0002)
    assert stats.totals("old") == (2, pytest.approx(20.0002), 1)
    window = RateWindow()
    assert window.rates(stats, "old").requests_per_s == 0.0  # no sample yet
    window.sample(stats, ["old", "new"])
    for _ in range(3):
        stats.observe("old", "read", 0.004)
    stats.error("old", "40001")
    rates = window.rates(stats, "old")
    assert rates.requests_per_s > 0 and rates.mean_latency_ms == pytest.approx(4.0)
    assert rates.error_ratio == pytest.approx(1 / 3)


def test_error_sqlstate() -> None:
    body = ErrorResponse({"S": "ERROR", "C": "22012", "M": "division by zero"}).encode()[5:]
    assert error_sqlstate(body, 0, len(body)) == "22012"
    assert error_sqlstate(b"SERROR\x00Mno code\x00\x00", 0, 17) == "XX000"


@given(st.binary(max_size=64))
def test_error_sqlstate_never_fails_on_garbage(body: bytes) -> None:
    code = error_sqlstate(body, 0, len(body))
    assert isinstance(code, str)
