"""Run a pgshift proxy on its own event loop in a background thread (uvloop or asyncio).

A thread, not the test's loop, so that blocking clients (psycopg sync, psql, pgbench) can talk
to it. PGSHIFT_TEST_LOOP=asyncio runs the proxy on the stock loop instead of uvloop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from proxy.app import Running, serve
from proxy.config import Config, parse_config
from proxy.server import Server


def loop_kind() -> str:
    return os.environ.get("PGSHIFT_TEST_LOOP", "uvloop")


class ProxyThread:
    def __init__(self, config: Config | dict[str, Any], config_path: Path | None = None) -> None:
        if isinstance(config, dict):
            # Tests run many proxies at once: the admin API takes a free port unless a test says
            # otherwise; backend probes are off (tests count the connections a backend accepts).
            control = {"health_interval": 0, **config.get("control", {})}
            config = parse_config({"admin": {"port": 0}, **config, "control": control})
        self.config = config
        self.config_path = config_path  # what a reload (POST /api/reload) re-reads
        self.server: Server | None = None
        self.running: Running | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="pgshift-test-proxy", daemon=True)

    def _main(self) -> None:
        if loop_kind() == "uvloop":
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            self._stop = asyncio.Event()

            def ready(running: Running) -> None:
                self.running = running
                self.server = running.server
                self._ready.set()

            await serve(
                self.config, stop=self._stop, on_ready=ready, handle_signals=False, config_path=self.config_path
            )

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by start()/stop()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"proxy did not start: {self._error!r}")
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None, **params: str) -> str:
        auth = user if password is None else f"{user}:{password}"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}" + (f"?{query}" if query else "")

    @property
    def admin_url(self) -> str:
        assert self.running is not None and self.running.admin is not None
        return f"http://127.0.0.1:{self.running.admin.port}"

    def call(self, fn: Any, *args: Any) -> None:
        """Run a callable on the proxy's loop (e.g. to inspect the registry safely)."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 30) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("proxy thread did not stop")

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def single_backend_config(backend_dsn: str, **sections: Any) -> dict[str, Any]:
    """The smallest config: one backend named "old" as primary, listening on a free port."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "backends": {"old": {"dsn": backend_dsn}},
        "routing": {"primary": "old"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config
