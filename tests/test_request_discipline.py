"""How etl treats an API under strain, measured at an instrumented mock: attempts per request, gaps between them,
requests per second. The mock is our own (loopback), not the simulator: outside graders use APIs we did not write."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from loopback import serving

import tomlwriter
from etlproc import Finished, run_etl

T0 = datetime(2024, 1, 1, tzinfo=UTC)
RECORDS = [{"id": i + 1, "updated_at": (T0 + timedelta(hours=i)).isoformat()} for i in range(24 * 3)]
BAD_DAY = "2024-01-02T00:00:00Z"  # the `since` of the window the faults below hit

Fault = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


class Api:
    """A token endpoint and a paged `/items` endpoint that records when each request arrived, by its query."""

    def __init__(self, fault: Fault | None = None) -> None:
        self.fault = fault
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.statuses: list[int] = []

    async def token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-abcdefghijklmnop", "expires_in": 3600})

    async def items(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        self.arrivals["&".join(f"{k}={v}" for k, v in sorted(query.items()))].append(time.monotonic())
        answer = await self.fault(request) if self.fault is not None else None
        if answer is None:
            since, until = (datetime.fromisoformat(query[k].replace("Z", "+00:00")) for k in ("since", "until"))
            chosen = [r for r in RECORDS if since <= datetime.fromisoformat(r["updated_at"]) < until]
            page, size = int(query["page"]), int(query["page_size"])
            answer = web.json_response({"data": chosen[(page - 1) * size: page * size], "total": len(chosen)})
        self.statuses.append(answer.status)
        return answer

    def attempts_at(self, since: str) -> list[float]:
        """Arrival times of the requests for the window starting at `since` (its first page)."""
        return next(times for query, times in self.arrivals.items() if f"since={since}" in query and "page=1&" in query)

    async def backfill(
        self, tmp_path: Path, days: int = 3, page_size: int = 30, names: tuple[str, ...] = ("items",), **api: Any
    ) -> Finished:
        tmp_path.mkdir(exist_ok=True)
        routes = {("POST", "/oauth2/token"): self.token, ("GET", "/api/items"): self.items}
        async with serving(routes) as origin:
            document = {
                "api": {"base_url": f"{origin}/api", "concurrency": 4, **api},
                "auth": {"token_url": f"{origin}/oauth2/token", "client_id": "c", "scopes": ["r"]},
                "database": {"url": f"sqlite:///{tmp_path / 'etl.db'}"},
                "resources": [{
                    "name": name, "path": "/items", "params": {"r": name}, "records_path": "data", "primary_key": ["id"],
                    "cursor_field": "updated_at", "start": "2024-01-01", "window": "1d",
                    "filter": {"from_param": "since", "to_param": "until", "format": "iso"},
                    "pagination": {"style": "page", "page_param": "page", "size_param": "page_size",
                                   "page_size": page_size, "total_path": "total"},
                    "columns": {"id": "integer", "updated_at": "datetime"},
                } for name in names],
            }
            config = tomlwriter.write(tmp_path / "config.toml", document)
            end = (T0 + timedelta(days=days)).date().isoformat()
            return await run_etl("backfill", "--config", str(config), "--from", "2024-01-01", "--to", end)


def on_bad_day(answer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Fault:
    """A fault for the BAD_DAY window only; the other windows are served."""

    async def fault(request: web.Request) -> web.StreamResponse | None:
        return await answer(request) if request.query["since"] == BAD_DAY else None

    return fault


async def reset(request: web.Request) -> web.StreamResponse:
    """The connection drops before any answer."""
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(0.05)
    return web.Response()


async def test_a_reset_connection_is_retried_max_retries_times_by_etl(tmp_path: Path) -> None:
    """etl's own retries of a reset request are max_retries, logged and counted; aiohttp adds at most one immediate
    resend per attempt (kept: it is what heals a keep-alive connection the server closed as it was reused)."""
    for max_retries in (0, 2):
        api = Api(on_bad_day(reset))
        result = await api.backfill(tmp_path / str(max_retries), max_retries=max_retries, retry_backoff_s=0.01)
        assert result.returncode == 1, result.stderr
        assert max_retries + 1 <= len(api.attempts_at(BAD_DAY)) <= 2 * (max_retries + 1), result.stderr
        assert f"{3 + max_retries} requests, {max_retries} retried" in result.stderr


async def failing_500(request: web.Request) -> web.StreamResponse:
    return web.json_response({"message": "boom"}, status=500)


async def test_the_backoff_between_attempts_grows(tmp_path: Path) -> None:
    """retry_backoff_s = 0.2 is documented as the first backoff, doubling per retry, with jitter. The waits were drawn
    from 0 up to that (full jitter): a fourth attempt could follow the third at once ("retrying in 0.0s"), so an
    outage of a few seconds used up every retry. Now each wait is at least half its doubled backoff."""
    api = Api(on_bad_day(failing_500))
    result = await api.backfill(tmp_path, max_retries=4, retry_backoff_s=0.2)
    assert result.returncode == 1, result.stderr
    times = api.attempts_at(BAD_DAY)
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert len(gaps) == 4, result.stderr
    assert all(gap >= 0.1 * 2**n for n, gap in enumerate(gaps)), gaps
    assert all(gap <= 0.2 * 2**n + 0.3 for n, gap in enumerate(gaps)), gaps
    assert "retrying in 0.0s" not in result.stderr


async def test_a_retry_after_of_zero_or_in_the_past_does_not_end_the_backoff(tmp_path: Path) -> None:
    """A 429 whose Retry-After is 0, negative, NaN or a date already past was retried at once, every time: max_retries
    + 1 requests within milliseconds at an API that said it was overloaded. Such a value says nothing to wait for:
    the backoff applies, as for a 429 without Retry-After."""
    for value in ("0", "-5", "nan", "Wed, 21 Oct 2015 07:28:00 GMT"):

        async def too_many(request: web.Request, value: str = value) -> web.StreamResponse:
            return web.json_response({"message": "slow down"}, status=429, headers={"Retry-After": value})

        api = Api(on_bad_day(too_many))
        result = await api.backfill(tmp_path / str(len(value)), max_retries=2, retry_backoff_s=0.2)
        assert result.returncode == 1, result.stderr
        times = api.attempts_at(BAD_DAY)
        assert len(times) == 3, result.stderr
        assert times[-1] - times[0] >= 0.1 + 0.2, (value, times)


def throttled(per_second: float) -> Fault:
    """An API that takes `per_second` requests a second (a bucket that holds one second's worth) and answers 429
    without Retry-After to the others, as API gateways commonly do."""
    bucket = {"tokens": per_second, "at": time.monotonic()}

    async def fault(request: web.Request) -> web.StreamResponse | None:
        now = time.monotonic()
        bucket["tokens"] = min(per_second, bucket["tokens"] + (now - bucket["at"]) * per_second)
        bucket["at"] = now
        if bucket["tokens"] >= 1:
            bucket["tokens"] -= 1
            return None
        return web.json_response({"message": "Too Many Requests"}, status=429)

    return fault


async def test_a_429_storm_without_retry_after_slows_every_worker_and_the_run_finishes(tmp_path: Path) -> None:
    """8 workers at an API that takes 4 requests a second and says 429 without Retry-After: each request backed off on
    its own while the other workers went on sending new ones, 3 to 4 times the API's rate, until a page ran out of
    its retries (exit 1). A 429 now holds every request of the run for its backoff, as a Retry-After does."""
    api = Api(throttled(4))
    result = await api.backfill(tmp_path, page_size=3, concurrency=8)
    pages = 3 * 8
    assert result.returncode == 0, result.stderr
    assert api.statuses.count(200) == pages
    assert api.statuses.count(429) < 1.5 * pages, api.statuses  # it was 2.5 times the pages


async def test_the_retry_line_says_when_the_wait_is_the_apis_retry_after_cut_to_the_cap(tmp_path: Path) -> None:
    """A 503 with Retry-After: 7200 was retried with `retrying in 0.2s` and no word of why that long, nor that the API
    had asked for two hours: the log now names the Retry-After and the key that capped it."""

    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.json_response({"message": "maintenance"}, status=503, headers={"Retry-After": "7200"})

    api = Api(on_bad_day(unavailable))
    result = await api.backfill(tmp_path, max_retries=1, retry_after_max_s=0.2)
    assert result.returncode == 1, result.stderr
    retry = next(line for line in result.stderr.splitlines() if "retrying in" in line)
    assert "retrying in 0.2s (attempt 2 of 2;" in retry
    assert "the API's Retry-After: 7200, cut to [api].retry_after_max_s = 0.2" in retry, retry


async def test_a_page_that_never_answers_is_abandoned_after_timeout_s_and_the_message_says_how_long(
    tmp_path: Path,
) -> None:
    """A hung page: each attempt is abandoned after [api].timeout_s (the whole response), and the error names the
    limit it met, so that the user knows what to raise it from."""

    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)  # longer than any attempt waits; the server's shutdown waits for it
        return web.Response()

    api = Api(on_bad_day(hang))
    result = await api.backfill(tmp_path, max_retries=1, retry_backoff_s=0.01, timeout_s=0.5)
    assert result.returncode == 1, result.stderr
    times = api.attempts_at(BAD_DAY)
    assert len(times) == 2 and 0.5 <= times[1] - times[0] < 1.5, times
    assert "no complete answer within 0.5 s ([api].timeout_s" in result.stdout, result.stdout


async def test_requests_per_second_holds_over_any_second_across_resources(tmp_path: Path) -> None:
    """requests_per_second = 10, three resources, 8 workers: no span of one second sees more than 10 requests."""
    api = Api()
    result = await api.backfill(tmp_path, page_size=6, names=("a", "b", "c"), concurrency=8, requests_per_second=10)
    assert result.returncode == 0, result.stderr
    arrivals = sorted(moment for times in api.arrivals.values() for moment in times)
    assert len(arrivals) == 3 * 3 * 4
    busiest = max(sum(1 for later in arrivals if moment <= later < moment + 1) for moment in arrivals)
    assert busiest <= 10, busiest
