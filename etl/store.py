"""Everything etl writes to the database, and the one transaction that makes a load safe.

`Store.commit(batch)` writes, in one transaction, the rows of many pages
(upserted on the primary key), their rejects, the progress of their windows
and the watermarks those windows move. A crash before the commit loses the
whole batch and nothing else; after it, all of it is there. Nothing is ever
half-recorded, so the next run neither skips nor double-counts.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Table, delete, func, insert, or_, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import Insert

from etl.config import ResourceConfig
from etl.db import database_error, migrate
from etl.durations import isoformat_utc, parse_instant
from etl.errors import ConfigError, LoadError
from etl.records import Reject
from etl.schema import LOADED_AT, RUN_ID, ensure_resource_table, rejects, runs, watermarks, windows
from etl.windows import Window


def cursor_text(value: Any) -> str | None:
    """A cursor value as stored in etl_watermarks/etl_windows: ISO-8601 UTC for instants."""
    if value is None:
        return None
    return isoformat_utc(value) if isinstance(value, datetime) else str(value)


def cursor_from_text(text: str | None) -> Any:
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return parse_instant(text)
    except ValueError:
        return text


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class WindowRecord:
    """A row of etl_windows as the pipeline uses it."""

    id: int
    resource: str
    kind: str
    window: Window
    state: str
    position: dict[str, Any] | None
    pages: int
    records: int
    max_cursor: Any


@dataclass
class WindowProgress:
    """What one batch adds to a window: pages, records, where to resume, and whether it is done."""

    position: dict[str, Any] | None = None
    pages: int = 0
    records: int = 0
    rejects: int = 0
    max_cursor: Any = None
    done: bool = False


@dataclass
class Watermark:
    resource: str
    watermark: Any
    synced_until: datetime | None


@dataclass
class LoadBatch:
    """Many pages' worth of writes that must land together."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rejects: list[tuple[str, Reject]] = field(default_factory=list)
    windows: dict[int, WindowProgress] = field(default_factory=dict)
    watermarks: list[Watermark] = field(default_factory=list)

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def is_empty(self) -> bool:
        return not (self.rows or self.rejects or self.windows or self.watermarks)


