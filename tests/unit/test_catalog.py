"""The shared function-volatility catalog: verdicts, claims, and learning from pg_proc's answer."""

from __future__ import annotations

import struct

from proxy.session.catalog import FunctionCatalog, lookup_sql
from proxy.wire.messages import ErrorResponse, frame


def row(*values: str) -> bytes:
    body = struct.pack("!h", len(values)) + b"".join(struct.pack("!i", len(v)) + v.encode() for v in values)
    return frame(ord("D"), body)


def test_unknown_then_learned() -> None:
    catalog = FunctionCatalog()
    assert catalog.verdict("app", {"public.twice", "bump"}) is None
    claimed = catalog.claim("app", {"public.twice", "bump", "ghost"})
    assert claimed == {"twice", "bump", "ghost"}
    assert catalog.claim("app", {"twice"}) == set()  # already being asked
    catalog.learn("app", claimed, [row("twice", "t"), row("bump", "f")])
    assert catalog.verdict("app", {"twice"}) is True
    assert catalog.verdict("app", {"twice", "bump"}) is False
    assert catalog.verdict("app", {"ghost"}) is False  # not in pg_proc: never trusted
    assert catalog.verdict("other_db", {"twice"}) is None


def test_a_failed_lookup_trusts_nothing() -> None:
    catalog = FunctionCatalog()
    names = catalog.claim("app", {"f"})
    catalog.learn("app", names, [ErrorResponse.build("ERROR", "42501", "permission denied").encode()])
    assert catalog.verdict("app", {"f"}) is False


def test_lookup_sql_quotes_names() -> None:
    sql = lookup_sql({"o'neil", "f"})
    assert "ARRAY['f', 'o''neil']" in sql and "provolatile" in sql
