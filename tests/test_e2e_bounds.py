"""Date filters at their edges, on APIs etl did not write: a record stamped exactly on a window's bound is
loaded once, whatever the API makes of its bounds. etl runs as a subprocess, as cron would run it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from loopback import serving

from etl.demo import demo_document

import tomlwriter
from dbquery import sqlite_rows
from etlproc import run_etl

MARCH_1 = datetime(2024, 3, 1, tzinfo=UTC)


class AfterApi:
    """An API whose `updated_after` is exclusive (`>`), as `created[gt]` or `modifiedAfter` are, and whose
    `updated_before` is exclusive or inclusive. It reads bounds as `iso`, `epoch` or `date`."""

    def __init__(self, fmt: str, to_inclusive: bool) -> None:
        self.fmt = fmt
        self.to_inclusive = to_inclusive
        self.records: dict[int, datetime] = {}

    def _bound(self, text: str) -> Any:
        if self.fmt == "epoch":
            return datetime.fromtimestamp(int(text), UTC)
        if self.fmt == "date":
            return datetime.fromisoformat(text).date()
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    def _inside(self, stamp: datetime, after: Any, before: Any) -> bool:
        value = stamp.date() if self.fmt == "date" else stamp
        return value > after and (value <= before if self.to_inclusive else value < before)

    async def token(self, _request: web.Request) -> web.Response:
        return web.json_response({"access_token": "bounds-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(self, request: web.Request) -> web.Response:
        after, before = self._bound(request.query["updated_after"]), self._bound(request.query["updated_before"])
        listed = [{"id": key, "updated_at": stamp.isoformat()} for key, stamp in sorted(self.records.items())
                  if self._inside(stamp, after, before)]
        return web.json_response({"data": listed})

    @asynccontextmanager
    async def config(self, directory: Path, database_url: str, **filter_: Any) -> AsyncIterator[Path]:
        async with serving({("POST", "/oauth2/token"): self.token, ("GET", "/api/v1/items"): self.items}) as base:
            document = demo_document({"url": database_url}, f"{base}/api/v1", f"{base}/oauth2/token")
            document["resources"] = [{
                "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
                "cursor_field": "updated_at", "start": "2024-01-01", "window": "1d", "pagination": {"style": "none"},
                "filter": {"from_param": "updated_after", "to_param": "updated_before", "format": self.fmt, **filter_},
                "columns": {"id": "integer", "updated_at": "datetime"},
            }]
            yield tomlwriter.write(directory / "config.toml", document)


@pytest.mark.parametrize(("fmt", "to_inclusive"), [("iso", False), ("epoch", False), ("epoch", True), ("date", True)])
async def test_an_exclusive_start_loses_no_record_stamped_on_a_window_bound(
    tmp_path: Path, fmt: str, to_inclusive: bool
) -> None:
    """`from_inclusive = false`: a record stamped at midnight, on the bound between two day windows, was read by
    neither with an API whose start is exclusive (`>`), and its backfill said exit 0 (3 of 12 lost here; with
    `format = "date"` every first day of a window). etl now asks for one step of the filter's grid earlier."""
    api = AfterApi(fmt, to_inclusive)
    for day in range(3):
        for key, offset in enumerate((timedelta(0), timedelta(hours=12), timedelta(hours=23, minutes=59, seconds=59))):
            api.records[10 * day + key] = MARCH_1 + timedelta(days=day) + offset
    api.records[99] = MARCH_1 + timedelta(days=3)  # on --to: outside [from, to)
    url = f"sqlite:///{tmp_path / 'bounds.db'}"
    filter_ = {"from_inclusive": False, "to_inclusive": to_inclusive}
    async with api.config(tmp_path, url, **filter_) as config:
        done = await run_etl("--config", str(config), "backfill", "--from", "2024-03-01", "--to", "2024-03-04")
    assert done.returncode == 0, done.stderr
    loaded = {key for (key,) in sqlite_rows(url, "SELECT id FROM items")}
    assert loaded - {99} == set(api.records) - {99}


class LocalTimeApi:
    """A legacy API that reads its bounds as naive wall-clock times (or dates) of its own zone, as many do."""

    def __init__(self, zone: str, fmt: str) -> None:
        self.zone = ZoneInfo(zone)
        self.fmt = fmt
        self.records: dict[int, datetime] = {}

    def _inside(self, stamp: datetime, since: str, until: str) -> bool:
        local = stamp.astimezone(self.zone)
        if self.fmt == "date":
            return since <= local.date().isoformat() < until
        return since <= local.strftime(self.fmt) < until

    async def items(self, request: web.Request) -> web.Response:
        since, until = request.query["since"], request.query["until"]
        listed = [{"id": key, "updated_at": stamp.astimezone(self.zone).isoformat()}
                  for key, stamp in sorted(self.records.items()) if self._inside(stamp, since, until)]
        return web.json_response({"data": listed})

    @asynccontextmanager
    async def config(
        self, directory: Path, database_url: str, start: str, cursor_type: str = "datetime", **filter_: Any
    ) -> AsyncIterator[Path]:
        routes = {("POST", "/oauth2/token"): AfterApi("iso", False).token, ("GET", "/api/v1/items"): self.items}
        async with serving(routes) as base:
            document = demo_document({"url": database_url}, f"{base}/api/v1", f"{base}/oauth2/token")
            document["sync"] = {"lag": "0s"}
            document["resources"] = [{
                "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
                "cursor_field": "updated_at", "start": start, "window": "1d", "pagination": {"style": "none"},
                "filter": {"from_param": "since", "to_param": "until", "format": self.fmt, **filter_},
                "columns": {"id": "integer", "updated_at": cursor_type},
            }]
            yield tomlwriter.write(directory / "config.toml", document)


