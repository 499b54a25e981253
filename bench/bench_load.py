"""Load rate of etl's loader beside the raw bulk rate of the same database (see bench/README.md).

    .venv/bin/python bench/bench_load.py [--rows 1000000] [--batch 5000] [--only sqlite|postgresql]

Generates N order-like records (10 fields: int id, int, decimal, string,
string, datetime, json, nested string, text, int), validates them with
etl.records as the pipeline does, then times:

- loader: `Store.commit` of one batch of validated rows at a time, each with
  its window's progress (as the pipeline commits), into a fresh database;
- raw: the same rows in one transaction into another fresh database, SQLite
  `executemany` of INSERT … ON CONFLICT, PostgreSQL COPY into a temporary
  table then INSERT … ON CONFLICT, conversion to driver values in the clock;
- the database alone: the same, with the driver values made beforehand.

It prints rows/s for each and the ratios; the target is loader/raw >= 0.7.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import make_url, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from etl.config import ResourceConfig
from etl.db import async_url, create_engine
from etl.records import RecordValidator
from etl.schema import resource_table
from etl.sqltypes import json_text
from etl.store import LoadBatch, Store, WindowProgress, row_writer
from etl.windows import Window

TARGET = 0.7
START = datetime(2024, 1, 1, tzinfo=UTC)
POSTGRES_SERVER = os.environ.get("ETL_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
ORDERS = ResourceConfig.model_validate(
    {
        "name": "orders", "path": "/orders", "primary_key": ["id"], "cursor_field": "updated_at",
        "columns": {
            "id": "integer", "customer_id": "integer", "total": "decimal", "currency": "string", "status": "string",
            "updated_at": "datetime", "lines": "json", "customer_name": {"type": "string", "source": "customer.name"},
            "note": "text", "version": "integer",
        },
    }
)
RAW_METHODS = {
    "sqlite": "executemany of INSERT … ON CONFLICT, one transaction",
    "postgresql": "COPY into a temporary table + INSERT … ON CONFLICT, one transaction",
}
TABLE_COLUMNS = [column.name for column in resource_table(ORDERS).columns]  # declared ones, then etl's two
STATUSES = ["new", "paid", "shipped", "cancelled", "refunded"]
NAMES = ["Zoë Müller", "O'Brien & Söhne", 'Ana "Ani" Li', "Jürgen Ødegård", "佐藤 花子"]


def record(i: int) -> dict[str, Any]:
    """An order as the API sends it: decimals as strings, ISO datetimes, nested customer, JSON lines."""
    lines = [{"sku": f"SKU-{(i * 7 + n) % 5000:04d}", "qty": 1 + (i + n) % 5, "price": f"{(i * 13 + n) % 20000 / 100:.2f}"}
             for n in range(1 + i % 3)]
    return {
        "id": i + 1,
        "customer_id": 1 + i % 50_000,
        "total": f"{(i * 37) % 1_000_000 / 100:.2f}",
        "currency": "EUR",
        "status": STATUSES[i % len(STATUSES)],
        "updated_at": (START + timedelta(seconds=i * 3)).isoformat().replace("+00:00", "Z"),
        "lines": lines,
        "customer": {"name": NAMES[i % len(NAMES)]},
        "note": "leave at the door, ring twice" if i % 3 == 0 else None,
        "version": 1,
    }


def validated_batches(rows: int, batch: int) -> list[list[dict[str, Any]]]:
    """The rows as the loader receives them: validated by etl.records, grouped in batches."""
    validator = RecordValidator(ORDERS)
    batches = []
    for first in range(0, rows, batch):
        page = validator.validate([record(i) for i in range(first, min(first + batch, rows))])
        assert not page.rejects, page.rejects[:1]
        batches.append(page.rows)
    return batches


async def loader_rate(url: str, batches: list[list[dict[str, Any]]]) -> float:
    """Rows per second through Store.commit, one transaction per batch with its window's progress."""
    engine = create_engine(url)
    try:
        store = Store(engine)
        await store.prepare([ORDERS], auto_migrate=True)
        run_id = await store.start_run("bench", {}, ["orders"])
        (window,) = await store.open_windows("sync", "orders", [Window(START, START + timedelta(days=3650))], run_id, reuse=False)
        await quiesce(engine)
        started = time.perf_counter()
        for number, rows in enumerate(batches, 1):
            progress = WindowProgress(position={"page": number}, pages=1, records=len(rows), max_cursor=rows[-1]["updated_at"])
            await store.commit(LoadBatch(rows={"orders": rows}, windows={window.id: progress}), run_id)
        seconds = time.perf_counter() - started
    finally:
        await engine.dispose()
    return sum(map(len, batches)) / seconds


