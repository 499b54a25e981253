"""config.toml edited after the tables exist, and etl's own tables across an upgrade: `sync` and `migrate` run
again as cron would, against an API of the test's own on loopback, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from alembic import command
from alembic.config import Config as AlembicConfig
from loopback import serving
from sqlalchemy import Connection

from etl.db import MIGRATIONS_DIR, create_engine

import tomlwriter
from dbquery import rows
from etlproc import Finished, run_etl

RECORDS = [{"id": n, "status": "new", "total": "1.50", "updated_at": f"2024-02-0{n}T00:00:00Z"} for n in (1, 2, 3)]


class Api:
    """Token endpoint and a /orders list without paging; counts the requests it answers."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.requests = 0
        self.origin = ""

    async def token(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response({"access_token": "schema-probe-token", "expires_in": 3600, "token_type": "Bearer"})

    async def orders(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response({"data": self.records})


@asynccontextmanager
async def api(records: list[dict[str, Any]] = RECORDS) -> AsyncIterator[Api]:
    served = Api(records)
    async with serving({("POST", "/token"): served.token, ("GET", "/api/orders"): served.orders}) as origin:
        served.origin = origin
        yield served


async def etl(tmp_path: Path, served: Api, database_url: str, columns: dict[str, Any], *args: str, **resource: Any) -> Finished:
    """`etl sync` (or `args`) with the orders resource declared with `columns` (and `resource`'s other keys)."""
    database = resource.pop("database", {})
    config = tomlwriter.write(tmp_path / "config.toml", {
        "api": {"base_url": f"{served.origin}/api", "max_retries": 0},
        "auth": {"token_url": f"{served.origin}/token", "client_id": "probe"},
        "database": {"url": database_url, **database},
        "resources": [{"name": "orders", "path": "/orders", "records_path": "data", "primary_key": ["id"],
                       "cursor_field": "updated_at", "pagination": {"style": "none"}, "columns": columns, **resource}],
    })
    return await run_etl("--config", str(config), *(args or ("sync",)))


BASE = {"id": "integer", "status": "string", "updated_at": "datetime"}


def _upgrade_to(connection: Connection, revision: str) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def test_auto_migrate_false_on_tables_of_an_older_etl_asks_for_migrate_before_any_request(
    tmp_path: Path, database_url: str
) -> None:
    """etl upgraded, its tables still at 0002, auto_migrate = false: the sync ran on them and failed every batch with
    "value too long for type character varying(64)" (a long cursor), exit 1 and no word of `migrate`."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade_to, "0002")
    finally:
        await engine.dispose()
    long_cursor = [{"id": 1, "status": "v" * 80}]
    async with api(long_cursor) as served:
        done = await etl(tmp_path, served, database_url, {"id": "integer", "status": "string"},
                         cursor_field="status", database={"auto_migrate": False})
    assert done.returncode == 1, done.stderr
    assert "revision 0002" in done.stderr and "python -m etl migrate" in done.stderr, done.stderr
    assert served.requests == 0
    assert await rows(database_url, "SELECT * FROM etl_runs") == []


async def test_a_column_renamed_only_in_case_is_exit_2_naming_it_and_the_tables_column(tmp_path: Path, database_url: str) -> None:
    """`total` declared as `Total` a month later: SQLite and MariaDB refused the ALTER with "duplicate column name",
    exit 1 naming no key; PostgreSQL added a second column beside the first, which kept its old values."""
    async with api() as served:
        assert (await etl(tmp_path, served, database_url, BASE | {"total": "decimal"})).returncode == 0
        done = await etl(tmp_path, served, database_url, BASE | {"Total": "decimal"})
    assert done.returncode == 2, done.stderr
    assert "resources.orders.columns.Total" in done.stderr and "'total'" in done.stderr, done.stderr
    assert 'source = "Total"' in done.stderr, done.stderr
    assert len((await rows(database_url, "SELECT * FROM orders"))[0]) == 6
