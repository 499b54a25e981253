"""Planning: the watermark follows finished windows only, each window's highest cursor is cumulative, full refreshes resume."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from etl.config import config_from_document
from etl.db import create_engine
from etl.demo import demo_document
from etl.planning import WatermarkTracker, plan_backfill, plan_sync
from etl.schema import windows
from etl.store import LoadBatch, Store, Watermark, WindowProgress, WindowRecord, cursor_from_text, cursor_text
from etl.windows import Window

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
SETTLED = datetime(2100, 1, 1, tzinfo=UTC)  # now less lag, far after every window here


def _orders():  # type: ignore[no-untyped-def]
    document = demo_document(None, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    return config_from_document(document).resource("orders")


def _windows(count: int, max_cursor: datetime | None = None) -> list[WindowRecord]:
    return [
        WindowRecord(n + 1, "orders", "sync", Window(T0 + n * DAY, T0 + (n + 1) * DAY), "pending", None, 0, 0, max_cursor if n == 0 else None)
        for n in range(count)
    ]


def test_a_windows_highest_cursor_is_cumulative_across_pages_and_runs() -> None:
    """A page with a lower cursor after a higher one does not lower the window's maximum; a resumed window starts from its stored one."""
    tracker = WatermarkTracker(_orders(), _windows(2, max_cursor=T0 + timedelta(hours=5)), None, SETTLED)
    assert tracker.saw_cursor(1, T0 + timedelta(hours=3)) == T0 + timedelta(hours=5)
    assert tracker.saw_cursor(1, T0 + timedelta(hours=9)) == T0 + timedelta(hours=9)
    assert tracker.saw_cursor(1, T0 + timedelta(hours=7)) == T0 + timedelta(hours=9)


def test_the_watermark_waits_for_the_first_unfinished_window() -> None:
    """Window 2 finishing before window 1 moves nothing; window 1 finishing then moves it over both."""
    tracker = WatermarkTracker(_orders(), _windows(2), None, SETTLED)
    tracker.saw_cursor(1, T0 + timedelta(hours=20))
    tracker.saw_cursor(2, T0 + timedelta(hours=30))
    assert tracker.window_finished(2) is None
    mark = tracker.window_finished(1)
    assert mark == Watermark("orders", T0 + timedelta(hours=30), T0 + 2 * DAY)


def test_a_backfill_that_does_not_touch_the_watermark_never_moves_it() -> None:
    """A range beginning after the watermark, with a gap in between, leaves the watermark where it was."""
    later = [WindowRecord(1, "orders", "backfill", Window(T0 + 10 * DAY, T0 + 11 * DAY), "pending", None, 0, 0, None)]
    tracker = WatermarkTracker(_orders(), later, Watermark("orders", T0, T0 + DAY), SETTLED)
    tracker.saw_cursor(1, T0 + timedelta(days=10, hours=1))
    assert tracker.window_finished(1) is None


def test_synced_until_stops_at_now_less_lag_when_windows_reach_into_the_future() -> None:
    """A backfill to the day after tomorrow loaded those days as they stand now: the next sync must read them again."""
    settled = T0 + timedelta(hours=30)
    tracker = WatermarkTracker(_orders(), _windows(3), Watermark("orders", None, T0), settled)
    tracker.window_finished(1)
    tracker.window_finished(2)
    mark = tracker.window_finished(3)
    assert mark is not None and mark.synced_until == settled


async def test_a_full_refresh_backfill_resumes_an_unfinished_one_and_leaves_no_other_behind(database_url: str) -> None:
    """A resource without date filters has one window per backfill: after a kill the next backfill takes it up
    where it stopped, older unfinished ones are superseded (status listed them for ever), a finished one is not reused."""
    products = config_from_document(demo_document(None, "http://127.0.0.1:1", "http://127.0.0.1:1")).resource("products")
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([products], auto_migrate=True)

        async def backfill(restart: bool = False, position: dict[str, int] | None = None, done: bool = False) -> WindowRecord:
            """Plans a backfill; with `position`, commits a page of it as the run would before it is killed or ends."""
            run = await store.start_run("backfill", {}, ["products"])
            plan = await plan_backfill(store, products, run, T0, T0 + DAY, None, restart, SETTLED, timedelta(0))
            assert len(plan.windows) == 1
            if position is not None:
                await store.commit(LoadBatch(windows={plan.windows[0].id: WindowProgress(position=position, pages=1, done=done)}), run)
            return plan.windows[0]

        killed = await backfill(position={"page": 4})
        resumed = await backfill()
        assert (resumed.id, resumed.position) == (killed.id, {"page": 4})
        restarted = await backfill(restart=True, position={"page": 9}, done=True)
        assert restarted.id != killed.id and restarted.position is None
        fresh = await backfill()
        assert fresh.id not in (killed.id, restarted.id) and fresh.position is None
        async with engine.connect() as connection:
            states = dict((await connection.execute(select(windows.c.id, windows.c.state))).all())
    finally:
        await engine.dispose()
    assert states == {killed.id: "superseded", restarted.id: "done", fresh.id: "pending"}



