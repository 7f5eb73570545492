"""Command line: `pgshift serve | passwd | demo`, the operator commands that call a running proxy's
admin API: `status | weights set | flip | rollback | history | reload` (also `python -m proxy …`),
and `sync check | sequences | start | status | stop`, which talk to the backends themselves."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.admin.render import clean, history_lines, mirror_lines, status_lines
from proxy.errors import ConfigError, PgShiftError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from proxy.admin.client import AdminClient
    from proxy.cdc.sqlconn import Endpoint

EXIT_USAGE = 2  # usage error, or a local configuration problem (argparse exits 2 too)

EXIT_CODES = """\
exit codes (the admin commands: status, weights, flip, rollback, history, reload):
  0  success, including a change that was already in effect ("no change")
  2  usage error, or a local configuration problem
  3  the admin API could not be reached (connection refused, timeout, name resolution)
  4  the admin API refused the request (HTTP 4xx: invalid 400, token 401/403, unknown 404,
     version conflict 409, body too large 413); its message is printed as "pgshift: <message>"
  5  the proxy failed to do it (HTTP 5xx, e.g. 503: control store unreachable)

The admin commands find the API at --admin URL, else at the [admin] host and port of --config
(default ./config.toml, else http://127.0.0.1:9187); the token comes from $PGSHIFT_ADMIN_TOKEN,
else the config's [admin] token."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "debug":  # httpx logs every request at INFO (the admin API, the D1 API)
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import run, serve
    from proxy.config import load_config

    config = load_config(args.config)
    logging.getLogger("proxy").info("pgshift %s starting (config %s)", __version__, args.config)
    run(serve(config, config_path=args.config))
    return 0


def _cmd_passwd(args: argparse.Namespace) -> int:
    from proxy.wire.auth import md5_password_hash, scram_verifier

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            raise PgShiftError("passwords do not match; nothing printed")
    if not password:
        raise PgShiftError("empty password refused")
    if args.md5:
        print(f'[auth.users.{args.user}]\nmethod = "md5"\nmd5 = "{md5_password_hash(args.user, password)}"')
    else:
        print(f'[auth.users.{args.user}]\nmethod = "scram-sha-256"\nverifier = "{scram_verifier(password)}"')
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(
        args.port, proxy=not args.no_proxy, admin_port=args.admin_port, old_port=args.old_port, new_port=args.new_port
    )


# --- operator commands: calls to a running proxy's admin API ----------------------------------


def _admin(args: argparse.Namespace) -> AdminClient:
    from proxy.admin.client import AdminClient, find_target

    explicit = args.config is not None
    target, warning = find_target(args.config if explicit else Path("config.toml"), url=args.admin, required=explicit)
    if warning:
        print(f"pgshift: warning: {warning}", file=sys.stderr)
    return AdminClient(target, timeout=args.timeout)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _print_change(result: dict[str, Any]) -> None:
    if not result.get("changed"):
        print(f"no change: routing is already at version {result.get('version')}")
        return
    print(f"routing version {result.get('version')} (changed)")
    for line in result.get("changes") or []:
        print(f"  {clean(line)}")


def _mutation(args: argparse.Namespace, call: Any) -> int:
    with _admin(args) as api:
        result: dict[str, Any] = call(api)
    if args.json:
        _print_json(result)
    else:
        _print_change(result)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None:
        if args.json:
            raise ConfigError("--watch redraws the table; for scripts use --json without --watch")
        return _watch_status(args)
    with _admin(args) as api:
        state = api.state()
    if args.json:
        _print_json(state)
    else:
        for line in status_lines(state):
            print(line)
    return 0


def _watch_status(args: argparse.Namespace) -> int:
    """Redraw the status screen every ``--watch`` seconds until Ctrl-C (for a read switch: watch
    latency and errors move while weights change). An unreachable API is shown, and retried."""
    import signal

    from proxy.admin.client import AdminUnreachable

    # Ctrl-C (SIGINT) ends it, even when started where SIGINT is ignored (a background job of a
    # script inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with _admin(args) as api:
        try:
            while True:
                try:
                    lines = status_lines(api.state())
                except AdminUnreachable as exc:
                    lines = [f"pgshift: {exc.message} (retrying)"]
                stamp = time.strftime("%H:%M:%S")
                sys.stdout.write("\x1b[H\x1b[2J" + f"every {args.watch:g}s, {stamp}\n" + "\n".join(lines) + "\n")
                sys.stdout.flush()
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _weight(token: str) -> tuple[str, int]:
    """``NAME=W`` with W a whole number >= 0 (ASCII digits only: no sign, no decimals)."""
    name, sep, value = token.partition("=")
    if not sep or not name or not re.fullmatch(r"[0-9]+", value):
        raise argparse.ArgumentTypeError(f"{token!r}: expected NAME=W with W a whole number 0 or more, e.g. old=90")
    return name, int(value)


def _cmd_weights_set(args: argparse.Namespace) -> int:
    reads: dict[str, int] = {}
    for name, weight in args.weights:
        if name in reads:
            raise ConfigError(f"backend {name!r} is given twice")
        reads[name] = weight
    return _mutation(
        args, lambda api: api.set_reads(reads, rule=args.rule, note=args.note, expect_version=args.expect_version)
    )


def _cmd_flip(args: argparse.Namespace) -> int:
    return _mutation(
        args,
        lambda api: api.flip(args.primary, force=args.force, note=args.note, expect_version=args.expect_version),
    )


def _cmd_rollback(args: argparse.Namespace) -> int:
    return _mutation(args, lambda api: api.rollback(args.to, note=args.note, expect_version=args.expect_version))


def _cmd_reload(args: argparse.Namespace) -> int:
    with _admin(args) as api:
        result = api.reload()
    if args.json:
        _print_json(result)
        return 0
    changed = "routing changed" if result.get("routing_changed") else "routing unchanged"
    print(f"config reloaded: routing version {result.get('version')} ({changed})")
    for warning in result.get("warnings") or []:
        print(f"warning: {clean(warning)}")
    return 0


def _cmd_pause(args: argparse.Namespace) -> int:
    with _admin(args) as api:
        result = api.pause(drain_timeout=args.drain_timeout, max_seconds=args.max, reason=args.reason)
    if args.json:
        _print_json(result)
        return 0
    print(
        f"writes paused: nothing runs on the primary (drained in {result.get('drain_ms', 0):g} ms); new work there "
        f"waits until `pgshift resume`, or {args.max:g} s at most. Reads routed elsewhere go on."
    )
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    with _admin(args) as api:
        result = api.resume()
    if args.json:
        _print_json(result)
    elif result.get("was_paused"):
        print(
            f"writes resumed after {result.get('paused_ms', 0):g} ms: {result.get('last_held', 0)} session(s) had "
            f"waited, the longest {1000 * (result.get('last_max_wait_s') or 0):.1f} ms"
        )
    else:
        print("writes were not paused")
    return 0


def _migrate_call(args: argparse.Namespace, call: Callable[[Any], dict[str, Any]]) -> int:
    from proxy.admin.client import AdminRefused
    from proxy.admin.migrate_render import guard_lines, step_lines

    with _admin(args) as api:
        try:
            result = call(api)
        except AdminRefused as exc:
            guards = exc.data.get("guards") if isinstance(exc.data, dict) else None
            if args.json and isinstance(exc.data, dict):
                _print_json(exc.data)
            elif guards:
                print(f"pgshift: {exc.message}", file=sys.stderr)
                for line in guard_lines(guards):
                    print("  " + line, file=sys.stderr)
                return exc.exit_code
            raise
    if args.json:
        _print_json(result)
    else:
        for line in step_lines(result):
            print(line)
    aborted = any(t.get("result") == "aborted" for t in result.get("taken") or [])
    return 1 if aborted else 0


def _cmd_migrate_status(args: argparse.Namespace) -> int:
    from proxy.admin.migrate_render import status_lines

    with _admin(args) as api:
        status = api.migrate_status()
    if args.json:
        _print_json(status)
    else:
        for line in status_lines(status):
            print(line)
    return 0


def _read_steps(text: str) -> list[int]:
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give percentages separated by commas, e.g. 1,10,50,100") from None
    if not steps or steps != sorted(set(steps)) or steps[-1] != 100 or steps[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: steps must rise from 1 or more to 100, e.g. 1,10,50,100")
    return steps


def _cmd_migrate_advance(args: argparse.Namespace) -> int:
    return _migrate_call(args, lambda api: api.migrate_advance(args.to, args.read_steps))


def _cmd_migrate_rollback(args: argparse.Namespace) -> int:
    return _migrate_call(args, lambda api: api.migrate_rollback(args.to))


def _cmd_migrate_decommission(args: argparse.Namespace) -> int:
    return _migrate_call(args, lambda api: api.migrate_decommission(args.report))


def _cmd_history(args: argparse.Namespace) -> int:
    with _admin(args) as api:
        history = api.history(args.limit)
    if args.json:
        _print_json(history)
        return 0
    for line in history_lines(history):
        print(line)
    return 0


def _cmd_mirror_status(args: argparse.Namespace) -> int:
    with _admin(args) as api:
        status = api.mirror()
    if args.json:
        _print_json(status)
    else:
        for line in mirror_lines(status):
            print(line)
    if args.check:
        troubled = any(m["out_of_sync"] or any(d["detached"] for d in m["databases"]) for m in status["mirrors"])
        return 1 if troubled else 0
    return 0


def _cmd_mirror_resume(args: argparse.Namespace) -> int:
    with _admin(args) as api:
        result = api.mirror_resume(args.name, repaired=args.repaired)
    if args.json:
        _print_json(result)
        return 0
    resumed = ", ".join(result.get("resumed") or []) or "(it was not detached)"
    print(f"mirror {clean(args.name)}: capture resumed for database(s) {clean(resumed)}")
    if args.repaired:
        cleared = ", ".join(result.get("cleared") or []) or "(none listed)"
        print(f"  out-of-sync tables cleared: {clean(cleared)}")
    return 0


# --- sync: bring a new database in line with the old one (issue 6) ----------------------------

SYNC_EXIT_CODES = """\
exit codes (sync commands):
  0  everything is in order (check: ready to sync; sequences: every sequence set or already past)
  1  problems found: each is listed with what to do (check), or a sequence is missing on the target,
     unreadable, or could not be set (sequences)
  2  usage error, or a local configuration problem (unknown backend, bad --config)
  3  a database could not be reached (or refused the login); the message names the backend

--from and --to name backends of --config ([backends.NAME]). The account: --user if given, else the
backend's mirror_user, else the user of its dsn; the database: --database, else the dsn's, else the
user's name."""


def _sync_endpoints(args: argparse.Namespace) -> tuple[Endpoint, Endpoint]:
    from proxy.cdc.sqlconn import resolve_endpoint
    from proxy.config import load_config

    if args.source == args.target:
        raise ConfigError(f"--from and --to name the same backend ({args.source!r})")
    config = load_config(args.config)
    source = resolve_endpoint(config, args.source, user=args.user, database=args.database)
    target = resolve_endpoint(config, args.target, user=args.user, database=args.database)
    return source, target


def _sync_run(work: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``work`` (a coroutine function); an unreachable database is exit 3, not 2."""
    from proxy.app import run
    from proxy.cdc.sqlconn import DatabaseUnreachable

    try:
        return run(work())  # on uvloop, as the proxy: a COPY or a change stream relays faster
    except DatabaseUnreachable as exc:
        print(f"pgshift: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code


def _sync_report(args: argparse.Namespace, make: Callable[[Endpoint, Endpoint], Coroutine[Any, Any, Any]]) -> int:
    """Run a sync tool: its report as text or --json; exit 0 when it is ok, 1 when not."""
    source, target = _sync_endpoints(args)

    async def work() -> int:
        report = await make(source, target)
        if args.json:
            _print_json(report.as_dict())
        else:
            for line in report.lines():
                print(clean(line))
        return 0 if report.ok else 1

    return _sync_run(work)


def _cmd_sync_check(args: argparse.Namespace) -> int:
    from proxy.cdc.checks import run_check

    tables = _sync_tables(args)
    return _sync_report(args, lambda source, target: run_check(source, target, tables))


def _cmd_sync_sequences(args: argparse.Namespace) -> int:
    from proxy.cdc.sequences import sync_sequences

    return _sync_report(
        args, lambda source, target: sync_sequences(source, target, margin=args.margin, dry_run=args.dry_run)
    )


def _sync_tables(args: argparse.Namespace) -> list[str] | None:
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables is not None else None
    if tables == []:
        raise ConfigError("--tables names no table")
    return tables


def _print_failure(exc: PgShiftError) -> None:
    print(f"pgshift: {exc.message}", file=sys.stderr)
    if exc.detail:
        print(f"detail: {exc.detail.strip()}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)


def _cmd_sync_start(args: argparse.Namespace) -> int:
    import gc

    from proxy.cdc.sqlconn import DatabaseUnreachable
    from proxy.cdc.sync import SyncOptions, SyncRun, install_signal_handlers

    bindir: Path | None = None
    bindir_problem: str | None = None
    if args.schema:
        from proxy.localpg import find_bindir

        try:
            bindir = find_bindir()
        except PgShiftError as exc:
            bindir_problem = exc.message
    options = SyncOptions(
        tables=_sync_tables(args), workers=args.workers, chunk_rows=args.chunk_rows, slot=args.slot,
        publication=args.publication, status_interval=args.status_interval, schema=args.schema,
        pg_bindir=bindir, pg_bindir_problem=bindir_problem, metrics_port=args.metrics_port,
    )  # fmt: skip
    source, target = _sync_endpoints(args)
    # The change stream allocates a few objects per change and keeps none in cycles: a young
    # collection every 700 allocations (the default) cost a quarter of the apply's CPU. Rarer ones,
    # and the objects of start-up moved out of the collector's sight.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

    async def work() -> int:
        run = SyncRun(source, target, options, say=lambda line: print(clean(line), file=sys.stderr, flush=True))
        remove = install_signal_handlers(run)
        try:
            result = await run.run()
        except DatabaseUnreachable:
            raise
        except PgShiftError as exc:  # (run() reports its own failures; this is one before it began)
            _print_failure(exc)
            return 1
        finally:
            remove()
        if args.json:
            _print_json(result.as_dict())
        report = result.check
        if report is not None and not report.ok and not args.json:
            for line in report.lines():
                print(clean(line))
            print("nothing was created: fix the problems above and start again")
        for problem in result.problems:
            print(f"pgshift: {clean(problem)}", file=sys.stderr)
        if result.problems:
            print("pgshift: nothing was created", file=sys.stderr)
        if result.error is not None:
            print(f"pgshift: sync failed: {clean(result.error)}", file=sys.stderr)
        for message in result.messages:
            print(f"pgshift: {clean(message)}", file=sys.stderr)
        return result.exit_code

    return _sync_run(work)


def _cmd_sync_status(args: argparse.Namespace) -> int:
    from proxy.cdc.sync import sync_status

    return _sync_report(args, lambda source, target: sync_status(source, target, args.slot))


def _stop_report(args: argparse.Namespace, ok: bool, lines: list[str], as_dict: Callable[[], Any]) -> int:
    """What a stop command (sync stop, d1 stop) did: JSON, or its lines (on stderr when not ok)."""
    if args.json:
        _print_json(as_dict())
    else:
        for line in lines:
            print(clean(line), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _cmd_sync_stop(args: argparse.Namespace) -> int:
    from proxy.cdc.sync import sync_stop

    source, target = _sync_endpoints(args)

    async def work() -> int:
        result = await sync_stop(source, target, args.slot, args.publication, force=args.force)
        return _stop_report(args, result.ok, result.lines, result.as_dict)

    return _sync_run(work)


# --- d1: Cloudflare D1 stores for reference tables (issue 8) ------------------------------------

D1_EXIT_CODES = """\
exit codes (d1 commands):
  0  done (--check: D1 matches; --apply: every table exists as it should)
  1  differences found (--check), tables that exist on D1 but differ (--apply leaves them alone),
     or a table that cannot go to D1 (not found on the source, no primary key)
  2  usage error, or a local configuration problem (unknown store, token variable not set)
  3  a database could not be reached: the source Postgres, or D1 (network, 5xx, rate limited)
  4  D1 refused the request (token 400/401/403, unknown account or database 404, SQL error 7500)

The source tables are read from the store's `source` backend (default: routing.primary) with the
account the sync commands use (--user, else its mirror_user, else the dsn's user)."""


def _d1_store(args: argparse.Namespace) -> tuple[Any, str, Any]:
    from proxy.config import load_config

    config = load_config(args.config)
    stores = {name: store for name, store in config.stores.items() if store.kind == "d1"}
    if args.store is not None:
        if args.store not in stores:
            known = ", ".join(sorted(stores)) or "none"
            raise ConfigError(f"no D1 store {args.store!r} in {args.config} (D1 stores: {known})")
        name = args.store
    elif len(stores) == 1:
        (name,) = stores
    elif not stores:
        raise ConfigError(
            f'{args.config} declares no D1 store: add [stores.NAME] with kind = "d1" (see README "Cloudflare D1")'
        )
    else:
        raise ConfigError(f"{args.config} declares several D1 stores ({', '.join(sorted(stores))}): pass --store NAME")
    return config, name, stores[name]


def _cmd_d1_schema(args: argparse.Namespace) -> int:
    from proxy.cdc.sqlconn import SqlConnection, resolve_endpoint
    from proxy.d1.client import D1Client, D1Error
    from proxy.d1.schema import D1SchemaError, apply_schema, differences, read_pg_tables, schema_sql, to_d1

    config, name, store = _d1_store(args)
    source = store.source or config.routing.primary
    endpoint = resolve_endpoint(config, source, user=args.user, database=args.database)
    mode = "apply" if args.apply else "check" if args.check else "print"
    client = D1Client.from_store(name, store) if mode != "print" else None  # (--print needs no token)

    async def work() -> int:
        try:
            async with await SqlConnection.connect(endpoint, application_name="pgshift-d1") as conn:
                tables = to_d1(await read_pg_tables(conn, store.tables))
        except D1SchemaError as exc:
            _print_failure(exc)
            return 1
        if client is None:
            header = [
                f'pgshift d1 schema: D1 store "{name}" (database {store.database_id}), from {endpoint.label()}',
                "STRICT tables; types per README 'Cloudflare D1'. Apply with:",
                "  wrangler d1 execute <DATABASE> --remote --file <this file>",
                "or save it as a migration (wrangler d1 migrations create), or run `pgshift d1 schema --apply`.",
            ]
            sql = schema_sql(tables, header)
            if args.json:
                _print_json({"store": name, "tables": [t.name for t in tables], "sql": sql})
            else:
                sys.stdout.write(sql)
            return 0
        async with client:
            try:
                if mode == "check":
                    found = await differences(client, tables)
                    report: dict[str, Any] = {"store": name, "ok": not any(found.values()), "differences": found}
                    lines = [line for diffs in found.values() for line in diffs]
                    ok_line = f"D1 store {name}: {len(tables)} table(s) match"
                else:
                    result = await apply_schema(client, tables)
                    report = {
                        "store": name, "ok": result.ok, "created": result.created,
                        "unchanged": result.unchanged, "differences": result.differences,
                    }  # fmt: skip
                    lines = [f"created table {t}" for t in result.created]
                    lines += [f"table {t} already matches" for t in result.unchanged]
                    lines += [f"left alone: {d}" for diffs in result.differences.values() for d in diffs]
                    ok_line = ""
            except D1Error as exc:
                _print_failure(exc)
                return exc.exit_code
        if args.json:
            _print_json(report)
        else:
            for line in lines or [ok_line]:
                print(clean(line))
        return 0 if report["ok"] else 1

    return _sync_run(work)


D1_FEED_EXIT_CODES = """\
exit codes (d1 sync, status, stop):
  0  sync: stopped cleanly while streaming (SIGINT/SIGTERM); status: the feed is in order (or there is
     none); stop: dropped (or nothing to drop)
  1  sync: it could not start (each problem listed, nothing created) or it failed (the message says what
     stays and how to resume); status: the slot retains WAL with no feed streaming from it; stop: the slot
     is in use (pass --force)
  2  usage error, or a local configuration problem (unknown store, token variable not set)
  3  the source Postgres or D1 could not be reached (D1: after every retry)
  4  D1 refused the token, or the account or database is unknown
  130 sync: interrupted during the backfill (the slot stays; the next run copies again)

The feed's slot and publication on the source are both named pgshift_d1_<store>; whether its backfill
finished is recorded in D1, in the table _pgshift_feed."""


def _d1_feed_setup(args: argparse.Namespace) -> tuple[str, Any, Endpoint, Any]:
    """The store's name and config, its source endpoint, and a D1Client for it (not yet opened)."""
    from proxy.cdc.sqlconn import resolve_endpoint
    from proxy.d1.client import D1Client

    config, name, store = _d1_store(args)
    source = store.source or config.routing.primary
    endpoint = resolve_endpoint(config, source, user=args.user, database=args.database)
    return name, store, endpoint, D1Client.from_store(name, store)


def _cmd_d1_sync(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from proxy.cdc.d1feed import D1Feed, FeedOptions

    name, store, endpoint, client = _d1_feed_setup(args)
    options = FeedOptions(batch_rows=args.batch_rows, status_interval=args.status_interval)

    def say(line: str) -> None:
        print(clean(line), file=sys.stderr, flush=True)

    async def work() -> int:
        feed = D1Feed(name, store.tables, endpoint, client, options, say=say)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, feed.request_stop)
        try:
            async with client:
                result = await feed.run()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if args.json:
            _print_json(result.as_dict())
        if result.error is not None:
            print(f"pgshift: d1 feed failed: {clean(result.error)}", file=sys.stderr)
            if result.hint:
                print(f"hint: {clean(result.hint)}", file=sys.stderr)
        for message in result.messages:
            print(f"pgshift: {clean(message)}", file=sys.stderr)
        return result.exit_code

    return _sync_run(work)


def _cmd_d1_status(args: argparse.Namespace) -> int:
    from proxy.cdc.d1feed import feed_status

    name, _, endpoint, client = _d1_feed_setup(args)

    async def work() -> int:
        async with client:
            report = await feed_status(name, endpoint, client)
        if args.json:
            _print_json(report.as_dict())
        else:
            for line in report.lines():
                print(clean(line))
        return 0 if report.ok else 1

    return _sync_run(work)


def _cmd_d1_stop(args: argparse.Namespace) -> int:
    from proxy.cdc.d1feed import feed_stop

    name, _, endpoint, client = _d1_feed_setup(args)

    async def work() -> int:
        async with client:
            result = await feed_stop(name, endpoint, client, force=args.force)
        return _stop_report(args, result.ok, result.lines, result.as_dict)

    return _sync_run(work)


# --- verify and repair: prove old and new hold the same rows (issue 7) ---------------------------

VERIFY_EXIT_CODES = """\
exit codes (verify, repair):
  0  no difference: every selected table compared and equal (repair: the rows now match)
  1  differences remain (each listed with its primary key), or a table could not be compared
     (missing on the target, no key column there); repair: a row still differs, or the write failed
  2  usage error, or a local configuration problem (unknown backend, bad --config, bad --state)
  3  a database could not be reached (or refused the login); the message names the backend
  4  verify stopped before covering everything (--max-duration, a statement error) and found no
     difference in what it covered: run it again with the same --state to resume

--from and --to name backends of --config ([backends.NAME]), as for sync. A difference is reported
only if it is still there after the lag window (--recheck-after) while the source row did not change:
writes in flight through the proxy or the CDC stream never count.

--store NAME (instead of --from/--to) compares the tables of the D1 store [stores.NAME] with its
source backend (the store's `source`, else routing.primary), in D1's canonical form (mode full, or
sample); repair --store rewrites the differing rows in D1. D1 unreachable or refusing the token: 3."""


def _verify_options(args: argparse.Namespace, **overrides: Any) -> Any:
    from proxy.verify.verify import VerifyOptions

    values = {
        "mode": args.mode or ("full" if args.store is not None else "checksum"),
        "tables": _sync_tables(args) if getattr(args, "tables", None) is not None else None,
        "sample": getattr(args, "sample", 1000), "chunk_rows": args.chunk_rows,
        "workers": getattr(args, "workers", 2), "rate_limit": getattr(args, "rate_limit", None),
        "statement_timeout": args.statement_timeout or None, "max_duration": getattr(args, "max_duration", None),
        "recheck_after": args.recheck_after, "rechecks": args.rechecks, "state_file": getattr(args, "state", None),
        "max_differences": getattr(args, "max_differences", 10_000),
    }  # fmt: skip
    values.update(overrides)
    return VerifyOptions(**values)


def _verify_sides(args: argparse.Namespace) -> None:
    """--store NAME, or --from OLD and --to NEW (and what --store does not support)."""
    if args.store is not None:
        flags = {
            "--from": args.source, "--to": args.target, "--state": getattr(args, "state", None),
            "--source-replica": getattr(args, "source_replica", None),
        }  # fmt: skip
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise ConfigError(f"--store cannot be combined with {' and '.join(given)}")
    elif args.source is None or args.target is None:
        raise ConfigError("name the two sides: --from OLD --to NEW (backends), or --store NAME (a D1 store)")


def _d1_verify_run(args: argparse.Namespace, work: Callable[..., Coroutine[Any, Any, int]]) -> int:
    """--store: run ``work(source endpoint, place, tables, client)``; D1 unreachable or refusing: exit 3."""
    from proxy.d1.client import D1Error
    from proxy.verify.d1side import D1Place, store_table

    name, store, endpoint, client = _d1_feed_setup(args)
    tables = store.tables
    if getattr(args, "tables", None) is not None:
        tables = [store_table(store.tables, t) for t in _sync_tables(args) or []]

    async def run() -> int:
        async with client:
            try:
                return await work(endpoint, D1Place.from_store(name, store), tables, client)
            except D1Error as exc:
                _print_failure(exc)
                return 3

    return _sync_run(run)


def _cmd_verify(args: argparse.Namespace) -> int:
    from proxy.cdc.sqlconn import resolve_endpoint
    from proxy.config import load_config
    from proxy.verify.d1side import verify_d1
    from proxy.verify.verify import verify

    _verify_sides(args)
    options = _verify_options(args)

    def say(line: str) -> None:
        if not args.quiet:
            print(clean(line), file=sys.stderr, flush=True)

    def output(report: Any) -> int:
        data = report.as_dict()
        if args.report is not None:
            args.report.write_text(json.dumps(data, indent=2) + "\n")
        if args.json:
            _print_json(data)
        else:
            for line in report.lines():
                print(clean(line))
        code: int = report.exit_code
        return code

    if args.store is not None:

        async def work_d1(source: Endpoint, place: Any, tables: list[str], client: Any) -> int:
            return output(await verify_d1(source, place, tables, client, options, say=say))

        return _d1_verify_run(args, work_d1)
    source, target = _sync_endpoints(args)
    replica = None
    if args.source_replica:
        if args.source_replica in (args.source, args.target):
            raise ConfigError("--source-replica must name a third backend (a replica of --from)")
        replica = resolve_endpoint(
            load_config(args.config), args.source_replica, user=args.user, database=args.database
        )

    async def work() -> int:
        return output(await verify(source, target, options, source_read=replica, say=say))

    return _sync_run(work)


def _cmd_repair(args: argparse.Namespace) -> int:
    from proxy.verify.d1side import repair_d1
    from proxy.verify.repair import repair

    _verify_sides(args)
    options = _verify_options(args, tables=None)

    def output(result: Any) -> int:
        if args.json:
            _print_json(result.as_dict())
        else:
            for line in result.lines():
                print(clean(line))
        return 0 if result.ok else 1

    if args.store is not None:

        async def work_d1(source: Endpoint, place: Any, tables: list[str], client: Any) -> int:
            return output(await repair_d1(
                source, place, tables, client, args.table, report=args.from_report, dry_run=args.dry_run,
                options=options,
            ))  # fmt: skip

        return _d1_verify_run(args, work_d1)
    source, target = _sync_endpoints(args)

    async def work() -> int:
        return output(
            await repair(source, target, args.table, report=args.from_report, dry_run=args.dry_run, options=options)
        )

    return _sync_run(work)


def _verify_seconds(text: str) -> float:
    """Seconds, 0 or more (a time box may be long: up to a week)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds (0 or more, at most 604800)")
    return value


def _add_verify_parsers(sub: Any) -> None:
    """`pgshift verify` and `pgshift repair` (registered by build_parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=Path("config.toml"), metavar="PATH", help="default: ./config.toml"
    )
    common.add_argument("--from", dest="source", metavar="OLD", help="the source of truth backend")
    common.add_argument("--to", dest="target", metavar="NEW", help="the backend compared with it")
    common.add_argument(
        "--store", metavar="NAME",
        help="instead of --from/--to: the D1 store [stores.NAME], compared with its source backend",
    )  # fmt: skip
    common.add_argument("--user", help="connect as this user on both (default: mirror_user, else the dsn's)")
    common.add_argument("--database", help="database on both (default: the dsn's, else the user's name)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument(
        "--mode", choices=["checksum", "sample", "full"],
        help="checksum: every row through checksums of key ranges computed in the databases, drilling down into "
        "ranges that differ (default); sample: --sample random rows per side and table; full: every row fetched "
        "and compared here (the default, and what checksum does, with --store)",
    )  # fmt: skip
    common.add_argument(
        "--chunk-rows", type=_count(1), default=10_000, metavar="N", help="rows per checksum chunk (default 10000)"
    )
    common.add_argument(
        "--recheck-after", type=_verify_seconds, metavar="SECONDS",
        help="the lag window: candidate differences are read again after it (default 2, or twice the lag a running "
        "sync records on the target)",
    )  # fmt: skip
    common.add_argument(
        "--rechecks", type=_count(0), default=3, metavar="N",
        help="rechecks of a difference whose source row keeps changing (default 3; 0: report at once, for "
        "databases nothing writes to)",
    )  # fmt: skip
    common.add_argument(
        "--statement-timeout", type=_verify_seconds, default=60.0, metavar="SECONDS",
        help="statement_timeout of every verify statement (default 60; 0: none)",
    )  # fmt: skip

    verify = sub.add_parser(
        "verify", help="prove old and new hold the same rows: checksums, sampling, row differences",
        description="Compare every selected table of --from and --to by primary key and list the rows that differ: "
        "only in one of them, or with different values (and which columns). Values are compared in canonical form "
        "(numeric scale, float text, time zone, json key order, collations do not matter).",
        parents=[common], epilog=VERIFY_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    verify.add_argument(
        "--tables", metavar="T1,T2", help="only these tables (schema-qualified or not); default: all but pgshift_*"
    )
    verify.add_argument(
        "--sample", type=_count(1), default=1000, metavar="N", help="--mode sample: random rows per side (default 1000)"
    )
    verify.add_argument(
        "--workers", type=_count(1), default=2, metavar="N", help="connections per side comparing chunks (default 2)"
    )
    verify.add_argument(
        "--rate-limit", type=_count(1), metavar="ROWS_PER_S", help="compare at most this many rows per second"
    )
    verify.add_argument(
        "--source-replica", metavar="BACKEND",
        help="read the source side from this backend of the config (a replica of --from) instead",
    )  # fmt: skip
    verify.add_argument(
        "--max-duration", type=_verify_seconds, metavar="SECONDS",
        help="start no new chunk after this long; report what was covered (exit 4 if incomplete)",
    )  # fmt: skip
    verify.add_argument(
        "--state", type=Path, metavar="FILE",
        help="progress file: a run stopped by --max-duration (or interrupted) resumes from it when run again",
    )  # fmt: skip
    verify.add_argument("--report", type=Path, metavar="FILE", help="also write the JSON report to FILE (for repair)")
    verify.add_argument(
        "--max-differences", type=_count(1), default=10_000, metavar="N",
        help="list at most N differences per table (default 10000)",
    )  # fmt: skip
    verify.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    verify.set_defaults(func=_cmd_verify)

    repair = sub.add_parser(
        "repair", help="rewrite the differing rows of a table on the target from the source",
        description="For every differing primary key of --table (from --from-report, else found by a verify run "
        "now): read the source row and, in one target transaction, delete or upsert that key; then compare those "
        "keys again. No other row is touched.",
        parents=[common], epilog=VERIFY_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    repair.add_argument("--table", required=True, metavar="T", help="the table to repair (schema-qualified or not)")
    repair.add_argument(
        "--from-report", type=Path, metavar="FILE", help="the keys to repair: a report of verify --report/--json"
    )
    repair.add_argument("--dry-run", action="store_true", help="list what would be written; write nothing")
    repair.set_defaults(func=_cmd_repair)


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, {minimum} or more")
        return int(text)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds (more than 0, less than 3600)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgshift",
        description="Postgres proxy for zero-downtime migrations.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pgshift {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy in the foreground")
    serve.add_argument("--config", type=Path, default=Path("config.toml"), help="default: ./config.toml")
    serve.set_defaults(func=_cmd_serve)

    passwd = sub.add_parser("passwd", help="print an [auth.users] entry with a SCRAM verifier (or md5 hash)")
    passwd.add_argument("user")
    passwd.add_argument("--md5", action="store_true", help="md5 hash instead of a SCRAM-SHA-256 verifier")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(func=_cmd_passwd)

    demo = sub.add_parser("demo", help="start two throw-away clusters with sample data and the proxy in front")
    demo.add_argument("--port", type=int, default=6432, help="proxy port (default 6432)")
    demo.add_argument("--admin-port", type=int, default=9187, help="admin API port (default 9187)")
    demo.add_argument(
        "--old-port", type=int, default=54321, help="port of the 'old' cluster (default 54321, as in config.toml)"
    )
    demo.add_argument(
        "--new-port", type=int, default=54322, help="port of the 'new' cluster (default 54322, as in config.toml)"
    )
    demo.add_argument(
        "--no-proxy", action="store_true", help="start only the clusters (for `serve --config config.toml`)"
    )
    demo.set_defaults(func=_cmd_demo)

    # Operator commands: options common to every call of the admin API, and to every change.
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument(
        "--admin",
        metavar="URL",
        help="the admin API (default: [admin] host/port of --config, else http://127.0.0.1:9187)",
    )
    api.add_argument(
        "--config", type=Path, metavar="PATH",
        help="config.toml to read [admin] from (address, token); default ./config.toml if present",
    )  # fmt: skip
    api.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS", help="default: 5")
    api.add_argument("--json", action="store_true", help="print the API's JSON answer as it is")
    change = argparse.ArgumentParser(add_help=False, parents=[api])
    change.add_argument("--note", metavar="TEXT", help="why: recorded with the new routing version")
    change.add_argument(
        "--expect-version", type=_count(1), metavar="N",
        help="refuse (exit 4) unless routing is still at version N (guards against concurrent changes)",
    )  # fmt: skip

    def operator(name: str, summary: str, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=summary, description=summary, parents=parents, epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    status = operator("status", "show routing, store, instances, backends and sessions of a running proxy", [api])
    status.add_argument(
        "--watch", type=_seconds, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C (not with --json)"
    )
    status.set_defaults(func=_cmd_status)

    weights = operator("weights", "change read weights", [])
    weights_sub = weights.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    weights_set = weights_sub.add_parser(
        "set",
        help="replace the read weights of the default routing, or of one rule",
        description="Replace the read weights of the default routing (or of --rule RULE): backends not named get no "
        "reads. Weights are relative, e.g. old=90 new=10.",
        parents=[change], epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    weights_set.add_argument(
        "weights", nargs="+", type=_weight, metavar="NAME=W", help="backend and its weight (0 or more)"
    )
    weights_set.add_argument("--rule", metavar="RULE", help="change this rule's weights instead of the default ones")
    weights_set.set_defaults(func=_cmd_weights_set)

    flip = operator("flip", "make another backend the primary (where writes go)", [change])
    flip.add_argument("--primary", required=True, metavar="NAME", help="the backend that becomes the primary")
    flip.add_argument(
        "--force", action="store_true", help="flip even though the last probe found the new primary unreachable"
    )
    flip.set_defaults(func=_cmd_flip)

    rollback = operator("rollback", "restore an earlier routing version (as a new version)", [change])
    rollback.add_argument(
        "--to", type=_count(1), metavar="N", help="the version to restore (default: the one the current replaced)"
    )
    rollback.set_defaults(func=_cmd_rollback)

    history = operator("history", "list routing versions, newest first", [api])
    history.add_argument("--limit", type=_count(0), default=20, metavar="N", help="how many (default 20; 0: all)")
    history.set_defaults(func=_cmd_history)

    pause = operator(
        "pause", "hold new work on the primary (reads elsewhere go on) once open transactions have ended", [api]
    )
    pause.add_argument(
        "--drain-timeout", type=_seconds, default=5.0, metavar="SECONDS",
        help="how long open transactions on the primary may take to end (default 5); then the pause is given up "
        "(exit 4) and everything goes on as before",
    )  # fmt: skip
    pause.add_argument(
        "--max", type=_seconds, default=30.0, metavar="SECONDS", help="the pause ends by itself after this (default 30)"
    )
    pause.add_argument("--reason", metavar="TEXT", help="shown in status and the proxy's log")
    pause.set_defaults(func=_cmd_pause)
    resume = operator("resume", "end a pause: held work goes on (to the primary of now)", [api])
    resume.set_defaults(func=_cmd_resume)

    migrate = operator("migrate", "the guarded migration: phases, read shift, cut-over, rollback, decommission", [])
    migrate_sub = migrate.add_subparsers(dest="migrate_command", required=True, metavar="ACTION")

    def migrate_action(name: str, summary: str) -> argparse.ArgumentParser:
        return migrate_sub.add_parser(
            name, help=summary, description=summary, parents=[api], epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    migrate_status = migrate_action("status", "the phase, and every guard of the next step with its value and verdict")
    migrate_status.set_defaults(func=_cmd_migrate_status)
    migrate_advance = migrate_action(
        "advance", "move forward one step (or --to a phase) when its guards hold; exit 4 naming the guard that blocks"
    )
    migrate_advance.add_argument(
        "--to", metavar="PHASE", help="go on to this phase: dual-write, read-shift:N (or N%%), cut"
    )
    migrate_advance.add_argument(
        "--read-steps",
        type=_read_steps,
        metavar="1,10,50,100",
        help="the read shares to pass (default: [migrate] read_steps)",
    )
    migrate_advance.set_defaults(func=_cmd_migrate_advance)
    migrate_rollback = migrate_action(
        "rollback", "back to the previous safe state; after the cut, the same guarded cut in the other direction"
    )
    migrate_rollback.add_argument("--to", metavar="PHASE", help="go back as far as this phase")
    migrate_rollback.set_defaults(func=_cmd_migrate_rollback)
    migrate_decommission = migrate_action(
        "decommission",
        "after the quiet period: final verify report, stop mirroring to the old database, drop its slot and "
        "publication",
    )
    migrate_decommission.add_argument("--report", metavar="PATH", help="where to write the final verify report")
    migrate_decommission.set_defaults(func=_cmd_migrate_decommission)

    reload = operator("reload", "make the proxy re-read its config file (like SIGHUP)", [api])
    reload.set_defaults(func=_cmd_reload)

    mirror = operator("mirror", "dual write: status of the mirrors, resume one after repair", [])
    mirror_sub = mirror.add_subparsers(dest="mirror_command", required=True, metavar="ACTION")
    mirror_status = mirror_sub.add_parser(
        "status", help="queues, lag, applied/failed/diverged counts, out-of-sync tables, recent divergences",
        description="Dual-write status of a running proxy: per mirror and database the apply queue, lag and counts, "
        "the tables that need repair, and the latest journal entries.",
        parents=[api], epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    mirror_status.add_argument(
        "--check", action="store_true", help="exit 1 if a mirror is detached or has out-of-sync tables"
    )
    mirror_status.set_defaults(func=_cmd_mirror_status)
    mirror_resume = mirror_sub.add_parser(
        "resume", help="start capturing for a detached mirror again",
        description="Start capturing writes for a detached mirror again. Writes made while it was detached are not "
        "replayed: repair its out-of-sync tables (pgshift verify/repair, or a re-sync), then pass --repaired to clear "
        "them from the list.",
        parents=[api], epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    mirror_resume.add_argument("name", metavar="MIRROR", help="the mirror backend")
    mirror_resume.add_argument(
        "--repaired", action="store_true", help="its out-of-sync tables were repaired: clear them from the journal"
    )
    mirror_resume.set_defaults(func=_cmd_mirror_resume)

    # sync: the prerequisites of a sync, and the sequences before a cut-over.
    sync_common = argparse.ArgumentParser(add_help=False)
    sync_common.add_argument(
        "--config", type=Path, default=Path("config.toml"), metavar="PATH", help="default: ./config.toml"
    )
    sync_common.add_argument("--from", dest="source", required=True, metavar="OLD", help="the source backend")
    sync_common.add_argument("--to", dest="target", required=True, metavar="NEW", help="the target backend")
    sync_common.add_argument("--user", help="connect as this user on both (default: mirror_user, else the dsn's)")
    sync_common.add_argument("--database", help="database on both (default: the dsn's, else the user's name)")
    sync_common.add_argument("--json", action="store_true", help="machine-readable output")
    sync = sub.add_parser(
        "sync", help="bring a new database in sync with the old one (check, start, status, stop, sequences)"
    )
    sync_sub = sync.add_subparsers(dest="sync_command", required=True, metavar="ACTION")
    sync_check = sync_sub.add_parser(
        "check", help="check every prerequisite of a sync; list each problem with its fix",
        description="Check the source (wal_level, free replication slots and WAL senders, the user's REPLICATION "
        "and publication rights) and every table (primary key or replica identity on the source; the same table, "
        "columns and types on the target). Reports every problem at once, each with what to do.",
        parents=[sync_common], epilog=SYNC_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sync_check.add_argument(
        "--tables", metavar="T1,T2",
        help="check only these tables (optionally schema-qualified); default: every table but pgshift_*",
    )  # fmt: skip
    sync_check.set_defaults(func=_cmd_sync_check)
    sync_sequences = sync_sub.add_parser(
        "sequences", help="set every sequence on the target past the source's value (before a cut-over)",
        description="Set every sequence on the target (serial, identity and standalone; matched by schema-qualified "
        "name) to max(source value, largest value of its owning column on the target) + margin, unless it is "
        "already past that.",
        parents=[sync_common], epilog=SYNC_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sync_sequences.add_argument(
        "--margin", type=_count(0), default=1000, metavar="N",
        help="room for rows the source writes after this runs (default 1000)",
    )  # fmt: skip
    sync_sequences.add_argument("--dry-run", action="store_true", help="report what would be set; change nothing")
    sync_sequences.set_defaults(func=_cmd_sync_sequences)

    slot_options = argparse.ArgumentParser(add_help=False)
    slot_options.add_argument(
        "--slot", default="pgshift_sync", metavar="NAME", help="the logical replication slot (default pgshift_sync)"
    )
    sync_start = sync_sub.add_parser(
        "start", help="check, publish, copy every table under one snapshot, then stream changes until stopped",
        description="Check the prerequisites (any problem: nothing is created), create the publication and the "
        "logical slot on the source if missing, copy the tables under the slot's snapshot (progress on stderr), "
        "then apply the change stream until SIGINT/SIGTERM. Run it again after any interruption: the copy resumes "
        "from its last finished chunk, the stream from the slot's confirmed position. Exit codes: 0 stopped "
        "cleanly while streaming; 1 problems found or the sync failed (the message says what stays and how to "
        "resume or clean up); 130 interrupted during the copy (start again to resume).",
        parents=[sync_common, slot_options], epilog=SYNC_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sync_start.add_argument(
        "--tables", metavar="T1,T2", help="sync only these tables (schema-qualified or not); default: all but pgshift_*"
    )
    sync_start.add_argument("--workers", type=_count(1), default=4, metavar="N", help="parallel copies (default 4)")
    sync_start.add_argument(
        "--chunk-rows", type=_count(1), default=250_000, metavar="N", help="rows per copy chunk (default 250000)"
    )
    sync_start.add_argument(
        "--publication", default="pgshift_sync", metavar="NAME", help="the publication (default pgshift_sync)"
    )
    sync_start.add_argument(
        "--status-interval", type=_seconds, default=5.0, metavar="SECONDS",
        help="seconds between status lines while streaming (default 5)",
    )  # fmt: skip
    sync_start.add_argument(
        "--schema", action="store_true",
        help="create the tables first: copy the schema of the selected tables (all of the database's without "
        "--tables) with the OS's pg_dump of the source's major version; its pre-data (tables, sequences, types, "
        "functions) before the copy, its post-data (primary keys, indexes, constraints, triggers) after it, before "
        "streaming. Without owners, grants, publications. Refused when a selected table exists on the target",
    )  # fmt: skip
    sync_start.add_argument(
        "--metrics-port", type=_count(1), metavar="PORT",
        help="serve Prometheus metrics (pgshift_sync_*) on http://127.0.0.1:PORT/metrics while it runs (default off)",
    )  # fmt: skip
    sync_start.set_defaults(func=_cmd_sync_start)
    sync_status = sync_sub.add_parser(
        "status", help="phase, copy progress, the slot's lag and WAL retention, last error",
        description="Read the sync's state from the target (pgshift_sync_state, pgshift_backfill) and its slot from "
        "the source. Exit 1 when the slot retains WAL without a consumer, or the sync recorded an error.",
        parents=[sync_common, slot_options], epilog=SYNC_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sync_status.set_defaults(func=_cmd_sync_status)
    sync_stop = sync_sub.add_parser(
        "stop", help="drop the slot and the publication, mark the sync stopped",
        description="Drop the replication slot and the publication on the source and mark the sync stopped. Refuses "
        "(exit 1) while a sync streams from the slot, unless --force, which terminates its walsender. Nothing to "
        "drop is not an error.",
        parents=[sync_common, slot_options], epilog=SYNC_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sync_stop.add_argument(
        "--publication", metavar="NAME", help="the publication (default: the one the sync recorded, else pgshift_sync)"
    )
    sync_stop.add_argument(
        "--force", action="store_true", help="terminate the walsender of a sync still streaming from the slot"
    )
    sync_stop.set_defaults(func=_cmd_sync_stop)

    # d1: Cloudflare D1 stores for read-only reference tables (issue 8).
    d1 = sub.add_parser("d1", help="Cloudflare D1 stores: the SQLite schema of their tables, the feed into them")
    d1_sub = d1.add_subparsers(dest="d1_command", required=True, metavar="ACTION")
    d1_schema = d1_sub.add_parser(
        "schema", help="print, apply or check the D1 tables derived from the Postgres ones",
        description="Derive STRICT SQLite tables (same columns, NOT NULL, primary key; types as in README "
        "'Cloudflare D1') from the source's tables listed in the store. --print (default) writes them as a file for "
        "`wrangler d1 execute DB --remote --file FILE` or a wrangler migration; --apply creates the missing tables "
        "through the D1 API (tables that exist are left alone, and listed if they differ); --check lists every "
        "difference between D1 and the expected tables.",
        epilog=D1_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    d1_schema.add_argument(
        "--config", type=Path, default=Path("config.toml"), metavar="PATH", help="default: ./config.toml"
    )
    d1_schema.add_argument("--store", metavar="NAME", help="the [stores.NAME] to use (default: the only D1 store)")
    d1_mode = d1_schema.add_mutually_exclusive_group()
    d1_mode.add_argument("--print", action="store_true", help="write the schema file to stdout (the default)")
    d1_mode.add_argument("--apply", action="store_true", help="create the missing tables on D1")
    d1_mode.add_argument("--check", action="store_true", help="exit 1 and list the differences if D1 differs")
    d1_schema.add_argument("--user", help="read the source catalog as this user (default: mirror_user, else the dsn's)")
    d1_schema.add_argument("--database", help="the source database (default: the dsn's, else the user's name)")
    d1_schema.add_argument("--json", action="store_true", help="machine-readable output")
    d1_schema.set_defaults(func=_cmd_d1_schema)
    d1_common = argparse.ArgumentParser(add_help=False)
    d1_common.add_argument(
        "--config", type=Path, default=Path("config.toml"), metavar="PATH", help="default: ./config.toml"
    )
    d1_common.add_argument("--store", metavar="NAME", help="the [stores.NAME] to use (default: the only D1 store)")
    d1_common.add_argument("--user", help="connect to the source as this user (default: mirror_user, else the dsn's)")
    d1_common.add_argument("--database", help="the source database (default: the dsn's, else the user's name)")
    d1_common.add_argument("--json", action="store_true", help="machine-readable output")
    d1_sync = d1_sub.add_parser(
        "sync", help="copy the store's tables into D1, then stream the source's changes into it until stopped",
        description="Check (the tables on the source, with primary keys; D1's tables as `d1 schema` derives them), "
        "create publication and logical slot pgshift_d1_<store> on the source, copy the tables into D1 under the "
        "slot's snapshot (progress on stderr), then apply the change stream as D1 batch requests until "
        "SIGINT/SIGTERM, confirming to the slot only what D1 accepted. Run it again after any interruption: it "
        "resumes from the slot (and copies again if the backfill had not finished).",
        parents=[d1_common], epilog=D1_FEED_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    d1_sync.add_argument(
        "--batch-rows", type=_count(1), default=2000, metavar="N", help="backfill rows per upsert call (default 2000)"
    )
    d1_sync.add_argument(
        "--status-interval", type=_seconds, default=5.0, metavar="SECONDS",
        help="seconds between status lines while streaming (default 5)",
    )  # fmt: skip
    d1_sync.set_defaults(func=_cmd_d1_sync)
    d1_status = d1_sub.add_parser(
        "status", help="the feed's phase, the slot's confirmed LSN and lag",
        description="Read the feed's slot and publication from the source and its record from D1. Exit 1 when the "
        "slot retains WAL with no feed streaming from it.",
        parents=[d1_common], epilog=D1_FEED_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    d1_status.set_defaults(func=_cmd_d1_status)
    d1_stop = d1_sub.add_parser(
        "stop", help="drop the feed's slot and publication (and its record in D1)",
        description="Drop the slot and publication pgshift_d1_<store> on the source and the feed's record in D1 "
        "(D1's tables and rows stay). Refuses (exit 1) while a feed streams from the slot, unless --force, which "
        "terminates its walsender.",
        parents=[d1_common], epilog=D1_FEED_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    d1_stop.add_argument("--force", action="store_true", help="terminate the walsender of a feed still streaming")
    d1_stop.set_defaults(func=_cmd_d1_stop)
    _add_verify_parsers(sub)  # verify, repair (issue 7)
    return parser


def _exit_code(exc: PgShiftError) -> int:
    """3, 4 or 5 for a failed admin API call (see EXIT_CODES); 2 for every local error."""
    from proxy.admin.client import AdminError

    return exc.exit_code if isinstance(exc, AdminError) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.func(args)
    except PgShiftError as exc:
        print(f"pgshift: {exc.message}", file=sys.stderr)
        if exc.detail:  # e.g. the tail of a cluster's log when it did not start
            print(f"detail: {exc.detail.strip()}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
