"""Date windows and how their bounds are written into the API's filter parameters.

A window is half-open, `[start, end)`. Bounds are cut on a grid of the filter's
granularity (a day for `format = "date"`, a second for `epoch`, ...), so an API
that only understands whole days is never asked for part of one: that would
load the same records twice or, with an inclusive end, skip some.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from etl.config import STRFTIME_DIRECTIVE, FilterConfig
from etl.durations import isoformat_utc

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WHOLE_DAY = timedelta(days=1)


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
EPOCH_DIRECTIVE = re.compile(r"%%|%s")


def granularity(fmt: str) -> timedelta:
    """The smallest step the filter format can express (a day for patterns without a time of day)."""
    if fmt in FORMAT_STEPS:
        return FORMAT_STEPS[fmt]
    directives = {match.group(1) for match in STRFTIME_DIRECTIVE.finditer(fmt)}
    for letters, step in DIRECTIVE_STEPS:
        if directives & set(letters):
            return step
    return WHOLE_DAY


def floor_to(moment: datetime, step: timedelta) -> datetime:
    """The grid point of `step` at or before `moment` (the grid starts at the Unix epoch)."""
    return moment - (moment - EPOCH) % step


def ceil_to(moment: datetime, step: timedelta) -> datetime:
    """The grid point of `step` at or after `moment`."""
    floored = floor_to(moment, step)
    return floored if floored == moment else floored + step


def cut(start: datetime, end: datetime, size: timedelta, step: timedelta) -> list[Window]:
    """`[start, end)` as consecutive windows of `size`, bounds on the `step` grid."""
    start, end = floor_to(start, step), ceil_to(end, step)
    size = max(ceil_to(EPOCH + size, step) - EPOCH, step)
    windows = []
    while start < end:
        windows.append(Window(start, min(start + size, end)))
        start += size
    return windows


def format_bound(moment: datetime, fmt: str) -> str:
    """One bound as the API wants it; a strftime pattern sees the UTC wall clock."""
    if fmt == "iso":
        return isoformat_utc(moment)
    if fmt == "date":
        return moment.date().isoformat()
    seconds = str((moment - EPOCH) // timedelta(seconds=1))
    if fmt == "epoch":
        return seconds
    if fmt == "epoch_ms":
        return str((moment - EPOCH) // timedelta(milliseconds=1))
    # %s is the C library's, which reads the wall clock as local time: write the epoch seconds ourselves
    return moment.strftime(EPOCH_DIRECTIVE.sub(lambda m: seconds if m.group() == "%s" else m.group(), fmt))


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
    between two windows is not left out of both.
    """
    if window.start is None or window.end is None:
        return {}
    step = granularity(filter_.format)
    start = window.start if filter_.from_inclusive else window.start - step
    end = window.end - step if filter_.to_inclusive and step >= WHOLE_DAY else window.end
    return {
        filter_.from_param: format_bound(start, filter_.format),
        filter_.to_param: format_bound(end, filter_.format),
    }
