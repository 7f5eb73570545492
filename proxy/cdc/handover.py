"""The change stream's part in a cut-over: catch up, stop and hold it, release it again.

The cut (migrate/cut.py) calls these while every write through pgshift is paused:

* ``caught_up``: the slot's confirmed position reached the end of the source's WAL as inserted
  after the drain (after a synchronous commit of our own, which makes the walsender see it at
  once), i.e. the target committed every change the source committed before the pause.
  The running sync reports promptly when idle (replication.py, advance_when_idle), so this takes
  milliseconds once the last transactions are applied.
* ``hold``: marks the stream held in its state row (``sync start`` refuses to run while it is) and
  ends the walsender streaming from the slot. The slot stays: decommission drops it.
* ``release``: a rollback clears the hold and moves the slot to the source's current position —
  while paused, source and target are equal, and the reverse window's writes (which came from the
  target) must not be replayed onto it. ``pgshift sync start`` then resumes from there.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.cdc.pgoutput import format_lsn, parse_lsn
from proxy.cdc.sqlconn import Endpoint, SqlConnection, quote_literal
from proxy.cdc.sync import STATE_TABLE, _read_state, release_slot, slot_info
from proxy.errors import PgShiftError

POLL = 0.003


async def stream_state(source: Endpoint, target: Endpoint, slot: str) -> dict[str, Any]:
    """What the cut needs to know: the state row on the target (None: no sync) and the slot."""
    async with await SqlConnection.connect(target) as tgt:
        state = await _read_state(tgt, slot)
    async with await SqlConnection.connect(source) as src:
        info = await slot_info(src, slot)
    return {"state": state, "slot": info}


async def stream_row(target: Endpoint, slot: str) -> dict[str, Any] | None:
    """The stream's state row on the target (None: no sync ever ran there)."""
    async with await SqlConnection.connect(target, "pgshift-migrate") as tgt:
        return await _read_state(tgt, slot)


async def caught_up(src: SqlConnection, slot: str, within: float) -> dict[str, Any]:
    """Wait until the slot confirmed the end of the source's WAL as it stands now; the figures
    either way. ``src``: a connection to the source (opened before the pause)."""
    started = time.monotonic()
    # With synchronous_commit = off (a common setting) committed WAL reaches the walsender only
    # when the WAL writer flushes it, up to wal_writer_delay later. A synchronous commit of our own
    # that writes WAL (a logical message: pgoutput leaves it out unless asked) flushes everything
    # before it at once. Without the privilege for it, the WAL writer will do.
    try:
        for sql in (
            "begin",
            "set local synchronous_commit = on",
            "select pg_logical_emit_message(true, 'pgshift', 'cut-over catch-up')",
            "commit",
        ):
            await src.query(sql)
    except PgShiftError:
        await src.query("rollback")
    # The goal: the end of the WAL inserted now (every commit before the pause lies below it).
    # Not pg_current_wal_flush_lsn(): with asynchronous commits it lags behind commits made.
    rows = await src.query("select pg_current_wal_insert_lsn()::text")
    goal = parse_lsn(str(rows[0][0]))
    while True:
        info = await slot_info(src, slot)
        if info is None:
            raise PgShiftError(f'the change stream\'s slot "{slot}" is gone from {src.endpoint.backend}')
        confirmed = parse_lsn(info["confirmed_flush_lsn"]) if info["confirmed_flush_lsn"] else 0
        waited = time.monotonic() - started
        result = {
            "goal_lsn": format_lsn(goal),
            "confirmed_lsn": format_lsn(confirmed),
            "behind_bytes": max(0, goal - confirmed),
            "active": bool(info["active"]),
            "catchup_ms": round(waited * 1000, 2),
        }
        if confirmed >= goal:
            return {"ok": True, **result}
        if waited >= within:
            return {"ok": False, **result}
        await asyncio.sleep(POLL)


async def hold(src: SqlConnection, tgt: SqlConnection, slot: str, reason: str) -> list[str]:
    """Mark the stream held, then end its walsender. Caught up and paused, it has nothing left to
    apply, so the swap need not wait for the walsender to be gone (a rollback's release does)."""
    await tgt.query(
        f"update {STATE_TABLE} set hold = {quote_literal(reason)}, updated_at = now() "
        f"where slot = {quote_literal(slot)}"
    )
    rows = await src.query(
        "select pg_terminate_backend(active_pid)::text from pg_replication_slots "
        f"where slot_name = {quote_literal(slot)} and active"
    )
    ended = "; its walsender was ended" if rows and rows[0][0] == "true" else ""
    return [f'the change stream "{slot}" is held{ended} (the slot stays until decommission)']


async def hold_endpoints(source: Endpoint, target: Endpoint, slot: str, reason: str) -> list[str]:
    tgt = await SqlConnection.connect(target, "pgshift-migrate")
    async with tgt, await SqlConnection.connect(source, "pgshift-migrate") as src:
        return await hold(src, tgt, slot, reason)


async def release(src: SqlConnection, tgt: SqlConnection, slot: str) -> list[str]:
    """A rollback, source and target equal and paused: move the slot to the present, lift the hold."""
    lines: list[str] = []
    info = await slot_info(src, slot)
    if info is not None:
        if info["active"] and not await release_slot(src, slot, int(info["active_pid"]), lines):
            raise PgShiftError(f'slot "{slot}" is in use (process {info["active_pid"]}): {"; ".join(lines)}')
        rows = await src.query(f"select pg_replication_slot_advance({quote_literal(slot)}, pg_current_wal_lsn())::text")
        lines.append(f'slot "{slot}" moved to the present ({rows[0][0]}): `pgshift sync start` resumes from there')
    await tgt.query(
        f"update {STATE_TABLE} set hold = null, phase = 'released', process = null, updated_at = now() "
        f"where slot = {quote_literal(slot)}"
    )
    lines.append("the change stream is released: start it again with `pgshift sync start`")
    return lines


async def release_endpoints(source: Endpoint, target: Endpoint, slot: str) -> list[str]:
    tgt = await SqlConnection.connect(target, "pgshift-migrate")
    async with tgt, await SqlConnection.connect(source, "pgshift-migrate") as src:
        return await release(src, tgt, slot)


async def unhold(target: Endpoint, slot: str) -> None:
    """An aborted cut: clear the hold, leave the slot where it is (nothing was swapped)."""
    async with await SqlConnection.connect(target) as tgt:
        await tgt.query(f"update {STATE_TABLE} set hold = null where slot = {quote_literal(slot)}")
