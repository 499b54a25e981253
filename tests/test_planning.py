"""Planning: the watermark follows finished windows only, each window's highest cursor is cumulative, full refreshes resume."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from etl.config import config_from_document
from etl.db import create_engine
from etl.demo import demo_document
from etl.planning import WatermarkTracker, plan_backfill
from etl.schema import windows
from etl.store import LoadBatch, Store, Watermark, WindowProgress, WindowRecord
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
            plan = await plan_backfill(store, products, run, T0, T0 + DAY, None, restart, SETTLED)
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

