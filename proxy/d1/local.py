"""The local D1 server (``d1local/``: Cloudflare's D1 REST API over workerd's D1 via miniflare)
as a subprocess, for the tests and ``pgshift demo``.

``LocalD1.start()`` runs ``node d1local/server.mjs`` on 127.0.0.1 (port 0: a free one), waits for
the line it prints once serving, and knows its API base, account, databases and token;
``stop()`` ends it (SIGTERM, then SIGKILL). The directory is ``d1local/`` at the top of the source
tree, or ``$PGSHIFT_D1LOCAL_DIR``; its npm packages come from ``cd d1local && npm ci``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from proxy.errors import PgShiftError

DEFAULT_ACCOUNT = "d1local-account"
DEFAULT_DATABASE = "00000000-0000-4000-8000-000000000001"


class LocalD1Error(PgShiftError):
    """The local D1 server cannot be started (no node, packages not installed, it failed)."""


def d1local_dir() -> Path:
    override = os.environ.get("PGSHIFT_D1LOCAL_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "d1local"


def missing_reason(directory: Path | None = None) -> str | None:
    """Why the local D1 cannot run here (None: it can)."""
    directory = directory or d1local_dir()
    if not (directory / "server.mjs").is_file():
        return f"{directory}/server.mjs not found (the local D1 lives in d1local/ of pgshift's source tree)"
    if shutil.which("node") is None:
        return "node is not installed (Node.js 20 or later: apt-get install nodejs npm)"
    if not (directory / "node_modules" / "miniflare" / "package.json").is_file():
        return f"the local D1's packages are not installed: run `cd {directory} && npm ci`"
    return None


@dataclass
class LocalD1:
    """A running local D1 server; use as a context manager or call ``stop()``."""

    api_base: str
    port: int
    account_id: str
    database_ids: list[str]
    token: str
    process: subprocess.Popen[str] = field(repr=False)
    _stderr: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def start(
        cls,
        *,
        port: int = 0,
        persist: Path | None = None,
        account_id: str = DEFAULT_ACCOUNT,
        database_ids: Sequence[str] = (DEFAULT_DATABASE,),
        token: str | None = None,
        timeout: float = 60.0,
    ) -> LocalD1:
        reason = missing_reason()
        if reason is not None:
            raise LocalD1Error(f"cannot start the local D1: {reason}")
        token = token or secrets.token_urlsafe(24)
        args = [
            "node",
            "server.mjs",
            "--port",
            str(port),
            "--account",
            account_id,
            "--database",
            ",".join(database_ids),
        ]
        if persist is not None:
            persist.mkdir(parents=True, exist_ok=True)
            args += ["--persist", str(persist)]
        env = {**os.environ, "D1LOCAL_TOKEN": token}
        process = subprocess.Popen(
            args,
            cwd=d1local_dir(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C meant for us is ours to pass on
        )
        stderr: list[str] = []
        assert process.stderr is not None and process.stdout is not None
        threading.Thread(target=_drain, args=(process.stderr, stderr), daemon=True).start()
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(process.stdout.readline() if process.stdout else ""))
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip():
            _end(process)
            detail = "".join(stderr[-20:]).strip() or None
            when = "exited" if process.returncode is not None else f"did not answer within {timeout:g} s"
            raise LocalD1Error(f"the local D1 server {when}", detail=detail)
        info = json.loads(line[0])
        threading.Thread(target=_drain, args=(process.stdout, []), daemon=True).start()
        return cls(
            info["url"], int(info["port"]), info["account_id"], list(info["database_ids"]), token, process, stderr
        )

    def store(self, database_id: str | None = None) -> dict[str, object]:
        """A ``[stores.NAME]`` table for this server (token given literally)."""
        return {
            "kind": "d1",
            "account_id": self.account_id,
            "database_id": database_id or self.database_ids[0],
            "token": self.token,
            "api_base": self.api_base,
        }

    def stop(self) -> None:
        _end(self.process)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _drain(stream: object, into: list[str]) -> None:
    try:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)
            del into[:-200]
    except (OSError, ValueError):
        pass


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):  # (a drain thread may be reading it)
                stream.close()
