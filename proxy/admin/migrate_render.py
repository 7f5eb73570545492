"""`pgshift migrate …` as text: the phase, every guard of the next step, the last cut and its pause."""

from __future__ import annotations

from typing import Any

from proxy.admin.render import _ago, _table, clean


def guard_lines(guards: list[dict[str, Any]]) -> list[str]:
    rows = [["ok" if g["ok"] else "BLOCKS", g["name"], clean(g["detail"])] for g in guards]
    return _table(["", "guard", "value"], rows) if rows else ["  (no guard)"]


def cut_lines(cut: dict[str, Any]) -> list[str]:
    head = (
        f"{cut.get('direction', '?')} cut {cut.get('from')} -> {cut.get('to')} ({cut.get('id')}): {cut.get('result')}"
    )
    if cut.get("result") == "aborted":
        head += f" — {clean(cut.get('reason'))}"
    out = [head]
    if cut.get("result") in ("done", "aborted"):
        out.append(
            f"  writes paused {cut.get('pause_ms', 0):g} ms (drain {cut.get('drain_ms', 0):g} ms); "
            f"{cut.get('held_requests', 0)} request(s) waited, "
            f"p50 {cut.get('wait_p50_ms', 0):g} ms, p99 {cut.get('wait_p99_ms', 0):g} ms, "
            f"max {cut.get('wait_max_ms', 0):g} ms"
        )
    timings = cut.get("timings_ms") or {}
    if timings:
        out.append("  steps (ms from start): " + ", ".join(f"{k} {v:g}" for k, v in timings.items()))
    out += [f"  note: {clean(n)}" for n in cut.get("notes") or []]
    return out


def status_lines(status: dict[str, Any]) -> list[str]:
    out = [
        f"migration {status['source']} -> {status['target']}: {status['label']}"
        + (
            f" (routing version {status['routing_version']}, primary {status['primary']}, "
            f"mirrors {', '.join(status['mirrors']) or 'none'})"
        ),
    ]
    if status.get("problem"):
        out.append(f"PROBLEM: {clean(status['problem'])}")
    if status.get("operation"):
        out.append(f"running: {clean(status['operation'])}")
    if status.get("cut"):
        cut = status["cut"]
        out.append(
            f"CUT IN PROGRESS: {cut['id']} ({cut['from']} -> {cut['to']}), step {cut.get('step')}, "
            f"on {cut.get('owner')}"
        )
    if status.get("quiet_period_left") is not None:
        left = status["quiet_period_left"]
        out.append(
            "reverse window: rollback stays instant; decommission "
            + (f"allowed in {left:g} s" if left else "allowed now")
        )
    nxt = status.get("next")
    if nxt:
        out.append(f"next: {nxt['step']} — {'ready' if nxt['ready'] else 'BLOCKED'}")
        out += ["  " + line for line in guard_lines(nxt["guards"])]
    back = status.get("rollback")
    if back:
        out.append(f"rollback: to {back['step']} — {'ready' if back['ready'] else 'BLOCKED'}")
        if back["guards"]:
            out += ["  " + line for line in guard_lines(back["guards"])]
    if status.get("last_cut"):
        out.append("last cut: " + "\n".join(cut_lines(status["last_cut"])))
    if status.get("instances"):
        out.append("instances: " + ", ".join(f"{i['instance']} (v{i['version']})" for i in status["instances"]))
    journal = status.get("journal") or []
    if journal:
        out.append("journal:")
        for entry in journal[-8:]:
            what = entry.get("to") or entry.get("reason") or ""
            out.append(
                f"  {_ago(entry.get('at'))} {entry.get('cut') or '-'} {entry.get('step')} {clean(what)}".rstrip()
            )
    return out


def step_lines(answer: dict[str, Any]) -> list[str]:
    out = []
    for taken in answer.get("taken") or []:
        if "direction" in taken:
            out += cut_lines(taken)
        else:
            out.append(
                f"{taken.get('step')}: {taken.get('result')}"
                + (f" (routing version {taken['version']})" if taken.get("version") else "")
            )
            out += [f"  {clean(line)}" for line in taken.get("lines") or []]
    status = answer.get("status")
    if status:
        out.append(f"now: {status['label']}" + (f"; next: {status['next']['step']}" if status.get("next") else ""))
    return out