async def test_bounds_in_the_apis_local_time_lose_no_record_written_between_syncs(tmp_path: Path) -> None:
    """`timezone`: an API in New York read etl's UTC wall clock as its own, five hours ahead, so each sync asked
    up to five hours into the future and the next one started there: what was written in between was lost, exit 0."""
    api = LocalTimeApi("America/New_York", "%Y-%m-%d %H:%M:%S")
    api.records[1] = datetime.now(UTC) - timedelta(hours=1)
    url = f"sqlite:///{tmp_path / 'local.db'}"
    start = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    async with api.config(tmp_path, url, start, timezone="America/New_York") as config:
        first = await run_etl("--config", str(config), "sync")
        api.records[2] = datetime.now(UTC)
        await asyncio.sleep(1.1)  # the second's grid: the next sync's end is after the record
        second = await run_etl("--config", str(config), "sync")
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert {key for (key,) in sqlite_rows(url, "SELECT id FROM items")} == {1, 2}


async def test_a_backfill_of_dates_in_the_apis_zone_covers_its_whole_utc_interval(tmp_path: Path) -> None:
    """Day windows follow the zone's midnights, so the local days asked for cover `[from, to)` in UTC, the 23-hour
    day of a DST change included: a record at 23:00Z on the last day is the next local day in Berlin."""
    api = LocalTimeApi("Europe/Berlin", "date")
    stamps = [datetime(2024, 3, 30, 0, 30, tzinfo=UTC), datetime(2024, 3, 31, 22, 30, tzinfo=UTC),
              datetime(2024, 4, 1, 23, 0, tzinfo=UTC), datetime(2024, 4, 1, 23, 59, tzinfo=UTC)]
    api.records = dict(enumerate(stamps))
    url = f"sqlite:///{tmp_path / 'dates.db'}"
    async with api.config(tmp_path, url, "2024-01-01", timezone="Europe/Berlin") as config:
        done = await run_etl("--config", str(config), "backfill", "--from", "2024-03-30", "--to", "2024-04-02")
    assert done.returncode == 0, done.stderr
    assert {key for (key,) in sqlite_rows(url, "SELECT id FROM items")} == set(api.records)


async def test_a_text_cursor_holding_local_times_is_warned_about(tmp_path: Path) -> None:
    """A cursor column declared `string` compares as text: when Berlin's clocks went back, 02:10+01:00 (01:10Z), a
    newer version, sorted before 02:30+02:00 (00:30Z), and "latest wins" kept the older one for good, exit 0."""
    api = LocalTimeApi("Europe/Berlin", "%Y-%m-%d %H:%M:%S")
    api.records[1] = datetime(2024, 10, 27, 0, 30, tzinfo=UTC)
    url = f"sqlite:///{tmp_path / 'text.db'}"
    async with api.config(tmp_path, url, "2024-01-01", cursor_type="string", timezone="Europe/Berlin") as config:
        done = await run_etl("--config", str(config), "backfill", "--from", "2024-10-27", "--to", "2024-10-28")
    assert done.returncode == 0, done.stderr
    assert "resources.items.columns.updated_at" in done.stderr and '"datetime"' in done.stderr, done.stderr


async def test_a_backfill_reloads_a_range_an_earlier_backfill_finished(tmp_path: Path) -> None:
    """A backfill that finished is not one to resume: a late writer's record stamped inside its range, and a
    backdated correction, were "finished by an earlier backfill and not fetched again" by the backfill run to
    reload that range (0 loaded, exit 0). Resuming is for a backfill that stopped before it finished."""
    api = LocalTimeApi("UTC", "%Y-%m-%dT%H:%M:%S")
    api.records = {key: MARCH_1 + timedelta(hours=7 * key) for key in range(10)}
    url = f"sqlite:///{tmp_path / 'again.db'}"
    async with api.config(tmp_path, url, "2024-01-01") as config:
        first = await run_etl("--config", str(config), "backfill", "--from", "2024-03-01", "--to", "2024-03-04")
        api.records[50] = MARCH_1 + timedelta(days=1, hours=6)
        again = await run_etl("--config", str(config), "backfill", "--from", "2024-03-02", "--to", "2024-03-03")
    assert (first.returncode, again.returncode) == (0, 0), first.stderr + again.stderr
    assert (50,) in sqlite_rows(url, "SELECT id FROM items"), again.stdout + again.stderr