class Store:
    """etl's reads and writes of its own tables and the resource tables, for one database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._tables: dict[str, Table] = {}
        self._upserts: dict[str, Insert] = {}
        self._cursor_columns: dict[str, str | None] = {}

    async def prepare(self, resources: Iterable[ResourceConfig], auto_migrate: bool) -> None:
        """Migrate etl's tables (unless told not to) and create or extend the resource tables."""
        if auto_migrate:
            await migrate(self.engine)
        try:
            async with self.engine.begin() as connection:
                for resource in resources:
                    table = await connection.run_sync(ensure_resource_table, resource)
                    self._register(resource, table)
        except ConfigError:
            raise
        except DBAPIError as exc:
            if not auto_migrate and "etl_" in str(exc.orig):
                raise LoadError(
                    "etl's tables are missing or out of date and [database].auto_migrate is false",
                    hint="run `python -m etl migrate`",
                ) from exc
            raise database_error(exc, self.engine.url) from exc

    def _register(self, resource: ResourceConfig, table: Table) -> None:
        self._tables[resource.name] = table
        cursor = resource.cursor_field if resource.cursor_field in resource.columns else None
        self._cursor_columns[resource.name] = cursor
        self._upserts[resource.name] = upsert_statement(self.dialect, table, resource.primary_key, cursor)

    # -- runs --------------------------------------------------------------------------------------

    async def start_run(self, command: str, arguments: dict[str, Any], resource_names: list[str]) -> int:
        values = {
            "command": command,
            "arguments": json.dumps(arguments, default=str, sort_keys=True),
            "resources": ",".join(resource_names),
            "status": "running",
            "started_at": utc_now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **{name: 0 for name in ("pages", "records_fetched", "records_loaded", "records_rejected", "requests", "retries", "token_requests")},
        }
        async with self._transaction() as connection:
            result = await connection.execute(insert(runs).values(**values))
            return int(result.inserted_primary_key[0])

    async def finish_run(self, run_id: int, status: str, counts: dict[str, int], error: str | None) -> None:
        async with self._transaction() as connection:
            await connection.execute(
                update(runs).where(runs.c.id == run_id).values(status=status, ended_at=utc_now(), error=error, **counts)
            )

    async def mark_abandoned(self, resource_names: list[str], current_run: int) -> None:
        """Runs still 'running' on resources whose lock we now hold died without saying so."""
        async with self._transaction() as connection:
            rows = await connection.execute(select(runs.c.id, runs.c.resources).where(runs.c.status == "running", runs.c.id != current_run))
            dead = [row.id for row in rows if set(row.resources.split(",")) & set(resource_names)]
            if dead:
                await connection.execute(
                    update(runs).where(runs.c.id.in_(dead)).values(
                        status="abandoned", error="the process ended without recording its end (killed or crashed)"
                    )
                )

    # -- windows and watermarks ----------------------------------------------------------------------

    async def watermark(self, resource: str) -> Watermark | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(watermarks).where(watermarks.c.resource == resource))).first()
        if row is None:
            return None
        return Watermark(resource, cursor_from_text(row.watermark), row.synced_until)

    async def open_windows(self, kind: str, resource: str, planned: list[Window], run_id: int, reuse: bool) -> list[WindowRecord]:
        """etl_windows rows for the planned windows; with `reuse`, rows of an earlier run of the same plan are taken up."""
        existing: dict[Window, Any] = {}
        async with self._transaction() as connection:
            if reuse and planned:
                query = select(windows).where(windows.c.kind == kind, windows.c.resource == resource)
                if planned[0].start is not None:
                    query = query.where(windows.c.window_start >= planned[0].start, windows.c.window_start < planned[-1].end)
                for row in await connection.execute(query.order_by(windows.c.id)):
                    existing[Window(row.window_start, row.window_end)] = row
            records = []
            now = utc_now()
            for window in planned:
                row = existing.get(window)
                if row is None:
                    result = await connection.execute(
                        insert(windows).values(
                            kind=kind, resource=resource, window_start=window.start, window_end=window.end, state="pending",
                            pages=0, records=0, rejects=0, run_id=run_id, updated_at=now,
                        )
                    )
                    records.append(WindowRecord(int(result.inserted_primary_key[0]), resource, kind, window, "pending", None, 0, 0, None))
                    continue
                if row.state != "done":
                    await connection.execute(update(windows).where(windows.c.id == row.id).values(run_id=run_id, updated_at=now))
                position = orjson.loads(row.position) if row.position else None
                records.append(
                    WindowRecord(row.id, resource, kind, window, row.state, position, row.pages, row.records, cursor_from_text(row.max_cursor))
                )
        return records

    async def forget_windows(self, kind: str, resource: str, start: datetime, end: datetime) -> int:
        async with self._transaction() as connection:
            result = await connection.execute(
                delete(windows).where(
                    windows.c.kind == kind, windows.c.resource == resource,
                    windows.c.window_start >= start, windows.c.window_start < end,
                )
            )
            return result.rowcount or 0

    async def fail_window(self, window_id: int, error: str) -> None:
        async with self._transaction() as connection:
            await connection.execute(
                update(windows).where(windows.c.id == window_id).values(state="failed", error=error[:4000], updated_at=utc_now())
            )

    # -- the load ------------------------------------------------------------------------------------

    async def commit(self, batch: LoadBatch, run_id: int) -> None:
        """Rows, rejects, window progress and watermarks of one batch, in one transaction."""
        now = utc_now()
        async with self._transaction() as connection:
            for resource, rows in batch.rows.items():
                if rows:
                    await connection.execute(self._upserts[resource], self._latest_versions(resource, rows, now, run_id))
            if batch.rejects:
                await connection.execute(
                    insert(rejects),
                    [
                        {"run_id": run_id, "resource": resource, "record_key": (reject.key or "")[:255] or None,
                         "raw": reject.raw, "error": reject.error[:4000], "rejected_at": now}
                        for resource, reject in batch.rejects
                    ],
                )
            for window_id, progress in batch.windows.items():
                await self._advance_window(connection, window_id, progress, run_id, now)
            for mark in batch.watermarks:
                await self._save_watermark(connection, mark, run_id, now)

    def _latest_versions(self, resource: str, rows: list[dict[str, Any]], now: datetime, run_id: int) -> list[dict[str, Any]]:
        """One row per key, the latest version (highest cursor, else last seen); etl's columns added."""
        key_columns = [column.name for column in self._tables[resource].primary_key.columns]
        cursor = self._cursor_columns[resource]
        latest: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row in rows:
            key = tuple(row[name] for name in key_columns)
            previous = latest.get(key)
            if previous is not None and cursor is not None and _older(row.get(cursor), previous.get(cursor)):
                continue
            latest[key] = row
        for row in latest.values():
            row[LOADED_AT] = now
            row[RUN_ID] = run_id
        return list(latest.values())

    async def _advance_window(self, connection: AsyncConnection, window_id: int, progress: WindowProgress, run_id: int, now: datetime) -> None:
        values: dict[str, Any] = {
            "pages": windows.c.pages + progress.pages,
            "records": windows.c.records + progress.records,
            "rejects": windows.c.rejects + progress.rejects,
            "state": "done" if progress.done else "running",
            "run_id": run_id,
            "updated_at": now,
            "error": None,
        }
        if progress.position is not None:
            values["position"] = orjson.dumps(progress.position).decode()
        if progress.max_cursor is not None:
            current = (await connection.execute(select(windows.c.max_cursor).where(windows.c.id == window_id))).scalar()
            values["max_cursor"] = cursor_text(newest_cursor(cursor_from_text(current), progress.max_cursor))
        await connection.execute(update(windows).where(windows.c.id == window_id).values(**values))

    async def _save_watermark(self, connection: AsyncConnection, mark: Watermark, run_id: int, now: datetime) -> None:
        values = {"watermark": cursor_text(mark.watermark), "synced_until": mark.synced_until, "run_id": run_id, "updated_at": now}
        result = await connection.execute(update(watermarks).where(watermarks.c.resource == mark.resource).values(**values))
        if not result.rowcount:
            await connection.execute(insert(watermarks).values(resource=mark.resource, **values))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """`engine.begin()` whose driver errors come out as etl's LoadError."""
        try:
            async with self.engine.begin() as connection:
                yield connection
        except (DBAPIError, OSError) as exc:
            raise database_error(exc, self.engine.url) from exc


