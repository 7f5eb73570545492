"""An async client for Cloudflare D1's REST API (``/query`` and ``/raw``) on httpx.

- Requests: ``POST {api_base}/accounts/{account}/d1/database/{database}/query`` (rows as objects)
  or ``/raw`` (columns + rows as arrays), body ``{"sql", "params"}`` or ``{"batch": [...]}``; a
  batch runs as one transaction. Answers come in Cloudflare's v4 envelope ``{"result": [...],
  "success", "errors": [{"code", "message"}], "messages"}``, one result per statement.
- Errors become ``D1Error`` subclasses naming the code and message: ``D1SqlError`` (code 7500
  with HTTP 400: the SQL failed; the batch was rolled back), ``D1AuthError`` (400 with 6003/6111,
  401, 403), ``D1NotFound`` (404), ``D1Unavailable`` (network errors, 5xx and 429 once the retries
  are spent).
- Retries: only for what may succeed later: network errors, 5xx (D1 answers an internal failure as
  7500 with HTTP 500) and 429. Exponential backoff with full jitter, never shorter than a
  ``Retry-After`` the server sent. A retried request may have been applied the first time: the
  statements pgshift sends (upserts and deletes by primary key, ``CREATE TABLE IF NOT EXISTS``)
  give the same result twice.
- A client-side request budget (sliding window, default Cloudflare's 1,200 requests per 5
  minutes per user) makes a long backfill wait instead of being blocked for five minutes; a 429
  also pauses every request of this client until its Retry-After.
- ``execute`` splits a long list of statements into batches that keep within a request byte
  budget; each statement must be within D1's limits (100 bound parameters, 100,000 bytes of SQL),
  which ``writes`` guarantees for the statements it builds.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx

from proxy.config import D1StoreConfig
from proxy.errors import PgShiftError

DEFAULT_API_BASE = "https://api.cloudflare.com/client/v4"
SQL_ERROR = 7500

Param = str | None


class D1Error(PgShiftError):
    """A D1 API call failed. ``code``: Cloudflare's error code (None for a network error);
    ``status``: the HTTP status (None when no answer came). ``exit_code`` for the CLI."""

    exit_code = 4

    def __init__(
        self, message: str, *, code: int | None = None, status: int | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.status = status


class D1SqlError(D1Error):
    """D1 refused the SQL (code 7500, HTTP 400): syntax, constraint, type or limit errors. Never retried."""


class D1AuthError(D1Error):
    """The token was refused (HTTP 400 with code 6003, 401 or 403)."""


class D1NotFound(D1Error):
    """No such account, database or endpoint (HTTP 404)."""


class D1Unavailable(D1Error):
    """D1 could not be reached or kept failing (network errors, 5xx, 429) after every retry."""

    exit_code = 3


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement and its bound parameters (strings or None: see ``types``)."""

    sql: str
    params: tuple[Param, ...] = ()

    def body(self) -> dict[str, Any]:
        return {"sql": self.sql, "params": list(self.params)}


