"""The layer table of DESIGN.md §2, enforced: an import arrow points only downward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "proxy"

# Which top-level parts of `proxy` each part may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "fileio": set(),
    "config": {"errors"},
    "localpg": {"errors"},
    "observability": {"errors", "config"},
    "wire": {"errors"},
    "sql": {"errors", "config"},
    "routing": {"errors", "config", "sql"},
    "backends": {"errors", "config", "wire", "observability"},
    # change data capture from the old database: pgoutput decoding, the replication connection,
    # and applying the changes with the dual-write apply stream; the D1 feed (cdc/d1feed.py) writes
    # the changes into a D1 store through the d1 layer
    "cdc": {"errors", "config", "wire", "backends", "mirror", "d1"},
    # dual write: capture (used by sessions) and the apply streams (own backend connections)
    "mirror": {"errors", "config", "wire", "backends", "routing", "sql", "fileio"},
    # Cloudflare D1 as a target for reference tables: the REST API client (httpx), type mapping,
    # schema and row writes; catalog reads go through a connection the caller passes in
    "d1": {"errors", "config"},
    "session": {"errors", "config", "wire", "backends", "routing", "sql", "observability", "mirror"},
    "server": {"errors", "config", "session", "routing", "sql", "observability", "mirror"},
    "control": {"errors", "config", "routing", "observability", "fileio"},
    "admin": {"errors", "config", "server", "control", "observability", "migrate"},
    # the guarded migration (issue 9): phases and guards over the control plane, the cut's pause
    # through the server, the change stream's handover and sequences through cdc, the final verify
    "migrate": {"errors", "config", "server", "control", "cdc", "verify", "fileio"},
    # (the composition root starts the verify layer's continuous sampler; admin gets it as a Protocol)
    "app": {"errors", "config", "server", "routing", "observability", "control", "admin", "verify", "migrate"},
    # the demo also starts the local D1 and applies its schema (read through the cdc layer's connection)
    "demo": {"errors", "config", "localpg", "app", "d1", "cdc"},
    # the validator: compares old and new through the cdc layer's SQL connections (issue 7), and a
    # D1 store with its Postgres source through the d1 layer's client (d1side.py)
    "verify": {"errors", "config", "wire", "backends", "cdc", "d1"},
    "cli": {"errors", "config", "app", "demo", "wire", "localpg", "admin", "cdc", "d1", "verify"},
    "__main__": {"cli"},
    "__init__": set(),
}
# Foreign modules that must never appear in a layer (sans-IO codec; pure routing decisions).
FORBIDDEN: dict[str, set[str]] = {
    "wire": {"asyncio", "socket", "ssl", "selectors", "pglast", "httpx", "asyncpg", "uvloop"},
    "routing": {"asyncio", "socket", "ssl", "pglast", "httpx", "asyncpg"},
    "control": {"pglast", "aiohttp"},
    "sql": {"asyncio", "socket", "httpx", "asyncpg"},
    "mirror": {"asyncpg"},  # replays the client's own frames: our wire codec, not a driver
    "cdc": {"asyncpg", "pglast"},  # the replication protocol on our own codec
    "verify": {"asyncpg", "pglast"},  # our own SQL client, like cdc
    "d1": {"asyncpg", "pglast"},  # HTTP to D1; Postgres only through the caller's connection
}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layering(path: Path) -> None:
    part = _part(path)
    assert part in ALLOWED, f"{path}: new top-level part {part!r}; add it to the layer table"
    for name in _imports(path):
        top = name.split(".")[0]
        if top == "proxy":
            target = name.split(".")[1] if "." in name else "__init__"
            assert target in (part, "__init__") or target in ALLOWED[part], (
                f"{path}: {part} must not import proxy.{target}"
            )
        else:
            assert top not in FORBIDDEN.get(part, set()), f"{path}: {part} must not use {top}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_has_purpose_line(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path} has no docstring stating its purpose"
