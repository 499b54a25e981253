"""Date windows and how their bounds are written into the API's filter parameters.

A window is half-open, `[start, end)`. Bounds are cut on a grid of the filter's
granularity (a day for `format = "date"`, a second for `epoch`, ...), so an API
that only understands whole days is never asked for part of one: that would
load the same records twice or, with an inclusive end, skip some.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from etl.config import OWN_DIRECTIVES, STRFTIME_DIRECTIVE, FilterConfig
from etl.durations import isoformat_utc

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WHOLE_DAY = timedelta(days=1)
WHOLE_SECOND = timedelta(seconds=1)  # the finest bound etl makes itself (sync's, an exclusive iso start): every ISO-8601 parser reads it


@dataclass(frozen=True, order=True)
class Window:
    """`[start, end)` in UTC; both None for a full refresh of an API without date filters."""

    start: datetime | None
    end: datetime | None

    @property
    def is_full_refresh(self) -> bool:
        return self.start is None

    def __str__(self) -> str:
        if self.start is None or self.end is None:
            return "full refresh"
        return f"[{isoformat_utc(self.start)}, {isoformat_utc(self.end)})"


FULL_REFRESH = Window(None, None)


FORMAT_STEPS = {
    "date": WHOLE_DAY,
    "epoch": timedelta(seconds=1),
    "epoch_ms": timedelta(milliseconds=1),
    "iso": timedelta(microseconds=1),
}
# strftime directives by the step they resolve; a pattern is as fine as its finest directive
DIRECTIVE_STEPS = (
    ("f", timedelta(microseconds=1)),
    ("STXcrs", timedelta(seconds=1)),
    ("MR", timedelta(minutes=1)),
    ("HIkl", timedelta(hours=1)),
)
OWN_DIRECTIVE = re.compile("|".join(map(re.escape, OWN_DIRECTIVES)))  # what format_bound writes itself


def granularity(fmt: str) -> timedelta:
    """The smallest step the filter format can express (a day for patterns without a time of day)."""
    if fmt in FORMAT_STEPS:
        return FORMAT_STEPS[fmt]
    directives = {match.group(1) for match in STRFTIME_DIRECTIVE.finditer(fmt)}
    for letters, step in DIRECTIVE_STEPS:
        if directives & set(letters):
            return step
    return WHOLE_DAY


def floor_to(moment: datetime, step: timedelta, zone: tzinfo = UTC) -> datetime:
    """The grid point of `step` at or before `moment`: the grid starts at the Unix epoch of `zone`'s wall clock
    (its midnights, for a day), since that is what an API reading its bounds in that zone can be asked for."""
    if zone is UTC:
        return moment - (moment - EPOCH) % step
    wall = _wall(moment, zone)
    wall -= (wall - EPOCH) % step
    while _instant(wall, zone) > moment:  # a wall clock the zone skipped (DST) maps after it
        wall -= step
    return _instant(wall, zone)


def ceil_to(moment: datetime, step: timedelta, zone: tzinfo = UTC) -> datetime:
    """The grid point of `step` at or after `moment`."""
    floored = floor_to(moment, step, zone)
    return floored if floored == moment else _shift(floored, step, zone)


def cut(start: datetime, end: datetime, size: timedelta, step: timedelta, zone: tzinfo = UTC) -> list[Window]:
    """`[start, end)` as consecutive windows of `size`, bounds on the `step` grid (of `zone`'s wall clock: a
    window of a day in a zone with DST is 23 or 25 hours on the days its clocks change)."""
    start, end = floor_to(start, step, zone), ceil_to(end, step, zone)
    size = max(ceil_to(EPOCH + size, step) - EPOCH, step)
    windows = []
    while start < end:
        following = _shift(start, size, zone)
        if following <= start:  # never backwards, where DST repeats an hour
            following = start + size
        windows.append(Window(start, min(following, end)))
        start = following
    return windows


def outside_calendar(start: datetime, end: datetime, size: timedelta, step: timedelta, zone: tzinfo = UTC) -> datetime | None:
    """The end of `[start, end)` from which `cut` or `filter_params` would leave the years 1 to 9999, else None: they go
    a step of the grid before `start` and up to a window of `size` after `end`."""
    for moment, delta in ((start, -step), (end, max(size, step))):
        try:
            _shift(floor_to(moment, step, zone) if delta < timedelta(0) else ceil_to(moment, step, zone), delta, zone)
        except OverflowError:
            return moment
    return None


def _shift(moment: datetime, delta: timedelta, zone: tzinfo) -> datetime:
    """`moment` moved by `delta` on `zone`'s wall clock: a day later is the next local midnight, DST or not."""
    if zone is UTC:
        return moment + delta
    return _instant(_wall(moment, zone) + delta, zone)


