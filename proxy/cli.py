"""Command line: `pgshift serve | passwd | demo` (also `python -m proxy …`)."""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path

from proxy import __version__
from proxy.errors import PgShiftError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app import run, serve
    from proxy.config import load_config

    config = load_config(args.config)
    logging.getLogger("proxy").info("pgshift %s starting (config %s)", __version__, args.config)
    run(serve(config))
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

    return run_demo(args.port, proxy=not args.no_proxy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgshift", description="Postgres proxy for zero-downtime migrations.")
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
    demo.add_argument(
        "--no-proxy", action="store_true", help="start only the clusters (for `serve --config config.toml`)"
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        code: int = args.func(args)
    except PgShiftError as exc:
        print(f"pgshift: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
