"""`pgshift demo`: two throw-away clusters with a car-marketplace sample, the proxy in front, and
(when node and d1local's packages are there) a local Cloudflare D1 with the store "edge"."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from proxy.config import Config, parse_config
from proxy.d1.local import LocalD1, missing_reason
from proxy.errors import ClusterError, PgShiftError
from proxy.localpg import LocalCluster, create_cluster

log = logging.getLogger(__name__)

# Fixed ports so that the repository's config.toml points at the demo clusters.
OLD_PORT = 54321
NEW_PORT = 54322
ADMIN_PORT = 9187
DATABASE = "marketplace"
# The demo's D1 store: the sample's reference tables, copied from "old" into the local D1.
D1_STORE = "edge"
D1_TABLES = ("cities", "categories")


def demo_config(
    proxy_port: int,
    old_port: int = OLD_PORT,
    new_port: int = NEW_PORT,
    *,
    admin_port: int = ADMIN_PORT,
    token: str | None = None,
    d1: dict[str, object] | None = None,
) -> dict[str, Any]:
    """The configuration config.toml spells out: clients' users and databases pass through;
    ``token``: the admin token (the demo makes one, so that routing can be changed live);
    ``d1``: a local D1's ``LocalD1.store()``, declared as [stores.edge] for the sample's reference
    tables, fed from "old"."""
    admin: dict[str, Any] = {"port": admin_port}
    if token is not None:
        admin["token"] = token
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "admin": admin,
        "backends": {
            # (mirror_user: ready for dual write, e.g. PATCH /api/routing {"mirrors": ["new"]})
            "old": {"dsn": f"postgresql://127.0.0.1:{old_port}?sslmode=disable", "mirror_user": "postgres"},
            "new": {"dsn": f"postgresql://127.0.0.1:{new_port}?sslmode=disable", "mirror_user": "postgres"},
        },
        "routing": {"primary": "old"},
    }
    if d1 is not None:
        config["stores"] = {D1_STORE: {**d1, "tables": list(D1_TABLES), "source": "old"}}
    return config


def to_toml(config: dict[str, Any]) -> str:
    """``config`` as TOML text (tomli-w: the writing half of the standard library's tomllib)."""
    return tomli_w.dumps(config)


def start_clusters(old_port: int = OLD_PORT, new_port: int = NEW_PORT) -> tuple[LocalCluster, LocalCluster]:
    """old: schema and data; new: the same schema, empty (phase 0, "shadow", of a migration)."""
    old = create_cluster("old", port=old_port)
    try:
        new = create_cluster("new", port=new_port)
    except BaseException:
        old.destroy()
        raise
    try:
        sql = resources.files("proxy.demo").joinpath("marketplace.sql").read_text()
        for cluster in (old, new):
            cluster.psql("create database marketplace")
        old.psql(sql, dbname="marketplace")
        schema = subprocess.run(
            [
                str(old.bindir / "pg_dump"),
                "--schema-only",
                "--no-owner",
                "-h",
                old.host,
                "-p",
                str(old.port),
                "-U",
                "postgres",
                "marketplace",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if schema.returncode != 0:
            raise ClusterError("pg_dump of the demo schema failed", detail=schema.stderr)
        new.psql(schema.stdout, dbname="marketplace")
    except BaseException:
        new.destroy()
        old.destroy()
        raise
    return old, new


@dataclass
class DemoD1:
    """The demo's local D1, and the demo's config with [stores.edge] written to ``config_path``
    (a temporary directory: ``close()`` stops the server and removes it)."""

    server: LocalD1
    config: Config
    config_path: Path
    store: dict[str, Any]  # the [stores.edge] table

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.config_path.parent, ignore_errors=True)


def d1_left_out(reason: str) -> str:
    """The one line the demo prints when it goes on without D1."""
    enable = "" if "npm ci" in reason else "; to include it: `cd d1local && npm ci` (Node.js 20+)"
    return f"D1 left out: {reason}{enable}"


def start_d1(make_config: Callable[[dict[str, object]], dict[str, Any]]) -> tuple[DemoD1 | None, str | None]:
    """Start the local D1, make the demo's config with store "edge" on it (``make_config(server.store())``:
    demo_config with ``d1=``), create the store's tables on D1 (what `pgshift d1 schema --apply` does)
    and write that config to a temporary file. (None, why) when the local D1 cannot run here or any
    step fails: the demo goes on without it."""
    reason = missing_reason()
    if reason is not None:
        return None, reason
    server: LocalD1 | None = None
    directory: Path | None = None
    try:
        server = LocalD1.start(timeout=30)
        data = make_config(server.store())
        config = parse_config(data, "demo config")
        _apply_d1_schema(config)
        directory = Path(tempfile.mkdtemp(prefix="pgshift-demo-"))
        path = directory / "pgshift-demo.toml"
        path.write_text(
            "# pgshift demo's configuration (written by `pgshift demo`, removed when it stops).\n" + to_toml(data)
        )
        return DemoD1(server, config, path, data["stores"][D1_STORE]), None
    except BaseException as exc:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        if server is not None:
            server.stop()
        if not isinstance(exc, Exception):  # Ctrl-C: the demo's own cleanup follows
            raise
        if isinstance(exc, PgShiftError):
            why = exc.message + (f" ({exc.detail.strip().splitlines()[-1]})" if exc.detail else "")
        else:
            why = f"{type(exc).__name__}: {exc}"
        log.debug("local D1 left out", exc_info=True)
        return None, why


def _apply_d1_schema(config: Config) -> None:
    """`pgshift d1 schema --apply --store edge --database marketplace`, in-process."""
    from proxy.app import run
    from proxy.cdc.sqlconn import SqlConnection, resolve_endpoint
    from proxy.d1.client import D1Client
    from proxy.d1.schema import apply_schema, read_pg_tables, to_d1

    store = config.stores[D1_STORE]
    endpoint = resolve_endpoint(config, store.source or config.routing.primary, database=DATABASE)

    async def work() -> None:
        async with await SqlConnection.connect(endpoint, application_name="pgshift-d1") as conn:
            tables = to_d1(await read_pg_tables(conn, store.tables))
        async with D1Client.from_store(D1_STORE, store) as client:
            result = await apply_schema(client, tables)
        if not result.ok:
            raise PgShiftError(f"D1's tables differ from the sample's: {result.differences}")

    run(work())


def _d1_banner(d1: DemoD1, *, no_proxy: bool) -> str:
    config = shlex.quote(str(d1.config_path))
    base = f"--store {D1_STORE} --config {config} --database {DATABASE}"
    server = d1.server
    query = json.dumps({"sql": "select * from cities order by id limit 5"})
    url = f"{server.api_base}/accounts/{server.account_id}/d1/database/{server.database_ids[0]}/query"
    text = f"""
D1: a local Cloudflare D1 ({server.api_base}) holds the tables of store "{D1_STORE}"
({", ".join(D1_TABLES)}, from "old"), declared in the demo's config {d1.config_path}.
Copy the rows and keep streaming changes (until Ctrl-C), compare D1 with "old", read D1:
  pgshift d1 sync {base}
  pgshift verify {base}
  curl -s -H "Authorization: Bearer {server.token}" -d '{query}' \\
      {url}
"""
    if no_proxy:
        section = to_toml({"stores": {D1_STORE: d1.store}}).strip()
        text += f"""
To use config.toml instead, add (the token and port are this run's):
{section}
"""
    return text


def _control(admin_port: int, token: str) -> str:
    where = "" if admin_port == ADMIN_PORT else f" --admin http://127.0.0.1:{admin_port}"
    return f"""
Change routing live, from another terminal in this directory:
  export PGSHIFT_ADMIN_TOKEN={token}
  pgshift status{where}
  pgshift weights set old=50 new=50{where}    ("new" is empty: about half the counts read 0)
  pgshift flip --primary new{where}           (writes go to new)
  pgshift rollback --to 1{where}
  curl -s http://127.0.0.1:{admin_port}/metrics | grep pgshift_routing
"""


def _banner(proxy_port: int, old: LocalCluster, new: LocalCluster) -> str:
    dsn = f"postgresql://postgres@127.0.0.1:{proxy_port}/marketplace"
    return f"""
pgshift demo is running.

  proxy      {dsn}
  old (primary)  {old.dsn(dbname="marketplace")}
  new            {new.dsn(dbname="marketplace")}

Try:
  psql "{dsn}" -c "select c.name, count(*) from listings l join vehicles v on v.id = l.vehicle_id \\
      join categories c on c.id = v.category_id group by 1 order by 2 desc limit 5"
  pgbench -n -S -T 5 -c 4 "{dsn}"        (after: pgbench -i "{dsn}")
  psql "{dsn}" -c "select pg_backend_pid(), current_user, inet_server_port()"
"""


def run_demo(
    port: int,
    *,
    proxy: bool = True,
    admin_port: int = ADMIN_PORT,
    old_port: int = OLD_PORT,
    new_port: int = NEW_PORT,
) -> int:
    from proxy.app import run, serve

    print("starting two throw-away Postgres clusters (old, new) and loading the sample ...", flush=True)
    old, new = start_clusters(old_port, new_port)
    d1: DemoD1 | None = None
    try:
        token = secrets.token_hex(12)

        def make_config(store: dict[str, object] | None = None) -> dict[str, Any]:
            return demo_config(port, old_port, new_port, admin_port=admin_port, token=token, d1=store)

        why = missing_reason()
        if why is None:
            print("starting the local D1 (Cloudflare D1's API over workerd, from d1local/) ...", flush=True)
            d1, why = start_d1(make_config)
        if d1 is None:
            print(d1_left_out(why or "unknown"), flush=True)
            config = parse_config(make_config(), "demo config")
        else:
            config = d1.config
        d1_text = "" if d1 is None else _d1_banner(d1, no_proxy=not proxy)
        if not proxy:
            print(_banner(port, old, new).replace("pgshift demo is running.", "Clusters are up (no proxy).") + d1_text)
            print("Run `pgshift serve --config config.toml` in another terminal; Ctrl-C here to stop.")
            # SIGTERM ends the wait like Ctrl-C, so the clusters are removed either way.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
            return 0

        def ready(_running: object) -> None:
            print(_banner(port, old, new) + _control(admin_port, token) + d1_text, flush=True)
            also = ", removes both clusters and stops the local D1" if d1 is not None else " and removes both clusters"
            print(f"Ctrl-C stops the proxy{also}.", flush=True)

        run(serve(config, on_ready=ready))
        return 0
    finally:
        if d1 is not None:
            print("stopping the local D1 ...", flush=True)
            with contextlib.suppress(Exception):  # (the clusters go in any case)
                d1.close()
        print("removing the demo clusters ...", flush=True)
        new.destroy()
        old.destroy()


__all__ = [
    "ADMIN_PORT",
    "D1_STORE",
    "D1_TABLES",
    "NEW_PORT",
    "OLD_PORT",
    "DemoD1",
    "d1_left_out",
    "demo_config",
    "run_demo",
    "start_clusters",
    "start_d1",
    "to_toml",
]
