"""The live control plane against real clusters: API validation, flip and rollback under load,
persistence across restarts, pinned sessions, reload, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

from proxy.localpg import free_port
from tests.integration.conftest import TwoClusters, routed_config
from tests.support.proxy import ProxyThread

TOKEN = "test-admin-token"


@pytest.fixture(autouse=True)
def _admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSHIFT_TEST_ADMIN_TOKEN", TOKEN)


def control_config(two: TwoClusters, control: dict[str, Any] | None = None, **routing: Any) -> dict[str, Any]:
    config = routed_config(two.old, two.new, **routing)
    config["admin"] = {"port": 0, "token": "env:PGSHIFT_TEST_ADMIN_TOKEN"}
    if control:
        config["control"] = control
    return config


def api(proxy: ProxyThread, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}", "X-Pgshift-Caller": "pytest"} if token else {}
    return httpx.Client(base_url=proxy.admin_url, headers=headers, timeout=10)


@pytest.fixture
def proxy(two_clusters: TwoClusters) -> Iterator[ProxyThread]:
    """Primary "old", every read on it, "new" a mirror; state in memory."""
    with ProxyThread(control_config(two_clusters, mirrors=["new"])) as running:
        yield running


def port_of(proxy: ProxyThread, sql: str = "select current_setting('port')") -> int:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])


# --- validation -------------------------------------------------------------------------------

BAD_ROUTING = [
    ({"primary": 5}, "routing.primary: Input should be a valid string"),
    ({"primary": "old", "reads": "all"}, "routing.reads: Input should be a valid dictionary"),
    ({"primary": "old", "reads": {"old": "lots"}}, "routing.reads.old: Input should be a valid integer"),
    ({"primary": "old", "reads": {"old": -1}}, "greater than or equal to 0"),
    ({"primary": "old", "reads": {"old": 0, "new": 0}}, "routing.reads needs at least one weight above 0"),
    ({"primary": "old", "reads": {}}, "routing.reads needs at least one weight above 0"),
    ({"primary": "old", "rules": [{"tables": ["t"], "reads": {}}]}, "reads needs at least one weight above 0"),
    ({"primary": "nowhere"}, "routing.primary = 'nowhere' is not a backend; declared backends: new, old"),
    ({"primary": "old", "reads": {"olde": 1}}, "routing.reads names unknown backend(s) olde"),
    ({"primary": "old", "mirrors": ["old"]}, "cannot be both primary and a mirror"),
    ({"primary": "old", "mirrors": ["x"]}, "routing.mirrors names unknown backend(s) x"),
    ({"primary": "old", "rules": [{"reads": {"new": 1}}]}, "a rule needs at least one of tables"),
    ({"primary": "old", "rules": [{"tables": ["t"], "reads": {"zz": 1}}]}, "routing.rules[0].reads names unknown"),
    ({"primary": "old", "colour": "blue"}, "routing.colour: unknown setting"),
    ([1, 2], "routing must be a JSON object"),
]


@pytest.mark.parametrize(("body", "message"), BAD_ROUTING, ids=[m for _, m in BAD_ROUTING])
def test_put_routing_rejects_bad_bodies(proxy: ProxyThread, body: Any, message: str) -> None:
    with api(proxy) as client:
        reply = client.put("/api/routing", json=body)
        assert reply.status_code == 400, reply.text
        assert message in reply.json()["error"]["message"]
        assert client.get("/api/state").json()["version"] == 1  # nothing changed


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "message"),
    [
        ("PUT", "/api/routing", b"{not json", 400, "body is not valid JSON"),
        ("PUT", "/api/routing", b"", 400, "request body is empty"),
        ("PATCH", "/api/routing", b'{"primary": "new"}', 400, "cannot change primary here"),
        ("PATCH", "/api/routing", b"{}", 400, "body must be a JSON object with the fields to change"),
        ("PATCH", "/api/routing/rules/nope", b'{"reads": {"new": 1}}', 400, "no rule named 'nope'"),
        ("POST", "/api/flip", b"{}", 400, 'body must name the new primary: {"primary": "new"}'),
        ("POST", "/api/flip", b'{"primary": "neww"}', 400, "cannot flip to 'neww': not a backend"),
        ("POST", "/api/rollback", b'{"to": 99}', 400, "no routing version 99"),
        ("POST", "/api/rollback", b'{"to": "two"}', 400, "to must be a version number"),
        ("POST", "/api/rollback", b"{}", 400, "version 1 is the first one"),
        ("POST", "/api/reload", b"", 400, "not started from a config file"),
        ("PUT", "/api/routing?expect_version=7", b'{"primary": "new"}', 409, "not 7 as expected"),
        ("PUT", "/api/routing?expect_version=x", b'{"primary": "new"}', 400, "expect_version must be a version"),
        ("PUT", "/api/routing", b"[" * (2 << 20), 413, "body too large; the limit is admin.max_body"),
        ("DELETE", "/api/routing", b"", 405, "DELETE is not allowed on /api/routing"),
        ("GET", "/api/nothing", b"", 404, "no endpoint /api/nothing"),
    ],
)
def test_api_errors_say_what_to_do(
    proxy: ProxyThread, method: str, path: str, content: bytes, status: int, message: str
) -> None:
    with api(proxy) as client:
        reply = client.request(method, path, content=content)
        assert reply.status_code == status, reply.text
        assert message in reply.json()["error"]["message"]
        assert client.get("/api/state").json()["version"] == 1


def test_mutations_need_the_token(proxy: ProxyThread) -> None:
    for token in (None, "wrong"):
        with api(proxy, token) as client:
            reply = client.post("/api/flip", json={"primary": "new"})
            assert reply.status_code == 401
            assert "Authorization: Bearer" in reply.json()["error"]["message"]
            assert client.get("/api/state").status_code == 200  # reads are open on loopback
            assert client.get("/api/state").json()["routing"]["primary"] == "old"


def test_without_a_configured_token_changes_are_refused(two_clusters: TwoClusters) -> None:
    config = control_config(two_clusters)
    config["admin"] = {"port": 0}
    with ProxyThread(config) as running, api(running) as client:
        reply = client.post("/api/flip", json={"primary": "new"})
        assert reply.status_code == 403
        assert "env:PGSHIFT_ADMIN_TOKEN" in reply.json()["error"]["message"]


def test_non_loopback_admin_without_token_refuses_to_start(two_clusters: TwoClusters) -> None:
    config = control_config(two_clusters)
    config["admin"] = {"host": "0.0.0.0", "port": 0}
    with pytest.raises(Exception, match=r"is not a loopback address: set admin\.token"):
        ProxyThread(config)


def test_static_routing_refuses_changes(two_clusters: TwoClusters) -> None:
    with ProxyThread(control_config(two_clusters, control={"live": False})) as running, api(running) as client:
        reply = client.post("/api/flip", json={"primary": "new"})
        assert reply.status_code == 400
        assert "live = false" in reply.json()["error"]["message"]


# --- changes take effect ------------------------------------------------------------------------


def test_weights_flip_rollback_history(proxy: ProxyThread, two_clusters: TwoClusters) -> None:
    old, new = two_clusters.old.port, two_clusters.new.port
    with api(proxy) as client:
        assert port_of(proxy) == old
        reply = client.patch("/api/routing", json={"reads": {"old": 0, "new": 100}}).json()
        assert reply["version"] == 2 and reply["changed"]
        assert port_of(proxy) == new  # a read
        assert port_of(proxy, "select current_setting('port') from pg_class for update limit 1") == old  # a write
        again = client.patch("/api/routing", json={"reads": {"old": 0, "new": 100}}).json()
        assert again == {**again, "version": 2, "changed": False}  # idempotent: no new version

        flipped = client.post("/api/flip?note=cut-over", json={"primary": "new"}).json()
        assert flipped["routing"]["primary"] == "new" and flipped["routing"]["mirrors"] == ["old"]
        assert port_of(proxy, "select current_setting('port') from pg_class for update limit 1") == new

        back = client.post("/api/rollback", json={"to": 1}).json()
        assert back["version"] == 4
        state = client.get("/api/state").json()
        assert state["routing"] == client.get("/api/history").json()["versions"][-1]["routing"]  # exactly v1
        assert port_of(proxy) == old

        history = client.get("/api/history").json()
        assert history["current"] == 4
        entries = history["versions"]
        assert [(e["version"], e["source"]) for e in entries] == [
            (4, "rollback"),
            (3, "flip"),
            (2, "patch"),
            (1, "config"),
        ]
        assert entries[1]["note"] == "cut-over" and entries[1]["caller"].startswith("pytest (127.0.0.1)")
        assert entries[1]["changes"] == ["primary old -> new", "mirrors ['new'] -> ['old']"]
        assert entries[1]["before"]["primary"] == "old"


def test_rule_patch(two_clusters: TwoClusters) -> None:
    rule = {"name": "cities", "tables": ["cities"], "reads": {"old": 100}}
    with ProxyThread(control_config(two_clusters, rules=[rule])) as running, api(running) as client:
        assert port_of(running, "select current_setting('port') from cities limit 1") == two_clusters.old.port
        reply = client.patch("/api/routing/rules/cities", json={"reads": {"old": 0, "new": 1}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["changes"] == ["rule cities: reads old=100 -> new=1 old=0"]
        assert port_of(running, "select current_setting('port') from cities limit 1") == two_clusters.new.port
        assert port_of(running) == two_clusters.old.port  # the default is untouched


async def test_flip_and_rollback_under_load(proxy: ProxyThread, two_clusters: TwoClusters) -> None:
    """16 clients in a loop of transactions while the primary flips and flips back: no error, no
    dropped connection, no transaction split across backends, and every transaction that begins
    after the API answered runs on the new primary."""
    old, new = two_clusters.old.port, two_clusters.new.port
    table = "flip_load"
    for cluster in (two_clusters.old, two_clusters.new):
        cluster.psql(
            # (uuid keys: "new" is a mirror, so it gets old's rows with their serial ids while its own
            # sequence stays behind; advancing sequences is the guarded cut-over's job, not a flip's)
            f"drop table if exists {table}; create table {table} (id uuid primary key default gen_random_uuid(), "
            "client int, port int)"
        )
    records: list[tuple[int, float, int, int]] = []  # (client, begin time, port at begin, port at end)
    stop = asyncio.Event()

    async def client(i: int) -> int:
        conn = await asyncpg.connect(proxy.dsn(), ssl=False)
        try:
            while not stop.is_set():
                begin = time.monotonic()
                async with conn.transaction():
                    first = int(await conn.fetchval("select current_setting('port')"))
                    await conn.execute(f"insert into {table} (client, port) values ($1, $2)", i, first)
                    last = int(await conn.fetchval("select current_setting('port')"))
                records.append((i, begin, first, last))
                await conn.fetchval("select 1")  # an autocommit statement between transactions
            return conn.get_server_pid()
        finally:
            await conn.close()

    def call(path: str, body: dict[str, Any]) -> float:
        with api(proxy) as admin:
            assert admin.post(path, json=body).status_code == 200
        return time.monotonic()

    tasks = [asyncio.create_task(client(i)) for i in range(16)]
    await asyncio.sleep(0.5)
    flip_started = time.monotonic()
    flipped = await asyncio.to_thread(call, "/api/flip", {"primary": "new"})
    await asyncio.sleep(0.7)
    rollback_started = time.monotonic()
    rolled_back = await asyncio.to_thread(call, "/api/rollback", {})
    await asyncio.sleep(0.7)
    stop.set()
    await asyncio.gather(*tasks)  # any client error fails the test here

    assert all(first == last for _, _, first, last in records), "a transaction ran on two backends"
    for i, begin, first, _ in records:
        if flipped < begin < rollback_started:
            assert first == new, f"client {i}: transaction begun after the flip ran on the old primary"
        elif begin > rolled_back:
            assert first == old, f"client {i}: transaction begun after the rollback ran on the new primary"
        elif begin < flip_started:
            assert first == old
    for i in range(16):
        assert any(b > flipped and b < rollback_started for c, b, _, _ in records if c == i), f"client {i} stalled"
        assert any(b > rolled_back for c, b, _, _ in records if c == i), f"client {i} stalled after rollback"
    # Every write landed on the primary of its time: nothing lost, nothing doubled.
    on_old = int(two_clusters.old.psql(f"select count(*) from {table} where port = {old}").strip())
    on_new = int(two_clusters.new.psql(f"select count(*) from {table} where port = {new}").strip())
    assert on_old + on_new == len(records)
    assert on_new == sum(1 for r in records if r[2] == new)
    with api(proxy) as admin:
        sessions = admin.get("/api/state").json()["sessions"]
    assert sessions["on_previous_primary"] == 0


def test_pinned_session_stays_on_its_primary_and_is_reported(proxy: ProxyThread, two_clusters: TwoClusters) -> None:
    old, new = two_clusters.old.port, two_clusters.new.port
    with psycopg.connect(proxy.dsn(), autocommit=True) as pinned, api(proxy) as client:
        pinned.execute("create temp table scratch (x int)")
        assert client.post("/api/flip", json={"primary": "new"}).status_code == 200
        # Its temporary table lives on the old primary: the session must stay there.
        pinned.execute("insert into scratch values (1)")
        row = pinned.execute("select current_setting('port'), count(*) from scratch").fetchone()
        assert row is not None and (int(row[0]), row[1]) == (old, 1)
        sessions = client.get("/api/state").json()["sessions"]
        assert sessions["pinned"] == 1 and sessions["pinned_by_cause"] == {"temp_table": 1}
        assert sessions["on_previous_primary"] == 1 and sessions["by_primary"] == {"old": 1}
        assert port_of(proxy) == new  # a new session writes to the new primary
    deadline = time.monotonic() + 5
    with api(proxy) as client:
        while client.get("/api/state").json()["sessions"]["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/api/state").json()["sessions"]["on_previous_primary"] == 0


def test_session_settings_and_statements_follow_a_flip(proxy: ProxyThread, two_clusters: TwoClusters) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, api(proxy) as client:
        conn.execute("set application_name = 'flip-follow'")
        conn.execute("set search_path = pg_catalog, public")
        conn.execute("prepare is_there (int) as select $1 + 1")  # SQL PREPARE pins: stays on old
        client.post("/api/flip", json={"primary": "new"})
        row = conn.execute("select current_setting('port')").fetchone()
        assert row is not None and int(row[0]) == two_clusters.old.port
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, api(proxy) as client:
        conn.execute("set application_name = 'flip-follow'")
        for _ in range(6):  # psycopg prepares a statement after 5 executions (prepare_threshold)
            conn.execute("select current_setting('application_name') where %s::int > 0", (1,))
        client.post("/api/flip", json={"primary": "old"})
        client.post("/api/flip", json={"primary": "new"})
        row = conn.execute("select current_setting('application_name') where %s::int > 0", (1,)).fetchone()
        assert row == ("flip-follow",)
        port = conn.execute("select current_setting('port')").fetchone()
        assert port is not None and int(port[0]) == two_clusters.new.port


# --- persistence --------------------------------------------------------------------------------


def test_restart_keeps_the_last_routing_version(two_clusters: TwoClusters, tmp_path: Path) -> None:
    state = tmp_path / "state.jsonl"
    config = control_config(two_clusters, control={"state_file": str(state)})
    with ProxyThread(config) as running, api(running) as client:
        client.patch("/api/routing", json={"reads": {"old": 50, "new": 50}})
        client.post("/api/flip", json={"primary": "new"})
    lines = [json.loads(line) for line in state.read_text().splitlines()]
    assert [line["version"] for line in lines] == [1, 2, 3]
    with ProxyThread(config) as running, api(running) as client:
        current = client.get("/api/state").json()
        assert current["version"] == 3 and current["routing"]["primary"] == "new"
        assert current["last_change"]["source"] == "flip"
        assert port_of(running, "select current_setting('port') from pg_class for update limit 1") == (
            two_clusters.new.port
        )
    # config.toml's [routing] edited while stopped: that edit becomes the next version.
    edited = control_config(two_clusters, control={"state_file": str(state)}, reads={"old": 1})
    with ProxyThread(edited) as running, api(running) as client:
        current = client.get("/api/state").json()
        assert current["version"] == 4 and current["routing"]["primary"] == "old"
        assert current["last_change"]["note"] == "config.toml [routing] changed since it was last applied"


def test_torn_state_file_is_reported(two_clusters: TwoClusters, tmp_path: Path) -> None:
    state = tmp_path / "state.jsonl"
    first = {"version": 1, "routing": {"primary": "old"}, "source": "config", "caller": "x", "created_at": 1}
    state.write_text(json.dumps(first) + '\n{"version": 2, "rout')
    with pytest.raises(RuntimeError, match="line 2 is not valid JSON"):
        ProxyThread(control_config(two_clusters, control={"state_file": str(state)})).start()


def test_persisted_version_naming_an_undeclared_backend_stops_the_start(
    two_clusters: TwoClusters, tmp_path: Path
) -> None:
    state = tmp_path / "state.jsonl"
    version = {"version": 1, "routing": {"primary": "gone"}, "source": "flip", "caller": "x", "created_at": 1}
    state.write_text(json.dumps({**version, "source": "config", "routing": {"primary": "old"}}) + "\n"
                     + json.dumps({**version, "version": 2}) + "\n")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"routing\.primary = 'gone' is not a backend"):
        ProxyThread(control_config(two_clusters, control={"state_file": str(state)})).start()


# --- reload ---------------------------------------------------------------------------------------


def _write_config(path: Path, two: TwoClusters, state: Path, reads: str, ports: tuple[int, int] = (0, 0)) -> None:
    path.write_text(
        f"""