def sqlite_values(batches: list[list[dict[str, Any]]]) -> list[tuple[Any, ...]]:
    """The rows as SQLite stores them (decimals, datetimes, JSON as text), by etl's own column converters."""
    writer = row_writer(sqlite.dialect(), ORDERS, resource_table(ORDERS))
    now = datetime.now(UTC)
    return [values for rows in batches for values in writer.parameters(rows, now, 1)]


def postgres_values(batches: list[list[dict[str, Any]]]) -> list[tuple[Any, ...]]:
    """The rows as asyncpg's COPY takes them natively: Decimal and datetime, which it encodes itself; JSON as text."""
    names = TABLE_COLUMNS[:-2]
    now = datetime.now(UTC)
    return [
        tuple(json_text(row[name]) if name == "lines" else row[name] for name in names) + (now, 1)
        for rows in batches for row in rows
    ]


def upsert_sql(placeholders: list[str]) -> str:
    """INSERT … ON CONFLICT (id) DO UPDATE of every column, as one would write it by hand."""
    updates = ", ".join(f"{name} = excluded.{name}" for name in TABLE_COLUMNS if name != "id")
    return f"INSERT INTO orders ({', '.join(TABLE_COLUMNS)}) {' '.join(placeholders)} ON CONFLICT (id) DO UPDATE SET {updates}"


async def create_orders_table(url: str) -> AsyncEngine:
    """The same table the loader writes, in the raw run's own fresh database; the engine to dispose of."""
    engine = create_engine(url)
    await Store(engine).prepare([ORDERS], auto_migrate=True)
    return engine


async def raw_sqlite_rate(url: str, batches: list[list[dict[str, Any]]], prepared: bool) -> float:
    """executemany of the upsert, every row in one transaction, with the pragmas etl uses.

    Unless `prepared`, the validated rows become SQLite values inside the clock, as
    asyncpg's COPY encodes Python values inside its own; `prepared` times SQLite alone.
    """
    await (await create_orders_table(url)).dispose()
    values = sqlite_values(batches) if prepared else None
    statement = upsert_sql(["VALUES (" + ", ".join("?" * (len(ORDERS.columns) + 2)) + ")"])
    connection = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        os.sync()
        started = time.perf_counter()
        connection.execute("BEGIN")
        connection.executemany(statement, values if values is not None else sqlite_values(batches))
        connection.execute("COMMIT")
        seconds = time.perf_counter() - started
    finally:
        connection.close()
    return sum(map(len, batches)) / seconds


async def raw_postgres_rate(url: str, batches: list[list[dict[str, Any]]], prepared: bool) -> float:
    """COPY of every row into a temporary table, then one INSERT … SELECT … ON CONFLICT, in one transaction.

    asyncpg encodes the Decimals and datetimes inside the clock; unless `prepared`, the
    tuples (JSON as text) are built inside it too, as the loader must.
    """
    engine = await create_orders_table(url)
    values = postgres_values(batches) if prepared else None
    connection = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await quiesce(engine)
        started = time.perf_counter()
        async with connection.transaction():
            await connection.execute("CREATE TEMPORARY TABLE stage (LIKE orders INCLUDING DEFAULTS) ON COMMIT DROP")
            records = values if values is not None else postgres_values(batches)
            await connection.copy_records_to_table("stage", records=records, columns=TABLE_COLUMNS)
            await connection.execute(upsert_sql([f"SELECT {', '.join(TABLE_COLUMNS)} FROM stage"]))
        seconds = time.perf_counter() - started
    finally:
        await connection.close()
        await engine.dispose()
    return sum(map(len, batches)) / seconds


