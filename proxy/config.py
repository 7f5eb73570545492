"""The configuration: a frozen, validated object built from config.toml (and nothing else)."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from proxy.errors import ConfigError

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_MD5_HASH = re.compile(r"^md5[0-9a-f]{32}$")
_B64 = r"[A-Za-z0-9+/]+={0,2}"
_SCRAM_VERIFIER = re.compile(rf"^SCRAM-SHA-256\$[1-9][0-9]*:{_B64}\${_B64}:{_B64}$")


def resolve_secret(value: str | None, what: str) -> str | None:
    """``env:VAR`` reads the environment (so secrets stay out of the file); anything else is literal."""
    if value is None or not value.startswith("env:"):
        return value
    var = value[4:]
    if var not in os.environ:
        raise ValueError(f"{what} refers to environment variable {var}, which is not set")
    return os.environ[var]


class BackendAddress(BaseModel):
    """A parsed backend DSN. ``user``/``dbname`` None: the client's own pass through."""

    model_config = _FROZEN
    host: str
    port: int
    user: str | None
    dbname: str | None
    password: str | None
    sslmode: str
    sslrootcert: str | None
    connect_timeout: float

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    def label(self) -> str:
        return f"{self.host}:{self.port}" if not self.is_unix else f"{self.host}/.s.PGSQL.{self.port}"


