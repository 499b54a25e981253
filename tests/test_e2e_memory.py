"""Big answers from an API etl did not write: what etl holds in memory stays bounded whatever the page size.
etl runs as a subprocess, as cron would run it."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from loopback import serving

from etl.demo import demo_document

import tomlwriter
from dbquery import scalar, sqlite_rows
from etlproc import finish, run_etl, start_etl

DAY_1 = datetime(2024, 1, 1, tzinfo=UTC)


class LargePagesApi:
    """`per_day` records a day, served in pages of whatever `page_size` asks; the first page served waits until
    the test holds the database's write lock, so that etl fetches ahead of a database that takes nothing."""

    def __init__(self, per_day: int, hold: sqlite3.Connection) -> None:
        self.per_day = per_day
        self.hold = hold
        self.locked = asyncio.Lock()
        self.held = False
        self.served = 0
        self.last_request = time.monotonic()

    async def token(self, _request: web.Request) -> web.Response:
        return web.json_response({"access_token": "memory-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(self, request: web.Request) -> web.Response:
        async with self.locked:
            if not self.held:
                await asyncio.to_thread(self.hold.execute, "BEGIN IMMEDIATE")
                self.held = True
        day = (datetime.fromisoformat(request.query["since"].replace("Z", "+00:00")) - DAY_1).days
        page, size = int(request.query["page"]), int(request.query["page_size"])
        first = (page - 1) * size
        keys = range(day * self.per_day + first, day * self.per_day + min(first + size, self.per_day))
        stamp = (DAY_1 + timedelta(days=day, hours=1)).isoformat()
        self.served += len(keys)
        self.last_request = time.monotonic()
        return web.json_response({"data": [{"id": key, "updated_at": stamp} for key in keys]})

    def document(self, base: str, database_url: str) -> dict[str, Any]:
        document = demo_document({"url": database_url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["api"]["concurrency"] = 2
        document["resources"] = [{
            "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
            "cursor_field": "updated_at", "start": "2024-01-01", "window": "1d",
            "filter": {"from_param": "since", "to_param": "until", "format": "iso"},
            "pagination": {"style": "page", "page_param": "page", "size_param": "page_size", "page_size": 2000},
            "columns": {"id": "integer", "updated_at": "datetime"},
        }]
        return document


async def test_pages_fetched_ahead_of_a_slow_database_are_bounded_in_records_not_pages(tmp_path: Path) -> None:
    """Fetched pages wait for the loader in a queue that was bounded at 64 pages, whatever their size: with
    `page_size = 20000` that is 1.3 million records held in memory (a backfill's peak RSS grew from 170 MB to
    970 MB as its records went from 0.2 to 2 million, PostgreSQL). Here the database takes nothing while etl
    fetches pages of 2,000 records: it may read only a few batches ahead, not 64 pages."""
    url = f"sqlite:///{tmp_path / 'memory.db'}"
    (tmp_path / "memory.db").touch()
    hold = sqlite3.connect(tmp_path / "memory.db", isolation_level=None, check_same_thread=False, timeout=30)
    api = LargePagesApi(per_day=7000, hold=hold)
    async with serving({("POST", "/oauth2/token"): api.token, ("GET", "/api/v1/items"): api.items}) as base:
        config = tomlwriter.write(tmp_path / "config.toml", api.document(base, url))
        process = await start_etl("--config", str(config), "backfill", "--from", "2024-01-01", "--to", "2024-01-26")
        while not api.held or time.monotonic() - api.last_request < 2:  # until etl waits for the database
            await asyncio.sleep(0.2)
        ahead = api.served
        await asyncio.to_thread(hold.execute, "ROLLBACK")
        done = await finish(process)
    hold.close()
    assert done.returncode == 0, done.stderr
    assert sqlite_rows(url, "SELECT count(*) FROM items") == [(25 * 7000,)]
    assert ahead <= 60_000, f"etl read {ahead} records ahead of a database that took none"


@asynccontextmanager
async def long_cursor_api(tmp_path: Path, database_url: str, failing_step: int | None = None) -> AsyncIterator[Path]:
    """An API whose cursors are 70 KB long (steps 1 to 3, one record each), answering 500 at `failing_step`;
    yields the config.toml of a resource paged by it."""
    cursor_of = {step: f"{step}:" + "c" * 70_000 for step in range(1, 4)}

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "cursor-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        sent = request.query.get("cursor")
        step = int(sent.partition(":")[0]) if sent else 0
        if step == failing_step:
            return web.json_response({"message": "internal error"}, status=500)
        stamp = (DAY_1 + timedelta(hours=step)).isoformat()
        return web.json_response({"data": [{"id": step, "updated_at": stamp}], "next": cursor_of.get(step + 1)})

    app = web.Application(handler_args={"max_line_size": 100_000})  # aiohttp's own limit is 8 KB
    app.router.add_post("/oauth2/token", token)
    app.router.add_get("/api/v1/items", items)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        document = demo_document({"url": database_url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["api"]["max_retries"] = 0
        document["resources"] = [{
            "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
            "cursor_field": "updated_at", "start": "2024-01-01", "window": "1d",
            "filter": {"from_param": "since", "to_param": "until", "format": "iso"},
            "pagination": {"style": "cursor", "cursor_param": "cursor", "next_cursor_path": "next", "page_size": 1},
            "columns": {"id": "integer", "updated_at": "datetime"},
        }]
        yield tomlwriter.write(tmp_path / "config.toml", document)
    finally:
        await runner.cleanup()


async def test_a_window_paged_by_cursors_longer_than_64_kb_loads(tmp_path: Path, database_url: str) -> None:
    """A cursor that carries the query's whole state can be large (a search API's scroll id, a serialised key).
    Each committed page stored it in `etl_windows.position`, a TEXT column of 64 KB on MySQL and MariaDB: a cursor
    of 70 KB failed every run there with "Data too long for column 'position'". A window left unfinished is read
    again from its first page, so a saved cursor was never sent again: it is no longer saved."""
    async with long_cursor_api(tmp_path, database_url) as config:
        done = await run_etl("--config", str(config), "backfill", "--from", "2024-01-01", "--to", "2024-01-02")
    assert done.returncode == 0, done.stderr[-2000:]
    assert await scalar(database_url, "SELECT count(*) FROM items") == 4


async def test_a_failure_on_a_page_with_a_long_cursor_is_said_in_short_and_recorded(
    tmp_path: Path, database_url: str
) -> None:
    """A page that fails names its URL, and the URL held the whole 70 KB cursor: the ERROR line and the summary
    line were 70 KB each, and on MySQL the run could not record its end (`etl_runs.error` is TEXT, 64 KB): it
    stayed 'running', with "Data too long for column 'error'". A long query value is now shortened in messages."""
    async with long_cursor_api(tmp_path, database_url, failing_step=2) as config:
        done = await run_etl("--config", str(config), "backfill", "--from", "2024-01-01", "--to", "2024-01-02")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "500 from" in done.stderr and "cursor=2:ccccc" in done.stderr
    assert max(len(line) for line in (done.stdout + done.stderr).splitlines()) < 2000
    assert await scalar(database_url, "SELECT status FROM etl_runs") == "failed"
    assert await scalar(database_url, "SELECT count(*) FROM items") == 2
