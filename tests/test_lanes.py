"""The lanes that fetch a planned window: page order, bounded look-ahead, failures and stops."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from etl.errors import SourceError
from etl.paginators import PlannedPage
from etl.pipeline import _Lanes


class FakeClient:
    """Answers page n after a seeded random delay; can fail one page; records what is in flight."""

    def __init__(self, fail_page: int | None = None, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.fail_page = fail_page
        self.in_flight = 0
        self.max_in_flight = 0
        self.requested: list[int] = []

    async def get(self, request: Any) -> Any:
        self.requested.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.rng.uniform(0, 0.004))
            if request == self.fail_page:
                raise SourceError(f"page {request} failed")
            return f"body {request}"
        finally:
            self.in_flight -= 1


def planned(count: int) -> list[PlannedPage]:
    return [PlannedPage(n, 100, {"page": n}, n == count - 1) for n in range(count)]  # type: ignore[arg-type]


async def drain(lanes: _Lanes, client: FakeClient, received: list[Any], stop: asyncio.Event | None = None) -> None:
    """Take pages as the pipeline does, into `received`; set `stop` after the 10th."""
    tasks = lanes.start(client, 4)  # type: ignore[arg-type]
    try:
        while (head := await lanes.next_page()) is not None:
            received.append(head)
            if stop is not None and len(received) == 10:
                stop.set()
    finally:
        await close(lanes, tasks)


async def close(lanes: _Lanes, tasks: list[asyncio.Task[None]]) -> None:
    """As the pipeline ends a window: nothing new is handed out, the lanes are cancelled and awaited."""
    lanes.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.asyncio
async def test_pages_come_in_plan_order_with_bounded_look_ahead() -> None:
    client = FakeClient()
    pages = planned(60)
    received: list[Any] = []
    await drain(_Lanes(iter(pages), 8, lambda: False), client, received)
    assert [page for page, _ in received] == pages
    assert [body for _, body in received] == [f"body {n}" for n in range(60)]
    assert client.max_in_flight == 4 and sorted(client.requested) == list(range(60))


@pytest.mark.asyncio
async def test_lanes_keep_fetching_while_the_consumer_is_busy() -> None:
    """Requests are not held back by the consumer: with it asleep, lanes fill the look-ahead."""
    client = FakeClient()
    lanes = _Lanes(iter(planned(50)), 8, lambda: False)
    tasks = lanes.start(client, 4)  # type: ignore[arg-type]
    await asyncio.sleep(0.1)  # the consumer does not take a page
    assert len(client.requested) == 8 and client.in_flight == 0
    await close(lanes, tasks)


@pytest.mark.asyncio
async def test_a_failed_page_raises_after_the_pages_before_it() -> None:
    client = FakeClient(fail_page=13)
    received: list[Any] = []
    with pytest.raises(SourceError, match="page 13 failed"):
        await drain(_Lanes(iter(planned(40)), 8, lambda: False), client, received)
    assert [page.request for page, _ in received] == list(range(13))


@pytest.mark.asyncio
async def test_a_stop_sends_nothing_new_and_hands_out_what_was_sent() -> None:
    stop = asyncio.Event()
    client = FakeClient()
    received: list[Any] = []
    await drain(_Lanes(iter(planned(100)), 8, stop.is_set), client, received, stop)
    assert 10 <= len(received) <= 10 + 8
    assert [page.request for page, _ in received] == list(range(len(received)))
    assert len(client.requested) == len(received)  # every request sent was handed out
