"""Config validation and the CLI's handling of bad input: clear errors that name the problem."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import load_config, parse_config, parse_dsn
from proxy.demo import demo_config
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra: object) -> dict[str, object]:
    return {"backends": {"old": {"dsn": "postgresql://127.0.0.1:5432"}}, "routing": {"primary": "old"}, **extra}


def test_repository_config_is_valid_and_matches_the_demo() -> None:
    config = load_config(REPO / "config.toml")
    assert config.routing.primary == "old"
    assert config.backends == parse_config(demo_config(6432)).backends


def test_defaults() -> None:
    config = parse_config(minimal())
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 6432)
    assert config.auth.for_user("anyone").method == "trust"
    assert config.proxy.max_message_size == 1 << 30


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"routing": {"primary": "old"}}, "backends: required setting is missing"),
        (minimal(routing={"primary": "nope"}), "routing.primary = 'nope' is not a backend; declared backends: old"),
        (minimal(listen={"port": 70000}), "listen.port"),
        (minimal(listen={"prot": 1}), "listen.prot: unknown setting"),
        (minimal(listen={"tls_cert": "/nonexistent.crt"}), "set both tls_cert and tls_key"),
        (minimal(listen={"tls_required": True}), "tls_required needs tls_cert and tls_key"),
        (
            {"backends": {"old": {"dsn": "mysql://x"}}, "routing": {"primary": "old"}},
            "dsn must start with postgresql://",
        ),
        ({"backends": {"old": {"dsn": "postgresql://h:99999"}}, "routing": {"primary": "old"}}, "port"),
        ({"backends": {"old": {"dsn": "postgresql://h?sslmode=maybe"}}, "routing": {"primary": "old"}}, "sslmode"),
        (
            {"backends": {"old": {"dsn": "postgresql://h?foo=1"}}, "routing": {"primary": "old"}},
            "unsupported parameter",
        ),
        (minimal(auth={"users": {"a": {"method": "scram-sha-256"}}}), "needs verifier"),
        (minimal(auth={"users": {"a": {"method": "scram-sha-256", "verifier": "x"}}}), "verifier must look like"),
        (minimal(auth={"users": {"a": {"method": "md5", "md5": "abc"}}}), "method md5 needs md5"),
        (minimal(auth={"method": "scram-sha-256"}), "auth.method"),
    ],
)
def test_bad_config_names_the_problem(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.toml")
    assert needle in info.value.message
    assert info.value.message.startswith("test.toml is invalid:")


def test_env_password_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"backends": {"old": {"dsn": "postgresql://svc@h/app", "password": "env:PGSHIFT_T_PW"}},
            "routing": {"primary": "old"}}  # fmt: skip
    with pytest.raises(ConfigError, match="PGSHIFT_T_PW, which is not set"):
        parse_config(data)
    monkeypatch.setenv("PGSHIFT_T_PW", "s3cret")
    address = parse_config(data).backends["old"].address
    assert (address.user, address.dbname, address.password) == ("svc", "app", "s3cret")


def test_dsn_forms() -> None:
    a = parse_dsn("postgresql://u:p%40ss@db.example:6000/app?sslmode=verify-full&sslrootcert=/ca.pem")
    assert (a.host, a.port, a.user, a.password, a.dbname, a.sslmode, a.sslrootcert) == (
        "db.example", 6000, "u", "p@ss", "app", "verify-full", "/ca.pem")  # fmt: skip
    b = parse_dsn("postgresql:///?host=/var/run/postgresql&port=5433")
    assert b.is_unix and b.port == 5433 and b.user is None and b.dbname is None


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[listen\nport = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)  # fmt: skip


def test_serve_with_bad_config_exits_2_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[backends.old]\ndsn = "postgresql://h"\n[routing]\nprimary = "new"\n')
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "routing.primary = 'new' is not a backend" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_and_bad_arguments() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = run_cli("demo", "--port", "many")
    assert result.returncode == 2 and "invalid int value" in result.stderr


def test_passwd_prints_a_usable_entry() -> None:
    import tomllib

    from proxy.wire.auth import ScramVerifier

    result = run_cli("passwd", "alice", "--password-stdin", stdin="pencil\n")
    assert result.returncode == 0, result.stderr
    entry = tomllib.loads(result.stdout)["auth"]["users"]["alice"]
    assert entry["method"] == "scram-sha-256"
    ScramVerifier.parse(entry["verifier"])
    assert "pencil" not in result.stdout
    parse_config(minimal(auth={"users": {"alice": entry}}))
    md5 = tomllib.loads(run_cli("passwd", "bob", "--md5", "--password-stdin", stdin="pw\n").stdout)
    assert md5["auth"]["users"]["bob"]["md5"].startswith("md5")
    empty = run_cli("passwd", "carol", "--password-stdin", stdin="\n")
    assert empty.returncode == 2 and "empty password refused" in empty.stderr


@pytest.mark.parametrize("section", ["listen", "admin"])
def test_serve_on_a_taken_port_exits_2_naming_it(tmp_path: Path, section: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = 0
        ports = {"listen": port, "admin": other} if section == "listen" else {"listen": other, "admin": port}
        config = tmp_path / "c.toml"
        config.write_text(
            f"[listen]\nport = {ports['listen']}\n[admin]\nport = {ports['admin']}\n"
            '[backends.old]\ndsn = "postgresql://127.0.0.1:1"\n[routing]\nprimary = "old"\n'
        )
        result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} ([{section}] host/port)" in result.stderr
    assert "Traceback" not in result.stderr
