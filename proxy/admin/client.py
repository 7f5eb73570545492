"""A small synchronous client of the admin HTTP API, for the operator commands (`pgshift status`, `flip`, …).

It finds the API and its token from config.toml's [admin] section only (the rest of the file is
not validated: an operator's shell need not hold the backends' passwords), and turns every
failure into one of three errors a script can tell apart: the API could not be reached
(``AdminUnreachable``), it refused the request (``AdminRefused``, HTTP 4xx), or the proxy failed
to do it (``AdminFailed``, HTTP 5xx or an answer that is not the API's).
"""

from __future__ import annotations

import getpass
import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from proxy.config import resolve_secret
from proxy.errors import ConfigError, PgShiftError

DEFAULT_URL = "http://127.0.0.1:9187"
TOKEN_ENV = "PGSHIFT_ADMIN_TOKEN"


class AdminError(PgShiftError):
    """A call to the admin API did not succeed; ``exit_code`` is what `pgshift` exits with."""

    exit_code = 1


class AdminUnreachable(AdminError):
    """No answer from the admin API: connection refused, timeout, name resolution, dropped connection."""

    exit_code = 3


class AdminRefused(AdminError):
    """The admin API refused the request (HTTP 4xx: invalid, unauthorized, unknown, conflict, too large)."""

    exit_code = 4

    def __init__(self, status: int, message: str, *, hint: str | None = None, data: Any = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.data = data  # the whole answer (a blocked migration step lists its guards there)


class AdminFailed(AdminError):
    """The proxy could not do what was asked (HTTP 5xx), or the answer was not the admin API's."""

    exit_code = 5

    def __init__(self, status: int, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class AdminTarget:
    """Where the admin API is and how to authenticate to it."""

    url: str
    token: str | None
    token_problem: str | None = None  # why the config's token could not be used (said if the API asks for one)


def check_url(url: str) -> str:
    """The base URL of the API, without a trailing slash; ConfigError if it is not an http(s) URL."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"--admin {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"--admin must be an http:// or https:// URL with a host, e.g. {DEFAULT_URL}; not {url!r}")
    return url.rstrip("/")


def _url_for(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"  # bound to every address: this machine's loopback is one of them
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _read_admin_section(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        document = tomllib.load(f)
    section = document.get("admin", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [admin] must be a table")
    return section


def find_target(config_path: Path, *, url: str | None, required: bool) -> tuple[AdminTarget, str | None]:
    """The API's address and token: ``url`` if given, else config.toml's [admin] host/port; the token
    from $PGSHIFT_ADMIN_TOKEN, else the config's [admin] token (``env:VAR`` resolved).

    ``required``: the config file was named explicitly, so a missing or broken one is an error
    (ConfigError); otherwise it falls back to the defaults. Returns the target and a warning to
    show (or None)."""
    warning = None
    section: dict[str, Any] = {}
    try:
        section = _read_admin_section(config_path)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {config_path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ConfigError) as exc:
        problem = exc.message if isinstance(exc, ConfigError) else f"cannot read {config_path}: {exc}"
        if required:
            raise ConfigError(problem) from None
        warning = f"{problem}; using the defaults ({DEFAULT_URL}, no token from the file)"
        section = {}

    if url is None:
        host = section.get("host", "127.0.0.1")
        port = section.get("port", 9187)
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ConfigError(f"{config_path}: [admin] host must be a string and port a number")
        if section.get("enabled", True) is False:
            raise ConfigError(
                f"{config_path} has [admin] enabled = false: that proxy has no admin API",
                hint="enable it and restart the proxy, or pass --admin URL of another one",
            )
        if not 0 < port < 65536:
            raise ConfigError(
                f"{config_path}: [admin] port = {port} does not say where the API listens",
                hint="pass --admin http://HOST:PORT (the proxy logs 'admin API on …' at startup)",
            )
        url = _url_for(host, port)
    url = check_url(url)

    token = os.environ.get(TOKEN_ENV) or None
    token_problem = None
    configured = section.get("token")
    if token is None and configured is not None:
        if not isinstance(configured, str):
            raise ConfigError(f"{config_path}: [admin] token must be a string")
        try:
            token = resolve_secret(configured, "admin.token") or None
        except ValueError as exc:  # env:VAR not set: fine for reads; said if the API asks for a token
            token_problem = f"{exc} (in {config_path}); export it, or set {TOKEN_ENV}"
    return AdminTarget(url, token, token_problem), warning


def caller_name() -> str:
    """``user@host``, recorded by the API in the audit trail of every change."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (e.g. a container running as an unnamed uid)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    name = f"{user}@{socket.gethostname()}"
    return name.encode("ascii", "replace").decode("ascii")  # a header value must be ASCII


class AdminClient:
    """Blocking calls to one proxy's admin API; every method returns the API's JSON answer."""

    def __init__(self, target: AdminTarget, *, timeout: float, caller: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        headers = {"X-Pgshift-Caller": caller or caller_name(), "Accept": "application/json"}
        if target.token:
            headers["Authorization"] = f"Bearer {target.token}"
        # trust_env=False: an HTTP(S)_PROXY meant for the internet must not sit between the operator
        # and the proxy's own API (its 502 would read as "the proxy failed").
        self._http = httpx.Client(
            base_url=target.url + "/", headers=headers, timeout=timeout, trust_env=False, follow_redirects=False
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- endpoints ----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return self._call("GET", "api/state")

    def history(self, limit: int) -> dict[str, Any]:
        return self._call("GET", "api/history", params={"limit": str(limit)})

    def set_reads(
        self, reads: dict[str, int], *, rule: str | None = None, note: str | None = None,
        expect_version: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Replace the read weights of the default routing, or of the rule named ``rule``."""
        path = "api/routing" if rule is None else f"api/routing/rules/{quote(rule, safe='')}"
        return self._call("PATCH", path, body={"reads": reads}, params=_options(note, expect_version))

    def flip(
        self, primary: str, *, force: bool = False, note: str | None = None, expect_version: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"primary": primary, "force": True} if force else {"primary": primary}
        return self._call("POST", "api/flip", body=body, params=_options(note, expect_version))

    def rollback(
        self, to: int | None = None, *, note: str | None = None, expect_version: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {} if to is None else {"to": to}
        return self._call("POST", "api/rollback", body=body, params=_options(note, expect_version))

    def reload(self) -> dict[str, Any]:
        return self._call("POST", "api/reload", body={})

    def pause(self, *, drain_timeout: float, max_seconds: float, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"drain_timeout": drain_timeout, "max_seconds": max_seconds}
        if reason:
            body["reason"] = reason
        # (the answer comes once the drain is over: wait for it longer than for other calls)
        return self._call("POST", "api/pause", body=body, timeout=self.timeout + drain_timeout)

    def resume(self) -> dict[str, Any]:
        return self._call("POST", "api/resume", body={})

    def mirror(self) -> dict[str, Any]:
        return self._call("GET", "api/mirror")

    def mirror_resume(self, name: str, *, repaired: bool = False) -> dict[str, Any]:
        return self._call("POST", f"api/mirror/{quote(name, safe='')}/resume", body={"repaired": repaired})

    # (a migration step may wait out dwell times and a cut: its answer can take long)
    MIGRATE_TIMEOUT = 24 * 3600.0

    def migrate_status(self) -> dict[str, Any]:
        return self._call("GET", "api/migrate", timeout=max(self.timeout, 30.0))

    def migrate_advance(self, to: str | None, read_steps: list[int] | None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if to is not None:
            body["to"] = to
        if read_steps is not None:
            body["read_steps"] = read_steps
        return self._call("POST", "api/migrate/advance", body=body, timeout=self.MIGRATE_TIMEOUT)

    def migrate_rollback(self, to: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {} if to is None else {"to": to}
        return self._call("POST", "api/migrate/rollback", body=body, timeout=self.MIGRATE_TIMEOUT)

    def migrate_decommission(self, report: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {} if report is None else {"report": report}
        return self._call("POST", "api/migrate/decommission", body=body, timeout=self.MIGRATE_TIMEOUT)

    # --- transport ----------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        url = self.target.url
        mutating = method != "GET"
        maybe_done = (
            " The request was sent: the change may have been made; check `pgshift status` before retrying."
            if mutating
            else ""
        )
        try:
            response = self._http.request(
                method, path, json=body, params=params, timeout=timeout if timeout is not None else self.timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise AdminUnreachable(
                f"cannot reach the admin API at {url}: {_describe(exc)}",
                hint="is the proxy running with [admin] enabled? Pass --admin URL or --config PATH to point at it",
            ) from None
        except httpx.TimeoutException:
            raise AdminUnreachable(
                f"no answer from the admin API at {url} within {timeout or self.timeout:g}s.{maybe_done}"
            ) from None
        except httpx.HTTPError as exc:  # the connection broke, or the answer was not HTTP
            raise AdminUnreachable(f"admin API at {url}: {_describe(exc)}.{maybe_done}") from None
        return self._answer(response)

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        try:
            data = response.json()
        except ValueError:  # not JSON (or not UTF-8): not the admin API, or something in front of it
            data = None
        if 200 <= status < 300:
            if isinstance(data, dict):
                return data
            raise AdminFailed(
                status,
                f"unexpected answer from {self.target.url} (HTTP {status}, not a JSON object)",
                hint="does --admin point at pgshift's admin API?",
            )
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        else:
            text = " ".join(response.text.split())[:300]
            message = f"HTTP {status} {response.reason_phrase} from {self.target.url}" + (f": {text}" if text else "")
        hint = self.target.token_problem if status in (401, 403) and self.target.token is None else None
        if 400 <= status < 500:
            raise AdminRefused(status, message, hint=hint, data=data)
        raise AdminFailed(status, message, hint=hint)


def _options(note: str | None, expect_version: int | None) -> dict[str, str]:
    params = {}
    if note:
        params["note"] = note
    if expect_version is not None:
        params["expect_version"] = str(expect_version)
    return params


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
