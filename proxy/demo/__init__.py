"""`pgshift demo`: two throw-away clusters with a car-marketplace sample, and the proxy in front."""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import subprocess
from importlib import resources
from typing import Any

from proxy.config import parse_config
from proxy.errors import ClusterError
from proxy.localpg import LocalCluster, create_cluster

log = logging.getLogger(__name__)

# Fixed ports so that the repository's config.toml points at the demo clusters.
OLD_PORT = 54321
NEW_PORT = 54322
ADMIN_PORT = 9187


def demo_config(
    proxy_port: int,
    old_port: int = OLD_PORT,
    new_port: int = NEW_PORT,
    *,
    admin_port: int = ADMIN_PORT,
    token: str | None = None,
) -> dict[str, Any]:
    """The configuration config.toml spells out: clients' users and databases pass through;
    ``token``: the admin token (the demo makes one, so that routing can be changed live)."""
    admin: dict[str, Any] = {"port": admin_port}
    if token is not None:
        admin["token"] = token
    return {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "admin": admin,
        "backends": {
            # (mirror_user: ready for dual write, e.g. PATCH /api/routing {"mirrors": ["new"]})
            "old": {"dsn": f"postgresql://127.0.0.1:{old_port}?sslmode=disable", "mirror_user": "postgres"},
            "new": {"dsn": f"postgresql://127.0.0.1:{new_port}?sslmode=disable", "mirror_user": "postgres"},
        },
        "routing": {"primary": "old"},
    }


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
    try:
        token = secrets.token_hex(12)
        config = parse_config(demo_config(port, old_port, new_port, admin_port=admin_port, token=token), "demo config")
        if not proxy:
            print(_banner(port, old, new).replace("pgshift demo is running.", "Clusters are up (no proxy)."))
            print("Run `pgshift serve --config config.toml` in another terminal; Ctrl-C here to stop.")
            # SIGTERM ends the wait like Ctrl-C, so the clusters are removed either way.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
            return 0

        def ready(_running: object) -> None:
            print(_banner(port, old, new) + _control(admin_port, token), flush=True)
            print("Ctrl-C stops the proxy and removes both clusters.", flush=True)

        run(serve(config, on_ready=ready))
        return 0
    finally:
        print("removing the demo clusters ...", flush=True)
        new.destroy()
        old.destroy()


__all__ = ["ADMIN_PORT", "NEW_PORT", "OLD_PORT", "demo_config", "run_demo", "start_clusters"]