async def quiesce(engine: AsyncEngine) -> None:
    """Start a timing with nothing of the one before still being written: dirty pages flushed, WAL checkpointed."""
    os.sync()
    if engine.dialect.name == "postgresql":
        async with engine.connect() as connection:
            await connection.exec_driver_sql("CHECKPOINT")


@asynccontextmanager
async def fresh_database(database: str, postgres_server: str = POSTGRES_SERVER) -> AsyncIterator[str]:
    """The URL of a new, empty database: a file in a temporary directory, or a database made on the server."""
    if database == "sqlite":
        with tempfile.TemporaryDirectory(prefix="etl-bench-") as directory:
            yield f"sqlite:///{Path(directory) / 'bench.db'}"
        return
    name = f"etl_bench_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(async_url(postgres_server), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f"CREATE DATABASE {name}"))
        yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
        async with admin.connect() as connection:
            await connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        await admin.dispose()


async def raw_rate_into(database: str, url: str, batches: list[list[dict[str, Any]]], prepared: bool) -> float:
    """The raw rate of the database at `url`, by its bulk method (RAW_METHODS)."""
    measure = raw_sqlite_rate if database == "sqlite" else raw_postgres_rate
    return await measure(url, batches, prepared)


def raw_rate(database: str, rows: int, prepared: bool = False, tries: int = 1) -> float:
    """The best raw bulk upsert rate of `rows` such rows into a fresh "sqlite" or "postgresql" database, of `tries` (bench_e2e.py)."""
    batches = validated_batches(rows, 5000)

    async def measure() -> float:
        best = 0.0
        for _ in range(tries):
            async with fresh_database(database) as url:
                best = max(best, await raw_rate_into(database, url, batches, prepared))
        return best

    return asyncio.run(measure())


def report(database: str, loader: float, raw: float, alone: float) -> bool:
    """The verdict against the raw rate from the same rows, and the share of the database's own rate."""
    ratio = loader / raw
    verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
    print(f"{database:<11} loader {loader:>9,.0f} rows/s   raw {raw:>9,.0f} rows/s   ratio {ratio:.2f} "
          f"(target >= {TARGET}) {verdict}\n"
          f"{'':<11} raw: {RAW_METHODS[database]}, from the same validated rows, driver values made inside the clock\n"
          f"{'':<11} the database alone, driver values made before the clock: {alone:,.0f} rows/s, "
          f"loader/that {loader / alone:.2f}", flush=True)
    return ratio >= TARGET


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000, help="rows per Store.commit (the pipeline's BATCH_ROWS)")
    parser.add_argument("--only", choices=["sqlite", "postgresql"], help="bench one database")
    parser.add_argument("--postgres", default=POSTGRES_SERVER, help="PostgreSQL server URL; a fresh database is created on it")
    args = parser.parse_args()

    started = time.perf_counter()
    batches = validated_batches(args.rows, args.batch)
    # The pipeline holds a bounded queue of pages, never a million rows: frozen, the bench's
    # own rows are not rescanned by every garbage collection the loader's allocations trigger.
    gc.freeze()
    print(f"{args.rows:,} records validated in {time.perf_counter() - started:.1f}s; "
          f"loading in batches of {args.batch:,}", flush=True)
    ok = True
    for database in [args.only] if args.only else list(RAW_METHODS):
        rates = []
        for measure in (loader_rate, partial(raw_rate_into, database, prepared=False), partial(raw_rate_into, database, prepared=True)):
            async with fresh_database(database, args.postgres) as url:
                rates.append(await measure(url, batches))
        ok &= report(database, *rates)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
