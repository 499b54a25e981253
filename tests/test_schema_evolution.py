"""config.toml edited after the tables exist, and etl's own tables across an upgrade: `sync` and `migrate` run
again as cron would, against an API of the test's own on loopback, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from alembic import command
from alembic.config import Config as AlembicConfig
from loopback import serving
from sqlalchemy import Connection, MetaData, Table, inspect, select
from sqlalchemy.exc import DBAPIError

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


def _statements(stderr: str) -> list[str]:
    return re.findall(r"(ALTER TABLE [^;]+);", stderr)


async def _execute(database_url: str, statements: list[str]) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


async def _refused_then_loaded_once_the_hinted_sql_ran(
    changed: Callable[[], Awaitable[Finished]], database_url: str, named: tuple[str, ...]
) -> bool:
    """The changed config is exit 2 naming `named`. SQLite, which cannot alter a column's type or a key, is told to
    point `table` at a new table (False); elsewhere the hinted SQL is run, and the changed config then loads,
    twice: the second run finds the change recorded (True)."""
    refused = await changed()
    assert refused.returncode == 2, refused.stderr
    assert all(phrase in refused.stderr for phrase in named), refused.stderr
    if database_url.startswith("sqlite"):
        assert "`table`" in refused.stderr and not _statements(refused.stderr), refused.stderr
        return False
    await _execute(database_url, _statements(refused.stderr))
    for _ in range(2):
        done = await changed()
        assert done.returncode == 0, done.stderr
    return True


async def test_a_type_changed_in_the_config_is_exit_2_with_the_sql_and_loads_once_the_table_has_it(
    tmp_path: Path, database_url: str
) -> None:
    """integer -> bigint: the hint said "migrate the table yourself", and once a DBA had, etl still refused it (it
    compared with what it had recorded, not with the table), exit 2 for good. Now the hint is the statement,
    and a table that has the declared type is loaded; SQLite, which cannot change a column's type, is told to
    point `table` at a new one, unless it stores both types alike (integer and bigint)."""
    records = [{"id": 1, "status": "new", "big": 7, "updated_at": "2024-02-01T00:00:00Z"}]
    async with api(records) as served:
        assert (await etl(tmp_path, served, database_url, BASE | {"big": "integer"})).returncode == 0
        records.append({"id": 2, "status": "new", "big": 2**40, "updated_at": "2024-02-02T00:00:00Z"})
        changed = partial(etl, tmp_path, served, database_url, BASE | {"big": "bigint"})
        named = ("resources.orders.columns.big", "was 'integer', is now 'bigint'")
        if database_url.startswith("sqlite"):
            assert (await changed()).returncode == 0
        else:
            assert await _refused_then_loaded_once_the_hinted_sql_ran(changed, database_url, named)
    assert [tuple(row) for row in await rows(database_url, "SELECT id, big FROM orders ORDER BY id")] == [(1, 7), (2, 2**40)]


async def test_a_key_changed_in_the_config_is_exit_2_with_the_sql_and_loads_once_the_table_has_it(
    tmp_path: Path, database_url: str
) -> None:
    """primary_key [id] -> [id, status]: refused for good even after a DBA changed the table's key as told."""
    records = [{"id": 1, "status": "new", "updated_at": "2024-02-01T00:00:00Z"}]
    async with api(records) as served:
        assert (await etl(tmp_path, served, database_url, BASE)).returncode == 0
        records.append({"id": 1, "status": "old", "updated_at": "2024-02-02T00:00:00Z"})
        changed = partial(etl, tmp_path, served, database_url, BASE, primary_key=["id", "status"])
        named = ("resources.orders.primary_key", "is now ['id', 'status']")
        if not await _refused_then_loaded_once_the_hinted_sql_ran(changed, database_url, named):
            return
    assert [tuple(row) for row in await rows(database_url, "SELECT id, status FROM orders ORDER BY status")] == [
        (1, "new"), (1, "old")
    ]

