"""The configuration: a frozen, validated object built from config.toml (and nothing else)."""

from __future__ import annotations

import os
import re
import tomllib
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
    _address: BackendAddress = PrivateAttr()

    @model_validator(mode="after")
    def _derive(self) -> BackendConfig:
        address = parse_dsn(self.dsn)
        password = resolve_secret(self.password, "password")
        if password is None:
            password = resolve_secret(address.password, "dsn password")
        self._address = address.model_copy(update={"password": password})
        return self

    @property
    def address(self) -> BackendAddress:
        """The DSN parsed, with the password resolved (env:VAR read at load time)."""
        return self._address


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
    model_config = _FROZEN
    primary: str
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
        return self

    def rule_names(self) -> list[str]:
        return [rule.name or f"rule{i + 1}" for i, rule in enumerate(self.rules)]


class Config(BaseModel):
    model_config = _FROZEN
    listen: ListenConfig = ListenConfig()
    proxy: ProxyConfig = ProxyConfig()
    auth: AuthConfig = AuthConfig()
    backends: Annotated[dict[str, BackendConfig], Field(min_length=1)]
    routing: RoutingConfig

    @model_validator(mode="after")
    def _references(self) -> Config:
        declared = ", ".join(sorted(self.backends))
        if self.routing.primary not in self.backends:
            raise ValueError(
                f"routing.primary = {self.routing.primary!r} is not a backend; declared backends: {declared}"
            )
        weight_sets = [("routing.reads", self.routing.reads or {})]
        weight_sets += [(f"routing.rules[{i}].reads", r.reads) for i, r in enumerate(self.routing.rules)]
        for where, weights in weight_sets:
            unknown = sorted(set(weights) - set(self.backends))
            if unknown:
                raise ValueError(
                    f"{where} names unknown backend(s) {', '.join(unknown)}; declared backends: {declared}"
                )
        return self


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
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
        raise ConfigError(f"{source} is invalid:\n{_format_errors(exc)}") from None


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
    return parse_config(data, str(path))
