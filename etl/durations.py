"""Parsing of the durations and instants users write in config.toml and on the command line."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

_SHORT_PART = r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)"
_SHORT = re.compile(rf"^\s*(?:{_SHORT_PART}\s*)+$")  # `1h30m` is the sum of its parts
_ISO = re.compile(
    r"^P(?:(?P<w>\d+(?:\.\d+)?)W)?(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


MAX_DURATION = timedelta(days=36525)


def parse_duration(text: str | int | float) -> timedelta:
    """`30s`, `5m`, `1h`, `1d` (or several, `1h30m`), ISO-8601 `PT1H`, or a number of seconds; at most a century either way."""
    try:
        duration = _duration(text)
    except OverflowError:
        duration = MAX_DURATION * 2
    if abs(duration) > MAX_DURATION:
        raise ValueError(f"{text!r} is longer than a century")
    return duration


def _duration(text: str | int | float) -> timedelta:
    if isinstance(text, bool):
        raise ValueError("a duration like '30s', '5m', '1h', '1d' or 'PT1H'")
    if isinstance(text, int | float):
        return timedelta(seconds=text)
    if not isinstance(text, str):
        raise ValueError("a duration like '30s', '5m', '1h', '1d' or 'PT1H'")
    if _SHORT.match(text):
        return timedelta(seconds=sum(float(number) * _UNIT_SECONDS[unit] for number, unit in re.findall(_SHORT_PART, text)))
    if (match := _ISO.match(text.strip().upper())) and text.strip().upper() not in ("P", "PT"):
        parts = {k: float(v) for k, v in match.groupdict().items() if v}
        return timedelta(
            weeks=parts.get("w", 0),
            days=parts.get("d", 0),
            hours=parts.get("h", 0),
            minutes=parts.get("m", 0),
            seconds=parts.get("s", 0),
        )
    raise ValueError(f"{text!r} is not a duration like '30s', '5m', '1h', '1d' or 'PT1H'")


def format_duration(delta: timedelta) -> str:
    """The shortest of `1d`, `2h`, `5m`, `30s` that states `delta` exactly."""
    seconds = delta.total_seconds()
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds}s"


def parse_instant(value: str | date | datetime) -> datetime:
    """A date (`YYYY-MM-DD`, midnight UTC) or an ISO-8601 datetime; naive means UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif not isinstance(value, str):
        raise ValueError("a date YYYY-MM-DD or an ISO-8601 datetime")
    else:
        text = value.strip()
        try:
            moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            raise ValueError(f"{value!r} is not a date YYYY-MM-DD or an ISO-8601 datetime") from None
    try:
        return as_utc(moment)
    except OverflowError:  # `9999-12-31T23:00-05:00` is in year 10000 in UTC
        raise ValueError(f"{value!r} is outside the years 1 to 9999 once in UTC") from None


def as_utc(moment: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def isoformat_utc(moment: datetime) -> str:
    """`2024-01-01T00:00:00Z`: the form etl prints and stores for instants."""
    text = as_utc(moment).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