def _older(candidate: Any, current: Any) -> bool:
    if candidate is None or current is None:
        return False
    try:
        return bool(candidate < current)
    except TypeError:
        return False


def newest_cursor(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    try:
        return max(a, b)
    except TypeError:
        return b


def upsert_statement(dialect: str, table: Table, key: list[str], cursor: str | None) -> Insert:
    """INSERT … ON CONFLICT / ON DUPLICATE KEY UPDATE that never lets an older version replace a newer one."""
    others = [column for column in table.columns if column.name not in key]
    if dialect in ("sqlite", "postgresql"):
        module = sqlite if dialect == "sqlite" else postgresql
        statement = module.insert(table)
        if not others:
            return statement.on_conflict_do_nothing(index_elements=key)
        newer = None
        if cursor is not None:
            old, new = table.c[cursor], statement.excluded[cursor]
            newer = or_(old.is_(None), new.is_(None), new >= old)
        return statement.on_conflict_do_update(
            index_elements=key, set_={column.name: statement.excluded[column.name] for column in others}, where=newer
        )
    if dialect == "mysql":
        statement = mysql.insert(table)
        if not others:
            return statement.prefix_with("IGNORE")
        if cursor is None:
            return statement.on_duplicate_key_update([(column.name, statement.inserted[column.name]) for column in others])
        old, new = table.c[cursor], statement.inserted[cursor]
        newer = or_(old.is_(None), new.is_(None), new >= old)
        # MySQL assigns left to right and later assignments see earlier ones: the cursor column goes last.
        ordered = sorted(others, key=lambda column: column.name == cursor)
        return statement.on_duplicate_key_update(
            [(column.name, func.if_(newer, statement.inserted[column.name], column)) for column in ordered]
        )
    raise LoadError(f"no upsert for the {dialect} dialect")