async def test_sqlite_takes_string_widened_to_text_as_the_rejects_advise_and_refuses_it_narrowed_again(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A value over 255 characters is rejected with "declare the column text"; on SQLite that change was exit 2 with
    a new `table` (a whole reload) as the remedy, though SQLite stores string and text alike. text -> string stays
    refused: the table holds longer values than a string column takes."""
    database_url = await fresh_database("sqlite")
    records = [{"id": 1, "status": "new", "updated_at": "2024-02-01T00:00:00Z"}]
    async with api(records) as served:
        assert (await etl(tmp_path, served, database_url, BASE)).returncode == 0
        records.append({"id": 2, "status": "v" * 300, "updated_at": "2024-02-02T00:00:00Z"})
        assert (await etl(tmp_path, served, database_url, BASE)).returncode == 1
        widened = await etl(tmp_path, served, database_url, BASE | {"status": "text"})
        narrowed = await etl(tmp_path, served, database_url, BASE)
    assert widened.returncode == 0, widened.stderr
    assert await rows(database_url, "SELECT id, length(status) FROM orders ORDER BY id") == [(1, 3), (2, 300)]
    assert narrowed.returncode == 2 and "column 'status' was 'text', is now 'string'" in narrowed.stderr, narrowed.stderr


async def test_text_narrowed_to_string_on_postgresql_hints_sql_that_refuses_long_values_rather_than_cuts_them(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """text -> string: the hinted `USING status::VARCHAR(255)` is an explicit cast, which PostgreSQL truncates to 255
    characters without a word; the statement cut every longer value the table held. Without it, the ALTER refuses."""
    database_url = await fresh_database("postgresql")
    records = [{"id": 1, "status": "v" * 300, "updated_at": "2024-02-01T00:00:00Z"}]
    async with api(records) as served:
        assert (await etl(tmp_path, served, database_url, BASE | {"status": "text"})).returncode == 0
        refused = await etl(tmp_path, served, database_url, BASE)
    assert refused.returncode == 2 and "resources.orders.columns.status" in refused.stderr, refused.stderr
    with pytest.raises(DBAPIError, match="value too long"):
        await _execute(database_url, _statements(refused.stderr))
    assert await rows(database_url, "SELECT length(status) FROM orders") == [(300,)]


async def test_a_key_moved_to_another_column_hints_sql_that_runs_and_lets_the_old_key_be_null(
    tmp_path: Path, database_url: str
) -> None:
    """primary_key [id] -> [code], `id` no longer declared: the hinted statement left `id` NOT NULL (dropping a key
    does not drop that), so every record after it was refused by the database (PostgreSQL) or failed its batch
    (MariaDB's "Field 'id' doesn't have a default value"), though the table had been changed as told."""
    records = [{"id": 1, "code": "a", "status": "new", "updated_at": "2024-02-01T00:00:00Z"}]
    async with api(records) as served:
        assert (await etl(tmp_path, served, database_url, BASE | {"code": "string"})).returncode == 0
        records[:] = [{"code": "a", "status": "old", "updated_at": "2024-02-02T00:00:00Z"},
                      {"code": "b", "status": "new", "updated_at": "2024-02-02T00:00:00Z"}]
        keyed_by_code = {"code": "string", "status": "string", "updated_at": "datetime"}
        changed = partial(etl, tmp_path, served, database_url, keyed_by_code, primary_key=["code"])
        named = ("resources.orders.primary_key", "is now ['code']")
        if not await _refused_then_loaded_once_the_hinted_sql_ran(changed, database_url, named):
            return
    assert [tuple(row) for row in await rows(database_url, "SELECT code, status FROM orders ORDER BY code")] == [
        ("a", "old"), ("b", "new")
    ]


async def test_a_key_on_a_column_the_table_lacks_hints_a_new_table_not_sql_that_fails(tmp_path: Path, database_url: str) -> None:
    """primary_key [id] -> [id, code], `code` declared with it: the hint's ADD PRIMARY KEY (id, code) failed ("column
    code does not exist"), and once the column is added its rows hold NULL there, which no key takes."""
    async with api() as served:
        assert (await etl(tmp_path, served, database_url, BASE)).returncode == 0
        refused = await etl(tmp_path, served, database_url, BASE | {"code": "string"}, primary_key=["id", "code"])
    assert refused.returncode == 2, refused.stderr
    assert "resources.orders.primary_key" in refused.stderr and "no column ['code']" in refused.stderr, refused.stderr
    assert "`table`" in refused.stderr and not _statements(refused.stderr), refused.stderr



async def test_a_column_added_to_a_loaded_table_says_its_old_rows_are_null_until_a_backfill_restart(
    tmp_path: Path, sqlite_or_postgres_url: str
) -> None:
    """The ALTER went by without a word: the rows loaded before held NULL in the new column, and nothing said which
    run would fill them (a sync does not read them again; `backfill --restart` over their range does)."""
    dated = {"start": "2024-01-01", "filter": {"from_param": "since", "to_param": "until"}}
    async with api() as served:
        assert (await etl(tmp_path, served, sqlite_or_postgres_url, BASE, **dated)).returncode == 0
        grown = await etl(tmp_path, served, sqlite_or_postgres_url, BASE | {"total": "decimal"}, **dated)
        again = await etl(tmp_path, served, sqlite_or_postgres_url, BASE | {"total": "decimal"}, **dated)
    assert grown.returncode == 0, grown.stderr
    assert "column 'total' added to table 'orders'" in grown.stderr and "backfill --restart" in grown.stderr, grown.stderr
    assert "added" not in again.stderr


async def test_a_column_removed_from_the_config_is_said_once_with_what_becomes_of_it(
    tmp_path: Path, sqlite_or_postgres_url: str
) -> None:
    """A column taken out of `columns` stayed in the table without a word: its old values went stale and new rows
    held NULL there, and the user was left to find out. Said once, on the run that no longer declares it."""
    async with api() as served:
        assert (await etl(tmp_path, served, sqlite_or_postgres_url, BASE | {"total": "decimal"})).returncode == 0
        shrunk = await etl(tmp_path, served, sqlite_or_postgres_url, BASE)
        again = await etl(tmp_path, served, sqlite_or_postgres_url, BASE)
        declared_again = await etl(tmp_path, served, sqlite_or_postgres_url, BASE | {"total": "decimal"})
    assert shrunk.returncode == again.returncode == declared_again.returncode == 0, shrunk.stderr + declared_again.stderr
    assert "column 'total' of table 'orders' is no longer in resources.orders.columns" in shrunk.stderr, shrunk.stderr
    assert "DROP COLUMN" in shrunk.stderr
    assert "no longer in" not in again.stderr + declared_again.stderr
    assert [str(row[0]) for row in await rows(sqlite_or_postgres_url, "SELECT total FROM orders ORDER BY id")] == ["1.50"] * 3


async def test_names_sql_reserves_or_cases_load_upsert_and_grow_on_every_database(tmp_path: Path, database_url: str) -> None:
    """Table `order`, mixed-case and reserved columns, a composite string key whose parts differ only in case: the
    second sync updates in place, a reserved column added later is filled, and `status` reads it all."""
    records = [{"order": "A-1", "Key": key, "Status": "new", "updatedAt": "2024-02-01T00:00:00Z", "from": "web", "select": 1}
               for key in ("k", "K")]
    columns = {"order": "string", "Key": "string", "Status": "string", "updatedAt": "datetime", "from": "string"}
    shape = {"table": "order", "primary_key": ["order", "Key"], "cursor_field": "updatedAt"}
    async with api(records) as served:
        assert (await etl(tmp_path, served, database_url, columns, **shape)).returncode == 0
        for record in records:
            record |= {"Status": "shipped", "updatedAt": "2024-02-02T00:00:00Z"}
        again = await etl(tmp_path, served, database_url, columns, **shape)
        grown = await etl(tmp_path, served, database_url, columns | {"select": "integer"}, **shape)
        status = await etl(tmp_path, served, database_url, columns, "status", **shape)
    assert again.returncode == grown.returncode == status.returncode == 0, again.stderr + grown.stderr + status.stderr
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            table = await connection.run_sync(lambda sync: Table("order", MetaData(), autoload_with=sync))
            loaded = (await connection.execute(select(table.c.Key, table.c.Status, table.c["select"]))).all()
    finally:
        await engine.dispose()
    assert sorted(map(tuple, loaded)) == [("K", "shipped", 1), ("k", "shipped", 1)]


async def test_the_statement_that_drops_a_removed_column_runs_as_given_on_names_sql_reserves(
    tmp_path: Path, database_url: str
) -> None:
    """The warning's `ALTER TABLE Group DROP COLUMN from` was a syntax error on every database (and PostgreSQL would
    have folded Group to group): its names are quoted as the database quotes them, so it runs as written."""
    async with api([record | {"from": "web"} for record in RECORDS]) as served:
        assert (await etl(tmp_path, served, database_url, BASE | {"from": "string"}, table="Group")).returncode == 0
        shrunk = await etl(tmp_path, served, database_url, BASE, table="Group")
    assert shrunk.returncode == 0, shrunk.stderr
    statements = re.findall(r"(ALTER TABLE \S+ DROP COLUMN [^;]+);", shrunk.stderr)
    assert len(statements) == 1, shrunk.stderr
    await _execute(database_url, statements)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda sync: [column["name"] for column in inspect(sync).get_columns("Group")])
    finally:
        await engine.dispose()
    assert "from" not in columns and "status" in columns


CASED_KEYS = [{"id": key, "status": key, "updated_at": "2024-02-01T00:00:00Z"} for key in ("A1", "a1", "a1 ", "é1", "e1")]
STRING_KEYED = {"id": "string", "status": "string", "updated_at": "datetime"}


async def test_a_mariadb_table_whose_key_ignores_case_is_exit_2_and_loads_every_key_once_altered(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A DBA's table keyed on a VARCHAR of the database's default collation (utf8mb4_general_ci): 'A1', 'a1', 'a1 ',
    'é1' and 'e1' were one row to MariaDB, 5 loaded and 2 rows, exit 0. Now exit 2 with the ALTER TABLE that makes the
    key binary; once it ran, five keys are five rows."""
    database_url = await fresh_database("mysql")
    await _execute(database_url, ["CREATE TABLE orders (id VARCHAR(100) PRIMARY KEY, status VARCHAR(20), updated_at DATETIME(6))"])
    async with api(CASED_KEYS) as served:
        changed = partial(etl, tmp_path, served, database_url, STRING_KEYED)
        assert await _refused_then_loaded_once_the_hinted_sql_ran(changed, database_url, ("resources.orders.primary_key", "utf8mb4_general_ci"))
    assert sorted(row.id for row in await rows(database_url, "SELECT id FROM orders")) == ["A1", "a1", "a1 ", "e1", "é1"]


async def test_a_mariadb_key_that_pads_with_spaces_is_warned_about_with_the_alter_that_fixes_it(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A table of an older etl keyed under utf8mb4_bin (PAD SPACE): 'a1' and 'a1 ' were one row without a word.
    It is still loaded (etl does not rewrite a table), with a warning and the statement that fixes it."""
    database_url = await fresh_database("mysql")
    await _execute(database_url, [
        "CREATE TABLE orders (id VARCHAR(255) PRIMARY KEY, status VARCHAR(255), updated_at DATETIME(6)) "
        "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    ])
    async with api(CASED_KEYS) as served:
        warned = await etl(tmp_path, served, database_url, STRING_KEYED)
        assert warned.returncode == 0, warned.stderr
        assert "trailing spaces" in warned.stderr and "utf8mb4_bin" in warned.stderr, warned.stderr
        await _execute(database_url, _statements(warned.stderr))
        done = await etl(tmp_path, served, database_url, STRING_KEYED)
    assert done.returncode == 0 and "trailing spaces" not in done.stderr, done.stderr
    assert len(await rows(database_url, "SELECT id FROM orders")) == 5


async def test_a_value_too_long_for_a_dbas_column_is_a_reject_on_a_mariadb_server_without_strict_mode(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A server whose sql_mode lacks STRICT_* (the URL's sql_mode stands in for a server's global one here) cut
    'shipped' to 'shi' in a DBA's VARCHAR(3) with a warning no one saw: exit 0, the value altered for good.
    etl's sessions are strict now: the database refuses it, and it is a reject saying why."""
    database_url = await fresh_database("mysql") + "?sql_mode=NO_ENGINE_SUBSTITUTION"
    await _execute(database_url, [
        "CREATE TABLE orders (id INT PRIMARY KEY, status VARCHAR(3), updated_at DATETIME(6))",
    ])
    records = [{"id": 1, "status": "new", "updated_at": "2024-02-01T00:00:00Z"},
               {"id": 2, "status": "shipped", "updated_at": "2024-02-01T00:00:00Z"}]
    async with api(records) as served:
        done = await etl(tmp_path, served, database_url, BASE)
    assert done.returncode == 1 and "1 rejected" in done.stdout, done.stdout + done.stderr
    assert [tuple(row) for row in await rows(database_url, "SELECT id, status FROM orders")] == [(1, "new")]
    [(key, error)] = await rows(database_url, "SELECT record_key, error FROM etl_rejects")
    assert key == "2" and "too long" in error.lower(), error


@pytest.mark.parametrize(("setup", "named"), [
    (["CREATE EXTENSION IF NOT EXISTS citext", "CREATE TABLE orders (id citext PRIMARY KEY, status text, updated_at timestamptz)"],
     "citext"),
    (["CREATE COLLATION nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
      "CREATE TABLE orders (id varchar(100) COLLATE nocase PRIMARY KEY, status text, updated_at timestamptz)"],
     "nocase"),
])
async def test_a_postgresql_key_that_ignores_case_is_exit_2_and_loads_every_key_once_altered(
    tmp_path: Path, fresh_database: Callable[[str], Any], setup: list[str], named: str
) -> None:
    """A DBA's table keyed on citext, or on a nondeterministic collation: 'A1' and 'a1' in one batch failed every run
    with "ON CONFLICT DO UPDATE command cannot affect row a second time" (exit 1, for good), and in two runs were one
    row without a word. Now exit 2 with the ALTER TABLE that makes the key compare as the API does."""
    database_url = await fresh_database("postgresql")
    await _execute(database_url, setup)
    async with api(CASED_KEYS) as served:
        changed = partial(etl, tmp_path, served, database_url, STRING_KEYED)
        assert await _refused_then_loaded_once_the_hinted_sql_ran(changed, database_url, ("resources.orders.primary_key", named))
    assert sorted(row.id for row in await rows(database_url, "SELECT id FROM orders")) == ["A1", "a1", "a1 ", "e1", "é1"]


@pytest.mark.parametrize("setup", [
    ["CREATE TABLE orders (id TEXT COLLATE NOCASE PRIMARY KEY, status TEXT, updated_at TEXT)"],
    ["CREATE TABLE orders (id TEXT NOT NULL, status TEXT, updated_at TEXT)", "CREATE UNIQUE INDEX orders_id ON orders (id COLLATE RTRIM)"],
])
async def test_a_sqlite_key_under_nocase_or_rtrim_is_exit_2(
    tmp_path: Path, fresh_database: Callable[[str], Any], setup: list[str]
) -> None:
    """A table of one's own keyed under NOCASE (or a unique index under RTRIM): 'A1' and 'a1' (or 'a1 ') were one row,
    exit 0. SQLite cannot change a column's collation: exit 2, hinting at a new `table`."""
    database_url = await fresh_database("sqlite")
    await _execute(database_url, setup)
    async with api(CASED_KEYS) as served:
        refused = await etl(tmp_path, served, database_url, STRING_KEYED)
    assert refused.returncode == 2, refused.stderr
    assert "resources.orders.primary_key" in refused.stderr and "`table`" in refused.stderr, refused.stderr
    assert await rows(database_url, "SELECT id FROM orders") == []