def parse_dsn(dsn: str) -> BackendAddress:
    """Parse a ``postgresql://`` URI (libpq's connection URI format, single host)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"dsn must start with postgresql:// (got {dsn.split(':', 1)[0]!r})")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    known = {"host", "port", "user", "dbname", "password", "sslmode", "sslrootcert", "connect_timeout"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(f"dsn has unsupported parameter(s) {', '.join(unknown)}; supported: {sorted(known)}")
    try:
        port = int(query.get("port") or parts.port or 5432)
    except ValueError as exc:
        raise ValueError(f"dsn has an invalid port: {exc}") from exc
    if not 0 < port < 65536:
        raise ValueError(f"dsn port {port} is out of range 1-65535")
    host = query.get("host") or unquote(parts.hostname or "") or "127.0.0.1"
    sslmode = query.get("sslmode", "prefer")
    if sslmode not in _SSLMODES:
        raise ValueError(f"dsn sslmode {sslmode!r} is not one of {', '.join(_SSLMODES)}")
    path = unquote(parts.path.lstrip("/"))
    try:
        timeout = float(query.get("connect_timeout", "10"))
    except ValueError as exc:
        raise ValueError("dsn connect_timeout must be a number of seconds") from exc
    return BackendAddress(
        host=host,
        port=port,
        user=query.get("user") or (unquote(parts.username) if parts.username else None),
        dbname=query.get("dbname") or path or None,
        password=query.get("password") or (unquote(parts.password) if parts.password else None),
        sslmode=sslmode,
        sslrootcert=query.get("sslrootcert"),
        connect_timeout=timeout if timeout > 0 else 10.0,
    )


class ListenConfig(BaseModel):
    model_config = _FROZEN
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 6432
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_required: bool = False

    @model_validator(mode="after")
    def _tls_pair(self) -> ListenConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.tls_required and self.tls_cert is None:
            raise ValueError("tls_required needs tls_cert and tls_key")
        return self


class ProxyConfig(BaseModel):
    model_config = _FROZEN
    # Postgres itself accepts client messages up to 1 GB (PQ_LARGE_MESSAGE_LIMIT); so do we by
    # default, so that nothing that works directly fails through the proxy.
    max_message_size: Annotated[int, Field(ge=8192, le=1 << 30)] = 1 << 30
    shutdown_grace: Annotated[float, Field(ge=0)] = 30.0
    # Postgres' authentication_timeout default: a client must finish startup within a minute.
    auth_timeout: Annotated[float, Field(gt=0)] = 60.0


class UserAuth(BaseModel):
    model_config = _FROZEN
    method: Literal["trust", "reject", "scram-sha-256", "md5"]
    verifier: str | None = None  # SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>
    md5: str | None = None  # md5 + md5(password || user), as pg_authid stores it

    @model_validator(mode="after")
    def _secret_for_method(self) -> UserAuth:
        if self.method == "scram-sha-256":
            if not self.verifier:
                raise ValueError("method scram-sha-256 needs verifier (make one with `pgshift passwd USER`)")
            if not _SCRAM_VERIFIER.match(self.verifier):
                raise ValueError("verifier must look like SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
        if self.method == "md5" and not (self.md5 and _MD5_HASH.match(self.md5)):
            raise ValueError('method md5 needs md5 = "md5<32 hex digits>" (see `pgshift passwd --md5 USER`)')
        return self


class AuthConfig(BaseModel):
    model_config = _FROZEN
    # Users not listed in [auth.users]: like the last line of a pg_hba.conf.
    method: Literal["trust", "reject"] = "trust"
    users: dict[str, UserAuth] = {}

    def for_user(self, user: str) -> UserAuth:
        return self.users.get(user) or UserAuth(method=self.method)


class BackendConfig(BaseModel):
    model_config = _FROZEN
    dsn: str
    password: str | None = None  # literal or env:VAR; overrides a password in the DSN
    # The account that applies mirrored writes when this backend is a mirror (one connection per
    # database, shared by every session). Default: the user the DSN pins.
    mirror_user: str | None = None
    mirror_password: str | None = None  # literal or env:VAR (default: password)
    _address: BackendAddress = PrivateAttr()
    _mirror_password: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _derive(self) -> BackendConfig:
        address = parse_dsn(self.dsn)
        password = resolve_secret(self.password, "password")
        if password is None:
            password = resolve_secret(address.password, "dsn password")
        self._address = address.model_copy(update={"password": password})
        mirror_password = resolve_secret(self.mirror_password, "mirror_password")
        self._mirror_password = mirror_password if mirror_password is not None else password
        return self

    @property
    def address(self) -> BackendAddress:
        """The DSN parsed, with the password resolved (env:VAR read at load time)."""
        return self._address

    @property
    def apply_account(self) -> tuple[str, str | None] | None:
        """(user, password) that applies mirrored writes here; None if none is configured."""
        user = self.mirror_user or self._address.user
        return (user, self._mirror_password) if user else None


Weights = dict[str, Annotated[int, Field(ge=0)]]


class RuleConfig(BaseModel):
    """A read-routing rule: every criterion given must match; the most specific rule wins."""

    model_config = _FROZEN
    name: str | None = None
    tables: list[str] | None = None  # matches when every table the read touches is listed
    users: list[str] | None = None
    application_names: list[str] | None = None
    reads: Weights
    sticky: Literal["statement", "session"] = "statement"

    @model_validator(mode="after")
    def _criteria(self) -> RuleConfig:
        if not (self.tables or self.users or self.application_names):
            raise ValueError("a rule needs at least one of tables, users, application_names")
        if not any(self.reads.values()):
            raise ValueError("reads needs at least one weight above 0")
        return self


class RoutingConfig(BaseModel):
    """The routing document: [routing] in config.toml, and the body of every routing version."""

    model_config = _FROZEN
    primary: str
    mirrors: list[str] = []  # backends that receive the primary's committed writes (issue 5)
    reads: Weights | None = None  # default read weights; absent = every read on the primary
    sticky: Literal["statement", "session"] = "statement"
    rules: list[RuleConfig] = []

    @model_validator(mode="after")
    def _weights(self) -> RoutingConfig:
        if self.reads is not None and not any(self.reads.values()):
            raise ValueError("routing.reads needs at least one weight above 0")
        names = [rule.name for rule in self.rules if rule.name]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        if len(set(self.mirrors)) != len(self.mirrors):
            raise ValueError("mirrors lists a backend twice")
        if self.primary in self.mirrors:
            raise ValueError(f"backend {self.primary!r} cannot be both primary and a mirror")
        return self

    def rule_names(self) -> list[str]:
        return [rule.name or f"rule{i + 1}" for i, rule in enumerate(self.rules)]

    def named(self) -> RoutingConfig:
        """The same routing with every rule named (``ruleN`` by position), so rules can be addressed."""
        if all(rule.name for rule in self.rules):
            return self
        rules = [r.model_copy(update={"name": n}) for r, n in zip(self.rules, self.rule_names(), strict=True)]
        return self.model_copy(update={"rules": rules})

    def problems(self, backends: Iterable[str]) -> list[str]:
        """References to backends that are not declared (the checks a model alone cannot make)."""
        known = set(backends)
        declared = ", ".join(sorted(known))
        found = []
        if self.primary not in known:
            found.append(f"routing.primary = {self.primary!r} is not a backend; declared backends: {declared}")
        unknown_mirrors = sorted(set(self.mirrors) - known)
        if unknown_mirrors:
            found.append(
                f"routing.mirrors names unknown backend(s) {', '.join(unknown_mirrors)}; declared backends: {declared}"
            )
        weight_sets = [("routing.reads", self.reads or {})]
        weight_sets += [(f"routing.rules[{i}].reads", r.reads) for i, r in enumerate(self.rules)]
        for where, weights in weight_sets:
            unknown = sorted(set(weights) - known)
            if unknown:
                found.append(f"{where} names unknown backend(s) {', '.join(unknown)}; declared backends: {declared}")
        return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class AdminConfig(BaseModel):
    """The admin HTTP API (status, routing changes, /metrics, health)."""

    model_config = _FROZEN
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9187
    token: str | None = None  # literal or env:VAR; required for mutating calls and any non-loopback bind
    max_body: Annotated[int, Field(ge=1024, le=16 << 20)] = 1 << 20
    _token: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _secured(self) -> AdminConfig:
        self._token = resolve_secret(self.token, "admin.token")
        if self.enabled and not is_loopback(self.host) and not self._token:
            raise ValueError(
                f"admin.host = {self.host!r} is not a loopback address: set admin.token "
                '(e.g. token = "env:PGSHIFT_ADMIN_TOKEN") or bind to 127.0.0.1'
            )
        return self

    @property
    def resolved_token(self) -> str | None:
        return self._token


class ControlConfig(BaseModel):
    """Where routing versions live, and whether they may change while the proxy runs."""

    model_config = _FROZEN
    # false: routing is fixed at startup; sessions are plain relays (the fastest path) and the
    # admin API refuses changes.
    live: bool = True
    # A Postgres DSN: routing versions in a table shared by every instance, changes broadcast
    # with LISTEN/NOTIFY. Without it they are kept in state_file (one instance).
    store: str | None = None
    store_password: str | None = None  # literal or env:VAR
    state_file: Path | None = None  # default (pgshift serve): pgshift-state.jsonl beside config.toml
    instance: str | None = None  # this instance's name in status (default host:listen-port)
    heartbeat: Annotated[float, Field(gt=0, le=60)] = 1.0  # seconds between store heartbeats/polls
    # Seconds between backend probes (a TCP connect and close, which Postgres does not log); 0: off.
    health_interval: Annotated[float, Field(ge=0, le=3600)] = 5.0
    _store_password: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _store(self) -> ControlConfig:
        if self.store is not None and not self.store.startswith(("postgresql://", "postgres://")):
            raise ValueError("control.store must be a postgresql:// DSN")
        self._store_password = resolve_secret(self.store_password, "control.store_password")
        return self

    @property
    def resolved_store_password(self) -> str | None:
        return self._store_password


MirrorMode = Literal["async", "sync"]
UnsafePolicy = Literal["record", "reject", "replay"]


class MirrorRule(BaseModel):
    """Dual-write settings for some sessions (by user / application_name) or transactions (by table)."""

    model_config = _FROZEN
    name: str | None = None
    users: list[str] | None = None
    application_names: list[str] | None = None
    tables: list[str] | None = None  # matches a transaction that writes any of these tables
    mode: MirrorMode | None = None
    sync_timeout: Annotated[float, Field(gt=0, le=3600)] | None = None
    unsafe: UnsafePolicy | None = None

    @model_validator(mode="after")
    def _criteria(self) -> MirrorRule:
        if not (self.tables or self.users or self.application_names):
            raise ValueError("a mirror rule needs at least one of tables, users, application_names")
        return self


class MirrorConfig(BaseModel):
    """Dual write to the backends listed in routing.mirrors (README "Dual write")."""

    model_config = _FROZEN
    # async: the client never waits for a mirror; sync: a COMMIT is answered once every mirror
    # applied the transaction, or sync_timeout passed.
    mode: MirrorMode = "async"
    sync_timeout: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # What a client sees when a sync mirror is late: its COMMIT answer plus a WARNING ("warn"), or
    # just the answer ("journal"). Either way the transaction is committed and journaled.
    on_timeout: Literal["warn", "journal"] = "warn"
    # Writes that can neither be replayed faithfully nor captured as row images (writable CTEs,
    # MERGE, CALL, DO, a table without primary key for row images): run and journal the tables
    # ("record"), refuse with an error before anything runs ("reject"), or replay anyway ("replay").
    unsafe: UnsafePolicy = "record"
    # DDL through the proxy: only on the primary (journaled), also on the mirrors, or refused.
    ddl: Literal["primary_only", "mirror", "reject"] = "primary_only"
    # SELECT calling functions that may write (user functions, volatile ones): replayed on the
    # mirrors when true; when false they run on the primary only (journaled as unmirrored).
    functions: bool = False
    # Memory bound of one mirror's apply queue; above it capture for that mirror stops and the
    # tables involved are marked out of sync.
    queue_bytes: Annotated[int, Field(ge=1 << 16, le=1 << 34)] = 64 << 20
    # A mirror unreachable this long (with writes waiting) is detached the same way.
    down_after: Annotated[float, Field(gt=0, le=86400)] = 30.0
    journal: Path | None = None  # divergence journal (default beside config.toml: pgshift-mirror.jsonl)
    rules: list[MirrorRule] = []


class VerifyConfig(BaseModel):
    """Continuous sampling inside the proxy ([verify]): every ``interval`` seconds ``sample`` random
    rows per table and side are compared (README "Continuous sampling")."""

    model_config = _FROZEN
    interval: Annotated[float, Field(ge=0, le=86400)] = 0.0  # seconds between rounds; 0: off
    sample: Annotated[int, Field(ge=1, le=1_000_000)] = 100  # rows per table and side per round
    tables: list[str] = []  # empty: every table with a primary key that is not pgshift's own
    source: str | None = None  # default: the live routing's primary
    target: str | None = None  # default: the live routing's first mirror (at startup: routing.mirrors[0])
    # Seconds before a candidate difference is looked at again; None: 2, widened to twice a
    # running sync's lag (as `pgshift verify` without --recheck-after).
    recheck_after: Annotated[float, Field(ge=0, le=3600)] | None = None
    rechecks: Annotated[int, Field(ge=0, le=100)] = 3

    @model_validator(mode="after")
    def _check(self) -> VerifyConfig:
        if any(not t.strip() for t in self.tables):
            raise ValueError("tables has an empty name")
        duplicates = sorted({t for t in self.tables if self.tables.count(t) > 1})
        if duplicates:
            raise ValueError(f"tables lists {', '.join(duplicates)} twice")
        if self.source is not None and self.source == self.target:
            raise ValueError(f"source and target are both {self.source!r}: name two different backends")
        return self

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def pair(self, routing: RoutingConfig) -> tuple[str, str | None]:
        """(source, target) for a routing: the named backends, else its primary and its first mirror
        that is not the source (None: no target can be chosen)."""
        source = self.source or routing.primary
        target = self.target or next((m for m in routing.mirrors if m != source), None)
        return source, target


class MigrateConfig(BaseModel):
    """The guarded migration ([migrate]): which backend is moved to which, the read-shift steps, the
    cut's time limits and the guards' thresholds (README "Migration runbook")."""

    model_config = _FROZEN
    source: str | None = None  # the database moved away from (default: routing.primary at first start)
    target: str | None = None  # the database moved to (default: the first of routing.mirrors, else the other backend)
    read_steps: list[Annotated[int, Field(ge=1, le=100)]] = [1, 10, 50, 100]  # % of reads on the target
    dwell: Annotated[float, Field(ge=0, le=7 * 86400)] = 0.0  # least seconds at a read step before the next
    drain_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0  # the cut gives up (and resumes) after this
    pause_max: Annotated[float, Field(gt=0, le=3600)] = 30.0  # no pause outlives this, whatever happens
    catchup_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0  # mirror queue and stream at zero lag
    max_sync_lag: Annotated[float, Field(ge=0, le=86400)] = 5.0  # seconds the change stream may be behind
    require_sync: bool = True  # the change stream must run (false: dual write alone carries changes)
    sync_slot: str = "pgshift_sync"  # the slot of `pgshift sync start --slot`
    verify_max_age: Annotated[float, Field(ge=0, le=30 * 86400)] = 3600.0  # a clean verify this recent; 0: not required
    quiet_period: Annotated[float, Field(ge=0, le=365 * 86400)] = 86400.0  # reverse window before decommission
    sequence_margin: Annotated[int, Field(ge=0)] = 1000  # values left free above the other side's sequences
    state_file: Path | None = None  # without [control] store: default pgshift-migration.json beside the state file
    report_dir: Path | None = None  # the final verify report (default: beside config.toml)

    @model_validator(mode="after")
    def _check(self) -> MigrateConfig:
        if self.read_steps != sorted(set(self.read_steps)):
            raise ValueError(f"read_steps must rise, each step once, e.g. [1, 10, 50, 100], not {self.read_steps}")
        if self.read_steps and self.read_steps[-1] != 100:
            raise ValueError(
                f"read_steps must end at 100 (every read on the target before the cut), not {self.read_steps}"
            )
        if self.source is not None and self.source == self.target:
            raise ValueError(f"source and target are both {self.source!r}: name two different backends")
        return self


_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


class D1StoreConfig(BaseModel):
    """A Cloudflare D1 database that receives read-only reference tables ([stores.NAME], kind "d1")."""

    model_config = _FROZEN
    kind: Literal["d1"]
    account_id: Annotated[str, Field(min_length=1)]
    database_id: Annotated[str, Field(min_length=1)]
    # A Cloudflare API token with D1 Read and D1 Edit: literal or env:VAR, read when the store is
    # used (not when the config is loaded, so a proxy that never touches D1 does not need it).
    token: Annotated[str, Field(min_length=1)]
    api_base: str = "https://api.cloudflare.com/client/v4"
    tables: Annotated[list[str], Field(min_length=1)]  # "table" (schema public) or "schema.table"
    source: str | None = None  # the backend whose tables feed this store (default: routing.primary)
    # Client-side request budget (Cloudflare's API allows 1,200 requests per 5 minutes per user).
    requests_per_window: Annotated[int, Field(ge=1)] = 1200
    window_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_request_bytes: Annotated[int, Field(ge=10_000, le=50_000_000)] = 1_000_000
    timeout: Annotated[float, Field(gt=0, le=600)] = 35.0  # seconds per request (D1 stops a query at 30)

    @model_validator(mode="after")
    def _check(self) -> D1StoreConfig:
        parts = urlsplit(self.api_base)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"api_base {self.api_base!r} must be an http(s):// URL")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(f"api_base {self.api_base!r}: plain http is only allowed to a loopback address")
        bad = [t for t in self.tables if not _TABLE_NAME.match(t)]
        if bad:
            raise ValueError(f"tables: {', '.join(map(repr, bad))} must be written as table or schema.table")
        names = [t if "." in t else f"public.{t}" for t in self.tables]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tables lists {', '.join(duplicates)} twice")
        if self.token.startswith("env:") and len(self.token) == 4:
            raise ValueError('token = "env:" names no variable (e.g. token = "env:CF_API_TOKEN")')
        return self

    def resolved_token(self, store: str) -> str:
        """The token, reading ``env:VAR`` now; ConfigError naming the variable if it is unset."""
        try:
            token = resolve_secret(self.token, f"stores.{store}.token")
        except ValueError as exc:
            raise ConfigError(
                str(exc), hint=f"export {self.token[4:]}=<a Cloudflare API token with D1 Read and D1 Edit>"
            ) from None
        assert token is not None
        return token


StoreConfig = D1StoreConfig
STORE_KINDS = ("d1",)


class Config(BaseModel):
    model_config = _FROZEN
    listen: ListenConfig = ListenConfig()
    proxy: ProxyConfig = ProxyConfig()
    auth: AuthConfig = AuthConfig()
    admin: AdminConfig = AdminConfig()
    control: ControlConfig = ControlConfig()
    mirror: MirrorConfig = MirrorConfig()
    verify: VerifyConfig = VerifyConfig()
    migrate: MigrateConfig = MigrateConfig()
    backends: Annotated[dict[str, BackendConfig], Field(min_length=1)]
    routing: RoutingConfig
    stores: dict[str, StoreConfig] = {}  # write targets other than Postgres: D1 (issue 8)

    @model_validator(mode="before")
    @classmethod
    def _store_kinds(cls, data: Any) -> Any:
        stores = data.get("stores") if isinstance(data, dict) else None
        if isinstance(stores, dict):
            for name, store in stores.items():
                kind = store.get("kind") if isinstance(store, dict) else None
                if kind is None:
                    raise ValueError(
                        f'stores.{name} needs kind (supported: {", ".join(STORE_KINDS)}), e.g. kind = "d1"'
                    )
                if kind not in STORE_KINDS:
                    raise ValueError(
                        f"stores.{name}.kind = {kind!r} is not supported (supported: {', '.join(STORE_KINDS)})"
                    )
        return data

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = self.routing.problems(self.backends)
        for name, store in self.stores.items():
            if store.source is not None and store.source not in self.backends:
                declared = ", ".join(sorted(self.backends))
                problems.append(
                    f"stores.{name}.source = {store.source!r} is not a backend; declared backends: {declared}"
                )
        for name in self.routing.mirrors:
            backend = self.backends.get(name)
            if backend is not None and backend.apply_account is None:
                problems.append(
                    f"backends.{name} is a mirror but has no account to apply writes with: set "
                    f"backends.{name}.mirror_user (and mirror_password), or a user in its dsn"
                )
        problems += self._verify_problems()
        problems += [
            f"migrate.{key} = {name!r} is not a backend; declared backends: {', '.join(sorted(self.backends))}"
            for key, name in (("source", self.migrate.source), ("target", self.migrate.target))
            if name is not None and name not in self.backends
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _verify_problems(self) -> list[str]:
        verify = self.verify
        declared = ", ".join(sorted(self.backends))
        found = [
            f"verify.{key} = {name!r} is not a backend; declared backends: {declared}"
            for key, name in (("source", verify.source), ("target", verify.target))
            if name is not None and name not in self.backends
        ]
        if found or not verify.enabled:
            return found
        source, target = verify.pair(self.routing)
        if target is None:
            return [
                f"verify.interval = {verify.interval:g} needs a backend to compare {source!r} with: set "
                'verify.target (e.g. target = "new"), or list it in routing.mirrors'
            ]
        if source == target:
            return [f"verify compares {source!r} with itself: set verify.source and verify.target to two backends"]
        for name in (source, target):
            backend = self.backends.get(name)
            if backend is not None and backend.apply_account is None:
                found.append(
                    f"backends.{name} has no account for [verify] to read with: set backends.{name}.mirror_user "
                    "(and mirror_password), or a user in its dsn"
                )
        return found


def format_errors(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: where (dotted path under ``prefix``) and what is wrong."""
    lines = []
    for err in exc.errors():
        where = ".".join([prefix, *(str(p) for p in err["loc"])] if prefix else [str(p) for p in err["loc"]])
        where = where or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see README 'Configuration')"
        elif err["type"] == "missing":
            msg = "required setting is missing"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{format_errors(exc)}") from None


def load_config(path: Path) -> Config:
    """Read and validate a config file; every problem → ConfigError naming the setting."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    control = data.get("control")
    if isinstance(control, dict) and control.get("state_file") is not None:
        # A relative state file is relative to the config file, not to the working directory.
        state = Path(str(control["state_file"]))
        data["control"] = {**control, "state_file": str(state if state.is_absolute() else path.parent / state)}
    elif control is None or (isinstance(control, dict) and not control.get("store")):
        data["control"] = {**(control or {}), "state_file": str(path.parent / "pgshift-state.jsonl")}
    mirror = data.get("mirror")
    if mirror is None or isinstance(mirror, dict):
        journal = Path(str((mirror or {}).get("journal") or "pgshift-mirror.jsonl"))
        data["mirror"] = {**(mirror or {}), "journal": str(journal if journal.is_absolute() else path.parent / journal)}
    return parse_config(data, str(path))
