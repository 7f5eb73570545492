"""The write pause of a cut-over (POST /api/pause, /api/resume) against real clusters: new work on
the primary waits without an error while reads routed elsewhere go on; the drain waits for open
transactions, gives up after its timeout and resumes; a pause never outlives its maximum."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from proxy.admin.render import status_lines
from tests.integration.conftest import TwoClusters, routed_config
from tests.support.proxy import ProxyThread

pytestmark = pytest.mark.timeout(60)

TOKEN = "pause-test-token"
ROOT = Path(__file__).resolve().parents[2]


class Admin:
    def __init__(self, proxy: ProxyThread) -> None:
        assert proxy.running is not None and proxy.running.admin is not None
        self.url = f"http://127.0.0.1:{proxy.running.admin.port}"
        self.proxy = proxy

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30)

    def pause_state(self) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(self.url + "/api/state", timeout=10).json()["pause"]
        return state


@pytest.fixture
def admin(two_clusters: TwoClusters, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Admin]]:
    monkeypatch.setenv("PGSHIFT_TEST_PAUSE_TOKEN", TOKEN)
    started: list[ProxyThread] = []

    def start(control: dict[str, Any] | None = None, **routing: Any) -> Admin:
        config = routed_config(two_clusters.old, two_clusters.new, **routing)
        config["admin"] = {"port": 0, "token": "env:PGSHIFT_TEST_PAUSE_TOKEN"}
        if control is not None:
            config["control"] = control
        proxy = ProxyThread(config).start()
        started.append(proxy)
        return Admin(proxy)

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


class Background:
    """A statement run through the proxy in a thread: when it finished, and how."""

    def __init__(self, dsn: str, sql: str) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(dsn, sql), daemon=True)
        self._thread.start()

    def _run(self, dsn: str, sql: str) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                self.result = conn.execute(sql).fetchone()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()

    def wait(self, timeout: float = 20) -> Any:
        assert self.done.wait(timeout), "the statement did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def test_writes_wait_reads_go_on_and_resume_releases(admin: Callable[..., Admin]) -> None:
    api = admin(reads={"old": 0, "new": 100})  # every read on new; writes on old, the primary
    dsn = api.proxy.dsn()
    paused = api.post("/api/pause", {"drain_timeout": 2, "reason": "test"})
    assert paused.status_code == 200, paused.text
    assert paused.json()["drained"] and paused.json()["paused"]

    write = Background(dsn, "update items set name = name where id = 1 returning id")
    with psycopg.connect(dsn, autocommit=True) as conn:  # a read while the pause holds the write
        started = time.monotonic()
        assert conn.execute("select count(*) from items").fetchone() == (1000,)
        assert time.monotonic() - started < 2
    time.sleep(0.3)
    assert not write.done.is_set(), "a write went to the primary during the pause"
    assert api.pause_state()["holding"] == 1
    screen = "\n".join(status_lines(httpx.get(api.url + "/api/state", timeout=10).json()))
    assert "WRITES PAUSED" in screen and "(test): 1 session(s) waiting" in screen

    resumed_at = time.monotonic()
    resumed = api.post("/api/resume")
    assert resumed.status_code == 200 and resumed.json()["was_paused"]
    assert write.wait() == (1,)  # no error: it just waited
    assert write.finished_at >= resumed_at
    state = api.pause_state()
    assert not state["paused"] and state["last_held"] == 1 and state["last_max_wait_s"] >= 0.3

    # Not paused: resume again is harmless, and writes flow.
    assert api.post("/api/resume").json()["was_paused"] is False
    assert Background(dsn, "update items set name = name where id = 2 returning id").wait() == (2,)


def test_drain_waits_for_open_transactions_or_gives_up(admin: Callable[..., Admin]) -> None:
    api = admin(reads={"old": 50, "new": 50})
    dsn = api.proxy.dsn()
    with psycopg.connect(dsn) as open_tx:  # (not autocommit: the UPDATE opens a transaction on old)
        open_tx.execute("update items set name = name where id = 3")

        # The transaction outlives the drain: the pause ends again, nothing is held.
        refused = api.post("/api/pause", {"drain_timeout": 0.3})
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert not body["drained"] and body["writing"] == 1 and not body["paused"]
        assert "drain timed out" in body["error"]["message"]
        assert Background(dsn, "update items set name = name where id = 4 returning id").wait() == (4,)

        # A drain that waits long enough: it returns once the transaction has committed.
        result: dict[str, httpx.Response] = {}
        pausing = threading.Thread(target=lambda: result.update(r=api.post("/api/pause", {"drain_timeout": 10})))
        pausing.start()
        time.sleep(0.4)
        assert pausing.is_alive()
        open_tx.execute("update items set name = name where id = 5")  # still inside: not held
        open_tx.commit()
        pausing.join(10)
    drained = result["r"]
    assert drained.status_code == 200 and drained.json()["drained"], drained.text
    assert drained.json()["drain_ms"] >= 300
    api.post("/api/resume")


def test_a_pause_ends_at_its_maximum(admin: Callable[..., Admin]) -> None:
    api = admin(reads={"old": 50, "new": 50})
    assert api.post("/api/pause", {"max_seconds": 0.5}).status_code == 200
    started = time.monotonic()
    write = Background(api.proxy.dsn(), "update items set name = name where id = 6 returning id")
    assert write.wait() == (6,)
    assert 0.3 <= write.finished_at - started < 5
    assert not api.pause_state()["paused"]


def test_bad_requests_and_a_plain_relay(admin: Callable[..., Admin]) -> None:
    api = admin(reads={"old": 50, "new": 50})
    for body, words in (
        ({"drain_timeout": -1}, "drain_timeout must be a number of seconds"),
        ({"max_seconds": "soon"}, "max_seconds must be a number of seconds"),
        ({"drain": 5}, "unknown key(s) drain"),
    ):
        answer = api.post("/api/pause", body)
        assert answer.status_code == 400 and words in answer.json()["error"]["message"], answer.text
    assert not api.pause_state()["paused"]
    # Reads only on the primary, no mirror, routing fixed at startup: sessions are plain relays.
    plain = admin(control={"live": False})
    answer = plain.post("/api/pause")
    assert answer.status_code == 400 and "cannot hold them" in answer.json()["error"]["message"]


def test_cli_pause_and_resume(admin: Callable[..., Admin], monkeypatch: pytest.MonkeyPatch) -> None:
    api = admin(reads={"old": 50, "new": 50})
    monkeypatch.setenv("PGSHIFT_ADMIN_TOKEN", TOKEN)

    def pgshift(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "proxy", *argv, "--admin", api.url]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)

    paused = pgshift("pause", "--drain-timeout", "2", "--reason", "cli test")
    assert paused.returncode == 0 and "writes paused" in paused.stdout, paused.stdout + paused.stderr
    write = Background(api.proxy.dsn(), "update items set name = name where id = 7 returning id")
    time.sleep(0.3)
    assert not write.done.is_set()
    resumed = pgshift("resume")
    assert resumed.returncode == 0 and "writes resumed after" in resumed.stdout, resumed.stdout + resumed.stderr
    assert "1 session(s) had waited" in resumed.stdout
    assert write.wait() == (7,)
    assert pgshift("resume").stdout.strip() == "writes were not paused"

    with psycopg.connect(api.proxy.dsn()) as open_tx:
        open_tx.execute("update items set name = name where id = 8")
        refused = pgshift("pause", "--drain-timeout", "0.3")
        assert refused.returncode == 4 and "the drain timed out" in refused.stderr, refused.stderr