[listen]
port = {ports[0]}
[admin]
port = {ports[1]}
token = "env:PGSHIFT_TEST_ADMIN_TOKEN"
[control]
state_file = "{state}"
health_interval = 0
[backends.old]
dsn = "{two.old.dsn(user="", dbname="")}"
[backends.new]
dsn = "{two.new.dsn(user="", dbname="")}"
[routing]
primary = "old"
{reads}
"""
    )


def test_reload_applies_a_changed_file_and_rejects_a_broken_one(two_clusters: TwoClusters, tmp_path: Path) -> None:
    from proxy.config import load_config

    path, state = tmp_path / "config.toml", tmp_path / "state.jsonl"
    _write_config(path, two_clusters, state, "")
    with ProxyThread(load_config(path), config_path=path) as running, api(running) as client:
        client.patch("/api/routing", json={"reads": {"old": 1, "new": 1}})
        # Unchanged [routing]: a reload keeps the API's change.
        reply = client.post("/api/reload").json()
        assert reply["routing_changed"] is False and reply["version"] == 2
        _write_config(path, two_clusters, state, "reads = { old = 0, new = 1 }\n[[routing.rules]]\nbroken = 1")
        reply = client.post("/api/reload")
        assert (
            reply.status_code == 400 and "routing.rules.0.broken: unknown setting" in reply.json()["error"]["message"]
        )
        assert client.get("/api/state").json()["version"] == 2
        _write_config(path, two_clusters, state, "reads = { old = 0, new = 1 }")
        reply = client.post("/api/reload").json()
        assert reply["routing_changed"] is True and reply["version"] == 3
        assert port_of(running) == two_clusters.new.port
        assert client.get("/api/history").json()["versions"][0]["source"] == "reload"


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_describe_traffic(proxy: ProxyThread) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1").fetchone()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
    with api(proxy) as client:
        client.patch("/api/routing", json={"reads": {"old": 1, "new": 1}})
        text = client.get("/metrics").text
    assert 'pgshift_request_duration_seconds_count{backend="old",kind="read"}' in text
    assert 'pgshift_backend_errors_total{backend="old",class="22"} 1.0' in text
    assert "pgshift_routing_version 2.0" in text
    assert 'pgshift_admin_changes_total{source="patch"} 1.0' in text
    assert 'pgshift_routing_read_weight{backend="new",rule=""} 50.0' in text
    assert 'pgshift_routing_decisions_total{backend="old",reason="primary_only"}' in text
    assert "pgshift_analysis_cache_misses_total" in text


def test_every_metric_is_documented_in_the_readme() -> None:
    from proxy.admin.metrics import HELP

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in HELP if f"`{name}" not in readme]
    assert not missing, f"README.md does not describe {missing}"


def test_sighup_reloads_and_a_broken_file_keeps_the_running_state(two_clusters: TwoClusters, tmp_path: Path) -> None:
    path, state, log = tmp_path / "config.toml", tmp_path / "state.jsonl", tmp_path / "stderr.log"
    ports = (free_port(), free_port())
    _write_config(path, two_clusters, state, "", ports)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PGSHIFT_TEST_ADMIN_TOKEN": TOKEN, "PYTHONPATH": root}
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(path)], env=env, stderr=stderr, cwd=tmp_path
        )
    base = f"http://127.0.0.1:{ports[1]}"

    def version() -> int:
        return int(httpx.get(f"{base}/api/state", timeout=5).json()["version"])

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert version() == 1
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        _write_config(path, two_clusters, state, "reads = { old = 0, new = 1 }", ports)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while version() != 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        path.write_text(path.read_text().replace("[routing]", "[routing\n"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reload rejected" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        assert "is not valid TOML" in log.read_text()
        assert version() == 2 and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_flip_to_an_unreachable_backend_needs_force(two_clusters: TwoClusters) -> None:
    dead = f"postgresql://127.0.0.1:{free_port()}?sslmode=disable"
    config = control_config(two_clusters, control={"health_interval": 0.1})
    config["backends"]["new"] = {"dsn": dead}
    with ProxyThread(config) as running, api(running) as client:
        deadline = time.monotonic() + 5
        while client.get("/api/state").json()["backends"]["new"]["up"] is not False:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert 'pgshift_backend_up{backend="new"} 0.0' in client.get("/metrics").text
        assert client.get("/readyz").status_code == 200  # the primary is fine
        refused = client.post("/api/flip", json={"primary": "new"})
        assert refused.status_code == 400
        assert "was unreachable at the last probe" in refused.json()["error"]["message"]
        assert client.get("/api/state").json()["version"] == 1
        forced = client.post("/api/flip", json={"primary": "new", "force": True})
        assert forced.status_code == 200 and forced.json()["version"] == 2
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "primary 'new' is unreachable" in ready.json()["problems"][0]
        # A session's next write has nowhere to go: it ends with the backend's error, as a direct
        # connection to a dead server would.
        with pytest.raises(psycopg.OperationalError, match="new"):
            port_of(running)


def test_sticky_sessions_follow_a_rollback(two_clusters: TwoClusters) -> None:
    rule = {"name": "app", "users": ["postgres"], "reads": {"old": 0, "new": 100}, "sticky": "session"}
    # (The default splits reads, so routing is not "primary only" and the sticky draw is consulted.)
    config = control_config(two_clusters, reads={"old": 1, "new": 1}, rules=[rule])
    with (
        ProxyThread(config) as running,
        api(running) as client,
        psycopg.connect(running.dsn(), autocommit=True) as conn,
    ):
        read = "select current_setting('port')"
        ports = [conn.execute(read).fetchone() for _ in range(3)]
        assert ports == [(str(two_clusters.new.port),)] * 3
        client.patch("/api/routing/rules/app", json={"reads": {"old": 100, "new": 0}})
        assert conn.execute(read).fetchone() == (str(two_clusters.old.port),)


def test_read_failing_on_the_previous_primary_is_retried_on_the_new_one(two_clusters: TwoClusters) -> None:
    """After a flip the session's new primary may not be connected yet when a read held on the
    previous primary fails: the retry opens it first, and the client sees only the answer."""
    table = "only_on_new"
    two_clusters.new.psql(f"drop table if exists {table}; create table {table} (x int); insert into {table} values (7)")
    two_clusters.old.psql(f"drop table if exists {table}")
    config = control_config(two_clusters, reads={"old": 100, "new": 0})
    with ProxyThread(config) as running, api(running) as client:
        with psycopg.connect(running.dsn(), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)  # connected to old only
            client.post("/api/flip", json={"primary": "new"})
            # Reads still weigh old=100: this one goes to old (now a read backend), fails there
            # (no such table), and is sent to the new primary, which this session opens now.
            assert conn.execute(f"select x from {table}").fetchone() == (7,)
        state = running.server.ctx.stats if running.server else None
        assert state is not None and state.failovers[("old", "error")] == 1
        assert state.moves["new"] == 1


def test_a_bug_in_the_relay_ends_only_its_session(proxy: ProxyThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the routing step raises for one statement. That client gets an error
    naming the proxy's log and its session ends; another session, and the proxy, go on."""
    from proxy.session.routed import RoutedSession

    real = RoutedSession._choose

    def buggy(self: RoutedSession, info: Any, *, open_ended: bool = False) -> str:
        if any("trigger_the_bug" in sql for sql, _ in info.texts):
            raise ZeroDivisionError("injected")
        return real(self, info, open_ended=open_ended)

    monkeypatch.setattr(RoutedSession, "_choose", buggy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as bystander:
        with psycopg.connect(proxy.dsn(), autocommit=True) as victim:
            with pytest.raises(psycopg.errors.InternalError_, match="pgshift internal error; see the proxy log"):
                victim.execute("select 'trigger_the_bug'")
            assert victim.closed or victim.broken
        assert bystander.execute("select 41 + 1").fetchone() == (42,)
    assert port_of(proxy) == port_of(proxy)  # new sessions work too


def test_deallocations_follow_a_flip_without_pinning(proxy: ProxyThread, two_clusters: TwoClusters) -> None:
    """DEALLOCATE (psycopg sends DEALLOCATE ALL after a rollback; older libpq evicts with
    DEALLOCATE name) is tracked, not pinned: the session still follows a flip, and a DEALLOCATE of
    a statement the new primary has not seen yet works, as it would against one server."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, api(proxy) as client:
        conn.execute("select %s::int", (1,), prepare=True)  # _pg3_0, parsed on old
        conn.execute("select %s::int + 1", (1,), prepare=True)  # _pg3_1
        client.post("/api/flip", json={"primary": "new"})
        assert conn.execute("select current_setting('port')").fetchone() == (str(two_clusters.new.port),)
        conn.execute("deallocate _pg3_0")  # new has never seen it: it is parsed there first
        assert conn.execute("select %s::int + 1", (5,)).fetchone() == (6,)  # _pg3_1, re-parsed on new
        conn.execute("deallocate all")
        assert conn.execute("select %s::int * 3", (5,), prepare=True).fetchone() == (15,)
        assert client.get("/api/state").json()["sessions"]["pinned"] == 0
