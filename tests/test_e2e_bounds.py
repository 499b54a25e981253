"""Date filters at their edges, on APIs etl did not write: a record stamped exactly on a window's bound is
loaded once, whatever the API makes of its bounds. etl runs as a subprocess, as cron would run it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