async def test_a_backfill_supersedes_the_unfinished_windows_of_an_earlier_one_that_it_covers(database_url: str) -> None:
    """A backfill killed, then run again with a smaller --window (it was slow): the range was loaded, but the
    first one's windows stayed "pending" in status for ever. Those within the new range are superseded now;
    one beyond it stays, as that part is still to load."""
    orders = _orders()
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([orders], auto_migrate=True)
        killed = await plan_backfill(store, orders, await store.start_run("backfill", {}, ["orders"]),
                                     T0, T0 + 6 * DAY, 2 * DAY, False, SETTLED, timedelta(0))
        again = await plan_backfill(store, orders, await store.start_run("backfill", {}, ["orders"]),
                                    T0, T0 + 4 * DAY, DAY, False, SETTLED, timedelta(0))
        async with engine.connect() as connection:
            states = dict((await connection.execute(select(windows.c.id, windows.c.state))).all())
    finally:
        await engine.dispose()
    assert [states[window.id] for window in killed.windows] == ["superseded", "superseded", "pending"]
    assert [states[window.id] for window in again.windows] == ["pending"] * 4


async def test_a_sync_stopped_early_is_taken_up_where_it_stopped(database_url: str) -> None:
    """A sync stopped in the middle of a window was planned afresh: every window read again from its first page,
    so a sync longer than its slot never got further. Now the next sync keeps the stopped one's windows: a
    finished one is not read again, the one it was in is taken up again, and the rest follow."""
    orders = _orders().model_copy(update={"start": T0, "window": DAY, "lookback": timedelta(hours=1)})
    now, lag = T0 + 5 * DAY + timedelta(hours=6), timedelta(minutes=5)
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([orders], auto_migrate=True)
        stopped = await store.start_run("sync", {}, ["orders"])
        first = await plan_sync(store, orders, stopped, now, lag)
        day1, day2, day3 = (window.id for window in first.windows[:3])
        await store.commit(LoadBatch(
            windows={day1: WindowProgress(pages=3, records=300, done=True), day3: WindowProgress(pages=2, records=150, done=True),
                     day2: WindowProgress(pages=5, records=500, position={"page": 6, "page_size": 100})},
            watermarks=[Watermark("orders", T0 + timedelta(hours=23), T0 + DAY)],
        ), stopped)
        await store.finish_run(stopped, "interrupted", {}, None)

        again = await plan_sync(store, orders, await store.start_run("sync", {}, ["orders"]), now + timedelta(hours=1), lag)
    finally:
        await engine.dispose()
    lookback = Window(T0 + DAY - timedelta(hours=1), T0 + DAY)
    assert [window.window for window in again.windows][:6] == [lookback] + [window.window for window in first.windows][1:6]
    assert [(window.id, window.state) for window in again.windows[1:3]] == [(day2, "running"), (day3, "done")]
    assert again.windows[1].position == {"page": 6, "page_size": 100}
    assert [window.state for window in again.pending] == ["pending", "running", "pending", "pending", "pending", "pending"]
    assert again.windows[-1].window.end == T0 + 5 * DAY + timedelta(hours=7) - timedelta(minutes=5)


async def test_a_window_finished_within_lookback_of_its_end_is_read_again(database_url: str) -> None:
    """A window finished minutes after its end may since have received records stamped within it: the sync that
    takes up the stopped one reads it again, as a sync's lookback would have."""
    orders = _orders().model_copy(update={"start": T0, "window": timedelta(hours=1)})
    now = datetime.now(UTC).replace(microsecond=0)
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([orders], auto_migrate=True)
        stopped = await store.start_run("sync", {}, ["orders"])
        orders = orders.model_copy(update={"start": now - timedelta(hours=3)})
        first = await plan_sync(store, orders, stopped, now, timedelta(minutes=5))
        last = first.windows[-1]
        await store.commit(LoadBatch(windows={last.id: WindowProgress(pages=1, done=True)}), stopped)
        again = await plan_sync(store, orders, await store.start_run("sync", {}, ["orders"]), now, timedelta(minutes=5))
    finally:
        await engine.dispose()
    assert again.windows[-1].window == last.window and again.windows[-1].state == "pending" and again.windows[-1].id != last.id


