"""etl.store on SQLite, PostgreSQL and MariaDB: typed upserts, rejects, and the one transaction per batch."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Row, Text, cast, func, select, text

from etl import jsonnumbers
from etl.config import ResourceConfig
from etl.db import async_url, create_engine, refused_data
from etl.errors import ConfigError, LoadError, LockHeld
from etl.locks import ResourceLocks
from etl.mysqltls import mysql_tls
from etl.records import RecordValidator
from etl.schema import rejects, resource_table, runs, watermarks, windows
from etl.store import LoadBatch, Store, Watermark, WindowProgress
from etl.windows import Window

from refusals import cjk, nested

T0 = datetime(2024, 5, 1, tzinfo=UTC)
TYPES = {
    "id": "integer",
    "big": "bigint",
    "name": "string",
    "body": "text",
    "price": "decimal",
    "ratio": "float",
    "flag": "boolean",
    "day": "date",
    "at": "datetime",
    "doc": "json",
    "label": {"type": "string", "source": "meta.label"},
}
UNICODE = "Ünïcødé \"double\" 'single' `tick` \\ ; -- 😀🇨🇭"


def _resource(name: str, columns: dict[str, Any], primary_key: list[str] | None = None, cursor: str | None = None) -> ResourceConfig:
    return ResourceConfig.model_validate(
        {"name": name, "path": f"/{name}", "primary_key": primary_key or ["id"], "cursor_field": cursor, "columns": columns}
    )


ORDERS = _resource("orders", {"id": "integer", "total": "decimal", "updated_at": "datetime"}, cursor="updated_at")


@asynccontextmanager
async def _store(url: str, *resources: ResourceConfig) -> AsyncIterator[Store]:
    engine = create_engine(url)
    try:
        store = Store(engine)
        await store.prepare(resources, auto_migrate=True)
        yield store
    finally:
        await engine.dispose()


async def _run(store: Store) -> int:
    return await store.start_run("sync", {}, ["test"])


async def _load(store: Store, resource: ResourceConfig, records: list[Any], run_id: int) -> None:
    """Validate records as the pipeline does and commit them in one batch."""
    page = RecordValidator(resource).validate(records)
    await store.commit(LoadBatch(rows={resource.name: page.rows}, rejects=[(resource.name, r) for r in page.rejects]), run_id)


async def _rows(store: Store, resource: ResourceConfig) -> list[Row[Any]]:
    table = resource_table(resource)
    async with store.engine.connect() as connection:
        return list(await connection.execute(select(table).order_by(*table.primary_key.columns)))


def _order(id_: int, total: str, minutes: int) -> dict[str, Any]:
    return {"id": id_, "total": total, "updated_at": (T0 + timedelta(minutes=minutes)).isoformat()}


async def test_every_type_round_trips_exactly(database_url: str) -> None:
    """Decimals to the last digit, aware UTC datetimes, unicode with quotes and emoji, JSON and NULLs come back as sent."""
    resource = _resource("things", TYPES)
    full = {
        "id": 1, "big": 2**63 - 1, "name": UNICODE, "body": UNICODE * 100, "price": "123.40", "ratio": 0.1 + 0.2,
        "flag": "true", "day": "2024-02-29", "at": "2024-02-29T23:59:59.123456+02:00",
        "doc": {"a": [1, 2.5, "x😀"], "b": None, "c": {"d": True}}, "meta": {"label": "ok"},
    }
    edges = {"id": 2, "big": -(2**63), "price": "-1234567890123456789012345678.0123456789", "flag": 0, "at": 1700000000}
    async with _store(database_url, resource) as store:
        await _load(store, resource, [full, edges, {"id": 3}], await _run(store))
        first, second, empty = await _rows(store, resource)

    assert (first.big, first.name, first.body, first.ratio, first.flag) == (2**63 - 1, UNICODE, UNICODE * 100, 0.30000000000000004, True)
    assert isinstance(first.price, Decimal) and first.price == Decimal("123.40")
    assert first.day == date(2024, 2, 29)
    assert first.at == datetime(2024, 2, 29, 21, 59, 59, 123456, tzinfo=UTC)
    assert first.at.utcoffset() == timedelta(0)
    assert first.doc == {"a": [1, 2.5, "x😀"], "b": None, "c": {"d": True}}
    assert first.label == "ok"
    assert (second.big, second.flag) == (-(2**63), False)
    assert second.price == Decimal("-1234567890123456789012345678.0123456789")
    assert second.at == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert [empty.big, empty.name, empty.price, empty.flag, empty.day, empty.at, empty.doc] == [None] * 7
    assert first._etl_run_id == second._etl_run_id and first._etl_loaded_at.utcoffset() == timedelta(0)


async def test_sqlite_shows_decimals_and_datetimes_as_they_are(fresh_database: Callable[[str], Any]) -> None:
    """In `sqlite3 etl.db` a decimal is the text 123.40 (not a float) and a datetime is ISO-8601 UTC text."""
    async with _store(await fresh_database("sqlite"), ORDERS) as store:
        await _load(store, ORDERS, [{"id": 1, "total": "123.40", "updated_at": "2024-05-01T12:00:00+02:00"}], await _run(store))
        async with store.engine.connect() as connection:
            row = (await connection.execute(text("SELECT typeof(total), total, updated_at FROM orders"))).one()
    assert tuple(row) == ("text", "123.40", "2024-05-01 10:00:00+00:00")


async def test_composite_keys_keep_rows_apart_and_update_one(database_url: str) -> None:
    """(order, line) keys: each pair is its own row, keys differing only in case too, and an update touches one row."""
    resource = _resource("lines", {"code": "string", "line": "integer", "qty": "integer"}, primary_key=["code", "line"])
    async with _store(database_url, resource) as store:
        run = await _run(store)
        await _load(store, resource, [{"code": "a", "line": 1, "qty": 1}, {"code": "a", "line": 2, "qty": 2},
                                      {"code": "A", "line": 1, "qty": 3}], run)
        await _load(store, resource, [{"code": "a", "line": 2, "qty": 20}], run)
        rows = await _rows(store, resource)
    assert sorted((row.code, row.line, row.qty) for row in rows) == [("A", 1, 3), ("a", 1, 1), ("a", 2, 20)]


async def test_keys_differing_only_in_trailing_spaces_are_two_rows(database_url: str) -> None:
    """A legacy system's 'A1' and 'A1 ' are two records; MySQL's PAD SPACE collations would make them one, losing one."""
    resource = _resource("codes", {"code": "string", "qty": "integer"}, primary_key=["code"])
    async with _store(database_url, resource) as store:
        run = await _run(store)
        await _load(store, resource, [{"code": "A1", "qty": 1}, {"code": "A1 ", "qty": 2}], run)
        await _load(store, resource, [{"code": "A1  ", "qty": 3}], run)
        rows = await _rows(store, resource)
    assert sorted((row.code, row.qty) for row in rows) == [("A1", 1), ("A1 ", 2), ("A1  ", 3)]


async def test_the_first_and_last_dates_of_the_calendar_stay_dates(database_url: str) -> None:
    """asyncpg sends date.min and date.max as -infinity and infinity: PostgreSQL stored those, not the dates."""
    resource = _resource("days", {"id": "integer", "day": "date"})
    async with _store(database_url, resource) as store:
        run = await _run(store)
        await _load(store, resource, [{"id": 1, "day": "0001-01-01"}, {"id": 2, "day": "9999-12-31"}], run)
        async with store.engine.connect() as connection:
            shown = (await connection.execute(text("SELECT CAST(day AS CHAR(10)) FROM days ORDER BY id"))).scalars().all()
            rows = await _rows(store, resource)
    assert [row.day for row in rows] == [date(1, 1, 1), date(9999, 12, 31)]
    assert shown == ["0001-01-01", "9999-12-31"]


async def test_a_decimal_key_is_one_row_however_the_api_writes_the_number(database_url: str) -> None:
    """1.0 in one run and 1 in the next are one key: SQLite compared the decimal text and kept two rows."""
    resource = _resource("parts", {"k": "decimal", "qty": "integer"}, primary_key=["k"])
    async with _store(database_url, resource) as store:
        run = await _run(store)
        await _load(store, resource, [{"k": "1.0", "qty": 1}, {"k": "0.00", "qty": 1}, {"k": "1E+2", "qty": 1}], run)
        await _load(store, resource, [{"k": 1, "qty": 2}, {"k": "-0", "qty": 2}, {"k": "100.000", "qty": 2}], run)
        rows = await _rows(store, resource)
    assert sorted((Decimal(row.k), row.qty) for row in rows) == [(Decimal(0), 2), (Decimal(1), 2), (Decimal(100), 2)]


async def test_a_nul_or_a_lone_surrogate_in_a_rejected_key_does_not_fail_the_batch(database_url: str) -> None:
    """The reject's key went to etl_rejects with the NUL in it: PostgreSQL refused the insert, the whole
    batch failed, and so did every later run. Keys are stored with such characters escaped."""
    resource = _resource("codes", {"code": "string", "qty": "integer"}, primary_key=["code"])
    async with _store(database_url, resource) as store:
        run = await _run(store)
        await _load(store, resource, [{"code": "a\x00b", "qty": 1}, {"code": "c\ud800", "qty": 2}, {"code": "ok", "qty": 3}], run)
        async with store.engine.connect() as connection:
            stored = list(await connection.execute(select(rejects).order_by(rejects.c.id)))
        rows = await _rows(store, resource)
    assert [row.code for row in rows] == ["ok"]
    assert [row.record_key for row in stored] == ["a\\u0000b", "c\\ud800"]
    assert "U+0000" in stored[0].error and "lone UTF-16 surrogate" in stored[1].error
    assert orjson.loads(stored[0].raw) == {"code": "a\x00b", "qty": 1}
    assert json.loads(stored[1].raw) == {"code": "c\ud800", "qty": 2}


async def test_an_updated_record_replaces_the_stored_row(database_url: str) -> None:
    """The same key with a newer cursor replaces every column and the run that loaded it."""
    async with _store(database_url, ORDERS) as store:
        first_run, second_run = await _run(store), await _run(store)
        await _load(store, ORDERS, [_order(1, "10.00", 0), _order(2, "20.00", 0)], first_run)
        await _load(store, ORDERS, [_order(1, "11.50", 5)], second_run)
        rows = await _rows(store, ORDERS)
    assert [(row.id, row.total, row.updated_at, row._etl_run_id) for row in rows] == [
        (1, Decimal("11.50"), T0 + timedelta(minutes=5), second_run),
        (2, Decimal("20.00"), T0, first_run),
    ]


async def test_an_older_version_arriving_later_does_not_overwrite_a_newer_one(database_url: str) -> None:
    """A late page with an older cursor (a lookback re-read, a retried window) leaves the newer row alone."""
    async with _store(database_url, ORDERS) as store:
        run = await _run(store)
        await _load(store, ORDERS, [_order(1, "2.00", 10)], run)
        await _load(store, ORDERS, [_order(1, "1.00", 5)], run)
        (row,) = await _rows(store, ORDERS)
    assert (row.total, row.updated_at) == (Decimal("2.00"), T0 + timedelta(minutes=10))


async def test_a_decimal_cursor_is_compared_as_a_number(database_url: str) -> None:
    """Version 10.25 is newer than 9.5 on every database; SQLite keeps decimals as text, where '10.25' < '9.5'."""
    versioned = _resource("versioned", {"id": "integer", "note": "string", "version": "decimal"}, cursor="version")
    async with _store(database_url, versioned) as store:
        run = await _run(store)
        for note, version in (("first", "9.5"), ("second", "10.25"), ("late", "9.9")):
            await _load(store, versioned, [{"id": 1, "note": note, "version": version}], run)
        (row,) = await _rows(store, versioned)
    assert (row.note, row.version) == ("second", Decimal("10.25"))


async def test_duplicates_in_one_batch_collapse_to_the_newest(database_url: str) -> None:
    """A key three times in one batch is stored once, as its newest version even when that is not the last."""
    async with _store(database_url, ORDERS) as store:
        await _load(store, ORDERS, [_order(1, "1.00", 1), _order(1, "3.00", 3), _order(1, "2.00", 2), _order(2, "9.00", 0)],
                    await _run(store))
        rows = await _rows(store, ORDERS)
    assert [(row.id, row.total) for row in rows] == [(1, Decimal("3.00")), (2, Decimal("9.00"))]


async def test_duplicates_without_a_cursor_collapse_to_the_last(database_url: str) -> None:
    """Without a cursor column the last version of a key in the batch wins."""
    resource = _resource("plain", {"id": "integer", "name": "string"})
    async with _store(database_url, resource) as store:
        await _load(store, resource, [{"id": 1, "name": "first"}, {"id": 1, "name": "last"}], await _run(store))
        rows = await _rows(store, resource)
    assert [(row.id, row.name) for row in rows] == [(1, "last")]


async def test_sqlite_keeps_json_numbers_and_decimals_as_written(fresh_database: Callable[[str], Any]) -> None:
    """A json column is TEXT to SQLite (JSON's NUMERIC affinity stored a bare 12345678901234567890123 as the
    float 1.23456789012346e+22), and a decimal is positional text (str() gave -1E-10 and 1E+5)."""
    resource = _resource("notes", {"id": "integer", "amount": "decimal", "doc": "json"})
    body = (b'[{"id": 1, "amount": "-0.0000000001", "doc": 12345678901234567890123},'
            b' {"id": 2, "amount": "1E+5", "doc": 3.14159265358979323846}, {"id": 3, "amount": "2.50", "doc": 1.0}]')
    async with _store(await fresh_database("sqlite"), resource) as store:
        await _load(store, resource, jsonnumbers.loads(body), await _run(store))
        async with store.engine.connect() as connection:
            stored = (await connection.execute(text("SELECT typeof(doc), doc, amount FROM notes ORDER BY id"))).all()
    assert [tuple(row) for row in stored] == [
        ("text", "12345678901234567890123", "-0.0000000001"),
        ("text", "3.14159265358979323846", "100000"),
        ("text", "1.0", "2.50"),
    ]


async def test_long_json_numbers_are_stored_with_every_digit(database_url: str) -> None:
    """A money API sending 12345678901234.567 as a JSON number: the decimal column, the json column and a
    reject's raw record keep every digit (orjson alone rounded them to ...566 and 1.18e21, exit 0)."""
    resource = _resource("ledger", {"id": "integer", "amount": "decimal", "doc": "json", "day": "date"})
    body = (b'[{"id": 1, "amount": 12345678901234.567, "doc": {"n": 1180591620717411303424, "x": 1234567890.123456789}},'
            b' {"id": 2, "amount": 1.5, "day": "not a date", "doc": {"x": 98765432109876.54321}}]')
    async with _store(database_url, resource) as store:
        await _load(store, resource, jsonnumbers.loads(body), await _run(store))
        (row,) = await _rows(store, resource)
        async with store.engine.connect() as connection:
            (reject,) = list(await connection.execute(select(rejects)))
            doc_text = (await connection.execute(select(cast(resource_table(resource).c.doc, Text)))).scalar_one()
    assert row.amount == Decimal("12345678901234.567")
    assert "1180591620717411303424" in doc_text and "1234567890.123456789" in doc_text  # as stored, not as read back
    assert "98765432109876.54321" in reject.raw


