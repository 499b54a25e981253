"""etl's own tables through Alembic, and resource tables that only ever grow, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

import etl.db
import etl.schema
from etl.config import ResourceConfig
from etl.db import HEAD_REVISION, MIGRATIONS_DIR, create_engine, current_revision, migrate
from etl.errors import ConfigError, LoadError
from etl.records import RecordValidator
from etl.schema import metadata, rejects, resource_table, runs
from etl.store import LoadBatch, Store

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)
EMOJI = '{"note": "Zoë 😀 \\"quoted\\""}'


@asynccontextmanager
async def _engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


def _alembic(connection: Connection, action: str, revision: str) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    getattr(command, action)(config, revision)


async def _alembic_to(engine: AsyncEngine, action: str, revision: str) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(_alembic, action, revision)


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))


def _run_row() -> dict[str, Any]:
    return {"command": "sync", "arguments": "{}", "resources": "orders", "status": "succeeded", "started_at": NOW,
            "host": "h", "pid": 1, "pages": 1, "records_fetched": 1, "records_loaded": 1, "records_rejected": 1,
            "requests": 1, "retries": 0, "token_requests": 1}


def _reject_row(run_id: int) -> dict[str, Any]:
    return {"run_id": run_id, "resource": "orders", "record_key": "7", "raw": EMOJI, "error": "total: bad 😀", "rejected_at": NOW}


async def test_migrate_from_empty_creates_etl_tables_and_twice_is_harmless(database_url: str) -> None:
    """`migrate` on an empty database reaches head with every etl_* table; a second run changes nothing."""
    async with _engine(database_url) as engine:
        assert await migrate(engine) == (None, HEAD_REVISION)
        assert await migrate(engine) == (HEAD_REVISION, HEAD_REVISION)
        tables = await _tables(engine)
    assert set(metadata.tables) | {"etl_alembic_version"} <= tables


def test_head_revision_is_the_newest_migration() -> None:
    """etl.db knows the head without Alembic, to start fast; a new migration must move it too."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD_REVISION


async def test_current_revision_reads_what_alembic_reads(database_url: str) -> None:
    """etl's own read of the version table, without Alembic, gives Alembic's answer at no revision, 0001 and head."""

    def alembics(connection: Connection) -> str | None:
        return MigrationContext.configure(connection, opts={"version_table": etl.db.VERSION_TABLE}).get_current_revision()

    async with _engine(database_url) as engine:
        for step in (None, "0001", "head"):
            if step is not None:
                await _alembic_to(engine, "upgrade", step)
            async with engine.connect() as connection:
                assert await current_revision(engine) == await connection.run_sync(alembics)
    assert await current_revision_of(database_url) == HEAD_REVISION


async def current_revision_of(url: str) -> str | None:
    async with _engine(url) as engine:
        return await current_revision(engine)


