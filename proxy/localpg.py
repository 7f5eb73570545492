"""Throw-away local Postgres clusters for tests, benchmarks and `pgshift demo`."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from proxy.errors import ClusterError

# Binaries a directory must hold to be usable as a server bindir.
_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")

# Debian/Ubuntu lay out one directory per major version; pick the newest.
_DEBIAN_BINDIR_GLOB = "/usr/lib/postgresql/*/bin"

# Seconds a client waits for the server to accept a connection (psql honours PGCONNECT_TIMEOUT).
_CONNECT_TIMEOUT = "10"

# Seconds pg_ctl waits for start/stop to complete.
_PG_CTL_WAIT = "60"

# Fallback OS user created when running as root and neither PGSHIFT_PG_OSUSER nor `postgres` exists.
_FALLBACK_OSUSER = "pgshift"

# Tuned for speed, not durability: the data is thrown away. wal_level=logical and the sender/slot
# limits let tests exercise logical replication; max_connections leaves room for pgbench -c 100.
_DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "wal_level": "logical",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "shared_buffers": "128MB",
    # pg_ctl -l already captures stderr into base_dir/postgres.log, which log_tail() reads.
    "logging_collector": "off",
}

_START_RETRIES = 3


def find_bindir() -> Path:
    """Locate the Postgres server binaries (initdb, pg_ctl, postgres).

    Order: $PGSHIFT_PG_BINDIR; `pg_config --bindir` if it holds the server binaries (it may only
    hold client tools when just libpq-dev is installed); the highest /usr/lib/postgresql/*/bin.
    """
    override = os.environ.get("PGSHIFT_PG_BINDIR")
    if override:
        path = Path(override)
        if not _has_server_binaries(path):
            raise ClusterError(f"PGSHIFT_PG_BINDIR={override} does not contain {', '.join(_SERVER_BINARIES)}")
        return path

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_binaries(Path(out)):
            return Path(out)

    candidates = [Path(p) for p in glob.glob(_DEBIAN_BINDIR_GLOB) if _has_server_binaries(Path(p))]
    if candidates:
        return max(candidates, key=lambda p: _version_key(p.parent.name))

    raise ClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install the server "
        "(e.g. `apt-get install postgresql`) or set PGSHIFT_PG_BINDIR to the directory holding them"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(eq=False)  # identity semantics: a cluster is a running resource, and weakref needs a hash
class LocalCluster:
    """A Postgres cluster living in ``base_dir``; ``destroy()`` stops it and deletes everything."""

    name: str
    host: str
    port: int
    datadir: Path
    bindir: Path
    base_dir: Path
    superuser: str = "postgres"
    # Unprivileged OS user the server runs as when we are root; None means "the current user".
    os_user: str | None = None
    # Set by create_cluster(); a hand-built LocalCluster is not torn down at exit.
    _finalizer: weakref.finalize[..., LocalCluster] | None = field(default=None, init=False, repr=False)

    # --- connection strings ---

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    # --- lifecycle ---

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def running(self) -> bool:
        """True while the postmaster's pid file exists (a crash may leave it stale)."""
        return (self.datadir / "postmaster.pid").exists()

    def start(self) -> None:
        argv = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log_path)]
        result = _run(self.as_os_user([*argv, "-w", "-t", _PG_CTL_WAIT, "start"]), cwd=self.base_dir)
        if result.returncode != 0:
            raise ClusterError(
                f"cluster {self.name!r} did not start on port {self.port}",
                detail=_join_output(result) + "\n--- postgres.log ---\n" + self.log_tail(),
            )

    def stop(self) -> None:
        """Fast shutdown (disconnects clients, checkpoints); a no-op if it is not running."""
        if not self.running:
            return
        result = self._pg_ctl_stop("fast")
        if result.returncode != 0:
            raise ClusterError(
                f"cluster {self.name!r} did not stop",
                detail=_join_output(result) + "\n--- postgres.log ---\n" + self.log_tail(),
            )

    def destroy(self) -> None:
        """Immediate shutdown and removal of base_dir; idempotent."""
        if self._finalizer is not None:
            # Calling the finalizer runs the teardown once and detaches it from the exit hook.
            self._finalizer()
        else:
            _teardown(str(self.bindir), str(self.datadir), str(self.base_dir), self.os_user, os.getpid())

    def _pg_ctl_stop(self, mode: str) -> subprocess.CompletedProcess[str]:
        return _pg_ctl_stop(self.bindir, self.datadir, self.base_dir, self.os_user, mode)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # --- running things against it ---

    def as_os_user(self, argv: Sequence[str]) -> list[str]:
        """Prefix ``argv`` so it runs as the cluster's OS user (server binaries refuse root)."""
        return _as_user(self.os_user, argv)

    def psql(self, sql: str, *, dbname: str = "postgres", user: str = "postgres") -> str:
        """Run ``sql`` (any number of statements) and return psql's unaligned, tuples-only stdout."""
        # SQL goes in via stdin rather than -c so multi-statement scripts behave the same on every
        # psql version (-c printed only the last result before PG 15); -q hides command tags.
        result = _run(self._psql_argv(dbname, user), input_text=sql, env=_client_env())
        if result.returncode != 0:
            raise ClusterError(
                f"psql on cluster {self.name!r} failed (exit {result.returncode})",
                detail=result.stderr.strip(),
            )
        return result.stdout

    def load_file(self, path: Path, *, dbname: str = "postgres") -> None:
        result = _run([*self._psql_argv(dbname, self.superuser), "-f", str(path)], env=_client_env())
        if result.returncode != 0:
            raise ClusterError(
                f"loading {path} into {self.name!r}/{dbname} failed (exit {result.returncode})",
                detail=result.stderr.strip(),
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _psql_argv(self, dbname: str, user: str) -> list[str]:
        # psql is a client: it may run as root, and goes over TCP like every other client does.
        argv = [_client_binary(self.bindir, "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]
        return [*argv, "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname]


def create_cluster(
    name: str,
    *,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
    hba: Sequence[str] | None = None,
    ssl_cert: Path | None = None,
    ssl_key: Path | None = None,
    start: bool = True,
) -> LocalCluster:
    """initdb a new cluster under /tmp, configure it, and (by default) start it.

    ``settings`` override the defaults in postgresql.conf; ``hba`` lines go before the default
    trust lines in pg_hba.conf (first match wins there). With ``ssl_cert``/``ssl_key`` the server
    gets ssl=on. When ``port`` is not given and the chosen one is taken by the time the server
    binds, start is retried on another port.
    """
    if (ssl_cert is None) != (ssl_key is None):
        raise ClusterError("ssl_cert and ssl_key must be given together")
    bindir = find_bindir()
    osuser = _resolve_os_user()

    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:32]
    # Explicitly /tmp, not $TMPDIR: the OS user must be able to traverse every parent directory,
    # and the unix socket path (base_dir/.s.PGSQL.port) must stay under the 107-byte limit.
    base_dir = Path(tempfile.mkdtemp(prefix=f"pgshift-{safe_name}-", dir="/tmp"))
    base_dir.chmod(0o755)
    datadir = base_dir / "data"
    cluster = LocalCluster(
        name=name,
        host="127.0.0.1",
        port=port if port is not None else free_port(),
        datadir=datadir,
        bindir=bindir,
        base_dir=base_dir,
        os_user=osuser,
    )
    cluster._finalizer = _register(cluster)
    try:
        _chown_tree(base_dir, osuser)
        _initdb(cluster)
        _configure(cluster, settings or {}, hba or (), ssl_cert, ssl_key)
        _chown_tree(base_dir, osuser)
        if start:
            _start_with_retry(cluster, pick_port=port is None)
    except BaseException:
        cluster.destroy()
        raise
    return cluster


# --- internals ---


def _initdb(cluster: LocalCluster) -> None:
    argv = [str(cluster.bindir / "initdb"), "-D", str(cluster.datadir), "-U", cluster.superuser]
    argv += ["-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"]
    result = _run(cluster.as_os_user(argv), cwd=cluster.base_dir)
    if result.returncode != 0:
        raise ClusterError(f"initdb for cluster {cluster.name!r} failed", detail=_join_output(result))


def _configure(
    cluster: LocalCluster,
    settings: Mapping[str, str],
    hba: Sequence[str],
    ssl_cert: Path | None,
    ssl_key: Path | None,
) -> None:
    values = dict(_DEFAULT_SETTINGS)
    values["port"] = str(cluster.port)
    values["unix_socket_directories"] = str(cluster.base_dir)
    if ssl_cert is not None and ssl_key is not None:
        shutil.copyfile(ssl_cert, cluster.datadir / "server.crt")
        shutil.copyfile(ssl_key, cluster.datadir / "server.key")
        for copied in ("server.crt", "server.key"):
            # The server refuses a key readable by group/others.
            (cluster.datadir / copied).chmod(0o600)
        values.update(ssl="on", ssl_cert_file="server.crt", ssl_key_file="server.key")
    values.update(settings)
    _append_settings(cluster.datadir / "postgresql.conf", values)

    if hba:
        hba_path = cluster.datadir / "pg_hba.conf"
        original = hba_path.read_text()
        # Prepended because pg_hba.conf is first-match: a test's scram line must win over trust.
        hba_path.write_text("# added by pgshift localpg\n" + "".join(f"{line}\n" for line in hba) + original)


def _append_settings(conf: Path, values: Mapping[str, str]) -> None:
    # Every value is written as a quoted string: the GUC parser accepts that for numbers, booleans
    # and lists alike, so callers never have to think about quoting. Later lines win.
    lines = ["", "# --- pgshift localpg ---"]
    lines += [f"{key} = '{value.replace(chr(39), chr(39) * 2)}'" for key, value in values.items()]
    with conf.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def _start_with_retry(cluster: LocalCluster, *, pick_port: bool) -> None:
    for attempt in range(_START_RETRIES):
        try:
            cluster.start()
            return
        except ClusterError:
            port_taken = "Address already in use" in cluster.log_tail()
            if not (pick_port and port_taken) or attempt == _START_RETRIES - 1:
                raise
            # free_port() is inherently racy against parallel test runs; take another.
            cluster.port = free_port()
            _append_settings(cluster.datadir / "postgresql.conf", {"port": str(cluster.port)})


def _resolve_os_user() -> str | None:
    """The unprivileged user that runs server binaries, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    wanted = os.environ.get("PGSHIFT_PG_OSUSER")
    if wanted:
        if not _user_exists(wanted):
            raise ClusterError(f"PGSHIFT_PG_OSUSER={wanted} is not an existing OS user")
        return wanted
    if _user_exists("postgres"):
        return "postgres"
    if not _user_exists(_FALLBACK_OSUSER):
        result = _run(["useradd", "--system", "--no-create-home", _FALLBACK_OSUSER])
        # Exit 9 means a parallel process created it first, which is fine.
        if result.returncode not in (0, 9):
            raise ClusterError(
                f"running as root, and creating the OS user {_FALLBACK_OSUSER!r} for Postgres failed; "
                "set PGSHIFT_PG_OSUSER to an unprivileged user",
                detail=_join_output(result),
            )
    return _FALLBACK_OSUSER


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _as_user(osuser: str | None, argv: Sequence[str]) -> list[str]:
    if osuser is None:
        return list(argv)
    return ["runuser", "-u", osuser, "--", *argv]


def _chown_tree(root: Path, osuser: str | None) -> None:
    if osuser is None:
        return
    entry = pwd.getpwnam(osuser)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, entry.pw_uid, entry.pw_gid)
        for item in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, item), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def _client_binary(bindir: Path, name: str) -> str:
    candidate = bindir / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} not found in {bindir} or on PATH; install the PostgreSQL client")
    return found


def _client_env() -> dict[str, str]:
    # Drop inherited libpq variables (PGHOST, PGSSLMODE, PGPASSWORD, ...) so they cannot redirect
    # or alter the connection; everything psql needs is on its command line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = _CONNECT_TIMEOUT
    return env


def _run(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            input=input_text,
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            check=False,
            # Without stdin the child would inherit ours and could block reading a terminal.
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except OSError as exc:
        raise ClusterError(f"could not run {argv[0]}: {exc}") from exc


def _join_output(result: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(part.strip() for part in (result.stdout, result.stderr) if part and part.strip())


def _pg_ctl_stop(
    bindir: Path, datadir: Path, base_dir: Path, osuser: str | None, mode: str
) -> subprocess.CompletedProcess[str]:
    argv = [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", mode, "-w", "-t", _PG_CTL_WAIT, "stop"]
    # cwd=base_dir: runuser keeps our cwd, which the OS user may not be allowed to enter.
    return _run(_as_user(osuser, argv), cwd=base_dir if base_dir.exists() else Path("/"))


def _teardown(bindir: str, datadir: str, base_dir: str, osuser: str | None, owner_pid: int) -> None:
    # A forked child inherits the exit hooks; only the process that created the cluster tears it down.
    if os.getpid() != owner_pid:
        return
    base = Path(base_dir)
    data = Path(datadir)
    if (data / "postmaster.pid").exists():
        with contextlib.suppress(ClusterError):
            _pg_ctl_stop(Path(bindir), data, base, osuser, "immediate")
    shutil.rmtree(base, ignore_errors=True)


def _register(cluster: LocalCluster) -> weakref.finalize[..., LocalCluster]:
    # The one piece of module-level state (inside weakref's own registry, run from atexit): every
    # cluster's teardown, so a test run that dies half-way (failed fixture, Ctrl-C, sys.exit) does
    # not leave postmasters and /tmp directories behind. It holds the cluster only weakly; the
    # teardown also runs when an unreferenced cluster is garbage-collected, as
    # tempfile.TemporaryDirectory does for its directory.
    return weakref.finalize(
        cluster,
        _teardown,
        str(cluster.bindir),
        str(cluster.datadir),
        str(cluster.base_dir),
        cluster.os_user,
        os.getpid(),
    )


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def _has_server_binaries(path: Path) -> bool:
    return all(os.access(path / binary, os.X_OK) for binary in _SERVER_BINARIES)