async def test_rejects_are_stored_with_their_raw_payload_key_and_error(database_url: str) -> None:
    """A bad record is in etl_rejects byte for byte as received, with its resource, run, key and reason."""
    bad = {"id": 7, "total": "12,50", "updated_at": "2024-05-01", "note": UNICODE}
    async with _store(database_url, ORDERS) as store:
        run = await _run(store)
        await _load(store, ORDERS, [_order(1, "1.00", 0), bad, "not a record"], run)
        async with store.engine.connect() as connection:
            stored = list(await connection.execute(select(rejects).order_by(rejects.c.id)))
        loaded = await _rows(store, ORDERS)
    assert [row.id for row in loaded] == [1]
    assert [(row.resource, row.run_id, row.record_key) for row in stored] == [("orders", run, "7"), ("orders", run, None)]
    assert stored[0].raw == orjson.dumps(bad).decode()
    assert orjson.loads(stored[0].raw) == bad
    assert stored[0].error.startswith("total: ")
    assert stored[1].raw == '"not a record"'
    assert stored[0].rejected_at.utcoffset() == timedelta(0)


async def _window(store: Store, run: int) -> int:
    (record,) = await store.open_windows("sync", "orders", [Window(T0, T0 + timedelta(days=1))], run, reuse=False)
    return record.id