@dataclass(frozen=True, slots=True)
class QueryResult:
    """One statement's answer from ``/query``: rows as dicts, and D1's meta (changes, duration, …)."""

    results: list[dict[str, Any]]
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RawResult:
    """One statement's answer from ``/raw``: column names and rows as lists."""

    columns: list[str]
    rows: list[list[Any]]
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Limits:
    """D1's documented per-statement limits, and this client's per-request budget."""

    max_params: int = 100  # bound parameters per statement
    max_sql_bytes: int = 100_000  # bytes of SQL text per statement
    max_request_bytes: int = 1_000_000  # JSON body of one request: keeps a batch far below 30 s
    max_statements: int = 1_000  # statements per request


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent (retries included)
    retries: int = 0
    statements: int = 0  # statements sent in successful requests
    waited: float = 0.0  # seconds spent waiting for the request budget


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RequestBudget:
    """At most ``requests`` requests in any ``window`` seconds (a sliding window), plus a pause
    that a 429's Retry-After sets. ``clock``/``sleep`` are injectable for tests."""

    def __init__(
        self,
        requests: int = 1200,
        window: float = 300.0,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if requests < 1 or window <= 0:
            raise ValueError("a request budget needs requests >= 1 and window > 0")
        self.requests = requests
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """No request before ``seconds`` from now (the server said so)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def delay(self) -> float:
        """Seconds until the next request may go (0: now)."""
        now = self._clock()
        while self._sent and self._sent[0] <= now - self.window:
            self._sent.popleft()
        wait = self._paused_until - now
        if len(self._sent) >= self.requests:
            wait = max(wait, self._sent[0] + self.window - now)
        return max(wait, 0.0)

    async def acquire(self) -> float:
        """Wait for room for one request and take it; the seconds waited."""
        waited = 0.0
        async with self._lock:
            while (wait := self.delay()) > 0:
                waited += wait
                await self._sleep(wait)
            self._sent.append(self._clock())
        return waited


@dataclass
class RetryPolicy:
    attempts: int = 6  # tries in all, the first included
    base: float = 0.5  # seconds; the n-th retry waits up to base * 2**(n-1)
    cap: float = 30.0
    max_retry_after: float = 310.0  # a longer Retry-After fails now instead of waiting
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, retry: int, retry_after: float | None) -> float:
        jittered = self.rng.uniform(0, min(self.cap, self.base * (2 ** (retry - 1))))
        return max(jittered, retry_after) if retry_after is not None else jittered


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


def _errors(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return [e for e in body["errors"] if isinstance(e, dict)]
    return []


def _describe(errors: list[dict[str, Any]]) -> tuple[int | None, str]:
    if not errors:
        return None, "no error detail in the answer"
    parts = []
    for error in errors:
        text = f"{error.get('message', '?')} [code: {error.get('code')}]"
        chain = error.get("error_chain")
        if isinstance(chain, list) and chain:
            text += " (" + "; ".join(f"{c.get('message')} [code: {c.get('code')}]" for c in chain) + ")"
        parts.append(text)
    code = errors[0].get("code")
    return (code if isinstance(code, int) else None), "; ".join(parts)


TOKEN_HINT = (
    "the store's token must be a Cloudflare API token with the D1 Read and D1 Edit permissions for this "
    "account (check token = and account_id in the [stores] section)"
)


class D1Client:
    """One D1 database through the REST API. Use as ``async with D1Client(...) as d1``."""

    def __init__(
        self,
        *,
        account_id: str,
        database_id: str,
        token: str,
        api_base: str = DEFAULT_API_BASE,
        limits: Limits | None = None,
        budget: RequestBudget | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 35.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Clock = time.time,
        label: str = "D1",
    ) -> None:
        self.label = label
        self.limits = limits or Limits()
        self.budget = budget or RequestBudget(sleep=sleep)
        self.retry = retry or RetryPolicy()
        self.stats = ClientStats()
        self._sleep = sleep
        self._wall_clock = wall_clock
        base = api_base.rstrip("/")
        self._url = f"{base}/accounts/{account_id}/d1/database/{database_id}"
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    @classmethod
    def from_store(cls, name: str, store: D1StoreConfig, **options: Any) -> D1Client:
        """A client for ``[stores.NAME]``: its token read now (``env:VAR``: ConfigError if unset),
        its request budget, request size and timeout; ``options`` as for the constructor."""
        sleep = options.pop("sleep", asyncio.sleep)
        options.setdefault("budget", RequestBudget(store.requests_per_window, store.window_seconds, sleep=sleep))
        options.setdefault("limits", Limits(max_request_bytes=store.max_request_bytes))
        return cls(
            account_id=store.account_id,
            database_id=store.database_id,
            token=store.resolved_token(name),
            api_base=store.api_base,
            timeout=store.timeout,
            sleep=sleep,
            label=f'D1 store "{name}"',
            **options,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # --- single requests ---

    async def query(self, sql: str, params: Sequence[Param] = ()) -> QueryResult:
        """One statement through ``/query``."""
        (result,) = await self.batch([Statement(sql, tuple(params))])
        return result

    async def raw(self, sql: str, params: Sequence[Param] = ()) -> RawResult:
        """One statement through ``/raw``."""
        (result,) = await self.batch_raw([Statement(sql, tuple(params))])
        return result

    async def batch(self, statements: Sequence[Statement]) -> list[QueryResult]:
        """The statements in one request (one transaction) through ``/query``."""
        answer = await self._send("query", statements)
        return [QueryResult(list(r.get("results") or []), dict(r.get("meta") or {})) for r in answer]

    async def batch_raw(self, statements: Sequence[Statement]) -> list[RawResult]:
        """The statements in one request (one transaction) through ``/raw``."""
        answer = await self._send("raw", statements)
        out = []
        for r in answer:
            results = r.get("results") or {}
            out.append(
                RawResult(
                    list(results.get("columns") or []), list(results.get("rows") or []), dict(r.get("meta") or {})
                )
            )
        return out

    # --- many statements ---

    def plan(self, statements: Sequence[Statement]) -> list[list[Statement]]:
        """Split ``statements`` (in order) into batches within the request limits."""
        batches: list[list[Statement]] = []
        current: list[Statement] = []
        size = 12  # {"batch":[]}
        for statement in statements:
            self.check(statement)
            cost = len(json.dumps(statement.body(), ensure_ascii=False).encode()) + 1
            if current and (size + cost > self.limits.max_request_bytes or len(current) >= self.limits.max_statements):
                batches.append(current)
                current, size = [], 12
            current.append(statement)
            size += cost
        if current:
            batches.append(current)
        return batches

    async def execute(self, statements: Sequence[Statement]) -> int:
        """Run every statement, in order, in as few requests as the limits allow; rows changed.
        Each request is one transaction; a failure stops at that request (earlier ones stay)."""
        changes = 0
        for batch in self.plan(statements):
            for result in await self.batch(batch):
                changes += int(result.meta.get("changes") or 0)
        return changes

    def check(self, statement: Statement) -> None:
        """Refuse a statement D1 would refuse for its size, before sending anything."""
        limits = self.limits
        if len(statement.params) > limits.max_params:
            raise D1SqlError(
                f"{self.label}: a statement has {len(statement.params)} bound parameters; D1 allows "
                f"{limits.max_params}",
                code=SQL_ERROR,
            )
        size = len(statement.sql.encode())
        if size > limits.max_sql_bytes:
            raise D1SqlError(
                f"{self.label}: a statement has {size} bytes of SQL; D1 allows {limits.max_sql_bytes}", code=SQL_ERROR
            )

    # --- the request loop ---

    async def _send(self, endpoint: str, statements: Sequence[Statement]) -> list[dict[str, Any]]:
        if not statements:
            return []
        for statement in statements:
            self.check(statement)
        body: dict[str, Any] = (
            statements[0].body() if len(statements) == 1 else {"batch": [s.body() for s in statements]}
        )
        content = json.dumps(body, ensure_ascii=False).encode()
        url = f"{self._url}/{endpoint}"
        retry = 0
        while True:
            self.stats.waited += await self.budget.acquire()
            self.stats.requests += 1
            failure: D1Error
            retry_after: float | None = None
            try:
                response = await self._http.post(url, content=content)
            except httpx.TransportError as exc:
                failure = D1Unavailable(
                    f"{self.label}: cannot reach the D1 API at {url}: {type(exc).__name__}: {exc}".rstrip(": ")
                )
            else:
                result = self._answer(response, len(statements))
                if not isinstance(result, D1Error):
                    self.stats.statements += len(statements)
                    return result
                failure = result
                retry_after = _retry_after(response.headers.get("retry-after"), self._wall_clock())
                if response.status_code == 429:
                    self.budget.pause(retry_after if retry_after is not None else self.budget.window)
            if not isinstance(failure, D1Unavailable):
                raise failure
            retry += 1
            if retry >= self.retry.attempts:
                failure.message += f" (gave up after {retry} attempts)"
                failure.args = (failure.message,)
                raise failure
            if retry_after is not None and retry_after > self.retry.max_retry_after:
                failure.message += f" (the server asks to wait {retry_after:.0f} s)"
                failure.args = (failure.message,)
                raise failure
            self.stats.retries += 1
            await self._sleep(self.retry.backoff(retry, retry_after))

    def _answer(self, response: httpx.Response, expected: int) -> list[dict[str, Any]] | D1Error:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        errors = _errors(body)
        code, detail = _describe(errors)
        if status == 200 and isinstance(body, dict) and body.get("success") is True:
            result = body.get("result")
            if isinstance(result, list) and len(result) == expected and all(isinstance(r, dict) for r in result):
                return result
            return D1Error(f"{self.label}: unexpected answer from D1: {expected} result(s) expected", status=status)
        if body is None and status < 500 and status != 429:
            return D1Error(f"{self.label}: D1 answered HTTP {status} without a JSON body", status=status)
        where = f"{self.label}: D1 answered HTTP {status}"
        if status == 429:
            return D1Unavailable(f"{where} (rate limited): {detail}", code=code, status=status)
        if status >= 500:
            return D1Unavailable(f"{where}: {detail}", code=code, status=status)
        if status in (401, 403) or (status == 400 and code in (6003, 6111, 10000, 10001, 9106, 9109)):
            return D1AuthError(f"{where}: {detail}", code=code, status=status, hint=TOKEN_HINT)
        if status == 404:
            return D1NotFound(
                f"{where}: {detail}",
                code=code,
                status=status,
                hint="check account_id and database_id in the [stores] section (`wrangler d1 list` shows them)",
            )
        if code == SQL_ERROR:
            return D1SqlError(f"{self.label}: SQL error: {detail}", code=code, status=status)
        return D1Error(f"{where}: {detail}", code=code, status=status)
