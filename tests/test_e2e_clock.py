"""Time on an API etl did not write: cursors stamped in the future, against each database, etl run as cron would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from loopback import serving

from etl.demo import demo_document

import tomlwriter
from dbquery import rows
from etlproc import run_etl


class SinceOnlyApi:
    """An API that filters on `updated_since` only (many do): a record stamped in the future is served at once.

    `skew` sets its clock against this machine's, as its responses' Date header tells it."""

    def __init__(self, skew: timedelta = timedelta(0)) -> None:
        self.records: dict[int, dict[str, Any]] = {}
        self.skew = skew

    def now(self) -> datetime:
        return datetime.now(UTC) + self.skew

    def put(self, key: int, stamp: datetime, version: int) -> None:
        self.records[key] = {"id": key, "updated_at": stamp.isoformat(), "version": version}

    async def token(self, _request: web.Request) -> web.Response:
        return web.json_response({"access_token": "clock-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(self, request: web.Request) -> web.Response:
        since = datetime.fromisoformat(request.query["updated_since"].replace("Z", "+00:00"))
        listed = [record for record in self.records.values() if datetime.fromisoformat(record["updated_at"]) >= since]
        return web.json_response({"data": listed}, headers={"Date": format_datetime(self.now(), usegmt=True)})

    @asynccontextmanager
    async def config(self, directory: Path, database_url: str, start: datetime, lookback: str | None = "1h") -> AsyncIterator[Path]:
        async with serving({("POST", "/oauth2/token"): self.token, ("GET", "/api/v1/items"): self.items}) as base:
            document = demo_document({"url": database_url}, f"{base}/api/v1", f"{base}/oauth2/token")
            document["sync"] = {"lag": "0s"}
            document["resources"] = [{
                "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
                "cursor_field": "updated_at", "start": start.isoformat(), "lookback": lookback, "window": "1d", "pagination": {"style": "none"},
                "filter": {"from_param": "updated_since", "to_param": "updated_until"},
                "columns": {"id": "integer", "updated_at": "datetime", "version": "integer"},
            }]
            if lookback is None:
                del document["resources"][0]["lookback"]
            yield tomlwriter.write(directory / "config.toml", document)


async def test_a_future_stamp_the_api_corrects_is_replaced_by_the_correction(tmp_path: Path, database_url: str) -> None:
    """Bad data stamped a year ahead, loaded by a sync (the API ignores updated_until), then corrected by the API to
    a stamp of today: the correction is older by the cursor, so "latest wins" kept the bad version for good, through
    every later sync and even a backfill of the range, exit 0. A stored cursor later than its row's _etl_loaded_at
    was in the future when it was loaded: it no longer holds off the version the API serves now."""
    api = SinceOnlyApi()
    now = datetime.now(UTC)
    api.put(1, now - timedelta(hours=2), version=1)
    api.put(2, now + timedelta(days=365), version=1)
    async with api.config(tmp_path, database_url, now - timedelta(days=1)) as config:
        first = await run_etl("sync", "--config", str(config))
        api.put(2, datetime.now(UTC) - timedelta(seconds=1), version=2)
        second = await run_etl("sync", "--config", str(config))

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert [tuple(row) for row in await rows(database_url, "SELECT id, version FROM items ORDER BY id")] == [(1, 1), (2, 2)]


async def test_a_record_committed_late_is_read_by_the_next_sync_without_a_lookback_set(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A legacy job stamps a record when it starts and commits it 20 minutes later, after a sync had read past
    that stamp. With lookback unset the next sync started where the last one ended and never saw it (exit 0).
    lookback defaults to SPEC.md's 1h, as every other key defaults to the value its example shows."""
    url = await fresh_database("sqlite")
    api = SinceOnlyApi()
    now = datetime.now(UTC)
    api.put(1, now - timedelta(hours=2), version=1)
    async with api.config(tmp_path, url, now - timedelta(days=1), lookback=None) as config:
        first = await run_etl("sync", "--config", str(config))
        api.put(2, now - timedelta(minutes=20), version=1)  # stamped before the first sync's end, visible after it
        second = await run_etl("sync", "--config", str(config))

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert [tuple(row) for row in await rows(url, "SELECT id FROM items ORDER BY id")] == [(1,), (2,)]


async def test_a_lookback_longer_than_the_time_since_start_reads_nothing_before_start(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A resource started today with a lookback of two days: the first sync read from `start`, the second from
    two days back, and loaded yesterday's records that `start` had kept out (a third of its rows, exit 0)."""
    url = await fresh_database("sqlite")
    api = SinceOnlyApi()
    now = datetime.now(UTC)
    api.put(1, now - timedelta(days=1), version=1)
    api.put(2, now - timedelta(hours=1), version=1)
    async with api.config(tmp_path, url, now - timedelta(hours=3), lookback="2d") as config:
        first = await run_etl("sync", "--config", str(config))
        second = await run_etl("sync", "--config", str(config))

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert [tuple(row) for row in await rows(url, "SELECT id FROM items")] == [(2,)]


async def test_an_api_clock_behind_ours_does_not_lose_what_it_stamps_after_a_sync(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """The API's clock an hour behind this machine's (lag 0, lookback 5 minutes): a sync marked itself loaded up
    to our now, and a record written right after it, stamped by the API an hour earlier, lay before the next
    sync's start: lost, exit 0, not a word. The API's Date header shows its clock: "loaded up to" stays within it."""
    url = await fresh_database("sqlite")
    api = SinceOnlyApi(skew=-timedelta(hours=1))
    api.put(1, api.now() - timedelta(minutes=1), version=1)
    async with api.config(tmp_path, url, api.now() - timedelta(days=1), lookback="5m") as config:
        first = await run_etl("sync", "--config", str(config))
        api.put(2, api.now(), version=1)
        second = await run_etl("sync", "--config", str(config))

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert [tuple(row) for row in await rows(url, "SELECT id FROM items ORDER BY id")] == [(1,), (2,)]
    assert "clock" in first.stderr and "behind" in first.stderr


async def test_status_says_when_the_highest_cursor_is_in_the_future(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A record stamped a year ahead made `status` show a highest cursor of next year beside "loaded up to" today,
    with nothing saying that the cursor, not etl, was wrong."""
    url = await fresh_database("sqlite")
    api = SinceOnlyApi()
    now = datetime.now(UTC)
    api.put(1, now + timedelta(days=365), version=1)
    async with api.config(tmp_path, url, now - timedelta(days=1)) as config:
        synced = await run_etl("sync", "--config", str(config))
        status = await run_etl("status", "--config", str(config))

    assert synced.returncode == status.returncode == 0, synced.stderr + status.stderr
    assert "in the future" in status.stdout