def _finishing_batch(window_id: int) -> LoadBatch:
    rows = RecordValidator(ORDERS).validate([_order(1, "1.00", 30), _order(2, "2.00", 60)]).rows
    return LoadBatch(
        rows={"orders": rows},
        windows={window_id: WindowProgress(position={"page": 3}, pages=2, records=2, max_cursor=T0 + timedelta(hours=1), done=True)},
        watermarks=[Watermark("orders", T0 + timedelta(hours=1), T0 + timedelta(days=1))],
    )


async def _bookkeeping(store: Store, window_id: int) -> tuple[int, Row[Any], Row[Any] | None]:
    async with store.engine.connect() as connection:
        count = (await connection.execute(select(func.count()).select_from(resource_table(ORDERS)))).scalar_one()
        window = (await connection.execute(select(windows).where(windows.c.id == window_id))).one()
        mark = (await connection.execute(select(watermarks).where(watermarks.c.resource == "orders"))).first()
    return count, window, mark


async def test_rows_window_progress_and_watermark_are_committed_together(database_url: str) -> None:
    """After a commit the rows, the finished window with its position and cursor, and the watermark are all there."""
    async with _store(database_url, ORDERS) as store:
        run = await _run(store)
        window_id = await _window(store, run)
        await store.commit(_finishing_batch(window_id), run)
        count, window, mark = await _bookkeeping(store, window_id)
        assert (await store.watermark("orders")) == Watermark("orders", T0 + timedelta(hours=1), T0 + timedelta(days=1))
    assert count == 2
    assert (window.state, window.pages, window.records, orjson.loads(window.position)) == ("done", 2, 2, {"page": 3})
    assert window.max_cursor == "2024-05-01T01:00:00Z"
    assert mark is not None and mark.run_id == run