async def test_a_full_refresh_sync_stopped_early_resumes_at_its_next_page(database_url: str) -> None:
    """A resource without date filters is one window per sync: a stopped one is taken up where it stopped,
    as a backfill's is, and a finished one is never taken up (each sync reads everything again)."""
    products = config_from_document(demo_document(None, "http://127.0.0.1:1", "http://127.0.0.1:1")).resource("products")
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([products], auto_migrate=True)

        async def sync(position: dict[str, int] | None = None, done: bool = False) -> WindowRecord:
            run = await store.start_run("sync", {}, ["products"])
            plan = await plan_sync(store, products, run, SETTLED, timedelta(minutes=5))
            if position is not None:
                await store.commit(LoadBatch(windows={plan.windows[0].id: WindowProgress(position=position, pages=1, done=done)}), run)
            return plan.windows[0]

        stopped = await sync(position={"page": 4})
        resumed = await sync(position={"page": 7}, done=True)
        fresh = await sync()
    finally:
        await engine.dispose()
    assert (resumed.id, resumed.position) == (stopped.id, {"page": 4})
    assert fresh.id != stopped.id and fresh.position is None


async def test_windows_cut_for_another_filter_format_are_not_taken_up(database_url: str) -> None:
    """Hour windows of a stopped sync, then the filter's format becomes "date": the API can only be asked for
    whole days, and [10:00, 11:00) as dates is [day, day), an empty range. The day is planned afresh instead."""
    hourly = _orders().model_copy(update={"start": T0, "window": timedelta(hours=1), "lookback": timedelta(0)})
    assert hourly.filter is not None
    daily = hourly.model_copy(update={"filter": hourly.filter.model_copy(update={"format": "date"}), "window": DAY})
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([hourly], auto_migrate=True)
        stopped = await store.start_run("sync", {}, ["orders"])
        await plan_sync(store, hourly, stopped, T0 + timedelta(hours=30), timedelta(0))
        again = await plan_sync(store, daily, await store.start_run("sync", {}, ["orders"]), T0 + timedelta(hours=30), timedelta(0))
    finally:
        await engine.dispose()
    assert [window.window for window in again.windows] == [Window(T0, T0 + DAY)]


def test_the_watermark_never_goes_back_when_its_stored_text_reads_back_as_another_type() -> None:
    """A date or decimal cursor is stored as text ('2024-01-12', '10.5') and reads back as a datetime or text:
    a run whose records were all older (a full refresh after the newest was deleted) used to lower the watermark."""
    cases = [
        (cursor_from_text(cursor_text(date(2024, 1, 12))), date(2024, 1, 10)),
        (cursor_from_text(cursor_text(Decimal("10.5"))), Decimal("9.75")),
        (cursor_from_text(cursor_text(1710201600.0)), 1710028800.0),
    ]
    for stored, older in cases:
        tracker = WatermarkTracker(_orders(), _windows(1), Watermark("orders", stored, T0), SETTLED)
        tracker.saw_cursor(1, older)
        mark = tracker.window_finished(1)
        assert mark is not None and mark.watermark == stored, (stored, older)


async def test_a_first_sync_with_nothing_to_load_says_why(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A start in the future (a typo) or within [sync].lag of now planned no window, and the run said only "0/0 windows"."""
    orders = _orders().model_copy(update={"start": T0 + 400 * DAY})
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([orders], auto_migrate=True)
        run_id = await store.start_run("sync", {}, ["orders"])
        with caplog.at_level(logging.INFO, logger="etl.planning"):
            future = await plan_sync(store, orders, run_id, T0, timedelta(minutes=5))
            within_lag = await plan_sync(store, orders, run_id, T0 + 400 * DAY + timedelta(minutes=1), timedelta(minutes=5))
    finally:
        await engine.dispose()
    assert future.windows == within_lag.windows == []
    said = [record for record in caplog.records if record.name == "etl.planning"]
    assert [record.levelno for record in said] == [logging.WARNING, logging.INFO]
    future_said, within_lag_said = (record.getMessage() for record in said)
    assert "start, 2025-02-04T00:00:00Z, is in the future; check resources.orders.start" in future_said
    assert "is not before now less [sync].lag" in within_lag_said


async def test_a_sync_without_date_filters_warns_that_start_and_lookback_do_nothing(
    fresh_database: Callable[[str], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """`start` and `lookback` on a resource without [resources.filter] (the table forgotten, or misspelt) were
    ignored without a word: every sync read it whole while its user believed it incremental."""
    document = demo_document(None, "http://127.0.0.1:1", "http://127.0.0.1:1")
    for resource in document["resources"]:
        if resource["name"] == "products":
            resource.update(start="2024-01-01", lookback="1h")
    products = config_from_document(document).resource("products")
    engine = create_engine(await fresh_database("sqlite"))
    try:
        store = Store(engine)
        await store.prepare([products], auto_migrate=True)
        with caplog.at_level(logging.WARNING):
            await plan_sync(store, products, await store.start_run("sync", {}, ["products"]), datetime.now(UTC), timedelta(0))
    finally:
        await engine.dispose()
    assert "products: resources.products.start and lookback have no effect without [resources.filter]" in caplog.text
