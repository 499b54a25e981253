"""Which windows a run loads, and how far the watermark may move when they finish.

`sync` plans from the watermark (less `lookback`) or `start` up to now less
`[sync].lag`; `backfill` plans the interval it is given and takes up the
windows an earlier, interrupted run of the same backfill left unfinished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

from etl.config import ResourceConfig
from etl.durations import format_duration, isoformat_utc
from etl.errors import ConfigError
from etl.store import Store, Watermark, WindowRecord, newest_cursor
from etl.windows import (
    FULL_REFRESH,
    WHOLE_SECOND,
    Window,
    ceil_to,
    cut,
    floor_to,
    granularity,
    outside_calendar,
)

log = logging.getLogger(__name__)

MAX_WINDOWS = 100_000  # each window costs at least one request and one row of etl_windows


@dataclass
class ResourcePlan:
    """The windows of one resource in time order, and what the watermark was when the run began."""

    resource: ResourceConfig
    windows: list[WindowRecord]
    tracker: WatermarkTracker

    @property
    def pending(self) -> list[WindowRecord]:
        return [window for window in self.windows if window.state != "done"]


async def plan_sync(store: Store, resource: ResourceConfig, run_id: int, now: datetime, lag: timedelta) -> ResourcePlan:
    """From the watermark less lookback (or `start`) to now less lag, taking up where a stopped sync left off.

    The windows of a sync that stopped early are planned again as they were, from its first unfinished
    one: a window it was in the middle of is read again from its first page, and one it finished is not
    read again unless it finished within lag + lookback of its end (records stamped in it may have
    arrived since). A sync longer than its slot gets further each night by the windows it finishes.
    """
    base = await store.watermark(resource.name)
    if resource.filter is None:  # one window: an unfinished one is taken up
        _warn_unfiltered(resource)
        windows = await store.open_windows("sync", resource.name, [FULL_REFRESH], run_id, reuse=True)
    else:
        planned, resumed = await _dated_sync(store, resource, base, now, lag)
        windows = await store.open_windows(
            "sync", resource.name, planned, run_id, reuse=bool(resumed), only=resumed, settled_after=lag + resource.lookback
        )
    await store.supersede_windows("sync", resource.name, run_id)
    return ResourcePlan(resource, windows, WatermarkTracker(resource, windows, base, now - lag))


def _warn_unfiltered(resource: ResourceConfig) -> None:
    """`start` or `lookback` without [resources.filter] (forgotten, or its table name misspelt) did nothing without
    a word: every sync read the resource whole while its user believed it incremental."""
    ignored = [key for key in ("start", "lookback") if key in resource.model_fields_set]
    if ignored:
        log.warning("%s: resources.%s.%s %s no effect without [resources.filter]: the API cannot be asked for a date "
                    "range, so every sync reads all of it", resource.name, resource.name, " and ".join(ignored),
                    "have" if len(ignored) > 1 else "has")


async def _dated_sync(
    store: Store, resource: ResourceConfig, base: Watermark | None, now: datetime, lag: timedelta
) -> tuple[list[Window], set[Window]]:
    """The windows of a sync with date filters, and which of them an earlier, stopped sync left to take up."""
    assert resource.filter is not None and resource.start is not None  # the config requires start with a filter
    step, zone = granularity(resource.filter.format), resource.filter.zone
    # never before `start`: a lookback longer than the time since it loaded what `start` kept out of the first sync
    start = max(base.synced_until - resource.lookback, resource.start) if base and base.synced_until else resource.start
    # whole seconds at least: `until=...T18:40:35.738436Z` was a 400 from every API that parses yyyy-MM-dd'T'HH:mm:ss'Z'
    # (iso's grid stays 1 us for backfill bounds given so); the next sync starts at this end
    whole = max(step, WHOLE_SECOND)
    start, end = floor_to(start, whole, zone), floor_to(now - lag, whole, zone)
    if base is None and start >= end:
        _nothing_yet(resource, start, end, now)
    if base is not None:
        await _warn_start_moved_earlier(store, resource, floor_to(resource.start, whole, zone))
    resumed = [(first, last) for first, last in await store.unfinished_sync(resource.name) if start < last and first < end]
    if any(floor_to(bound, step, zone) != bound for bounds in resumed for bound in bounds):
        resumed = []  # cut for another filter format: the API could not be asked for them as they are
    if resumed:
        log.info("%s: taking up the %d windows from %s on that an earlier sync left unfinished",
                 resource.name, len(resumed), isoformat_utc(resumed[0][0]))
    planned = _around(resumed, start, end, resource.window, step, zone, f"resources.{resource.name}.window")
    return planned, {Window(*bounds) for bounds in resumed}


async def _warn_start_moved_earlier(store: Store, resource: ResourceConfig, start: datetime) -> None:
    """`start` moved earlier once the resource was loaded: a sync goes on from where the last one ended, and the
    time between the new start and where loading began was never read, exit 0 and no word."""
    loaded_from = await store.loaded_from(resource.name)
    if loaded_from is None or start >= loaded_from:
        return
    log.warning("%s: resources.%s.start, %s, is before %s, where what was loaded of it begins: a sync goes on from where "
                "the last one ended and does not read the time before; `python -m etl backfill --from %s --to %s "
                "--resource %s` loads it", resource.name, resource.name, isoformat_utc(start), isoformat_utc(loaded_from),
                _flag_value(start), _flag_value(loaded_from), resource.name)


def _flag_value(moment: datetime) -> str:
    """A date for a UTC midnight (what users write), else the instant."""
    text = isoformat_utc(moment)
    return text.removesuffix("T00:00:00Z")


def _nothing_yet(resource: ResourceConfig, start: datetime, end: datetime, now: datetime) -> None:
    """A first sync with nothing to load said so only as "0/0 windows": a start in the future is likely a typo."""
    if start > now:
        log.warning("%s: nothing to load: its start, %s, is in the future; check resources.%s.start",
                    resource.name, isoformat_utc(start), resource.name)
    else:
        log.info("%s: nothing to load yet: its start, %s, is not before now less [sync].lag (%s on the API filter's grid)",
                 resource.name, isoformat_utc(start), isoformat_utc(end))


def _around(
    resumed: list[tuple[datetime, datetime]], start: datetime, end: datetime, size: timedelta, step: timedelta,
    zone: tzinfo, key: str,
) -> list[Window]:
    """`[start, end)` cut into windows, keeping the resumed ones as they are (they follow on from each other)."""
    if not resumed:
        return _cut(start, end, size, step, zone, key) if start < end else []
    (first, _), (_, last) = resumed[0], resumed[-1]
    before = _cut(start, first, size, step, zone, key) if start < first else []
    after = _cut(last, end, size, step, zone, key) if last < end else []
    return before + [Window(*bounds) for bounds in resumed] + after


async def plan_backfill(
    store: Store,
    resource: ResourceConfig,
    run_id: int,
    start: datetime,
    end: datetime,
    window: timedelta | None,
    restart: bool,
    now: datetime,
    lag: timedelta,
) -> ResourcePlan:
    """What lies after now less `[sync].lag` may still change: the watermark stops there, and a window an
    earlier backfill finished before its end was that far behind it is read again, not taken as finished."""
    base = await store.watermark(resource.name)
    if resource.filter is None:
        windows = await store.open_windows("backfill", resource.name, [FULL_REFRESH], run_id, reuse=not restart)
        await store.supersede_windows("backfill", resource.name, run_id, full_refresh_only=True)
    else:
        step, zone = granularity(resource.filter.format), resource.filter.zone
        planned = _cut(start, end, window or resource.window, step, zone, _window_key(resource, window))
        loads = (planned[0].start, planned[-1].end) if planned else (start, end)
        if loads != (start, end) and loads[0] and loads[1]:
            log.info("%s: the API's filter (format %r) takes whole steps of %s, so the backfill loads %s to %s",
                     resource.name, resource.filter.format, format_duration(step), isoformat_utc(loads[0]), isoformat_utc(loads[1]))
        if restart:
            await store.forget_windows("backfill", resource.name, floor_to(start, step, zone), ceil_to(end, step, zone))
        windows = await store.open_windows(
            "backfill", resource.name, planned, run_id, reuse=True, settled_after=lag, stopped_only=True
        )
        if planned:
            await store.supersede_windows("backfill", resource.name, run_id, within=Window(planned[0].start, planned[-1].end))
        finished = sum(window.state == "done" for window in windows)
        if finished:
            log.info("%s: %d of %d windows were finished by an earlier backfill that stopped early and are not fetched again; "
                     "--restart reloads them", resource.name, finished, len(windows))
    return ResourcePlan(resource, windows, WatermarkTracker(resource, windows, base, now - lag))


def check_backfill_windows(resources: list[ResourceConfig], start: datetime, end: datetime, window: timedelta | None) -> None:
    """Refuse a backfill's windows before the run is recorded: refused while planning, it left a failed run in
    etl_runs for a configuration error (exit 2), and the windows of the resources planned before it pending."""
    for resource in resources:
        if resource.filter is not None:
            size, step, zone = window or resource.window, granularity(resource.filter.format), resource.filter.zone
            if edge := outside_calendar(start, end, size, step, zone):  # `--to 9999-12-31` was a traceback, exit 1
                flag = "--from" if edge == start else "--to"
                raise ConfigError(f"{flag} {isoformat_utc(edge)}: the windows of {resource.name} ({format_duration(size)}) and the "
                                  f"bounds sent to its API would reach outside the years 1 to 9999: give a {flag} nearer to now")
            _require_few(start, end, size, step, _window_key(resource, window))


def _window_key(resource: ResourceConfig, window: timedelta | None) -> str:
    return "--window" if window else f"resources.{resource.name}.window"


def _cut(start: datetime, end: datetime, size: timedelta, step: timedelta, zone: tzinfo, key: str) -> list[Window]:
    _require_few(start, end, size, step, key)
    return cut(start, end, size, step, zone)


def _require_few(start: datetime, end: datetime, size: timedelta, step: timedelta, key: str) -> None:
    """A window far too small for the interval (`--window 1s` over a year) would plan millions."""
    count = (end - start) // max(size, step)
    if count > MAX_WINDOWS:
        raise ConfigError(
            f"{key}: windows of {format_duration(size)} cut {isoformat_utc(start)} to {isoformat_utc(end)} into "
            f"about {count:,}, more than {MAX_WINDOWS:,} (each is at least one request): use a larger {key}"
        )


class WatermarkTracker:
    """Moves the watermark only over finished windows that follow on from where it stood.

    Windows finish out of order when they run in parallel; the watermark
    follows the first unfinished one, so a crash can never leave it past a
    window that was not loaded. A backfill of a range that does not touch the
    watermark (a hole in the past, or beyond a gap) never moves it, and
    `synced_until` never passes `settled` (now less `[sync].lag`): a backfill
    to tomorrow has loaded tomorrow only as it stands today, and the next sync
    must read it again rather than start after it.
    """

    def __init__(
        self, resource: ResourceConfig, windows: list[WindowRecord], base: Watermark | None, settled: datetime
    ) -> None:
        self._resource = resource.name
        self._windows = windows
        self._done = {window.id: window.state == "done" for window in windows}
        self._max_cursor: dict[int, Any] = {window.id: window.max_cursor for window in windows}
        self._watermark = base.watermark if base else None
        self._synced_until = base.synced_until if base else None
        self._settled = settled
        anchor = self._synced_until or resource.start
        first: Window | None = windows[0].window if windows else None
        self._may_advance = first is not None and (first.start is None or anchor is None or first.start <= anchor)
        self._next = 0

    def saw_cursor(self, window_id: int, cursor: Any) -> Any:
        """Record a page's highest cursor; returns the window's highest so far, committed pages included."""
        self._max_cursor[window_id] = newest_cursor(self._max_cursor.get(window_id), cursor)
        return self._max_cursor[window_id]

    def window_finished(self, window_id: int, api_behind: timedelta = timedelta(0)) -> Watermark | None:
        """The new watermark if this window extends the finished prefix, else None.

        `synced_until` stays `api_behind` (the API's clock behind ours) further back: the API stamps what it
        writes after this run by its clock, and the next sync must start before that."""
        self._done[window_id] = True
        moved = False
        while self._next < len(self._windows) and self._done[self._windows[self._next].id]:
            window = self._windows[self._next]
            self._watermark = newest_cursor(self._watermark, self._max_cursor.get(window.id))
            if window.window.end is not None:
                loaded_until = min(window.window.end, self._settled - api_behind)
                self._synced_until = max(self._synced_until or loaded_until, loaded_until)
            self._next += 1
            moved = True
        if not (moved and self._may_advance):
            return None
        return Watermark(self._resource, self._watermark, self._synced_until)