async def test_a_string_cursor_longer_than_64_characters_is_kept_whole(database_url: str) -> None:
    """etl_watermarks.watermark and etl_windows.max_cursor were VARCHAR(64): PostgreSQL and MariaDB refused a
    longer string cursor in the bookkeeping of every batch, and every run failed though each record was valid."""
    stamp = "2024-01-01T00:00:00Z/" + "b" * 150
    async with _store(database_url, ORDERS) as store:
        run = await _run(store)
        window_id = await _window(store, run)
        await store.commit(LoadBatch(windows={window_id: WindowProgress(pages=1, max_cursor=stamp, done=True)},
                                     watermarks=[Watermark("orders", stamp, T0 + timedelta(days=1))]), run)
        _, window, mark = await _bookkeeping(store, window_id)
    assert window.max_cursor == stamp and mark is not None and mark.watermark == stamp


async def test_each_commit_adds_to_its_runs_counters(database_url: str) -> None:
    """A run killed after some commits must still show, in etl_runs, the pages and records it committed."""
    async with _store(database_url, ORDERS) as store:
        run = await _run(store)
        window_id = await _window(store, run)
        batch = _finishing_batch(window_id)
        batch.token_requests, batch.requests, batch.retries = 1, 5, 2
        await store.commit(batch, run)
        await _load(store, ORDERS, [_order(3, "1.00", 5), {"id": "not a number"}], run)
        async with store.engine.connect() as connection:
            counters = (await connection.execute(
                select(runs.c.pages, runs.c.records_fetched, runs.c.records_loaded, runs.c.records_rejected, runs.c.token_requests,
                       runs.c.requests, runs.c.retries)
                .where(runs.c.id == run)
            )).one()
    # a batch that does not say keeps the request counts; a killed run showed "pages 73, requests 0"
    assert tuple(counters) == (2, 2, 3, 1, 1, 5, 2)


