"""[verify] (continuous sampling): config validation, the backend pair after routing changes, the
per-table bookkeeping of a round, the status lines, and the metrics documented in the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.admin.render import verify_lines
from proxy.cdc.sqlconn import resolve_endpoint
from proxy.config import Config, RoutingConfig, parse_config
from proxy.errors import ConfigError
from proxy.verify.compare import RowDifference
from proxy.verify.report import TableResult, VerifyReport
from proxy.verify.sampler import HELP, Sampler

README = Path(__file__).resolve().parents[2] / "README.md"


def config(verify: dict[str, Any] | None = None, **routing: Any) -> dict[str, Any]:
    return {
        "backends": {
            "old": {"dsn": "postgresql://app@127.0.0.1:5432/shop"},
            "new": {"dsn": "postgresql://127.0.0.1:5433/shop", "mirror_user": "sync"},
            "spare": {"dsn": "postgresql://127.0.0.1:5434/shop"},  # no account
        },
        "routing": {"primary": "old", **routing},
        **({"verify": verify} if verify is not None else {}),
    }


def test_defaults_are_off() -> None:
    verify = parse_config(config()).verify
    assert not verify.enabled and verify.interval == 0
    assert (verify.sample, verify.tables, verify.source, verify.target) == (100, [], None, None)
    assert (verify.recheck_after, verify.rechecks) == (None, 3)


def test_the_pair_defaults_to_the_primary_and_the_first_mirror() -> None:
    parsed = parse_config(config({"interval": 30}, mirrors=["new"]))
    assert parsed.verify.pair(parsed.routing) == ("old", "new")
    parsed = parse_config(config({"interval": 30, "target": "new", "sample": 5, "tables": ["a", "s.b"]}))
    assert parsed.verify.pair(parsed.routing) == ("old", "new")
    assert resolve_endpoint(parsed, "new").user == "sync"


@pytest.mark.parametrize(
    ("verify", "routing", "needle"),
    [
        ({"interval": 30}, {}, "verify.interval = 30 needs a backend to compare 'old' with: set verify.target"),
        ({"interval": 30, "target": "nwe"}, {}, "verify.target = 'nwe' is not a backend; declared backends: new, old"),
        ({"target": "nwe"}, {}, "verify.target = 'nwe' is not a backend"),  # a typo is reported even when off
        ({"interval": 30, "source": "x", "target": "new"}, {}, "verify.source = 'x' is not a backend"),
        ({"interval": 30, "target": "spare"}, {}, "backends.spare has no account for [verify] to read with"),
        ({"interval": 30, "source": "spare", "target": "new"}, {}, "backends.spare.mirror_user"),
        ({"interval": 30, "target": "old"}, {}, "verify compares 'old' with itself"),
        ({"interval": 30, "source": "new", "target": "new"}, {}, "source and target are both 'new'"),
        ({"interval": -1, "target": "new"}, {}, "verify.interval"),
        ({"interval": 30, "target": "new", "sample": 0}, {}, "verify.sample"),
        ({"interval": 30, "target": "new", "rechecks": -1}, {}, "verify.rechecks"),
        ({"interval": 30, "target": "new", "recheck_after": -2}, {}, "verify.recheck_after"),
        ({"interval": 30, "target": "new", "tables": ["a", "a"]}, {}, "tables lists a twice"),
        ({"interval": 30, "target": "new", "tables": [" "]}, {}, "tables has an empty name"),
        ({"interval": 30, "target": "new", "every": 3}, {}, "verify.every: unknown setting"),
    ],
)
def test_invalid(verify: dict[str, Any], routing: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(verify, **routing))
    assert needle in info.value.message


def routed(primary: str, *mirrors: str) -> RoutingConfig:
    return RoutingConfig(primary=primary, mirrors=list(mirrors))


def sampler(verify: dict[str, Any], **routing: Any) -> tuple[Sampler, Config]:
    parsed = parse_config(config({"interval": 1, **verify}, **routing))
    return Sampler(parsed.verify, lambda: parsed, lambda: parsed.routing), parsed


def test_the_pair_follows_a_flip() -> None:
    s, _ = sampler({}, mirrors=["new"])
    assert s.pair(routed("old", "new")) == ("old", "new")
    assert s.pair(routed("new", "old")) == ("new", "old")  # flip: the old primary became the mirror
    assert s.pair(routed("new")) == ("new", "old")  # no mirrors any more: the other of the startup pair
    assert s.pair(routed("old")) == ("old", "new")


def test_a_fixed_target_that_became_primary_is_compared_with_the_other_backend() -> None:
    s, _ = sampler({"target": "new"})
    assert s.pair(routed("old")) == ("old", "new")
    assert s.pair(routed("new", "old")) == ("old", "new")
    fixed, _ = sampler({"source": "old", "target": "new"})
    assert fixed.pair(routed("new", "old")) == ("old", "new")
    assert s.pair(routed("spare")) == ("spare", "new")  # (a primary the API installed: compared too)


def report(parsed: Config, *tables: TableResult) -> VerifyReport:
    return VerifyReport(resolve_endpoint(parsed, "old"), resolve_endpoint(parsed, "new"), "sample", list(tables))


def result(name: str, rows: int, *differences: RowDifference, key: bool = True, at: float = 100.0) -> TableResult:
    out = TableResult(name, ["id"] if key else [], ["id", "v"], rows_compared=rows, complete=True, checked_at=at)
    out.differences.extend(differences)
    return out


def test_rounds_are_recorded_per_table() -> None:
    s, parsed = sampler({"target": "new"})
    assert s._record(report(parsed, result("public.a", 10), result("public.nokey", 0, key=False))) == "clean"
    diff = RowDifference("different", ("7",), ["v"], {"v": "x"}, {"v": "y"})
    assert s._record(report(parsed, result("public.a", 10, diff, at=200.0))) == "differences"
    stats = s.tables["public.a"]
    assert (stats.rows_checked, stats.differences, stats.differences_found, stats.last_clean_at) == (20, 1, 1, 100.0)
    assert stats.keys == [{"kind": "different", "key": {"id": "7"}, "columns": ["v"], "source": {"v": "x"},
                           "target": {"v": "y"}}]  # fmt: skip
    assert "public.nokey" not in s.tables  # no primary key: not sampled, not shown
    assert s._record(report(parsed, result("public.a", 10, at=300.0))) == "clean"
    assert (stats.differences, stats.differences_found, stats.last_clean_at) == (0, 1, 300.0)
    assert s._record(report(parsed)) == "clean"
    assert s.tables == {}  # a table no longer there is dropped


def test_summary_and_status_lines() -> None:
    s, parsed = sampler({"target": "new"})
    s.source, s.target = "old", "new"
    diff = RowDifference("only_in_source", ("3",))
    s._record(report(parsed, result("public.a", 10, diff), result("public.b", 5)))
    s._finish("differences", 1000.0, 0.0, None)
    summary = s.summary()
    assert summary["tables"]["public.a"]["differences"] == 1 and summary["differences"] == 1
    assert summary["rounds"] == {"clean": 0, "differences": 1, "unsettled": 0, "error": 0}
    lines = verify_lines(summary)
    assert lines[1].startswith("verify  old -> new, 100 rows per table every 1.0 s: 1 round(s) (1 differences)")
    flagged = [line for line in lines if "DIFFERENCE(S)" in line]
    assert len(flagged) == 1 and "public.a" in flagged[0]
    assert "    pgshift repair --from old --to new --table public.a" in lines
    s._finish("error", 1001.0, 0.0, "cannot connect to backend new")
    assert verify_lines(s.summary())[-1] == "  LAST ROUND FAILED: cannot connect to backend new"
    assert verify_lines({"enabled": False, "interval": 0})[1].startswith("verify  off")
    assert verify_lines(None) == []


def test_every_verify_metric_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    missing = [name for name in HELP if f"`{name}" not in readme]
    assert not missing, f"README.md does not describe {missing}"
