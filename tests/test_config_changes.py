"""config.toml edited between nightly runs, one key at a time, after a sync has loaded: each change either loads
what the new config asks for, or says what it does not load and the command that does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from loopback import serving

import tomlwriter
from dbquery import rows
from etlproc import Finished, run_etl


def _instant(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class DatedApi:
    """Token endpoint and /orders filtered by `since` (inclusive) and `until` (exclusive), one page per window."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.origin = ""

    async def token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "config-change-token", "expires_in": 3600, "token_type": "Bearer"})

    async def orders(self, request: web.Request) -> web.Response:
        since, until = _instant(request.query["since"]), _instant(request.query["until"])
        return web.json_response({"data": [r for r in self.records if since <= _instant(r["updated_at"]) < until]})


@asynccontextmanager
async def dated_api(records: list[dict[str, Any]]) -> AsyncIterator[DatedApi]:
    served = DatedApi(records)
    async with serving({("POST", "/token"): served.token, ("GET", "/api/orders"): served.orders}) as origin:
        served.origin = origin
        yield served


async def etl(tmp_path: Path, served: DatedApi, database_url: str, *args: str, **resource: Any) -> Finished:
    """`etl` (sync unless `args`) with the orders resource as a nightly config has it, `resource` changing keys."""
    config = tomlwriter.write(tmp_path / "config.toml", {
        "api": {"base_url": f"{served.origin}/api", "max_retries": 0},
        "auth": {"token_url": f"{served.origin}/token", "client_id": "probe"},
        "database": {"url": database_url},
        "resources": [{
            "name": "orders", "path": "/orders", "records_path": "data", "primary_key": ["id"], "cursor_field": "updated_at",
            "start": "2024-01-01", "window": "30d", "filter": {"from_param": "since", "to_param": "until"},
            "pagination": {"style": "none"}, "columns": {"id": "integer", "updated_at": "datetime"}, **resource,
        }],
    })
    return await run_etl("--config", str(config), *(args or ("sync",)))


async def test_start_moved_earlier_says_what_sync_does_not_load_and_the_backfill_that_does(
    tmp_path: Path, sqlite_or_postgres_url: str
) -> None:
    """`start` moved a year back after the first sync: the next sync went on from its watermark, the year before the
    old start was never loaded and nothing said so, exit 0. Now each sync says it, with the backfill that loads it,
    until that backfill has run."""
    records = [{"id": n, "updated_at": f"{year}-03-10T00:00:00Z"} for n, year in ((1, 2023), (2, 2024))]
    earlier = {"start": "2023-01-01"}
    async with dated_api(records) as served:
        assert (await etl(tmp_path, served, sqlite_or_postgres_url)).returncode == 0
        moved = await etl(tmp_path, served, sqlite_or_postgres_url, **earlier)
        assert moved.returncode == 0, moved.stderr
        assert "resources.orders.start" in moved.stderr, moved.stderr
        backfill = "python -m etl backfill --from 2023-01-01 --to 2024-01-01 --resource orders"
        assert backfill in moved.stderr, moved.stderr
        assert (await etl(tmp_path, served, sqlite_or_postgres_url, *backfill.split()[3:], **earlier)).returncode == 0
        after = await etl(tmp_path, served, sqlite_or_postgres_url, **earlier)
        later = await etl(tmp_path, served, sqlite_or_postgres_url, start="2024-02-01")
    assert after.returncode == later.returncode == 0, after.stderr + later.stderr
    assert "resources.orders.start" not in after.stderr + later.stderr, after.stderr + later.stderr
    assert [row[0] for row in await rows(sqlite_or_postgres_url, "SELECT id FROM orders ORDER BY id")] == [1, 2]
