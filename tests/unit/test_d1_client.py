"""D1 client rules a local server cannot produce on demand (httpx.MockTransport): 429 with
Retry-After, 5xx, network errors, no retry for SQL errors, refused tokens, and the request budget
on an injected clock."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from proxy.d1.client import (
    D1AuthError,
    D1Client,
    D1SqlError,
    D1Unavailable,
    Limits,
    RequestBudget,
    RetryPolicy,
    Statement,
)

OK = {"result": [{"results": [{"x": 1}], "success": True, "meta": {"changes": 1}}], "success": True, "errors": [],
      "messages": []}  # fmt: skip


def fail(code: int, message: str) -> dict[str, Any]:
    return {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


class Clock:
    """A manual clock whose sleep advances it (so waits are measured, never slept)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def make(handler: Callable[[httpx.Request], httpx.Response], clock: Clock, **kwargs: Any) -> D1Client:
    kwargs.setdefault("budget", RequestBudget(1200, 300, clock=clock, sleep=clock.sleep))
    return D1Client(
        account_id="acc", database_id="db", token="tok", api_base="https://d1.test/client/v4",
        transport=httpx.MockTransport(handler), sleep=clock.sleep, wall_clock=clock,
        retry=RetryPolicy(rng=random.Random(1)), **kwargs,
    )  # fmt: skip


def scripted(answers: list[httpx.Response | Exception], seen: list[httpx.Request]) -> Callable[..., httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


async def test_request_shape_and_envelope() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    async with make(scripted([httpx.Response(200, json=OK)], seen), clock) as client:
        result = await client.query("SELECT ?", ["1"])
    assert result.results == [{"x": 1}] and result.meta == {"changes": 1}
    (request,) = seen
    assert request.url == "https://d1.test/client/v4/accounts/acc/d1/database/db/query"
    assert request.headers["authorization"] == "Bearer tok"
    assert json.loads(request.content) == {"sql": "SELECT ?", "params": ["1"]}


async def test_429_waits_for_retry_after_then_succeeds() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    answers: list[httpx.Response | Exception] = [
        httpx.Response(429, json=fail(971, "Please wait and consider throttling your request speed"),
                       headers={"retry-after": "7"}),
        # an HTTP date (the Clock is the wall clock too): 9 s after the second answer, at 1007
        httpx.Response(429, headers={"retry-after": formatdate(1016, usegmt=True)}),
        httpx.Response(200, json=OK),
    ]  # fmt: skip
    async with make(scripted(answers, seen), clock) as client:
        await client.query("SELECT 1")
    assert len(seen) == 3 and client.stats.retries == 2
    assert clock.slept == [pytest.approx(7), pytest.approx(9)]  # never sooner than the server asked


async def test_5xx_and_network_errors_are_retried_with_backoff() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    answers: list[httpx.Response | Exception] = [
        httpx.Response(500, json=fail(7500, "internal error; reference = abc")),
        httpx.Response(502, text="<html>bad gateway</html>"),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.Response(200, json=OK),
    ]
    async with make(scripted(answers, seen), clock) as client:
        await client.query("SELECT 1")
    assert len(seen) == 5 and client.stats.retries == 4
    caps = [0.5 * 2**i for i in range(4)]
    assert all(0 <= s <= cap for s, cap in zip(clock.slept, caps, strict=True))  # full jitter under the cap


async def test_gives_up_after_the_attempts() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    answers: list[httpx.Response | Exception] = [httpx.Response(503, json=fail(7500, "overloaded"))] * 6
    async with make(scripted(answers, seen), clock) as client:
        with pytest.raises(D1Unavailable, match="gave up after 6 attempts") as info:
            await client.query("SELECT 1")
    assert info.value.exit_code == 3 and info.value.status == 503 and len(seen) == 6


async def test_retry_after_beyond_the_limit_fails_at_once() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    answers: list[httpx.Response | Exception] = [httpx.Response(429, headers={"retry-after": "3600"})]
    async with make(scripted(answers, seen), clock) as client:
        with pytest.raises(D1Unavailable, match="asks to wait 3600 s"):
            await client.query("SELECT 1")
    assert len(seen) == 1 and client.budget.delay() == pytest.approx(3600)  # and the budget holds off


async def test_sql_errors_are_never_retried() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    answers: list[httpx.Response | Exception] = [
        httpx.Response(400, json=fail(7500, 'near "SELEC": syntax error at offset 0: SQLITE_ERROR'))
    ]
    async with make(scripted(answers, seen), clock) as client:
        with pytest.raises(D1SqlError, match=r"syntax error .* \[code: 7500\]") as info:
            await client.query("SELEC 1")
    assert info.value.code == 7500 and info.value.status == 400 and len(seen) == 1 and clock.slept == []


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (403, fail(10000, "Authentication error")),
        (401, fail(10001, "Unable to authenticate request")),
        (400, {"success": False, "result": None, "messages": [], "errors": [{
            "code": 6003, "message": "Invalid request headers",
            "error_chain": [{"code": 6111, "message": "Invalid format for Authorization header"}]}]}),
    ],
)  # fmt: skip
async def test_auth_failures_are_not_retried(status: int, body: dict[str, Any]) -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    async with make(scripted([httpx.Response(status, json=body)], seen), clock) as client:
        with pytest.raises(D1AuthError) as info:
            await client.query("SELECT 1")
    assert len(seen) == 1 and info.value.status == status
    assert info.value.hint is not None and "D1 Read and D1 Edit" in info.value.hint


async def test_request_budget_sliding_window() -> None:
    clock = Clock()
    budget = RequestBudget(3, 10.0, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert await budget.acquire() == 0
    clock.now += 4
    assert await budget.acquire() == pytest.approx(6)  # the first one leaves the window at +10
    assert budget.delay() == 0  # (now 1010: the three sent at 1000 have left the window)
    await budget.acquire()
    await budget.acquire()
    assert budget.delay() == pytest.approx(10)  # three sent at 1010: the next may go at 1020


async def test_budget_spaces_a_burst_of_requests() -> None:
    seen: list[httpx.Request] = []
    clock = Clock()
    answers: list[httpx.Response | Exception] = [httpx.Response(200, json=OK) for _ in range(10)]
    async with make(scripted(answers, seen), clock, budget=RequestBudget(4, 60, clock=clock, sleep=clock.sleep)) as c:
        start = clock.now
        for _ in range(10):
            await c.query("SELECT 1")
    assert len(seen) == 10 and clock.now - start == pytest.approx(120)  # 4 per minute: the 9th at +120 s
    assert c.stats.waited == pytest.approx(120)


async def test_plan_splits_by_request_bytes_and_refuses_oversized_statements() -> None:
    clock = Clock()
    client = make(lambda r: httpx.Response(200, json=OK), clock, limits=Limits(max_request_bytes=10_000))
    statements = [Statement("INSERT INTO t VALUES (?, ?)", (str(i), "x" * 1000)) for i in range(50)]
    batches = client.plan(statements)
    assert len(batches) > 1 and [s for b in batches for s in b] == statements
    assert all(len(json.dumps({"batch": [s.body() for s in b]})) <= 10_000 for b in batches)
    with pytest.raises(D1SqlError, match="101 bound parameters"):
        client.plan([Statement("SELECT 1", ("1",) * 101)])
    with pytest.raises(D1SqlError, match="bytes of SQL"):
        client.plan([Statement("SELECT '" + "x" * 100_000 + "'")])
    await client.close()
