"""etl.windows: windows on the filter's grid, bounds in every format, and inclusive ends that
neither repeat nor skip a record.

The last test backfills the simulator day by day in every filter format
(payments has a day-granular, inclusive `to`) and checks that each record was
served exactly once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from etl import runs
from etl.config import Config, FilterConfig, config_from_document
from etl.demo import demo_document
from etl.progress import NoProgress
from etl.simulator import Simulator
from etl.windows import Window, cut, filter_params, format_bound, granularity

JAN_1 = datetime(2024, 1, 1, tzinfo=UTC)
MOMENT = datetime(2024, 3, 5, 14, 7, 9, 250000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("fmt", "step"),
    [
        ("iso", timedelta(microseconds=1)),
        ("date", timedelta(days=1)),
        ("epoch", timedelta(seconds=1)),
        ("epoch_ms", timedelta(milliseconds=1)),
        ("%Y-%m-%d", timedelta(days=1)),
        ("%d.%m.%Y %H", timedelta(hours=1)),
        ("%Y-%m-%d %H:%M", timedelta(minutes=1)),
        ("%Y-%m-%d %T", timedelta(seconds=1)),
        ("%Y-%m-%dT%H:%M:%S.%f", timedelta(microseconds=1)),
        ("%Y-%m-%d 100%%S", timedelta(days=1)),
    ],
)
def test_granularity_is_the_finest_step_the_format_writes(fmt: str, step: timedelta) -> None:
    """A pattern is as fine as its finest directive; an escaped %%S is text, not seconds."""
    assert granularity(fmt) == step


@pytest.mark.parametrize(
    ("fmt", "written"),
    [
        ("iso", "2024-03-05T14:07:09.250000Z"),
        ("date", "2024-03-05"),
        ("epoch", "1709647629"),
        ("epoch_ms", "1709647629250"),
        ("%d/%m/%Y %H:%M", "05/03/2024 14:07"),
        ("%s", "1709647629"),
    ],
)
def test_bounds_are_written_in_the_configured_format(fmt: str, written: str) -> None:
    """Each format writes the same instant as the API expects it, in UTC."""
    assert format_bound(MOMENT, fmt) == written


@pytest.fixture
def new_york() -> Iterator[None]:
    """The process's local time zone is not UTC for the duration of a test."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_strftime_epoch_does_not_depend_on_the_local_time_zone(new_york: None) -> None:
    """%s is written from the UTC instant, not from the C library's local-time reading."""
    assert format_bound(MOMENT, "%s") == "1709647629"


def test_an_exclusive_end_is_the_window_end() -> None:
    """Without to_inclusive, `to` is the window's own (exclusive) end."""
    filter_ = FilterConfig(from_param="since", to_param="until", format="epoch")
    params = filter_params(Window(JAN_1, JAN_1 + timedelta(days=1)), filter_)
    assert params == {"since": "1704067200", "until": "1704153600"}


@pytest.mark.parametrize(("fmt", "to"), [("date", "2024-01-01"), ("%d/%m/%Y", "01/01/2024")])
def test_an_inclusive_end_of_whole_days_is_the_windows_last_day(fmt: str, to: str) -> None:
    """With to_inclusive and a format of days, `to` is the last day inside the window: the API reads it whole."""
    filter_ = FilterConfig(from_param="from", to_param="to", format=fmt, to_inclusive=True)
    assert filter_params(Window(JAN_1, JAN_1 + timedelta(days=1)), filter_)["to"] == to


@pytest.mark.parametrize(
    ("fmt", "to"),
    [("epoch", "1704153600"), ("%Y-%m-%d %T", "2024-01-02 00:00:00"), ("epoch_ms", "1704153600000"), ("iso", "2024-01-02T00:00:00Z")],
)
def test_an_inclusive_end_finer_than_a_day_is_the_windows_end(fmt: str, to: str) -> None:
    """`to = 23:59:59` would leave a record at 23:59:59.5 in neither window; the end itself overlaps one instant."""
    filter_ = FilterConfig(from_param="from", to_param="to", format=fmt, to_inclusive=True)
    assert filter_params(Window(JAN_1, JAN_1 + timedelta(days=1)), filter_)["to"] == to