def _wall(moment: datetime, zone: tzinfo) -> datetime:
    """`moment`'s wall clock in `zone`, written as a UTC datetime so that the epoch grid applies to it."""
    return moment.astimezone(zone).replace(tzinfo=UTC)


def _instant(wall: datetime, zone: tzinfo) -> datetime:
    """The instant (UTC) that `zone`'s wall clock shows as `wall`: the first, when DST's end shows it twice."""
    return wall.replace(tzinfo=zone).astimezone(UTC)


def format_bound(moment: datetime, fmt: str, zone: tzinfo = UTC) -> str:
    """One bound as the API wants it; a date or strftime pattern sees `zone`'s wall clock (UTC's by default)."""
    if fmt == "iso":
        return isoformat_utc(moment)
    if fmt == "date":
        return moment.astimezone(zone).date().isoformat()
    seconds = str((moment - EPOCH) // timedelta(seconds=1))
    if fmt == "epoch":
        return seconds
    if fmt == "epoch_ms":
        return str((moment - EPOCH) // timedelta(milliseconds=1))
    # %s is the C library's, which reads the wall clock as local time: write the epoch seconds ourselves;
    # %:z (+05:30, RFC 3339's offset) is Python 3.12's, and went out literally on 3.11
    local = moment.astimezone(zone)
    own = {"%s": seconds, "%:z": _colon_offset(local)}
    return local.strftime(OWN_DIRECTIVE.sub(lambda m: own.get(m.group(), m.group()), fmt))


def _colon_offset(local: datetime) -> str:
    """The UTC offset as RFC 3339 writes it, +05:30."""
    offset = local.utcoffset() or timedelta(0)
    minutes = abs(offset) // timedelta(minutes=1)
    return f"{'-' if offset < timedelta(0) else '+'}{minutes // 60:02}:{minutes % 60:02}"


def filter_params(window: Window, filter_: FilterConfig) -> dict[str, str]:
    """The query parameters that ask the API for exactly this window.

    With `to_inclusive` and a format of whole days, `to` is the window's last day:
    an API compares dates, so that day is asked for whole and the next window
    starts on the following one. With a finer format (seconds, ...), `to` is the
    window's end itself: `end - 1s` would ask for nothing after 23:59:59.000, and
    a record at 23:59:59.5 would fall between two windows. A record exactly at the
    end is then read by both windows and stored once.

    Without `from_inclusive` (an API whose start is exclusive, `updated_after`),
    `from` is one step of the grid before the window's start: `> start - step`
    holds for every record at or after the start, so one stamped on the bound
    between two windows is not left out of both. For iso the step back is a whole
    second: the records of that second are read twice and stored once.
    """
    if window.start is None or window.end is None:
        return {}
    step, zone = granularity(filter_.format), filter_.zone
    back = max(step, WHOLE_SECOND) if filter_.format == "iso" else step  # iso: no fraction a strict parser refuses
    start = window.start if filter_.from_inclusive else _shift(window.start, -back, zone)
    end = _shift(window.end, -step, zone) if filter_.to_inclusive and step >= WHOLE_DAY else window.end
    return {
        filter_.from_param: format_bound(start, filter_.format, zone),
        filter_.to_param: format_bound(end, filter_.format, zone),
    }
