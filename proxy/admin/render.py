"""Human-readable output of the operator commands: the status screen and the history table."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any


def clean(value: Any) -> str:
    """A value from the API as one printable line (no terminal escapes, newlines or tabs)."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _table(headers: list[str], rows: list[list[Any]], right: frozenset[int] = frozenset()) -> list[str]:
    """Aligned columns; ``right``: indexes of right-aligned (numeric) columns."""
    cells = [headers, *[[clean(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def _utc(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return _duration(time.time() - ts) + " ago"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _weights(weights: Any) -> str:
    if not weights:
        return "(all on the primary)"
    return " ".join(f"{k}={v}" for k, v in sorted(weights.items()))


def _number(value: Any, digits: int) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}f}"


def status_lines(state: dict[str, Any]) -> list[str]:
    version = state.get("version")
    changed = state.get("last_change") or {}
    routing = state.get("routing") or {}
    fixed = "" if state.get("live", True) else " (fixed at startup: [control] live = false)"
    out = [f"instance {clean(state.get('instance'))}: routing version {version}{fixed}"]
    if state.get("problem"):
        out.append(f"  PROBLEM: {clean(state['problem'])}")
    pause = state.get("pause") or {}
    if pause.get("paused"):
        out.append(
            f"  WRITES PAUSED for {_number(pause.get('paused_for_s'), 1)} s ({clean(pause.get('reason'))}): "
            f"{clean(pause.get('holding'))} session(s) waiting; POST /api/resume ends it"
        )
    note = f' — "{clean(changed["note"])}"' if changed.get("note") else ""
    out.append(
        f"  last change {_utc(changed.get('at'))} ({_ago(changed.get('at'))}) by {clean(changed.get('caller'))}"
        f" via {clean(changed.get('source'))}{note}"
    )

    out += ["", "routing"]
    out.append(f"  primary  {clean(routing.get('primary'))}")
    out.append(f"  mirrors  {clean(', '.join(routing.get('mirrors') or []) or '(none)')}")
    for mirror in state.get("mirror") or []:
        repair = mirror.get("out_of_sync_tables") or 0
        out.append(
            f"    {clean(mirror.get('name'))}: {clean(mirror.get('state'))}, queue {clean(mirror.get('queued'))}, "
            f"lag {_number(mirror.get('lag_seconds'), 3)} s, diverged {clean(mirror.get('diverged'))}"
            + (f", {repair} table(s) NEED REPAIR (pgshift mirror status)" if repair else "")
        )
    out.append(f"  reads    {clean(_weights(routing.get('reads')))}   sticky {clean(routing.get('sticky'))}")
    rules = routing.get("rules") or []
    if rules:
        rows = []
        for rule in rules:
            criteria = " ".join(
                f"{key}={','.join(rule[key])}" for key in ("tables", "users", "application_names") if rule.get(key)
            )
            rows.append([rule.get("name"), criteria, _weights(rule.get("reads")), rule.get("sticky")])
        out += _table(["RULE", "CRITERIA", "READS", "STICKY"], rows)

    store = state.get("store") or {}
    if store.get("ok", True):
        health = "ok"
    else:
        since = store.get("down_since")
        health = f"DOWN since {_utc(since)} ({_duration(time.time() - since) if since else '-'}): {store.get('error')}"
    out += ["", f"store  {clean(store.get('kind'))} {clean(store.get('location'))}: {clean(health)}"]

    instances = state.get("instances") or []
    if instances:
        out += ["", "instances"]
        rows = []
        for row in instances:
            notes = []
            if row.get("self"):
                notes.append("this instance")
            if row.get("version") != version:
                notes.append(f"<-- DIFFERENT VERSION (this instance is at {version})")
            age = row.get("heartbeat_age_s")
            rows.append([
                row.get("instance"), row.get("version"), "-" if age is None else f"{age:.1f}s",
                "STALE" if row.get("stale") else "no", ", ".join(notes),
            ])  # fmt: skip
        out += _table(["NAME", "VERSION", "HEARTBEAT", "STALE", ""], rows, right=frozenset({1, 2}))

    backends = state.get("backends") or {}
    if backends:
        out += ["", "backends"]
        rows = []
        down = []
        for name, b in backends.items():
            up = b.get("up")
            if up is False:
                down.append(f"  {clean(name)} is DOWN: {clean(b.get('probe_error'))}")
            ratio = b.get("error_ratio")
            rows.append([
                name, b.get("role"), "?" if up is None else ("up" if up else "DOWN"), _number(b.get("probe_ms"), 1),
                _number(b.get("requests_per_s"), 2), _number(b.get("mean_latency_ms"), 2),
                _number(b.get("errors_per_s"), 3), "-" if ratio is None else f"{ratio * 100:.2f}%",
                b.get("connections"),
            ])  # fmt: skip
        headers = ["NAME", "ROLE", "STATE", "PROBE ms", "REQ/s", "MEAN ms", "ERR/s", "ERRORS", "CONNS"]
        out += _table(headers, rows, right=frozenset(range(3, 9)))
        out += down

    out += verify_lines(state.get("verify"))

    sessions = state.get("sessions") or {}
    pinned = sessions.get("pinned_by_cause") or {}
    causes = f" ({', '.join(f'{k} {v}' for k, v in sorted(pinned.items()))})" if pinned else ""
    previous = sessions.get("on_previous_primary", 0)
    primary = routing.get("primary")
    by_primary = sessions.get("by_primary") or {}
    where = ", ".join(f"{k} {v}" for k, v in sorted(by_primary.items()) if k != primary and v)
    out += [
        "",
        f"sessions  {sessions.get('active', 0)} active, {sessions.get('starting', 0)} starting, "
        f"{sessions.get('in_transaction', 0)} in a transaction, {sessions.get('pinned', 0)} pinned{causes}, "
        f"{previous} on a previous primary" + (f" ({where})" if where else ""),
    ]
    return [clean(line) for line in out]


def verify_lines(verify: Any) -> list[str]:
    """The continuous sampling block of the status screen (nothing from a proxy without it)."""
    if not isinstance(verify, dict):
        return []
    if not verify.get("enabled"):
        return ["", "verify  off (set [verify] interval to sample old and new continuously)"]
    rounds = verify.get("rounds") or {}
    counts = ", ".join(f"{n} {k}" for k, n in rounds.items() if n)
    last = verify.get("last_round") or {}
    head = (
        f"verify  {clean(verify.get('source'))} -> {clean(verify.get('target'))}, {clean(verify.get('sample'))} rows "
        f"per table every {clean(verify.get('interval'))} s: {sum(rounds.values())} round(s)"
    ) + (f" ({counts})" if counts else "")
    if last.get("at") is not None:
        head += f"; last {_ago(last['at'])}: {clean(last.get('result'))}"
    out = ["", head]
    tables = verify.get("tables") or {}
    rows, flagged = [], []
    for name, t in tables.items():
        note = ""
        if t.get("differences"):
            note = f"<-- {t['differences']} DIFFERENCE(S)"
            flagged.append(name)
        elif t.get("unsettled"):
            note = f"{t['unsettled']} unsettled (kept changing)"
        elif t.get("error"):
            note = f"ERROR: {t['error']}"
        clean_at = t.get("last_clean_at")
        rows.append([
            name, f"{t.get('rows_checked', 0):,}", t.get("differences", 0), t.get("differences_found_total", 0),
            f"{_utc(clean_at)} ({_ago(clean_at)})" if clean_at else "never", note,
        ])  # fmt: skip
    if rows:
        headers = ["TABLE", "ROWS CHECKED", "DIFFERENCES", "FOUND TOTAL", "LAST CLEAN", ""]
        out += _table(headers, rows, right=frozenset({1, 2, 3}))
    elif last.get("result") != "error":
        out.append("  (no table compared yet)")
    if flagged:
        src, tgt = clean(verify.get("source")), clean(verify.get("target"))
        out.append(f"  {len(flagged)} table(s) NEED REPAIR (rows differ on {tgt}):")
        out += [f"    pgshift repair --from {src} --to {tgt} --table {clean(name)}" for name in flagged]
    if last.get("error"):
        out.append(f"  LAST ROUND FAILED: {clean(last['error'])}")
    elif verify.get("last_error"):
        out.append(f"  last error {_ago(verify.get('last_error_at'))}: {clean(verify['last_error'])}")
    return out


def history_lines(history: dict[str, Any]) -> list[str]:
    current = history.get("current")
    rows = [
        [
            ("* " if v.get("version") == current else "  ") + str(v.get("version")),
            _utc(v.get("created_at")),
            v.get("source"),
            v.get("caller"),
            v.get("note") or "",
            "; ".join(str(c) for c in v.get("changes") or []),
        ]
        for v in history.get("versions") or []
    ]
    lines = _table(["  VERSION", "TIME (UTC)", "SOURCE", "CALLER", "NOTE", "CHANGES"], rows)
    lines.append(f"(* current: version {current})")
    return lines


def mirror_lines(status: dict[str, Any]) -> list[str]:
    """``pgshift mirror status`` as text."""
    out = [
        f"dual write: mode {clean(status.get('mode'))}, unsafe writes: {clean(status.get('unsafe'))}, "
        f"ddl: {clean(status.get('ddl'))}, transactions committed: {clean(status.get('committed'))}",
        f"journal: {clean(status.get('journal') or '(memory only)')}"
        + (f"  ({status['journal_write_errors']} WRITE ERRORS)" if status.get("journal_write_errors") else ""),
    ]
    mirrors = status.get("mirrors") or []
    if not mirrors:
        out.append("no mirrors (set [routing] mirrors = [...] to dual-write)")
    for mirror in mirrors:
        out.append("")
        configured = "" if mirror.get("configured") else "  (no longer in routing.mirrors)"
        out.append(
            f"mirror {clean(mirror['name'])}{configured} — journal: diverged {mirror['diverged']}, failed "
            f"{mirror['failed']}, unmirrored {mirror['unmirrored']}; transactions not sent (detached): "
            f"{mirror['unmirrored_txns']}; sync timeouts: {mirror['sync_timeouts']}"
        )
        rows = [
            [
                d["database"], d["state"], d["queued"], d["queued_bytes"], _number(d["lag_seconds"], 3),
                d["applied"], d["failed"], d["last_applied_seq"],
                (d["detached"] or {}).get("reason") or d["last_error"] or "",
            ]
            for d in mirror["databases"]
        ]  # fmt: skip
        if rows:
            headers = ["database", "state", "queued", "bytes", "lag s", "applied", "failed", "last seq", "note"]
            out.extend("  " + line for line in _table(headers, rows, right=frozenset({2, 3, 4, 5, 6, 7})))
        tables = mirror.get("out_of_sync") or []
        if tables:
            out.append(f"  NEEDS REPAIR ({len(tables)} tables):")
            rows = [[t["database"], t["table"], _ago(t["since"]), t["reason"]] for t in tables]
            out.extend("    " + line for line in _table(["database", "table", "since", "first reason"], rows))
    recent = status.get("recent") or []
    if recent:
        out.append("")
        out.append("recent journal entries (newest last):")
        rows = [
            [_utc(e.get("at")), e.get("mirror", ""), e.get("kind", ""), ", ".join(e.get("tables") or []),
             (e.get("fingerprint") or "")[:16], e.get("reason", "")]
            for e in recent[-15:]
        ]  # fmt: skip
        out.extend("  " + line for line in _table(["at", "mirror", "kind", "tables", "fingerprint", "reason"], rows))
    return out