@pytest.mark.parametrize(
    ("fmt", "since"),
    [("epoch", "1704067199"), ("epoch_ms", "1704067199999"), ("iso", "2023-12-31T23:59:59Z"), ("date", "2023-12-31")],
)
def test_an_exclusive_start_is_one_step_before_the_window(fmt: str, since: str) -> None:
    """`> start - step` is `>= start` on the grid: a record stamped on the bound is not left out of both windows.
    iso goes back a whole second, not its microsecond: `...59.999999Z` was a 400 from every API that parses
    yyyy-MM-dd'T'HH:mm:ss'Z', and what the second overlaps is stored once."""
    filter_ = FilterConfig(from_param="from", to_param="to", format=fmt, from_inclusive=False)
    assert filter_params(Window(JAN_1, JAN_1 + timedelta(days=1)), filter_)["from"] == since


def test_day_windows_in_a_zone_follow_its_midnights_through_dst() -> None:
    """With `timezone`, a day window is the zone's day (23 hours when clocks go forward): each asks for one date,
    none twice, none skipped, and the first starts at the local midnight before `from`."""
    filter_ = FilterConfig(from_param="from", to_param="to", format="date", timezone="Europe/Berlin", to_inclusive=True)
    windows = cut(datetime(2024, 3, 30, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC), timedelta(days=1),
                  granularity("date"), filter_.zone)
    assert [(w.start, w.end) for w in windows] == [
        (datetime(2024, 3, 29, 23, tzinfo=UTC), datetime(2024, 3, 30, 23, tzinfo=UTC)),
        (datetime(2024, 3, 30, 23, tzinfo=UTC), datetime(2024, 3, 31, 22, tzinfo=UTC)),
        (datetime(2024, 3, 31, 22, tzinfo=UTC), datetime(2024, 4, 1, 22, tzinfo=UTC)),
    ]
    assert [filter_params(w, filter_)["to"] for w in windows] == ["2024-03-30", "2024-03-31", "2024-04-01"]


def test_a_strftime_bound_is_the_zones_wall_clock() -> None:
    filter_ = FilterConfig(from_param="from", to_param="to", format="%Y-%m-%d %H:%M:%S", timezone="America/New_York")
    assert filter_params(Window(JAN_1, JAN_1 + timedelta(hours=1)), filter_) == {
        "from": "2023-12-31 19:00:00", "to": "2023-12-31 20:00:00"}


def test_an_rfc3339_offset_with_a_colon_is_written_whatever_the_python() -> None:
    """`%:z` (+01:00, what RFC 3339 APIs read) is Python 3.12's: on 3.11 it went out literally, `since=...T01:00:00%:z`."""
    filter_ = FilterConfig(from_param="from", to_param="to", format="%Y-%m-%dT%H:%M:%S%:z", timezone="Asia/Kolkata")
    assert filter_params(Window(JAN_1, JAN_1 + timedelta(hours=1)), filter_) == {
        "from": "2024-01-01T05:30:00+05:30", "to": "2024-01-01T06:30:00+05:30"}


@pytest.mark.parametrize("fmt", ["%Y-%m-%d %Q", "%Y-%m-%dT%H:%M:%S%::z", "%Y-%m-%d%"])
def test_a_directive_strftime_does_not_know_is_refused(fmt: str) -> None:
    """The C library leaves a directive it does not know as written: it went to the API literally (`%Q`)."""
    with pytest.raises(ValueError, match="strftime"):
        FilterConfig(from_param="from", to_param="to", format=fmt)


@pytest.mark.parametrize(("fmt", "zone"), [("iso", "Europe/Berlin"), ("epoch", "UTC"), ("date", "Europe/Berln")])
def test_a_timezone_that_cannot_apply_is_refused(fmt: str, zone: str) -> None:
    with pytest.raises(ValueError, match="timezone"):
        FilterConfig(from_param="from", to_param="to", format=fmt, timezone=zone)


