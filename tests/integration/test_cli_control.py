"""The operator commands (`pgshift status | weights set | flip | rollback | history | reload`) against a
real proxy's admin API, run as the operator would: a subprocess, judged by its output and exit code.

Exit codes: 0 ok (also "no change"), 2 usage/local config, 3 API unreachable, 4 API refused (4xx),
5 the proxy failed (5xx). Every test starts its own proxy (memory store: routing version 1 at start).
"""

from __future__ import annotations

import http.server
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from proxy.admin.render import status_lines
from proxy.localpg import free_port
from tests.integration.conftest import TwoClusters, routed_config
from tests.support.proxy import ProxyThread

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin-token"
CITIES = {"name": "cities", "tables": ["cities"], "reads": {"old": 100}}
READS = {"old": 90, "new": 10}


def pgshift(
    *args: str, cwd: Path, token: str | None = TOKEN, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a separate process, with only the given admin token in its environment."""
    environment = {k: v for k, v in os.environ.items() if k != "PGSHIFT_ADMIN_TOKEN"}
    environment["PYTHONPATH"] = str(ROOT)
    if token is not None:
        environment["PGSHIFT_ADMIN_TOKEN"] = token
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=30
    )


def state(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/api/state", timeout=5)
    answer.raise_for_status()
    data: dict[str, Any] = answer.json()
    return data


@pytest.fixture
def admin_url(two_clusters: TwoClusters, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Factory: starts a proxy with the given [routing] (default reads 90/10 and the "cities" rule),
    [control] (``control=``) and an admin token; returns its admin API URL. Stopped at the end of the test."""
    monkeypatch.setenv("PGSHIFT_TEST_TOKEN", TOKEN)
    started: list[ProxyThread] = []

    def start(control: dict[str, Any] | None = None, **routing: Any) -> str:
        routing = {"reads": READS, "rules": [CITIES], **routing}
        config = routed_config(two_clusters.old, two_clusters.new, **routing)
        config["admin"] = {"port": 0, "token": "env:PGSHIFT_TEST_TOKEN"}
        if control is not None:
            config["control"] = control
        proxy = ProxyThread(config).start()
        started.append(proxy)
        assert proxy.running is not None and proxy.running.admin is not None
        return f"http://127.0.0.1:{proxy.running.admin.port}"

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


def test_status_table_and_json(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url(control={"health_interval": 5})  # the first probes start at once
    deadline = time.monotonic() + 10
    while not all(b["up"] for b in state(url)["backends"].values()):
        assert time.monotonic() < deadline, f"backends never probed up: {state(url)['backends']}"
        time.sleep(0.1)

    table = pgshift("status", "--admin", url, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    current = state(url)
    assert f"instance {current['instance']}: routing version 1" in out
    assert "by config.toml via config" in out
    assert "  primary  old\n" in out
    assert "  mirrors  (none)\n" in out
    assert "  reads    new=10 old=90" in out
    rule_line = next(line for line in out.splitlines() if line.strip().startswith("cities"))
    assert rule_line.split() == ["cities", "tables=cities", "old=100", "statement"]
    assert "store  memory" in out and ": ok" in out
    lines = out.splitlines()
    old_row = next(line.split() for line in lines if line.strip().startswith("old ") and "primary" in line)
    new_row = next(line.split() for line in lines if line.strip().startswith("new ") and "read" in line)
    assert old_row[:3] == ["old", "primary", "up"] and new_row[:3] == ["new", "read", "up"]
    assert any(current["instance"] in line and "this instance" in line for line in lines)
    assert "sessions  0 active" in out and "0 on a previous primary" in out

    raw = pgshift("status", "--json", "--admin", url, cwd=tmp_path)
    assert raw.returncode == 0, raw.stderr
    data = json.loads(raw.stdout)
    assert data.keys() == current.keys()
    assert data["routing"] == current["routing"]
    assert data["version"] == 1 and data["routing"]["primary"] == "old"
    assert raw.stdout.startswith('{\n  "instance"')  # indent=2, the API's own key order


def test_weights_set_default_and_rule(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    done = pgshift("weights", "set", "old=50", "new=50", "--note", "half and half", "--admin", url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["routing version 2 (changed)", "  reads new=10 old=90 -> new=50 old=50"]
    after = state(url)
    assert after["version"] == 2
    assert after["routing"]["reads"] == {"old": 50, "new": 50}
    assert after["routing"]["rules"][0]["reads"] == {"old": 100}  # the rule kept its own weights

    done = pgshift("weights", "set", "new=100", "--rule", "cities", "--json", "--admin", url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["version"] == 3 and answer["changed"] is True
    assert answer["changes"] == ["rule cities: reads old=100 -> new=100"]
    after = state(url)
    assert after["routing"]["rules"][0]["reads"] == {"new": 100}
    assert after["routing"]["reads"] == {"old": 50, "new": 50}

    history = httpx.get(f"{url}/api/history", timeout=5).json()["versions"]
    assert history[1]["note"] == "half and half"
    assert history[0]["caller"].split(" ")[0].count("@") == 1  # X-Pgshift-Caller: user@host


def test_flip_rollback_history(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    flip = pgshift("flip", "--primary", "new", "--note", "cutover", "--admin", url, cwd=tmp_path)
    assert flip.returncode == 0, flip.stderr
    assert flip.stdout.splitlines() == ["routing version 2 (changed)", "  primary old -> new"]
    assert state(url)["routing"]["primary"] == "new"

    back = pgshift("rollback", "--admin", url, cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    assert back.stdout.splitlines() == ["routing version 3 (changed)", "  primary new -> old"]
    assert state(url)["routing"]["primary"] == "old"

    again = pgshift("rollback", "--to", "2", "--admin", url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "routing version 4 (changed)"
    assert state(url)["routing"]["primary"] == "new"

    raw = pgshift("history", "--json", "--admin", url, cwd=tmp_path)
    assert raw.returncode == 0, raw.stderr
    history = json.loads(raw.stdout)
    assert history["current"] == 4
    versions = history["versions"]
    assert [v["version"] for v in versions] == [4, 3, 2, 1]
    assert [v["source"] for v in versions] == ["rollback", "rollback", "flip", "config"]
    assert [v["note"] for v in versions] == ["restores version 2", "restores version 1", "cutover", "first start"]

    table = pgshift("history", "--limit", "3", "--admin", url, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["VERSION", "TIME", "(UTC)", "SOURCE", "CALLER"]
    rows = lines[1:-1]
    assert [row.split()[:2] for row in rows] == [
        ["*", "4"],
        ["3", _utc_date(versions[1])],
        ["2", _utc_date(versions[2])],
    ]
    assert rows[0].split()[3] == "rollback" and "primary old -> new" in rows[0]
    assert "cutover" in rows[2] and "flip" in rows[2]
    assert lines[-1] == "(* current: version 4)"


def _utc_date(version: dict[str, Any]) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(version["created_at"]))


def test_no_op_change_exits_0(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    same = pgshift("weights", "set", "old=90", "new=10", "--admin", url, cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert same.stdout == "no change: routing is already at version 1\n"
    flip = pgshift("flip", "--primary", "old", "--expect-version", "1", "--json", "--admin", url, cwd=tmp_path)
    assert flip.returncode == 0, flip.stderr
    answer = json.loads(flip.stdout)
    assert answer["changed"] is False and answer["version"] == 1 and answer["changes"] == []
    assert state(url)["version"] == 1


def test_refused_unknown_backend_or_rule_exit_4(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    bad = pgshift("weights", "set", "old=50", "ghost=50", "--admin", url, cwd=tmp_path)
    assert bad.returncode == 4, bad.stderr
    assert bad.stderr.startswith("pgshift: ") and "ghost" in bad.stderr
    assert bad.stdout == ""
    rule = pgshift("weights", "set", "new=1", "--rule", "towns", "--admin", url, cwd=tmp_path)
    assert rule.returncode == 4, rule.stderr
    assert "pgshift: no rule named 'towns'; rules: cities" in rule.stderr
    after = state(url)
    assert after["version"] == 1 and after["routing"]["reads"] == READS


def test_refused_without_token_exit_4(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    missing = pgshift("flip", "--primary", "new", "--admin", url, cwd=tmp_path, token=None)
    assert missing.returncode == 4, missing.stderr
    assert "pgshift: missing or wrong admin token" in missing.stderr
    wrong = pgshift("rollback", "--admin", url, cwd=tmp_path, token="not-the-token")
    assert wrong.returncode == 4, wrong.stderr
    assert "admin token" in wrong.stderr
    assert state(url)["routing"]["primary"] == "old"
    # Reading needs no token on a loopback admin address.
    assert pgshift("status", "--admin", url, cwd=tmp_path, token=None).returncode == 0


def test_refused_on_version_conflict_exit_4(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    stale = pgshift("flip", "--primary", "new", "--expect-version", "7", "--admin", url, cwd=tmp_path)
    assert stale.returncode == 4, stale.stderr
    assert "pgshift: routing is at version 1, not 7 as expected" in stale.stderr
    assert state(url)["routing"]["primary"] == "old"
    fresh = pgshift("flip", "--primary", "new", "--expect-version", "1", "--admin", url, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert state(url)["routing"]["primary"] == "new"


def test_reload_without_config_file_exit_4(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    reload = pgshift("reload", "--admin", url, cwd=tmp_path)
    assert reload.returncode == 4, reload.stderr
    assert "pgshift: this proxy was not started from a config file; there is nothing to reload" in reload.stderr
    assert state(url)["version"] == 1


def test_reload_reports_version_change_and_warnings(
    two_clusters: TwoClusters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.config import load_config

    monkeypatch.setenv("PGSHIFT_TEST_TOKEN", TOKEN)
    path = tmp_path / "proxy.toml"  # not ./config.toml: the CLI is told where the API is

    def write(routing: str, admin: str = "") -> None:
        old, new = (json.dumps(c.dsn(user="", dbname="")) for c in (two_clusters.old, two_clusters.new))
        path.write_text(
            f'[listen]\nport = 0\n[admin]\nport = 0\ntoken = "env:PGSHIFT_TEST_TOKEN"\n{admin}'
            f"[control]\nhealth_interval = 0\n[backends.old]\ndsn = {old}\n[backends.new]\ndsn = {new}\n"
            f'[routing]\nprimary = "old"\n{routing}'
        )

    write("")
    with ProxyThread(load_config(path), config_path=path) as proxy:
        assert proxy.running is not None and proxy.running.admin is not None
        url = f"http://127.0.0.1:{proxy.running.admin.port}"
        write("reads = { old = 1, new = 3 }\n")
        changed = pgshift("reload", "--admin", url, cwd=tmp_path)
        assert changed.returncode == 0, changed.stderr
        assert changed.stdout == "config reloaded: routing version 2 (routing changed)\n"
        assert state(url)["routing"]["reads"] == {"old": 1, "new": 3}

        write("reads = { old = 1, new = 3 }\n", admin="max_body = 4096\n")
        same = pgshift("reload", "--admin", url, cwd=tmp_path)
        assert same.returncode == 0, same.stderr
        assert same.stdout.splitlines() == [
            "config reloaded: routing version 2 (routing unchanged)",
            "warning: [admin] changed: takes effect at restart",
        ]
        raw = pgshift("reload", "--json", "--admin", url, cwd=tmp_path)
        assert raw.returncode == 0, raw.stderr
        assert json.loads(raw.stdout)["routing_changed"] is False


@pytest.mark.parametrize("token", ["old=abc", "old=-1", "old=1.5", "old=+3", "old= 3", "=5", "old", "old=٣"])
def test_bad_weight_is_a_usage_error(token: str, tmp_path: Path) -> None:
    # Pointed at a port where nothing listens: were the token accepted, the exit code would be 3.
    bad = pgshift("weights", "set", "new=10", token, "--admin", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert f"argument NAME=W: {token!r}" in bad.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    port = free_port()
    twice = pgshift("weights", "set", "old=1", "old=2", "--admin", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert twice.returncode == 2 and "pgshift: backend 'old' is given twice" in twice.stderr
    no_scheme = pgshift("status", "--admin", f"127.0.0.1:{port}", cwd=tmp_path)
    assert no_scheme.returncode == 2 and "--admin must be an http:// or https:// URL" in no_scheme.stderr
    no_file = pgshift("status", "--config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert no_file.returncode == 2 and "absent.toml does not exist" in no_file.stderr
    assert pgshift("flip", "--admin", f"http://127.0.0.1:{port}", cwd=tmp_path).returncode == 2  # --primary missing
    helped = pgshift("--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "3  the admin API could not be reached" in helped.stdout
    assert "4  the admin API refused the request" in helped.stdout


def test_unreachable_exit_3(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["flip", "--primary", "new"]):
        nobody = pgshift(*args, "--admin", url, cwd=tmp_path)
        assert nobody.returncode == 3, nobody.stderr
        assert f"pgshift: cannot reach the admin API at {url}" in nobody.stderr


def test_admin_address_and_token_from_config_file(admin_url: Callable[..., str], tmp_path: Path) -> None:
    """Without --admin, ./config.toml's [admin] says where and with which token; nothing else in it
    is checked (this one has a backend password in a variable the operator's shell lacks)."""
    url = admin_url()
    port = int(url.rsplit(":", 1)[1])
    (tmp_path / "config.toml").write_text(
        '[backends.old]\ndsn = "postgresql://db.example/app"\npassword = "env:PGSHIFT_TEST_UNSET_PASSWORD"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {port}\ntoken = "env:PGSHIFT_TEST_CLI_TOKEN"\n'
    )
    unset = pgshift("flip", "--primary", "new", cwd=tmp_path, token=None)
    assert unset.returncode == 4, unset.stderr
    assert "PGSHIFT_TEST_CLI_TOKEN" in unset.stderr  # the hint says why no token was sent
    done = pgshift("flip", "--primary", "new", cwd=tmp_path, token=None, env={"PGSHIFT_TEST_CLI_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("routing version 2 (changed)")
    assert state(url)["routing"]["primary"] == "new"


class _Stub(http.server.BaseHTTPRequestHandler):
    """Not pgshift: a 503 with the API's error shape, or a 200 that is not JSON."""

    def _answer(self) -> None:
        if self.path.startswith("/api/state"):
            body, status, kind = b"<html>hello</html>", 200, "text/html"
        else:
            body = json.dumps({"error": {"status": 503, "message": "control store unreachable: try later"}}).encode()
            status, kind = 503, "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stub_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_proxy_failure_exit_5(stub_url: str, tmp_path: Path) -> None:
    failed = pgshift("flip", "--primary", "new", "--admin", stub_url, cwd=tmp_path)
    assert failed.returncode == 5, failed.stderr
    assert "pgshift: control store unreachable: try later" in failed.stderr
    odd = pgshift("status", "--admin", stub_url, cwd=tmp_path)
    assert odd.returncode == 5, odd.stderr
    assert "not a JSON object" in odd.stderr


def test_status_highlights_other_versions_and_outages() -> None:
    now = time.time()
    state = {
        "instance": "a:6432",
        "version": 5,
        "live": True,
        "routing": {"primary": "new", "mirrors": ["old"], "reads": {"new": 100}, "sticky": "session", "rules": []},
        "last_change": {"at": now - 120, "source": "flip", "caller": "ops@box (10.0.0.2)", "note": "go\x1b[2J"},
        "store": {"kind": "postgres", "location": "db:5432/pgshift", "ok": False, "error": "refused",
                  "down_since": now - 30},
        "instances": [
            {"instance": "a:6432", "version": 5, "heartbeat_age_s": 0.2, "stale": False, "self": True},
            {"instance": "b:6432", "version": 4, "heartbeat_age_s": 42.0, "stale": True, "self": False},
        ],
        "backends": {
            "old": {"role": "mirror", "up": False, "probe_ms": None, "probe_error": "connection refused",
                    "requests_per_s": 0.0, "mean_latency_ms": None, "errors_per_s": 0.5, "error_ratio": 1.0,
                    "connections": 0},
            "new": {"role": "primary", "up": True, "probe_ms": 1.25, "probe_error": None, "requests_per_s": 12.5,
                    "mean_latency_ms": 3.5, "errors_per_s": 0.0, "error_ratio": 0.0, "connections": 4},
        },
        "sessions": {"active": 4, "starting": 0, "in_transaction": 1, "pinned": 2,
                     "pinned_by_cause": {"temp_table": 2}, "by_primary": {"new": 2, "old": 2},
                     "on_previous_primary": 2},
    }  # fmt: skip
    lines = status_lines(state)
    out = "\n".join(lines)
    assert '"go\\x1b[2J"' in out  # a note cannot drive the terminal
    assert "2m ago" in out and "by ops@box (10.0.0.2) via flip" in out
    assert "  mirrors  old" in lines and "  reads    new=100   sticky session" in lines
    assert "store  postgres db:5432/pgshift: DOWN since " in out and "(30s): refused" in out
    other = next(line for line in lines if "b:6432" in line)
    assert other.split()[:4] == ["b:6432", "4", "42.0s", "STALE"]
    assert "DIFFERENT VERSION (this instance is at 5)" in other
    assert "DIFFERENT" not in next(line for line in lines if "a:6432" in line and "this instance" in line)
    old_row = next(line.split() for line in lines if line.strip().startswith("old "))
    assert old_row == ["old", "mirror", "DOWN", "-", "0.00", "-", "0.500", "100.00%", "0"]
    new_row = next(line.split() for line in lines if line.strip().startswith("new ") and "primary" in line)
    assert new_row == ["new", "primary", "up", "1.2", "12.50", "3.50", "0.000", "0.00%", "4"]
    assert "  old is DOWN: connection refused" in lines
    assert lines[-1] == (
        "sessions  4 active, 0 starting, 1 in a transaction, 2 pinned (temp_table 2), 2 on a previous primary (old 2)"
    )


def _available(stream: IO[str] | None) -> str:
    """What can be read from ``stream`` now, without waiting for its end."""
    if stream is None or not select.select([stream], [], [], 0.5)[0]:
        return ""
    return os.read(stream.fileno(), 65536).decode(errors="replace")


def test_status_watch_redraws_until_ctrl_c(admin_url: Callable[..., str], tmp_path: Path) -> None:
    url = admin_url()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", "status", "--watch", "0.2", "--admin", url],
        cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            seen = ""
            deadline = time.monotonic() + 15
            while seen.count("routing version 1") < 2:  # drawn at least twice
                assert time.monotonic() < deadline, seen
                seen += proc.stdout.readline()
            assert "\x1b[2J" in seen and "every 0.2s" in seen
        finally:
            proc.send_signal(signal.SIGINT)
            # The process's end, not the pipes' EOF: in the full suite a process forked meanwhile
            # by another thread of pytest may hold a copy of the pipes (seen in CI).
            proc.wait(timeout=30)
        assert proc.returncode == 0, _available(proc.stderr)
    refused = pgshift("status", "--watch", "1", "--json", "--admin", url, cwd=tmp_path)
    assert refused.returncode == 2 and "--watch redraws the table" in refused.stderr
