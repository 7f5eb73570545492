"""Password lookup in a libpq password file (~/.pgpass or PGPASSFILE), as libpq does it."""

from __future__ import annotations

import os
from pathlib import Path


def _fields(line: str) -> list[str]:
    # Fields are separated by ':'; a backslash escapes ':' and '\' (libpq-pgpass.html).
    out, cur, esc = [], [], False
    for ch in line:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ":":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def lookup(host: str, port: int, dbname: str, user: str, path: Path | None = None) -> str | None:
    """First matching line wins; '*' matches anything. Unreadable file → None (libpq ignores it too)."""
    if path is None:
        env = os.environ.get("PGPASSFILE")
        path = Path(env) if env else Path.home() / ".pgpass"
    try:
        text = path.read_text()
    except OSError:
        return None
    wanted = (host, str(port), dbname, user)
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        fields = _fields(raw)
        if len(fields) != 5:
            continue
        host_f = fields[0]
        if host_f == "localhost" and (host.startswith("/") or host in ("127.0.0.1", "::1")):
            host_f = host  # libpq matches 'localhost' for socket connections; loopback is the same here
        pattern = (host_f, fields[1], fields[2], fields[3])
        if all(p == "*" or p == w for p, w in zip(pattern, wanted, strict=True)):
            return fields[4]
    return None