def _days(params: dict[str, str]) -> list[date]:
    """The days an inclusive from/to pair asks for."""
    first, last = date.fromisoformat(params["from"]), date.fromisoformat(params["to"])
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def test_day_windows_with_inclusive_ends_cover_every_day_exactly_once() -> None:
    """Windows cut from an interval with ragged ends ask for each day once: none twice, none skipped."""
    filter_ = FilterConfig(from_param="from", to_param="to", format="date", to_inclusive=True)
    windows = cut(
        JAN_1 + timedelta(hours=10),
        JAN_1 + timedelta(days=9, hours=3),
        timedelta(hours=36),
        granularity("date"),
    )
    asked = [day for window in windows for day in _days(filter_params(window, filter_))]
    assert asked == [date(2024, 1, day) for day in range(1, 11)]


def test_windows_smaller_than_the_grid_grow_to_one_step() -> None:
    """A 6h window over a day-granular filter becomes whole days on the grid, never a part of one."""
    windows = cut(JAN_1, JAN_1 + timedelta(days=2), timedelta(hours=6), timedelta(days=1))
    assert windows == [
        Window(JAN_1, JAN_1 + timedelta(days=1)),
        Window(JAN_1 + timedelta(days=1), JAN_1 + timedelta(days=2)),
    ]


def _day_by_day(sim: Simulator, database_url: str, window: str) -> Config:
    """The demo config's resources that have a date filter, each cut into windows of `window`."""
    document = demo_document({"url": database_url}, sim.base_url, sim.token_url)
    document["resources"] = [r for r in document["resources"] if "filter" in r]
    for resource in document["resources"]:
        resource["window"] = window
    return config_from_document(document)


async def test_backfilling_day_by_day_serves_every_record_exactly_once(
    fresh_database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten days in 12h windows, every filter format: each record served once, stored or rejected once."""
    monkeypatch.setenv("ETL_CLIENT_SECRET", "demo-secret")
    monkeypatch.delenv("ETL_DATABASE_URL", raising=False)
    async with Simulator() as sim:
        config = _day_by_day(sim, await fresh_database("sqlite"), "12h")
        outcome = await runs.backfill(
            config, JAN_1, JAN_1 + timedelta(days=10), None, None, False, asyncio.Event(), NoProgress()
        )
        assert outcome.exit_code == 0, outcome.error
        for name in ("orders", "customers", "events", "payments"):
            truth = sim.truth(name)
            assert sim.counters.records_served[name] == len(truth), name
            assert outcome.resources[name].loaded + outcome.resources[name].rejected == len(truth), name
        payments = [key for key in sim.counters.page_fetches if key.startswith("payments?")]
        assert len(payments) == 10 and set(sim.counters.page_fetches.values()) == {1}


async def test_a_backfill_says_what_it_loads_on_a_coarse_filter_and_which_windows_it_skips(
    fresh_database: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """6:00 to 6:00 on a day-granular filter loads two whole days, and says so; run again after it stopped (its run
    not succeeded, as a kill leaves it), it says what it skips and why."""
    monkeypatch.setenv("ETL_CLIENT_SECRET", "demo-secret")
    monkeypatch.delenv("ETL_DATABASE_URL", raising=False)
    async with Simulator() as sim:
        url = await fresh_database("sqlite")
        config = _day_by_day(sim, url, "1d")
        start, end = JAN_1 + timedelta(hours=6), JAN_1 + timedelta(days=1, hours=6)
        for _ in range(2):
            outcome = await runs.backfill(config, start, end, ["payments"], None, False, asyncio.Event(), NoProgress())
            assert outcome.exit_code == 0, outcome.error
            with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
                connection.execute("UPDATE etl_runs SET status = 'running'")
    messages = [record.getMessage() for record in caplog.records if record.name == "etl.planning"]
    assert messages.count(
        "payments: the API's filter (format 'date') takes whole steps of 1d, "
        "so the backfill loads 2024-01-01T00:00:00Z to 2024-01-03T00:00:00Z"
    ) == 2
    assert messages[-1] == (
        "payments: 2 of 2 windows were finished by an earlier backfill that stopped early and are not fetched again; "
        "--restart reloads them"
    )