async def test_a_run_on_an_up_to_date_database_does_not_import_alembic(fresh_database: Callable[[str], Any]) -> None:
    """Alembic and its templates cost ~0.1 s of every start; they are loaded only when the schema must change."""
    url = await fresh_database("sqlite")
    async with _engine(url) as engine:
        await migrate(engine)
    script = (
        "import asyncio, sys\n"
        "from etl.db import create_engine, migrate\n"
        "async def main():\n"
        f"    engine = create_engine({url!r})\n"
        "    print(await migrate(engine))\n"
        "    await engine.dispose()\n"
        "asyncio.run(main())\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('alembic', 'mako')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.splitlines() == [f"('{HEAD_REVISION}', '{HEAD_REVISION}')", "[]"]


async def test_a_database_migrated_by_a_newer_etl_is_named_as_such(fresh_database: Callable[[str], Any]) -> None:
    """Revision 0099 (a newer etl's): migrate ended in Alembic's "Can't locate revision" traceback, and check passed."""
    async with _engine(await fresh_database("sqlite")) as engine:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(text(f"UPDATE {etl.db.VERSION_TABLE} SET version_num = '0099'"))
        with pytest.raises(LoadError, match="revision 0099, which this etl .* does not know: a newer etl migrated them"):
            await migrate(engine)


async def test_a_version_table_with_two_known_revisions_is_named_with_the_row_to_keep(fresh_database: Callable[[str], Any]) -> None:
    """Rows 0001 and 0003 (a hand-made repair, another tool's stamp): one of them is wrong and etl cannot tell which;
    it was a MultipleResultsFound traceback. migrate stops with both named and the statement that keeps one."""
    async with _engine(await fresh_database("sqlite")) as engine:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(text(f"INSERT INTO {etl.db.VERSION_TABLE} (version_num) VALUES ('0001')"))
        with pytest.raises(LoadError) as caught:
            await migrate(engine)
    assert "holds 2 revisions (0001, 0003)" in caught.value.message
    assert f"DELETE FROM {etl.db.VERSION_TABLE} WHERE version_num <> '0003'" in (caught.value.hint or "")


async def test_schema_definitions_match_what_the_migrations_create(database_url: str) -> None:
    """etl/schema.py's tables (what the code queries) have exactly the columns, keys and indexes the migrations made."""

    def describe(sync: Connection) -> dict[str, Any]:
        inspector = inspect(sync)
        return {
            name: (
                {column["name"]: column["nullable"] for column in inspector.get_columns(name)},
                inspector.get_pk_constraint(name)["constrained_columns"],
                sorted(str(index["name"]) for index in inspector.get_indexes(name)),
            )
            for name in metadata.tables
        }

    async with _engine(database_url) as engine:
        await migrate(engine)
        async with engine.connect() as connection:
            created = await connection.run_sync(describe)
    declared = {
        name: (
            {column.name: column.nullable for column in table.columns},
            [column.name for column in table.primary_key.columns],
            sorted(str(index.name) for index in table.indexes),
        )
        for name, table in metadata.tables.items()
    }
    assert created == declared


async def test_upgrade_from_the_previous_revision_keeps_every_row(database_url: str) -> None:
    """A database at revision 0001 with runs and rejects in it upgrades to head with its rows intact."""
    async with _engine(database_url) as engine:
        await _alembic_to(engine, "upgrade", "0001")
        async with engine.begin() as connection:
            await connection.execute(insert(runs).values(**_run_row()))
        assert await migrate(engine) == ("0001", HEAD_REVISION)
        async with engine.begin() as connection:
            run_id = (await connection.execute(select(runs.c.id))).scalar_one()
            await connection.execute(insert(rejects).values(**_reject_row(run_id)))
            stored = (await connection.execute(select(runs.c.command, runs.c.started_at))).one()
            raw = (await connection.execute(select(rejects.c.raw))).scalar_one()
    assert tuple(stored) == ("sync", NOW)
    assert raw == EMOJI


async def test_downgrade_to_base_then_upgrade_again(database_url: str) -> None:
    """Every revision's downgrade undoes its upgrade: base leaves no etl_* table, and head can be reached again."""
    async with _engine(database_url) as engine:
        await migrate(engine)
        await _alembic_to(engine, "downgrade", "base")
        assert await current_revision(engine) is None
        assert not set(metadata.tables) & await _tables(engine)
        await migrate(engine)
        assert set(metadata.tables) <= await _tables(engine)


async def test_etl_tables_take_emoji_on_a_mysql_database_created_latin1(fresh_database: Callable[[str], Any]) -> None:
    """On a MySQL database whose default charset is latin1, a reject with emoji is stored, not refused."""
    url = await fresh_database("mysql")
    async with _engine(url) as engine:
        async with engine.begin() as connection:
            await connection.execute(text("ALTER DATABASE CHARACTER SET latin1 COLLATE latin1_swedish_ci"))
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(insert(runs).values(**_run_row()))
            run_id = (await connection.execute(select(runs.c.id))).scalar_one()
            await connection.execute(insert(rejects).values(**_reject_row(run_id)))
            raw = (await connection.execute(select(rejects.c.raw))).scalar_one()
    assert raw == EMOJI


# -- resource tables evolve additively -------------------------------------------------------------------


def _orders(**columns: Any) -> ResourceConfig:
    return ResourceConfig.model_validate(
        {"name": "orders", "path": "/orders", "primary_key": columns.pop("primary_key", ["id"]),
         "columns": {"id": "integer", "line": "integer", "total": "decimal", **columns}}
    )


async def _prepare(engine: AsyncEngine, resource: ResourceConfig, records: list[dict[str, Any]] | None = None) -> None:
    store = Store(engine)
    await store.prepare([resource], auto_migrate=True)
    if records:
        rows = RecordValidator(resource).validate(records).rows
        await store.commit(LoadBatch(rows={"orders": rows}), await store.start_run("sync", {}, ["orders"]))


async def test_a_newly_declared_column_is_added_and_old_rows_keep_their_values(database_url: str) -> None:
    """New columns (a reserved word and a JSON one among them) are added; existing rows keep theirs, with NULL in the new."""
    async with _engine(database_url) as engine:
        await _prepare(engine, _orders(), [{"id": 1, "line": 1, "total": "1.10"}])
        grown = _orders(where="datetime", doc="json")
        await _prepare(engine, grown, [{"id": 2, "line": 1, "total": "2.20", "where": NOW.isoformat(), "doc": {"a": 1}}])
        table = resource_table(grown)
        async with engine.connect() as connection:
            rows = [tuple(row) for row in await connection.execute(
                select(table.c.id, table.c.total, table.c["where"], table.c.doc).order_by(table.c.id))]
    assert [(id_, str(total).rstrip("0"), where, doc) for id_, total, where, doc in rows] == [
        (1, "1.1", None, None), (2, "2.2", NOW, {"a": 1})
    ]


async def test_a_changed_type_stops_with_exit_2_naming_the_column_and_both_types(database_url: str) -> None:
    """`total` declared decimal, then string: a ConfigError (exit 2) that says so, and the table is untouched."""
    async with _engine(database_url) as engine:
        await _prepare(engine, _orders(), [{"id": 1, "line": 1, "total": "1.10"}])
        with pytest.raises(ConfigError) as caught:
            await _prepare(engine, ResourceConfig.model_validate(
                {"name": "orders", "path": "/orders", "primary_key": ["id"],
                 "columns": {"id": "integer", "line": "integer", "total": "string"}}))
    assert caught.value.exit_code == 2
    assert "column 'total' was 'decimal', is now 'string'" in caught.value.message


async def test_a_changed_primary_key_stops_with_exit_2(database_url: str) -> None:
    """A key of [id] that becomes [id, line] is refused with exit 2 naming both keys, never a silent rewrite."""
    async with _engine(database_url) as engine:
        await _prepare(engine, _orders())
        with pytest.raises(ConfigError) as caught:
            await _prepare(engine, _orders(primary_key=["id", "line"]))
    assert caught.value.exit_code == 2
    assert "primary_key was ['id'], is now ['id', 'line']" in caught.value.message


@pytest.mark.parametrize("made", ["(id integer, line integer, total decimal(38, 10))",
                                  "(id integer, line integer, total decimal(38, 10), PRIMARY KEY (id, line))"])
async def test_a_table_made_elsewhere_without_the_declared_key_stops_with_exit_2(database_url: str, made: str) -> None:
    """A table etl did not create, with no primary key or unique index on exactly primary_key: MySQL's upsert
    then inserted every record again on every run (246 rows for 123), and PostgreSQL and SQLite failed every
    batch, of every resource in it, with "no unique constraint matching the ON CONFLICT". Refused up front."""
    async with _engine(database_url) as engine:
        async with engine.begin() as connection:
            await connection.execute(text(f"CREATE TABLE orders {made}"))
        with pytest.raises(ConfigError) as caught:
            await _prepare(engine, _orders())
    assert caught.value.exit_code == 2
    assert "resources.orders.primary_key" in caught.value.message and "'orders'" in caught.value.message


async def test_the_index_hinted_for_a_keyless_table_quotes_its_names(fresh_database: Callable[[str], Any]) -> None:
    """`CREATE UNIQUE INDEX ... ON Group (Key)` was a syntax error, and PostgreSQL would have folded Group to group."""
    async with _engine(await fresh_database("postgresql")) as engine:
        async with engine.begin() as connection:
            await connection.execute(text('CREATE TABLE "Group" ("Key" integer, line integer, total decimal(38, 10))'))
        resource = ResourceConfig.model_validate({"name": "orders", "table": "Group", "path": "/orders", "primary_key": ["Key"],
                                                  "columns": {"Key": "integer", "line": "integer", "total": "decimal"}})
        with pytest.raises(ConfigError) as caught:
            await _prepare(engine, resource)
    assert 'ON "Group" ("Key")' in (caught.value.hint or ""), caught.value.hint


async def test_a_table_made_elsewhere_with_the_declared_key_is_loaded(database_url: str) -> None:
    """A key made as a unique index (a DBA's own table) is one etl's upsert can use: records are stored once."""
    async with _engine(database_url) as engine:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE orders (id integer NOT NULL, line integer, total decimal(38, 10))"))
            await connection.execute(text("CREATE UNIQUE INDEX orders_by_id ON orders (id)"))
        await _prepare(engine, _orders(), [{"id": 1, "line": 1, "total": "1.10"}])
        await _prepare(engine, _orders(), [{"id": 1, "line": 1, "total": "1.20"}])
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT COUNT(*) FROM orders"))).scalar_one() == 1

async def test_a_table_dropped_by_its_owner_is_created_again_from_the_new_declaration(fresh_database: Callable[[str], Any]) -> None:
    """After `DROP TABLE orders`, a changed type is no conflict: the table is new, and so is what is recorded of it."""
    async with _engine(await fresh_database("sqlite")) as engine:
        await _prepare(engine, _orders())
        async with engine.begin() as connection:
            await connection.execute(text("DROP TABLE orders"))
        await _prepare(engine, _orders(total="string"), [{"id": 1, "line": 1, "total": "n/a"}])
        await _prepare(engine, _orders(total="string"))
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT total FROM orders"))).scalar_one() == "n/a"


async def test_without_auto_migrate_an_empty_database_says_to_run_migrate(fresh_database: Callable[[str], Any]) -> None:
    """auto_migrate = false on a database without etl's tables stops with the command that fixes it."""
    async with _engine(await fresh_database("sqlite")) as engine:
        with pytest.raises(LoadError) as caught:
            await Store(engine).prepare([_orders()], auto_migrate=False)
    assert caught.value.hint == "run `python -m etl migrate`"


async def test_a_migration_cut_short_leaves_nothing_behind_and_the_next_one_completes(
    sqlite_or_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed mid-migration must not leave tables without their version row: every later run
    would fail on "table etl_runs already exists". (MySQL commits each DDL statement; it cannot be tested so.)"""
    real_upgrade = etl.db._upgrade

    def upgrade_then_die(connection: Connection) -> None:
        real_upgrade(connection)
        raise RuntimeError("killed before commit")

    async with _engine(sqlite_or_postgres_url) as engine:
        monkeypatch.setattr(etl.db, "_upgrade", upgrade_then_die)
        with pytest.raises(RuntimeError):
            await migrate(engine)
        assert not {name for name in await _tables(engine) if name.startswith("etl_")}
        monkeypatch.setattr(etl.db, "_upgrade", real_upgrade)
        assert await migrate(engine) == (None, HEAD_REVISION)


async def test_a_first_migration_that_left_some_tables_and_no_version_row_is_completed(database_url: str) -> None:
    """MySQL commits each CREATE TABLE: a first `migrate` killed half-way leaves tables and an empty version table.
    The next run must complete it, not fail on "table etl_runs already exists" for ever."""
    async with _engine(database_url) as engine:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(text("DELETE FROM etl_alembic_version"))
            await connection.execute(text("DROP INDEX ix_etl_rejects_resource_run" + (" ON etl_rejects" if "mysql" in database_url else "")))
            await connection.execute(text("DROP TABLE etl_resource_columns"))
        assert await migrate(engine) == (None, HEAD_REVISION)
        assert set(metadata.tables) <= await _tables(engine)
        async with engine.connect() as connection:
            indexes = await connection.run_sync(lambda sync: {index["name"] for index in inspect(sync).get_indexes("etl_rejects")})
    assert "ix_etl_rejects_resource_run" in indexes


async def test_adding_a_column_cut_short_leaves_the_table_as_it_was(fresh_database: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The ALTER TABLE and the record of what was declared commit together, or neither does."""
    async with _engine(await fresh_database("sqlite")) as engine:
        await _prepare(engine, _orders())
        monkeypatch.setattr(etl.schema, "_record_declaration", _die)
        with pytest.raises(RuntimeError):
            await Store(engine).prepare([_orders(note="string")], auto_migrate=True)
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda sync: {column["name"] for column in inspect(sync).get_columns("orders")})
    assert "note" not in columns


def _die(*_args: Any) -> None:
    raise RuntimeError("killed before commit")


async def test_a_sqlite_file_that_cannot_be_opened_leaves_no_aiosqlite_thread_behind(tmp_path: Path) -> None:
    """aiosqlite queued its thread's stop after a failed open without awaiting it: when the error ended the
    run, the loop closed first and the thread printed "Exception in thread …" to stderr. The error now
    reaches the caller only once that thread has ended."""
    engine = create_engine(f"sqlite:///{tmp_path / 'no-such-directory' / 'etl.db'}")
    try:
        with pytest.raises(LoadError, match="unable to open database file"):
            await current_revision(engine)
        alive = [thread.name for thread in threading.enumerate() if "_connection_worker_thread" in thread.name]
    finally:
        await engine.dispose()
    assert alive == []


async def test_runs_migrating_a_new_database_at_once_take_turns(database_url: str) -> None:
    """Cron starts `sync --resource a` and `sync --resource b` together on a new database (or the first night of
    a newer etl): their locks differ, so both migrated at once and one exited 1 (PostgreSQL: duplicate key in
    pg_type; MariaDB: 'Duplicate entry 0001', 'skipped since its definition is being modified by concurrent DDL')."""
    engines = [create_engine(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(engine) for engine in engines), return_exceptions=True)
        revision = await current_revision(engines[0])
    finally:
        for engine in engines:
            await engine.dispose()
    assert [result for result in results if isinstance(result, BaseException)] == []
    assert revision == HEAD_REVISION
    assert {result[1] for result in results} == {HEAD_REVISION}  # each saw it migrated, by itself or another


async def test_the_schema_lock_is_held_until_the_migration_is_committed(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MySQL's GET_LOCK is the session's: it was released before the commit, so another `migrate` (two processes,
    `sync --resource a` and `--resource b` from cron) read the revision not yet committed, ran its migration again
    and failed: "Online migration expected to match one row when updating '0002' to '0003'; 0 found", exit 1."""
    real_lock = etl.db.schema_lock

    @asynccontextmanager
    async def lock_then_linger(connection: Any) -> AsyncIterator[None]:
        async with real_lock(connection):
            yield
        await asyncio.sleep(0.5)  # what a busy machine does between the lock's release and the commit

    monkeypatch.setattr(etl.db, "schema_lock", lock_then_linger)
    engines = [create_engine(database_url) for _ in range(2)]
    try:
        first = asyncio.create_task(migrate(engines[0]))
        await asyncio.sleep(0.2)
        results = await asyncio.gather(first, migrate(engines[1]), return_exceptions=True)
    finally:
        for engine in engines:
            await engine.dispose()
    assert [result for result in results if isinstance(result, BaseException)] == []


async def test_an_etl_table_dropped_by_hand_is_created_again_by_migrate(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """`DROP TABLE etl_windows` at head: migrate said "already current" and did nothing, and every sync after it ended
    in an internal error ("no such table: etl_windows"). migrate makes it again, empty, as the migrations do, and says so."""
    async with _engine(database_url) as engine:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(insert(runs).values(**_run_row()))
            await connection.execute(text("DROP TABLE etl_windows"))
            await connection.execute(text("DROP TABLE etl_rejects"))
        assert await migrate(engine) == (HEAD_REVISION, HEAD_REVISION)
        async with engine.begin() as connection:
            run_id = (await connection.execute(select(runs.c.id))).scalar_one()
            await connection.execute(insert(rejects).values(**_reject_row(run_id)))  # utf8mb4 on MySQL, as 0002 makes it
            raw = (await connection.execute(select(rejects.c.raw))).scalar_one()
            indexes = await connection.run_sync(lambda sync: {index["name"] for index in inspect(sync).get_indexes("etl_windows")})
    assert raw == EMOJI
    assert "ix_etl_windows_lookup" in indexes
    assert "etl_rejects, etl_windows" in caplog.text and "created again, empty" in caplog.text


async def test_without_auto_migrate_an_etl_table_dropped_by_hand_says_to_run_migrate(fresh_database: Callable[[str], Any]) -> None:
    async with _engine(await fresh_database("sqlite")) as engine:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(text("DROP TABLE etl_windows"))
        with pytest.raises(LoadError) as caught:
            await Store(engine).prepare([_orders()], auto_migrate=False)
    assert "etl_windows" in caught.value.message
    assert "python -m etl migrate" in (caught.value.hint or "")
