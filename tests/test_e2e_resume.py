"""kill -9 or a second run at a known point, against an API etl did not write (page-numbered, on loopback).

The API stalls after a set number of pages; the test waits until etl_windows shows that the pages before the
stall are committed, kills etl with SIGKILL, lets the API go on, and runs the same command again. The kill point
is thus deterministic: one window finished, one in the middle, the rest untouched.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import POSTGRES_URL, on_server
from loopback import serving
from sqlalchemy import make_url

from etl.demo import demo_document

import tomlwriter
from dbquery import rows, scalar
from etlproc import Finished, finish, run_etl, start_etl

DAY0 = datetime(2024, 3, 1, tzinfo=UTC)
DAYS = 4
PER_DAY = 30
PAGE_SIZE = 10


@dataclass
class StallingApi:
    """Page-numbered records with an updated_since/updated_until filter; stalls once `stall_after` pages are served."""

    stall_after: int
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    served: int = 0
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        for n in range(DAYS * PER_DAY):
            stamp = DAY0 + timedelta(days=n // PER_DAY, minutes=17 * (n % PER_DAY))
            self.records[n + 1] = {"id": n + 1, "updated_at": stamp.isoformat(), "version": 1}

    async def token(self, _request: web.Request) -> web.Response:
        return web.json_response({"access_token": "resume-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(self, request: web.Request) -> web.Response:
        self.served += 1
        if self.served > self.stall_after and not self.release.is_set():
            self.stalled.set()
            await self.release.wait()
        since = datetime.fromisoformat(request.query["updated_since"].replace("Z", "+00:00"))
        until = datetime.fromisoformat(request.query["updated_until"].replace("Z", "+00:00"))
        chosen = sorted(
            (r for r in self.records.values() if since <= datetime.fromisoformat(r["updated_at"]) < until),
            key=lambda r: (r["updated_at"], r["id"]),
        )
        page = int(request.query["page"])
        return web.json_response({"data": chosen[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]})

    @asynccontextmanager
    async def config(self, directory: Path, database_url: str) -> AsyncIterator[Path]:
        async with serving({("POST", "/oauth2/token"): self.token, ("GET", "/api/v1/items"): self.items}) as base:
            document = demo_document({"url": database_url}, f"{base}/api/v1", f"{base}/oauth2/token")
            document["api"] = {**document["api"], "concurrency": 1}
            document["resources"] = [{
                "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
                "cursor_field": "updated_at", "start": DAY0.isoformat(), "window": "1d",
                "pagination": {"style": "page", "page_param": "page", "size_param": "page_size", "page_size": PAGE_SIZE},
                "filter": {"from_param": "updated_since", "to_param": "updated_until"},
                "columns": {"id": "integer", "updated_at": "datetime", "version": "integer"},
            }]
            yield tomlwriter.write(directory / "config.toml", document)


async def _kill_once_committed(url: str, process: asyncio.subprocess.Process, api: StallingApi, records: int) -> None:
    """SIGKILL once the API has stalled and `records` records are committed: a kill point that does not depend on timing."""
    await asyncio.wait_for(api.stalled.wait(), 60)
    for _ in range(600):
        try:
            if (await scalar(url, "SELECT SUM(records) FROM etl_windows") or 0) >= records:
                break
        except Exception:  # noqa: BLE001 - the table may not exist yet
            pass
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"{records} records not committed in 30 s")
    process.send_signal(signal.SIGKILL)
    await finish(process)


async def _killed_then_rerun(tmp_path: Path, url: str, *command: str) -> tuple[StallingApi, Finished]:
    """The first window (3 pages) and 2 pages of the second committed, SIGKILL, then the same command again.

    Meanwhile a record of the stopped window changed: the re-run must store its latest version."""
    api = StallingApi(stall_after=PER_DAY // PAGE_SIZE + 1 + 2)  # a full last page is followed by an empty one
    async with api.config(tmp_path, url) as config:
        args = (*command, "--config", str(config))
        await _kill_once_committed(url, await start_etl(*args), api, PER_DAY + 2 * PAGE_SIZE)
        api.records[PER_DAY + 1]["version"] = 2
        api.release.set()
        again = await run_etl(*args)
    return api, again


async def _assert_all_loaded_once(url: str, api: StallingApi) -> None:
    stored = await rows(url, "SELECT id, version FROM items")
    assert sorted(stored) == sorted((key, record["version"]) for key, record in api.records.items())
    assert await rows(url, "SELECT status FROM etl_runs ORDER BY id") == [("abandoned",), ("succeeded",)]


@pytest.fixture(params=["sqlite", "postgresql"])
async def resume_url(request: pytest.FixtureRequest, fresh_database: Callable[[str], Any]) -> str:
    return await fresh_database(request.param)


async def test_a_backfill_killed_mid_window_is_resumed_and_says_what_it_takes_up(tmp_path: Path, resume_url: str) -> None:
    """The re-run of a kill -9'd backfill said only "run 2: backfill of items": not that run 1 had died, nor that
    the window it was in would be read again. At 3 a.m. that reads as a fresh run, and the killed one as lost work."""
    api, again = await _killed_then_rerun(
        tmp_path, resume_url, "backfill", "--from", "2024-03-01", "--to", "2024-03-05", "--resource", "items"
    )

    assert again.returncode == 0, again.stderr
    await _assert_all_loaded_once(resume_url, api)
    assert await rows(resume_url, "SELECT state, records FROM etl_windows ORDER BY window_start") == [("done", PER_DAY)] * DAYS
    assert "run 1 (backfill --from 2024-03-01T00:00:00Z --to 2024-03-05T00:00:00Z --resource items, pid " in again.stderr and "ended without recording its end (killed or crashed)" in again.stderr
    assert "items: 1 of 4 windows were finished by an earlier backfill" in again.stderr
    assert "reading this unfinished window again from its first page (an earlier run stopped after 20 records)" in again.stderr


async def test_a_sync_killed_mid_window_is_resumed_and_says_the_run_it_takes_over(tmp_path: Path, resume_url: str) -> None:
    """The same for a sync: the re-run named the windows it took up, but not the run that had died leaving them."""
    api, again = await _killed_then_rerun(tmp_path, resume_url, "sync")

    assert again.returncode == 0, again.stderr
    await _assert_all_loaded_once(resume_url, api)
    assert "run 1 (sync, pid " in again.stderr and "ended without recording its end (killed or crashed)" in again.stderr
    assert "running the same command again takes up its unfinished windows" in again.stderr
    assert "items: taking up the" in again.stderr
    assert "reading this unfinished window again from its first page (an earlier run stopped after 20 records)" in again.stderr
    top = await scalar(resume_url, "SELECT watermark FROM etl_watermarks WHERE resource = 'items'")
    assert datetime.fromisoformat(top) == max(datetime.fromisoformat(r["updated_at"]) for r in api.records.values())


async def test_a_second_run_is_refused_while_the_first_outlives_the_servers_idle_in_transaction_timeout(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """The connection that holds a run's PostgreSQL advisory lock sat idle in an open transaction for the whole run:
    a server with idle_in_transaction_session_timeout (a usual setting of managed PostgreSQL) closed it after that
    long, the lock went with it, and the next cron run started beside the first (exit 0 for both), calling the first
    one "killed or crashed" while it was still loading. The lock's connection now commits once it has the lock."""
    url = await fresh_database("postgresql")
    await on_server(POSTGRES_URL, f"ALTER DATABASE {make_url(url).database} SET idle_in_transaction_session_timeout = '500ms'")
    api = StallingApi(stall_after=PER_DAY // PAGE_SIZE + 1 + 2)
    async with api.config(tmp_path, url) as config:
        args = ("backfill", "--from", "2024-03-01", "--to", "2024-03-05", "--config", str(config))
        first = await start_etl(*args)
        await asyncio.wait_for(api.stalled.wait(), 60)
        await asyncio.sleep(1.5)  # three times the server's timeout
        started = await start_etl(*args)
        await asyncio.wait([asyncio.ensure_future(started.wait())], timeout=20)  # refused at once; else it too waits on the API
        api.release.set()
        second, finished = await finish(started), await finish(first)

    assert second.returncode == 4, second.stderr
    assert "another run holds the lock for resource 'items'" in second.stderr
    assert finished.returncode == 0, finished.stderr
    await _assert_all_loaded_once_by_one_run(url, api)


async def _assert_all_loaded_once_by_one_run(url: str, api: StallingApi) -> None:
    stored = await rows(url, "SELECT id, version FROM items")
    assert sorted(stored) == sorted((key, record["version"]) for key, record in api.records.items())
    assert await rows(url, "SELECT status FROM etl_runs ORDER BY id") == [("succeeded",)]