async def test_a_failure_between_rows_and_watermark_moves_neither(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after the upsert ran but before the watermark was written rolls back the rows and the window too."""
    async with _store(database_url, ORDERS) as store:
        run = await _run(store)
        window_id = await _window(store, run)
        upserted: list[int] = []
        original_write = Store._write_rows

        async def write_then_count(self: Store, connection: Any, *args: Any) -> None:
            await original_write(self, connection, *args)
            upserted.append((await connection.execute(select(func.count()).select_from(resource_table(ORDERS)))).scalar_one())

        async def fail(*_args: Any) -> None:
            raise LoadError("injected failure before the watermark")

        monkeypatch.setattr(Store, "_write_rows", write_then_count)
        monkeypatch.setattr(Store, "_save_watermark", fail)
        with pytest.raises(LoadError, match="injected"):
            await store.commit(_finishing_batch(window_id), run)
        count, window, mark = await _bookkeeping(store, window_id)
    assert upserted == [2]
    assert count == 0
    assert (window.state, window.pages, window.records, window.max_cursor) == ("pending", 0, 0, None)
    assert mark is None


async def test_reserved_words_are_quoted_as_table_and_column_names(database_url: str) -> None:
    """A resource named `select` with columns `order`, `group`, `from` and a cursor `where` loads and upserts."""
    resource = _resource("select", {"order": "integer", "group": "string", "from": "decimal", "where": "datetime"},
                         primary_key=["order", "group"], cursor="where")
    records = [{"order": 1, "group": "g", "from": "1.5", "where": T0.isoformat()},
               {"order": 1, "group": "g", "from": "2.5", "where": (T0 + timedelta(1)).isoformat()}]
    async with _store(database_url, resource) as store:
        await _load(store, resource, records, await _run(store))
        await _load(store, resource, records[:1], await _run(store))
        rows = await _rows(store, resource)
    assert [(row.order, row.group, row._mapping["from"]) for row in rows] == [(1, "g", Decimal("2.5"))]


@pytest.mark.parametrize(
    ("url", "driver"),
    [("sqlite:///etl.db", "sqlite+aiosqlite"), ("postgresql://u@h/db", "postgresql+asyncpg"),
     ("mysql://u@h/db", "mysql+aiomysql"), ("mariadb://u@h/db", "mysql+aiomysql")],
)
def test_plain_urls_get_the_async_driver(url: str, driver: str) -> None:
    """sqlite://, postgresql:// and mysql:// without a driver name get aiosqlite, asyncpg and aiomysql."""
    assert async_url(url).drivername == driver


def test_libpq_sslmode_is_asyncpgs_ssl_and_an_unknown_parameter_is_named() -> None:
    """`?sslmode=require` (libpq's spelling, in most PostgreSQL URLs) was a TypeError traceback from asyncpg.connect."""
    assert async_url("postgresql://u@h/db?sslmode=require").query == {"ssl": "require"}
    assert async_url("postgresql://u@h/db?ssl=disable&command_timeout=5").query == {"ssl": "disable", "command_timeout": "5"}
    with pytest.raises(ConfigError, match="database.url: the PostgreSQL driver \\(asyncpg\\) does not take the parameter 'application'"):
        async_url("postgresql://u@h/db?application=etl")



def test_mysql_parameters_are_those_aiomysql_takes_and_the_charset_is_utf8mb4() -> None:
    """`autocommit=false` reached aiomysql as the string "false", which is true: every statement committed alone."""
    assert async_url("mysql://u@h/db?connect_timeout=5").query == {"connect_timeout": "5", "charset": "utf8mb4"}
    with pytest.raises(ConfigError, match="parameter 'autocommit' is not one"):
        async_url("mysql://u@h/db?autocommit=false")
    with pytest.raises(ConfigError, match="charset=utf8mb3 cannot carry"):
        async_url("mariadb://u@h/db?charset=utf8mb3")


@pytest.mark.parametrize(("query", "verify", "hostname", "required_by"), [
    ("ssl_mode=REQUIRED", ssl.CERT_NONE, False, "ssl_mode=REQUIRED"),
    ("ssl_mode=verify_ca", ssl.CERT_REQUIRED, False, "ssl_mode=verify_ca"),
    ("ssl_mode=VERIFY_IDENTITY", ssl.CERT_REQUIRED, True, "ssl_mode=VERIFY_IDENTITY"),
    ("ssl_mode=PREFERRED", ssl.CERT_NONE, False, None),
    ("ssl_ca=/etc/ssl/certs/ca-certificates.crt", ssl.CERT_REQUIRED, True, "ssl_ca"),
    ("ssl_ca=/etc/ssl/certs/ca-certificates.crt&ssl_check_hostname=false", ssl.CERT_REQUIRED, False, "ssl_ca"),
])
def test_mysql_tls_parameters_become_an_ssl_context(query: str, verify: ssl.VerifyMode, hostname: bool, required_by: str | None) -> None:
    """aiomysql takes an SSLContext: SQLAlchemy's dict of the ssl_* parameters reached it as it was."""
    if "ssl_ca=" in query and not Path("/etc/ssl/certs/ca-certificates.crt").is_file():
        pytest.skip("no system CA bundle")
    tls = mysql_tls(async_url(f"mysql://u@h/db?{query}"), "database.url")
    assert tls.context is not None and tls.context.verify_mode == verify and tls.context.check_hostname == hostname
    assert tls.required_by == required_by and tls.url.query == {"charset": "utf8mb4"}
    assert mysql_tls(async_url("mysql://u@h/db?ssl_mode=DISABLED&ssl_ca=/x"), "database.url").context is None


@pytest.mark.parametrize("field", ["name", "table", "column"])
def test_names_that_are_not_identifiers_are_refused_before_any_sql(field: str) -> None:
    """`x"; DROP TABLE y; --` as a resource, table or column name is a configuration error."""
    evil = 'x"; DROP TABLE y; --'
    document: dict[str, Any] = {"name": "orders", "path": "/o", "primary_key": ["id"], "columns": {"id": "integer"}}
    if field == "column":
        document["columns"] = {"id": "integer", evil: "string"}
    else:
        document[field] = evil
    with pytest.raises(ValueError, match="'\"' is not allowed"):
        ResourceConfig.model_validate(document)


async def test_a_text_or_json_primary_key_is_a_configuration_error(fresh_database: Callable[[str], Any]) -> None:
    """Text and JSON cannot be keys on every database: refused up front (exit 2), naming the column."""
    resource = _resource("docs", {"id": "text", "body": "json"})
    with pytest.raises(ConfigError, match="'id'") as caught:
        async with _store(await fresh_database("sqlite"), resource):
            pass
    assert caught.value.exit_code == 2


async def test_a_key_too_long_for_mariadb_is_a_configuration_error(fresh_database: Callable[[str], Any]) -> None:
    """Four string key columns are 4,080 bytes of index in utf8mb4, past MariaDB's 3,072: exit 2 naming the key, not error 1071."""
    resource = _resource("wide", {name: "string" for name in "abcd"}, primary_key=list("abcd"))
    with pytest.raises(ConfigError, match=r"resources\.wide\.primary_key: \['a', 'b', 'c', 'd'\] is too long a key") as caught:
        async with _store(await fresh_database("mysql"), resource):
            pass
    assert caught.value.exit_code == 2 and "3,072 bytes" in str(caught.value.hint)


async def test_a_database_refusal_is_a_load_error(fresh_database: Callable[[str], Any]) -> None:
    """A write the database refuses comes out as etl's LoadError naming the database, not a driver traceback."""
    url = await fresh_database("sqlite")
    async with _store(url, ORDERS) as store:
        run = await _run(store)
        async with store.engine.begin() as connection:
            await connection.execute(text("DROP TABLE orders"))
        with pytest.raises(LoadError, match="no such table: orders"):
            await _load(store, ORDERS, [_order(1, "1.00", 0)], run)



def test_a_missing_table_is_not_reported_as_an_unreachable_server() -> None:
    """SQLite's "no such table" is a refused statement, not a hint to check the URL and credentials."""
    from sqlalchemy.exc import OperationalError

    from etl.db import database_error

    error = database_error(OperationalError("SELECT", {}, Exception("no such table: etl_runs")), "sqlite:///x.db")
    assert "refused a statement" in str(error) and "credentials" not in str(error)
    unreachable = database_error(OperationalError("connect", {}, Exception("unable to open database file")), "sqlite:///x.db")
    assert "cannot use the database" in str(unreachable) and "the file's directory must exist" in str(unreachable)
    readonly = database_error(OperationalError("INSERT", {}, Exception("attempt to write a readonly database")), "sqlite:///x.db")
    assert "cannot write to the database" in str(readonly) and "write permission on the SQLite file and on its directory" in str(readonly.hint)


async def test_a_sqlite_file_reached_through_a_symlink_has_the_same_lock(tmp_path: Path) -> None:
    """sqlite:///link.db and sqlite:///lock.db are one database: a second run through the link exits 4, as any other."""
    (tmp_path / "lock.db").touch()
    (tmp_path / "link.db").symlink_to(tmp_path / "lock.db")
    engines = [create_engine(f"sqlite:///{tmp_path / name}") for name in ("lock.db", "link.db")]
    try:
        async with ResourceLocks(engines[0], ["orders"]):
            with pytest.raises(LockHeld, match="another run holds the lock for resource 'orders'"):
                async with ResourceLocks(engines[1], ["orders"]):
                    pass
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_sqlite_uri_filename_is_locked_and_loaded_like_its_path(tmp_path: Path) -> None:
    """sqlite:///file:/dir/x.db?uri=true (SQLAlchemy's URI filenames): the lock went to ./file:/dir/x.db.locks, which did not exist."""
    path = tmp_path / "uri.db"
    engines = [create_engine(f"sqlite:///file:{path}?uri=true"), create_engine(f"sqlite:///{path}")]
    try:
        async with ResourceLocks(engines[0], ["orders"]):
            with pytest.raises(LockHeld):
                async with ResourceLocks(engines[1], ["orders"]):
                    pass
        async with _store(f"sqlite:///file:{path}?uri=true", ORDERS) as store:
            await _load(store, ORDERS, [_order(1, "1.00", 0)], await _run(store))
    finally:
        for engine in engines:
            await engine.dispose()
    assert (tmp_path / "uri.db.locks").is_dir() and not Path("file:").exists()


def test_mysql_lock_names_differ_per_database_and_fit_in_64_characters() -> None:
    """GET_LOCK is server-wide: the same resource in two databases must not block each other."""
    from etl.db import mysql_lock_name

    assert mysql_lock_name("a", "orders") != mysql_lock_name("b", "orders")
    assert len(mysql_lock_name("x" * 64, "y" * 63)) <= 64


@pytest.mark.parametrize("words", ["(2013, 'Lost connection to MySQL server during query')", "(1153, \"Got a packet bigger than 'max_allowed_packet' bytes\")"])
def test_a_statement_too_large_for_mysql_names_max_allowed_packet(words: str) -> None:
    """A 17 MB record made every run fail with a hint to check the URL, the server and the credentials."""
    from sqlalchemy.exc import OperationalError

    from etl.db import database_error

    error = database_error(OperationalError("INSERT", {}, Exception(words)), "mysql://root@127.0.0.1/test")
    assert "max_allowed_packet" in (error.hint or "") and "credentials" not in str(error) + (error.hint or "")



# -- rows the database refuses -----------------------------------------------------------------------

DOCS = _resource("docs", {"id": "integer", "doc": "json"})
CJK_KEYS = _resource("names", {name: "string" for name in ("a", "b", "c", "d")}, primary_key=["a", "b", "c", "d"])


def _page_batch(window_id: int, resource: ResourceConfig, records: list[Any]) -> LoadBatch:
    """One page of `records` validated as the pipeline does, finishing its window."""
    page = RecordValidator(resource).validate(records)
    batch = LoadBatch(rejects=[(resource.name, reject) for reject in page.rejects])
    batch.add_rows(resource.name, window_id, page.rows)
    batch.windows[window_id] = WindowProgress(pages=1, records=len(page.rows), rejects=len(page.rejects), done=True)
    return batch


async def _refused_case(store: Store, resource: ResourceConfig, records: list[Any]) -> tuple[int, list[Any], Row[Any], Row[Any]]:
    """Commit the records as one page of a window; returns how many the database refused, the rejects, the window and the run."""
    run = await _run(store)
    (window,) = await store.open_windows("sync", resource.name, [Window(T0, T0 + timedelta(days=1))], run, reuse=False)
    refused = await store.commit(_page_batch(window.id, resource, records), run)
    async with store.engine.connect() as connection:
        stored = list(await connection.execute(select(rejects).order_by(rejects.c.id)))
        progress = (await connection.execute(select(windows).where(windows.c.id == window.id))).one()
        counters = (await connection.execute(select(runs).where(runs.c.id == run))).one()
    return len(refused), stored, progress, counters


async def test_a_json_value_mariadb_refuses_is_a_reject_and_the_rest_of_the_batch_loads(database_url: str) -> None:
    """A json value 40 levels deep failed MariaDB's CONSTRAINT check (4025) and with it every batch for ever, exit 1.

    Now it alone is a reject with MariaDB's reason; SQLite and PostgreSQL store it.
    """
    records = [{"id": n, "doc": {"n": n}} for n in range(1, 21)] + [{"id": 21, "doc": nested(40)}, {"id": "x"}]
    async with _store(database_url, DOCS) as store:
        refused, stored, window, run = await _refused_case(store, DOCS, records)
        loaded = await _rows(store, DOCS)
    by_mariadb = database_url.startswith("mysql")
    assert refused == (1 if by_mariadb else 0)
    assert len(loaded) == (20 if by_mariadb else 21)
    assert (window.state, window.records, window.rejects) == ("done", len(loaded), 22 - len(loaded))
    assert (run.records_fetched, run.records_loaded, run.records_rejected) == (22, len(loaded), 22 - len(loaded))
    if by_mariadb:
        refusal = stored[-1]
        assert (refusal.resource, refusal.record_key, refusal.run_id) == ("docs", "21", run.id)
        assert refusal.error.startswith("the database refused this record: (4025, 'CONSTRAINT `docs.doc` failed")
        assert orjson.loads(refusal.raw) == {"id": 21, "doc": nested(40)}


async def test_a_composite_key_too_large_for_a_postgresql_index_is_a_reject(fresh_database: Callable[[str], Any]) -> None:
    """Four 255-character CJK key columns make a 3096-byte index row, over btree's 2704 (SQLSTATE 54000):
    the record is a reject naming that, the other records of the batch load."""
    records = [{"a": f"a{n}", "b": "b", "c": "c", "d": "d"} for n in range(7)] + [{k: cjk(i) for i, k in enumerate("abcd")}]
    async with _store(await fresh_database("postgresql"), CJK_KEYS) as store:
        refused, stored, window, run = await _refused_case(store, CJK_KEYS, records)
        loaded = await _rows(store, CJK_KEYS)
    assert refused == 1 and len(loaded) == 7
    (refusal,) = stored
    assert refusal.record_key == "|".join(cjk(i) for i in range(4))[:255]
    assert refusal.error.startswith("the database refused this record: index row size 3096 exceeds btree version 4 maximum 2704")
    assert "\n" not in refusal.error
    assert (window.records, window.rejects, run.records_loaded, run.records_rejected) == (7, 1, 7, 1)


async def _forbid(store: Store, table: str, column: str, value: str) -> None:
    """A rule of the database's own that refuses one value: a CHECK constraint, a trigger on SQLite."""
    async with store.engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            await connection.exec_driver_sql(
                f"CREATE TRIGGER no_{table} BEFORE INSERT ON {table} WHEN NEW.{column} = '{value}' "
                f"BEGIN SELECT RAISE(ABORT, 'the value {value} is forbidden'); END"
            )
        else:
            await connection.exec_driver_sql(f"ALTER TABLE {table} ADD CONSTRAINT no_{table} CHECK ({column} <> '{value}')")


async def test_every_refused_row_is_found_across_resources_and_the_rest_commits(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Three refused rows among 200 of one resource and one among another's, with a key twice in the batch:
    each refused row is a reject, every other row, the window progress and the watermark are committed."""
    plain = _resource("plain", {"id": "integer", "name": "string"})
    async with _store(database_url, ORDERS, plain) as store:
        await _forbid(store, "orders", "total", "6.66")
        await _forbid(store, "plain", "name", "bad")
        run = await _run(store)
        window_id = await _window(store, run)
        orders = [_order(n, "6.66" if n in (3, 150, 151) else "1.00", n) for n in range(1, 201)] + [_order(1, "1.50", 500)]
        batch = _page_batch(window_id, ORDERS, orders)
        batch.add_rows("plain", window_id, [{"id": 1, "name": "good"}, {"id": 2, "name": "bad"}])
        batch.windows[window_id].records += 2
        batch.watermarks = [Watermark("orders", T0 + timedelta(minutes=500), T0 + timedelta(days=1))]
        refused = await store.commit(batch, run)
        loaded = await _rows(store, ORDERS)
        async with store.engine.connect() as connection:
            plain_names = [row.name for row in await connection.execute(select(resource_table(plain).c.name))]
        count, window, mark = await _bookkeeping(store, window_id)
    assert sorted((name, reject.key) for name, reject in refused) == [("orders", "150"), ("orders", "151"), ("orders", "3"), ("plain", "2")]
    assert len(loaded) == 197 and loaded[0].total == Decimal("1.50") and plain_names == ["good"]
    assert (window.state, window.records, window.rejects) == ("done", 199, 4)
    assert mark is not None and mark.synced_until is not None and count == 197
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert [message.split(";")[0] for message in warned] == [
        "orders: the database refused 3 record(s), now in etl_rejects", "plain: the database refused 1 record(s), now in etl_rejects",
    ]


async def test_a_table_gone_mid_run_fails_the_batch_without_looking_for_a_row(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renamed table is no record's fault: the batch fails (exit 1) as before, and nothing of it is committed."""
    async with _store(database_url, ORDERS) as store:
        run = await _run(store)
        window_id = await _window(store, run)
        async with store.engine.begin() as connection:
            await connection.exec_driver_sql("ALTER TABLE orders RENAME TO orders_old")

        async def no_isolation(*_args: Any) -> None:
            raise AssertionError("rows were isolated for an error that is not about them")

        monkeypatch.setattr(Store, "_refused_rows", no_isolation, raising=False)
        with pytest.raises(LoadError, match="refused a statement") as failed:
            await store.commit(_finishing_batch(window_id), run)
        async with store.engine.connect() as connection:
            window = (await connection.execute(select(windows).where(windows.c.id == window_id))).one()
            stored = (await connection.execute(select(func.count()).select_from(rejects))).scalar_one()
    assert failed.value.exit_code == 1
    assert (window.state, window.records, stored) == ("pending", 0, 0)


async def test_a_nul_in_a_rejects_key_is_stored_as_text(database_url: str) -> None:
    """PostgreSQL cannot store U+0000: a key holding one is written with the six characters \\u0000."""
    async with _store(database_url, ORDERS) as store:
        await _load(store, ORDERS, [{"id": "7\x00", "total": "1", "updated_at": "2024-05-01"}], await _run(store))
        async with store.engine.connect() as connection:
            (reject,) = list(await connection.execute(select(rejects)))
    assert reject.record_key == "7\\u0000"


async def test_a_failure_after_the_refused_rows_were_found_commits_nothing(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The savepoints live inside one transaction: rows written in them are gone if the batch fails after them.

    On SQLite a first SAVEPOINT outside a transaction begins one of its own, which its RELEASE commits:
    the rows of `plain`, written first and refused nothing, were committed without the rest of the batch.
    """
    plain = _resource("plain", {"id": "integer", "name": "string"})
    async with _store(database_url, plain, ORDERS) as store:
        await _forbid(store, "orders", "total", "6.66")
        run = await _run(store)
        window_id = await _window(store, run)
        batch = LoadBatch()
        batch.add_rows("plain", window_id, [{"id": 1, "name": "good"}])
        batch.add_rows("orders", window_id, RecordValidator(ORDERS).validate([_order(1, "1.00", 1), _order(2, "6.66", 2)]).rows)
        batch.windows[window_id] = WindowProgress(pages=1, records=3, done=True)

        async def fail(*_args: Any) -> None:
            raise LoadError("injected failure after the rows")

        monkeypatch.setattr(Store, "_count_in_run", fail)
        with pytest.raises(LoadError, match="injected"):
            await store.commit(batch, run)
        count, window, _mark = await _bookkeeping(store, window_id)
        async with store.engine.connect() as connection:
            plain_rows = (await connection.execute(select(func.count()).select_from(resource_table(plain)))).scalar_one()
    assert (plain_rows, count, window.state) == (0, 0, "pending")


async def _record_dead_run(store: Store) -> tuple[int, int]:
    """A run of orders marked running whose process has exited, as a SIGKILL leaves it: (run id, pid)."""
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    killed, gone = await store.start_run("sync", {}, ["orders"]), int(exited.stdout)
    async with store.engine.begin() as connection:
        await connection.execute(runs.update().where(runs.c.id == killed).values(pid=gone))
    return killed, gone


async def test_exit_4_names_the_live_holder_not_a_killed_run_nor_nobody(database_url: str) -> None:
    """A run takes its lock before it records itself in etl_runs. A second run started at that moment named
    nobody, or the newest 'running' row: one left by a run killed earlier, whose process is gone. It now
    passes over dead runs of this host and waits a little for the holder's row."""
    async with _store(database_url, ORDERS) as store:
        await _record_dead_run(store)
        second = create_engine(database_url)
        try:
            async with ResourceLocks(store.engine, ["orders"]):
                recording = asyncio.create_task(_start_run_after(store, 0.5))
                with pytest.raises(LockHeld) as held:
                    async with ResourceLocks(second, ["orders"]):
                        pass
                holder = await recording
        finally:
            await second.dispose()
    assert f"run {holder} (sync, pid {os.getpid()} on" in str(held.value)


async def test_a_lock_whose_only_running_run_is_dead_names_it_as_such(tmp_path: Path) -> None:
    """A server may keep a vanished host's session, and its lock, for a while: with no live run to name, the
    dead one is named and said to be dead, rather than nobody (or it, as if it were still working)."""
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    async with _store(url, ORDERS) as store:
        killed, gone = await _record_dead_run(store)
        second = create_engine(url)
        try:
            async with ResourceLocks(store.engine, ["orders"]):
                with pytest.raises(LockHeld) as held:
                    async with ResourceLocks(second, ["orders"]):
                        pass
        finally:
            await second.dispose()
    assert f"run {killed} (sync, pid {gone} on" in str(held.value)
    assert "its process has ended" in str(held.value)


async def _start_run_after(store: Store, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return await store.start_run("sync", {}, ["orders"])


@asynccontextmanager
async def _max_allowed_packet(url: str, size: int) -> AsyncIterator[None]:
    """The MariaDB server's max_allowed_packet lowered for the connections opened meanwhile, then restored.

    The variable is global (a session cannot change its own), so the window is kept to the one load.
    """
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            before = (await connection.exec_driver_sql("SELECT @@GLOBAL.max_allowed_packet")).scalar_one()
            await connection.exec_driver_sql(f"SET GLOBAL max_allowed_packet = {size}")
            try:
                yield
            finally:
                await connection.exec_driver_sql(f"SET GLOBAL max_allowed_packet = {before}")
    finally:
        await engine.dispose()


async def test_a_batch_larger_than_mariadbs_max_allowed_packet_loads_in_statements_that_fit(
    fresh_database: Callable[[str], Any],
) -> None:
    """Rows of 20 KB each, 2.4 MB a batch, on a server whose max_allowed_packet is 800 KB: the driver's
    multi-row INSERTs of up to 1,024,000 bytes were cut off (error 2013) and the run failed every night,
    though no record was near the limit. Rows and rejects now go in statements the server takes."""
    url = await fresh_database("mysql")
    resource = _resource("docs", {"id": "integer", "body": "text", "doc": "json", "must": {"type": "integer", "nullable": False}})
    records = [{"id": n, "body": f"{n}'\\" * 4000, "doc": {"n": n, "pad": "é" * 2000}, "must": n} for n in range(1, 101)]
    records += [{"id": n, "body": "x" * 30_000} for n in range(101, 141)]  # no `must`: 1.2 MB of rejects, with their raw
    async with _max_allowed_packet(url, 800 * 1024), _store(url, resource) as store:
        await _load(store, resource, records, await _run(store))
        loaded = await _rows(store, resource)
        async with store.engine.connect() as connection:
            stored = list(await connection.execute(select(rejects).order_by(rejects.c.id)))
    assert [row.id for row in loaded] == list(range(1, 101))
    assert loaded[41].body == "42'\\" * 4000 and loaded[41].doc == {"n": 42, "pad": "é" * 2000}
    assert [orjson.loads(row.raw)["id"] for row in stored] == list(range(101, 141))


@pytest.mark.parametrize(
    ("number", "refused"),
    [(3157, True), (4025, True), (1406, True), (2013, False), (1213, False)],
    ids=["mysql8-json-too-deep", "mariadb-check", "too-long", "lost-connection", "deadlock"],
)
def test_mysql_errors_about_a_row_are_told_from_errors_about_the_statement(number: int, refused: bool) -> None:
    """MySQL 8 refuses JSON nested deeper than 100 levels with 3157: that row is a reject, as MariaDB's 4025 makes
    it, and the batch loads; a lost connection or a deadlock is no row's fault and fails the batch."""
    assert refused_data(Exception(number, "the server's words")) is refused
