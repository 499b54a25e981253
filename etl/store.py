"""Everything etl writes to the database, and the one transaction that makes a load safe.

`Store.commit(batch)` writes, in one transaction, the rows of many pages
(upserted on the primary key), their rejects, the progress of their windows
and the watermarks those windows move. A crash before the commit loses the
whole batch and nothing else; after it, all of it is there. Nothing is ever
half-recorded, so the next run neither skips nor double-counts.

When the database refuses a row (a value, a key or a constraint it will not
take), the batch is written again with each resource's rows in SAVEPOINTs,
halving any set that fails down to the rows that fail alone: those become
rejects, and everything else of the batch commits as usual. Only that failure
path pays for savepoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import operator
import os
import re
import socket
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from itertools import repeat
from typing import Any, TypeVar
from typing import cast as cast_to

import asyncpg
import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    DateTime,
    Float,
    MetaData,
    Select,
    Table,
    Text,
    bindparam,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateTable
from sqlalchemy.sql.dml import Insert

from etl import jsonnumbers
from etl.config import ResourceConfig
from etl.db import (
    DRIVER_ERRORS,
    begin_explicitly,
    database_error,
    driver_message,
    migrate,
    refused_data,
    require_current,
)
from etl.durations import isoformat_utc, parse_instant
from etl.errors import ConfigError, LoadError
from etl.logs import escape_lone_surrogates
from etl.records import Reject, key_text
from etl.schema import LOADED_AT, RUN_ID, ensure_resource_table, rejects, runs, watermarks, windows
from etl.sqltypes import ExactDecimal, driver_column, driver_value, key_column, to_utc
from etl.windows import Window

log = logging.getLogger(__name__)
REFUSED = "the database refused this record"
MARIADB_CHECK_FAILED = 4025  # ER_CONSTRAINT_FAILED: a CHECK constraint, such as a json column's JSON_VALID
STATEMENT_HEADROOM = 1024  # bytes of a MySQL statement kept for what a row estimate leaves out


def cursor_text(value: Any) -> str | None:
    """A cursor value as stored in etl_watermarks/etl_windows: ISO-8601 UTC for instants."""
    if value is None:
        return None
    return isoformat_utc(value) if isinstance(value, datetime) else str(value)


def cursor_from_text(text: str | None) -> Any:
    """A stored cursor as a value: a date column's '2024-03-12' stays a date, and is written back as it was."""
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    if len(text) == len("2024-03-12"):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
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
    """What one batch adds to a window: pages, records, where to resume, and whether it is done.

    `max_cursor` is the window's highest cursor so far, earlier batches included (the pipeline's
    WatermarkTracker holds it), so it is written as it is, without reading the stored one.
    """

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
    # the run's so far, for etl_runs: not only known once it ends (a killed run showed pages but 0 requests)
    token_requests: int | None = None
    requests: int | None = None
    retries: int | None = None
    # per resource, (rows so far, window) after each page: whose window a row the database refuses was in
    row_windows: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def is_empty(self) -> bool:
        return not (self.rows or self.rejects or self.windows or self.watermarks)

    def add_rows(self, resource: str, window_id: int, rows: list[dict[str, Any]]) -> None:
        """A page's rows, remembering their window once per page (not per row)."""
        kept = self.rows.setdefault(resource, [])
        kept.extend(rows)
        self.row_windows.setdefault(resource, []).append((len(kept), window_id))

    def window_of(self, resource: str, index: int) -> int | None:
        """The window of the resource's row at `index`; None for rows added without one."""
        pages = self.row_windows.get(resource, [])
        page = bisect_right([end for end, _ in pages], index)
        return pages[page][1] if page < len(pages) else None

    def refusing(self, refused: dict[str, dict[int, Reject]]) -> LoadBatch:
        """This batch with the rows the database refused (by resource and index) moved to its rejects."""
        windows = {window_id: dataclasses.replace(progress) for window_id, progress in self.windows.items()}
        moved = Counter(self.window_of(resource, index) for resource, found in refused.items() for index in found)
        for window_id, count in moved.items():
            if window_id in windows:
                windows[window_id].records -= count
                windows[window_id].rejects += count
        rows = {
            resource: [row for index, row in enumerate(rows) if index not in refused.get(resource, {})]
            for resource, rows in self.rows.items()
        }
        new_rejects = [(resource, reject) for resource, found in refused.items() for reject in found.values()]
        return dataclasses.replace(self, rows=rows, rejects=self.rejects + new_rejects, windows=windows, row_windows={})


class Store:
    """etl's reads and writes of its own tables and the resource tables, for one database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._writers: dict[str, RowWriter] = {}
        self._max_statement: int | None = None  # bytes a MySQL statement may carry, when the driver's own cut is too large

    async def prepare(self, resources: Iterable[ResourceConfig], auto_migrate: bool) -> None:
        """Migrate etl's tables (unless told not to) and create or extend the resource tables."""
        if auto_migrate:
            await migrate(self.engine)
        else:
            await require_current(self.engine)
        try:
            async with self.engine.begin() as connection:
                await begin_explicitly(connection)
                self._max_statement = await _max_statement(connection)
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
        self._writers[resource.name] = row_writer(self.engine.dialect, resource, table, self._max_statement)

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
            return _new_id(await connection.execute(insert(runs).values(**values)))

    async def finish_run(self, run_id: int, status: str, counts: dict[str, int], error: str | None) -> None:
        async with self._transaction() as connection:
            await connection.execute(
                update(runs).where(runs.c.id == run_id).values(status=status, ended_at=utc_now(), error=error, **counts)
            )

    async def mark_abandoned(self, resource_names: list[str], current_run: int) -> list[Any]:
        """Runs still 'running' on resources whose lock we now hold died without saying so; returns them, oldest first."""
        async with self._transaction() as connection:
            rows = await connection.execute(
                select(runs.c.id, runs.c.resources, runs.c.command, runs.c.arguments, runs.c.pid, runs.c.host, runs.c.started_at)
                .where(runs.c.status == "running", runs.c.id != current_run).order_by(runs.c.id)
            )
            dead = [row for row in rows if set(row.resources.split(",")) & set(resource_names)]
            if dead:
                await connection.execute(
                    update(runs).where(runs.c.id.in_([row.id for row in dead])).values(
                        status="abandoned", error="the process ended without recording its end (killed or crashed)"
                    )
                )
        return dead

    # -- windows and watermarks ----------------------------------------------------------------------

    async def watermark(self, resource: str) -> Watermark | None:
        async with self.engine.connect() as connection:
            row = (await connection.execute(select(watermarks).where(watermarks.c.resource == resource))).first()
        if row is None:
            return None
        return Watermark(resource, cursor_from_text(row.watermark), row.synced_until)

    async def unfinished_sync(self, resource: str) -> list[tuple[datetime, datetime]]:
        """The windows of the last sync plan from its first unfinished one on, when that sync stopped early.

        They follow on from each other: a window is followed by the newest one starting where it ends,
        so older plans that left windows on the same dates do not interleave with it.
        """
        async with self.engine.connect() as connection:
            stored = list(await connection.execute(
                select(windows.c.id, windows.c.window_start, windows.c.window_end, windows.c.state)
                .where(windows.c.kind == "sync", windows.c.resource == resource, windows.c.state != "superseded",
                       windows.c.window_start.is_not(None), windows.c.window_end.is_not(None))
                .order_by(windows.c.id)
            ))
        unfinished = [row.window_start for row in stored if row.state != "done"]
        if not unfinished:
            return []
        following = {row.window_start: row.window_end for row in stored}  # by id: the newest wins
        chain, start = [], min(unfinished)
        while start in following and following[start] > start:
            chain.append((start, following[start]))
            start = following[start]
        return chain

    async def loaded_from(self, resource: str) -> datetime | None:
        """Where the resource's finished windows begin without a gap up to its first finished sync window (which
        began at the `start` of its first sync); None before any finished sync window."""
        finished = (windows.c.resource == resource, windows.c.state == "done", windows.c.window_end.is_not(None))
        async with self.engine.connect() as connection:
            first = (await connection.execute(
                select(func.min(windows.c.window_start)).where(windows.c.kind == "sync", *finished)
            )).scalar()
            if first is None:
                return None
            earlier = await connection.execute(
                select(windows.c.window_start, windows.c.window_end)
                .where(windows.c.window_start < first, *finished).order_by(windows.c.window_end.desc())
            )
            for row in earlier:  # latest end first: once one ends before the point reached, none after it reaches it
                if row.window_end < first:
                    break
                first = min(first, row.window_start)
        return first

    async def open_windows(
        self, kind: str, resource: str, planned: list[Window], run_id: int, reuse: bool, only: set[Window] | None = None,
        settled_after: timedelta = timedelta(0), stopped_only: bool = False,
    ) -> list[WindowRecord]:
        """etl_windows rows for the planned windows; with `reuse`, rows of an earlier run of the same plan are taken up.

        `only` limits what is taken up to those windows, and a finished one is taken up (not read again)
        only when it finished at least `settled_after` after its end: a window finished too close to its
        end (or before it, by a backfill into the future) may since have received records stamped within it.
        With `stopped_only`, a finished one is taken up only from a run that did not succeed (a backfill
        stopped early, run again), and becomes this run's: once a run has them all, it finished them.
        """
        existing: dict[Window, Any] = {}
        async with self._transaction() as connection:
            if reuse and planned:
                query = (
                    select(windows, runs.c.status.label("run_status"))
                    .select_from(windows.outerjoin(runs, runs.c.id == windows.c.run_id))
                    .where(windows.c.kind == kind, windows.c.resource == resource)
                )
                if planned[0].start is not None:
                    query = query.where(windows.c.window_start >= planned[0].start, windows.c.window_start < planned[-1].end)
                else:  # a full refresh: an unfinished one resumes; a finished one is not this load, which reads everything again
                    query = query.where(windows.c.window_start.is_(None), windows.c.state.not_in(("done", "superseded")))
                for stored in await connection.execute(query.order_by(windows.c.id)):
                    window = Window(stored.window_start, stored.window_end)
                    existing.pop(window, None)  # the newest row of a window decides
                    if stopped_only and stored.state == "done" and stored.run_status == "succeeded":
                        continue  # a backfill that finished is one to read again, not to resume
                    if (only is None or window in only) and _resumable(stored, settled_after):
                        existing[window] = stored
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
                    records.append(WindowRecord(_new_id(result), resource, kind, window, "pending", None, 0, 0, None))
                    continue
                if row.state != "done":  # read again from its first page: its counts start again with this reading
                    await connection.execute(
                        update(windows).where(windows.c.id == row.id).values(run_id=run_id, updated_at=now, pages=0, records=0, rejects=0)
                    )
                elif stopped_only:  # this run's now (its finish time kept): this run's success closes it
                    await connection.execute(update(windows).where(windows.c.id == row.id).values(run_id=run_id))
                position = orjson.loads(row.position) if row.position else None
                pages, counted = (row.pages, row.records) if row.state == "done" else (0, 0)
                records.append(
                    WindowRecord(row.id, resource, kind, window, row.state, position, pages, counted, cursor_from_text(row.max_cursor))
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

    async def supersede_windows(
        self, kind: str, resource: str, run_id: int, full_refresh_only: bool = False, within: Window | None = None
    ) -> None:
        """Unfinished windows of earlier runs that this run's plan covers, so that `status` does not list them.

        A sync plans from the watermark, which covers every earlier sync window; a backfill of a resource
        without date filters took up the newest unfinished full refresh (now this run's) and covers the rest;
        a dated backfill covers those `within` its interval (cut for another --window, they are not taken up).
        """
        query = update(windows).where(
            windows.c.kind == kind, windows.c.resource == resource, windows.c.state != "done", windows.c.run_id != run_id
        )
        if full_refresh_only:
            query = query.where(windows.c.window_start.is_(None))
        if within is not None:
            query = query.where(windows.c.window_start >= within.start, windows.c.window_end <= within.end)
        async with self._transaction() as connection:
            await connection.execute(query.values(state="superseded", updated_at=utc_now()))

    async def fail_window(self, window_id: int, error: str) -> None:
        async with self._transaction() as connection:
            await connection.execute(
                update(windows).where(windows.c.id == window_id).values(state="failed", error=error[:4000], updated_at=utc_now())
            )

    # -- the load ------------------------------------------------------------------------------------

    async def commit(self, batch: LoadBatch, run_id: int) -> list[tuple[str, Reject]]:
        """Rows, rejects, window progress and watermarks of one batch, in one transaction.

        Returns the rows the database refused, now in etl_rejects (none on the normal path), for
        the caller's counts. Any other failure raises LoadError and commits nothing of the batch.
        """
        now = utc_now()
        try:
            async with self.engine.begin() as connection:
                for resource, rows in batch.rows.items():
                    if rows:
                        await self._write_rows(connection, resource, rows, now, run_id)
                await self._write_bookkeeping(connection, batch, run_id, now)
        except DRIVER_ERRORS as exc:
            if not refused_data(exc):
                raise database_error(exc, self.engine.url) from exc
            return await self._commit_refusing(batch, run_id, now)
        return []

    async def _commit_refusing(self, batch: LoadBatch, run_id: int, now: datetime) -> list[tuple[str, Reject]]:
        """The batch again, the rows the database refuses alone moved to the rejects; the rest commits as usual."""
        async with self._transaction() as connection:
            await begin_explicitly(connection)
            refused = {
                resource: await self._refused_rows(connection, resource, rows, now, run_id)
                for resource, rows in batch.rows.items()
            }
            await self._write_bookkeeping(connection, batch.refusing(refused), run_id, now)
        for resource, found in refused.items():
            if found:
                first = next(iter(found.values()))
                log.warning(
                    "%s: the database refused %d record(s), now in etl_rejects; the first (key %s): %s",
                    resource, len(found), _shortened(first.key or ""), first.error.removeprefix(f"{REFUSED}: "),
                )
        return [(resource, reject) for resource, found in refused.items() for reject in found.values()]

    async def _refused_rows(
        self, connection: AsyncConnection, resource: str, rows: list[Row], now: datetime, run_id: int
    ) -> dict[int, Reject]:
        """Write the rows in savepoints, halving every set the database refuses; returns the rows it refuses alone.

        One version per key first, so that no key is in two halves. An error that is not about the data
        (a lost connection, a deadlock) ends the search: it is raised as it is, and nothing commits.
        """
        writer = self._writers[resource]
        index_of = {id(row): index for index, row in enumerate(rows)}
        refused: dict[int, Reject] = {}
        pending = [writer.latest(rows)]
        while pending:
            part = pending.pop()
            if not part:
                continue
            try:
                async with connection.begin_nested():
                    await writer.write(connection, part, now, run_id, again=True)
            except DRIVER_ERRORS as exc:
                if not refused_data(exc):
                    raise
                if len(part) == 1:
                    refused[index_of[id(part[0])]] = writer.reject(part[0], exc)
                else:
                    pending += [part[len(part) // 2:], part[: len(part) // 2]]
        return dict(sorted(refused.items()))

    async def _write_bookkeeping(self, connection: AsyncConnection, batch: LoadBatch, run_id: int, now: datetime) -> None:
        """Everything of the batch but its rows: rejects, window progress, watermarks and the run's counters."""
        stored = [
            {"run_id": run_id, "resource": resource, "record_key": _storable(reject.key or "", 255) or None,
             "raw": reject.raw, "error": _storable(reject.error, 4000), "rejected_at": now}
            for resource, reject in batch.rejects
        ]
        limit = None if self._max_statement is None else self._max_statement - STATEMENT_HEADROOM
        for part in bounded(stored, lambda reject: statement_bytes(reject.values()), limit):
            await connection.execute(insert(rejects), part)
        for window_id, progress in batch.windows.items():
            await self._advance_window(connection, window_id, progress, run_id, now)
        for mark in batch.watermarks:
            await self._save_watermark(connection, mark, run_id, now)
        await self._count_in_run(connection, batch, run_id)

    @staticmethod
    async def _count_in_run(connection: AsyncConnection, batch: LoadBatch, run_id: int) -> None:
        """The run's counters grow with each commit: a run killed later still shows what it loaded (finish_run sets the totals)."""
        progress = batch.windows.values()
        counts = {"token_requests": batch.token_requests, "requests": batch.requests, "retries": batch.retries}
        known = {name: value for name, value in counts.items() if value is not None}
        await connection.execute(
            update(runs).where(runs.c.id == run_id).values(
                pages=runs.c.pages + sum(window.pages for window in progress),
                records_fetched=runs.c.records_fetched + sum(window.records + window.rejects for window in progress),
                records_loaded=runs.c.records_loaded + batch.row_count,
                records_rejected=runs.c.records_rejected + len(batch.rejects),
                **known,
            )
        )

    async def _write_rows(self, connection: AsyncConnection, resource: str, rows: list[dict[str, Any]], now: datetime, run_id: int) -> None:
        """Upsert one resource's rows of the batch, with the writer made for its table and database."""
        await self._writers[resource].write(connection, rows, now, run_id)

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
            values["max_cursor"] = cursor_text(progress.max_cursor)
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
        except DRIVER_ERRORS as exc:
            raise database_error(exc, self.engine.url) from exc


def _resumable(row: Any, settled_after: timedelta) -> bool:
    """An unfinished window, or one finished at least `settled_after` past its end."""
    if row.state == "superseded":
        return False
    return row.state != "done" or row.window_end is None or row.updated_at >= row.window_end + settled_after


def _older(candidate: Any, current: Any) -> bool:
    if candidate is None or current is None:
        return False
    try:
        return bool(candidate < current)
    except TypeError:
        return False


def newest_cursor(a: Any, b: Any) -> Any:
    """The higher of two cursors, one of which may have come back from its text in etl_watermarks/etl_windows."""
    if a is None:
        return b
    if b is None:
        return a
    try:
        return max(a, b)
    except TypeError:
        pass
    try:
        return a if _comparable(a) > _comparable(b) else b
    except (TypeError, InvalidOperation):  # still apart (a NaN): the newer one, as before
        return b


def _comparable(cursor: Any) -> Any:
    """A cursor in a form its stored text compares with: a date column's '2024-03-12' comes back as a datetime,
    a decimal or float column's '10.5' as text; compared as they were, the watermark took the lower one."""
    if isinstance(cursor, datetime):
        return cursor
    if isinstance(cursor, date):
        return datetime(cursor.year, cursor.month, cursor.day, tzinfo=UTC)
    if isinstance(cursor, (int, float)) and not isinstance(cursor, bool):
        return Decimal(str(cursor))
    if isinstance(cursor, str):
        try:
            return Decimal(cursor)
        except InvalidOperation:
            return cursor
    return cursor


def upsert_statement(
    dialect: str, table: Table, key: list[str], cursor: str | None, source: Select[Any] | None = None, instant: bool = False
) -> Insert:
    """INSERT … ON CONFLICT / ON DUPLICATE KEY UPDATE that never lets an older version replace a newer one.

    Every column but the key is replaced (there are always etl's own two), when
    the incoming cursor is not older than the stored one. `source` (PostgreSQL)
    inserts the rows of a SELECT instead of VALUES. An `instant` (datetime) cursor
    is not held as newer when it was later than its row's `_etl_loaded_at`: stamped
    in the future (bad data, an API's clock ahead), it would keep out the API's
    correction for good, and a record's future version is read again once its time comes.
    """
    others = [column for column in table.columns if column.name not in key]
    if dialect in ("sqlite", "postgresql"):
        statement = (sqlite if dialect == "sqlite" else postgresql).insert(table)
        if source is not None:
            statement = statement.from_select([column.name for column in table.columns], source)
        newer = None
        if cursor is not None:
            old: ColumnElement[Any] = table.c[cursor]
            new: ColumnElement[Any] = statement.excluded[cursor]
            if dialect == "sqlite" and isinstance(old.type, ExactDecimal):  # stored as text, where '10.25' < '9.5'
                old, new = cast(old, Float), cast(new, Float)
            newer = _newer(old, new, table.c[LOADED_AT] if instant else None)
        return statement.on_conflict_do_update(
            index_elements=key, set_={column.name: statement.excluded[column.name] for column in others}, where=newer
        )
    if dialect == "mysql":
        statement = mysql.insert(table)
        if cursor is None:
            return statement.on_duplicate_key_update([(column.name, statement.inserted[column.name]) for column in others])
        newer = _newer(table.c[cursor], statement.inserted[cursor], table.c[LOADED_AT] if instant else None)
        # MySQL assigns left to right and later assignments see earlier ones: the cursor column goes last, but for
        # _etl_loaded_at after it, which the test reads too (once the cursor is the new one, new >= old holds).
        ordered = sorted(others, key=lambda column: (column.name == LOADED_AT and instant, column.name == cursor))
        return statement.on_duplicate_key_update(
            [(column.name, func.if_(newer, statement.inserted[column.name], column)) for column in ordered]
        )
    raise LoadError(f"no upsert for the {dialect} dialect")


def _newer(old: ColumnElement[Any], new: ColumnElement[Any], loaded_at: ColumnElement[Any] | None) -> ColumnElement[bool]:
    """Whether the incoming version replaces the stored one: not older by the cursor, or the stored cursor was in
    the future when it was loaded (only for a datetime cursor, compared with `loaded_at`)."""
    newer = or_(old.is_(None), new.is_(None), new >= old)
    return newer if loaded_at is None else or_(newer, old > loaded_at)


Row = dict[str, Any]
Item = TypeVar("Item")


async def _max_statement(connection: AsyncConnection) -> int | None:
    """On MySQL/MariaDB, the server's max_allowed_packet when it is below the driver's own cut of a multi-row INSERT.

    aiomysql sends an executemany as INSERTs of up to 1,024,000 bytes (`Cursor.max_stmt_length`): that fits
    any server's packet of 1 MB or more. Below that (a hosted server set to 512 KB), every batch of more than
    the packet's worth of rows was cut off with error 2013, though no record came near the limit.
    """
    if connection.dialect.name != "mysql":
        return None
    import aiomysql  # here: the driver of MySQL alone, ~10 MB that a SQLite or PostgreSQL run does not need

    packet = int((await connection.exec_driver_sql("SELECT @@max_allowed_packet")).scalar_one())
    return packet if packet <= aiomysql.Cursor.max_stmt_length else None


def statement_bytes(values: Iterable[Any]) -> int:
    """At least the bytes that values take in a MySQL statement: a character is at most 4 bytes in UTF-8,
    or 2 escaped; any other value (a number, a date, NULL) fewer than 48."""
    return sum(4 * len(value) + 3 if isinstance(value, str) else 48 for value in values)


def bounded(items: list[Item], size: Callable[[Item], int], limit: int | None) -> Iterator[list[Item]]:
    """The items in consecutive parts of at most `limit` in all (an item larger than that alone); all in one without
    a limit, and no part for no items (an executemany of none would be an execute)."""
    if limit is None:
        if items:
            yield items
        return
    part: list[Item] = []
    total = 0
    for item in items:
        item_size = size(item)
        if part and total + item_size > limit:
            yield part
            part, total = [], 0
        part.append(item)
        total += item_size
    if part:
        yield part


def latest_versions(rows: list[Row], key: Callable[[Row], Any], cursor: str | None) -> list[Row]:
    """One row per key: the highest cursor, else the last seen; one statement must never meet a key twice."""
    keys = list(map(key, rows))
    if len(set(keys)) == len(keys):
        return rows
    kept: dict[Any, Row] = {}
    for row_key, row in zip(keys, rows, strict=True):
        previous = kept.get(row_key)
        if previous is None or cursor is None or not _older(row.get(cursor), previous.get(cursor)):
            kept[row_key] = row
    return list(kept.values())


class RowWriter(ABC):
    """Upserts the validated rows of one resource, converted column by column into driver values.

    Whole columns converted by plain functions (etl.sqltypes.driver_column),
    then sent as tuples with a statement compiled once: SQLAlchemy's per-row,
    per-value bind processing would otherwise be most of a load's time.
    """

    def __init__(self, dialect: Dialect, resource: ResourceConfig, names: list[str]) -> None:
        self.names = names  # the order in which the statement takes its values
        self._resource = resource.name
        self._json_columns = {name for name, spec in resource.columns.items() if spec.type == "json"}
        self._primary_key = resource.primary_key
        self._key = operator.itemgetter(*resource.primary_key)
        self._cursor = _cursor_column(resource)
        self._stamp = driver_value("datetime", dialect.name) or to_utc
        self._converters = {
            name: convert
            for name, spec in resource.columns.items()
            if (convert := driver_column(spec.type, dialect.name)) is not None
        }
        self._converters |= {
            name: convert for name in resource.primary_key if (convert := key_column(resource.columns[name].type, dialect.name)) is not None
        }

    @abstractmethod
    async def write(self, connection: AsyncConnection, rows: list[Row], now: datetime, run_id: int, again: bool = False) -> None:
        """Upsert the rows inside the caller's transaction; `again` when it has written rows before."""

    def latest(self, rows: list[Row]) -> list[Row]:
        """One row per key, the version an upsert of them all would keep."""
        return latest_versions(rows, self._key, self._cursor)

    def reject(self, row: Row, refusal: BaseException) -> Reject:
        """A row the database refused, as a reject: its key as records.Reject gives it, the row as JSON."""
        key = key_text(row.get(name) for name in self._primary_key)
        reason = driver_message(refusal) + self._json_check_reason(refusal)
        return Reject(key=key, raw=jsonnumbers.dumps(row).decode(), error=f"{REFUSED}: {reason}")

    def _json_check_reason(self, refusal: BaseException) -> str:
        """What MariaDB's "CONSTRAINT `items.doc` failed" (4025) means on a json column: its JSON_VALID check, which
        refuses only JSON nested too deep, as etl writes valid JSON. Its own words named neither that nor a remedy."""
        original = getattr(refusal, "orig", None) or refusal
        if not original.args or original.args[0] != MARIADB_CHECK_FAILED:
            return ""
        found = re.search(r"CONSTRAINT `(?:[^`]*\.)?([^`.]+)` failed", str(original.args[-1]))
        column = found.group(1) if found else None
        if column not in self._json_columns:
            return ""
        return (f" (MariaDB checks a json column with JSON_VALID, which refuses JSON nested 32 levels or more; declare "
                f"resources.{self._resource}.columns.{column} as text to keep such values as they come)")

    def parameters(self, rows: list[Row], now: datetime, run_id: int) -> list[tuple[Any, ...]]:
        """One tuple per key (its latest version) in `names` order, etl's columns included."""
        rows = self.latest(rows)
        constants = {LOADED_AT: self._stamp(now), RUN_ID: run_id}
        columns = [
            repeat(constants[name], len(rows)) if name in constants else self._column(rows, name) for name in self.names
        ]
        return list(zip(*columns, strict=True))

    def _column(self, rows: list[Row], name: str) -> list[Any]:
        values = [row.get(name) for row in rows]
        convert = self._converters.get(name)
        return values if convert is None else convert(values)


class ExecutemanyWriter(RowWriter):
    """SQLite and MySQL: the upsert compiled once, run with executemany (aiomysql sends multi-row INSERTs).

    With `max_statement` (a MySQL server whose max_allowed_packet is below aiomysql's own cut), the rows go
    in as many executemany calls as keep each statement within it, by an upper bound of their bytes.
    """

    def __init__(self, dialect: Dialect, resource: ResourceConfig, table: Table, max_statement: int | None = None) -> None:
        upsert = upsert_statement(dialect.name, table, resource.primary_key, _cursor_column(resource), instant=_instant_cursor(resource))
        compiled = upsert.compile(dialect=dialect)
        super().__init__(dialect, resource, list(compiled.positiontup or []))
        self._sql = str(compiled)
        self._row_limit = None if max_statement is None else max_statement - len(self._sql.encode()) - STATEMENT_HEADROOM

    async def write(self, connection: AsyncConnection, rows: list[Row], now: datetime, run_id: int, again: bool = False) -> None:
        for part in bounded(self.parameters(rows, now, run_id), statement_bytes, self._row_limit):
            await connection.exec_driver_sql(self._sql, part)


class CopyWriter(RowWriter):
    """PostgreSQL: COPY into a temporary stage table, then one INSERT … SELECT … ON CONFLICT.

    Columns the loader turns into text (decimals, datetimes, JSON) are text in
    the stage and cast by the server in the SELECT, and etl's two columns are
    one parameter each: asyncpg's binary encoding of numeric and timestamptz
    took more time than COPY itself. The stage lives as long as the session
    and empties at every commit; its name carries a digest of the columns and
    their types, so a changed table gets a new stage. The first statement goes
    through SQLAlchemy, which opens the transaction the raw COPY then joins.
    A write `again` in the same transaction (only when rows are isolated after
    a refusal) empties the stage first: the rows of the last write are still there.
    """

    def __init__(self, dialect: Dialect, resource: ResourceConfig, table: Table) -> None:
        declared = [column for column in table.columns if column.name in resource.columns]
        super().__init__(dialect, resource, [column.name for column in declared])
        shape = [table.name, *(f"{name}:{resource.columns[name].type}" for name in self.names)]
        digest = hashlib.blake2b("\0".join(shape).encode(), digest_size=8).hexdigest()
        self._stage = f"_etl_stage_{digest}"
        stage = Table(
            self._stage, MetaData(),
            *(Column(column.name, Text() if column.name in self._converters else column.type) for column in declared),
            prefixes=["TEMPORARY"], postgresql_on_commit="DELETE ROWS",
        )
        self._create = str(CreateTable(stage, if_not_exists=True).compile(dialect=dialect))
        self._empty = f"DELETE FROM {dialect.identifier_preparer.quote(self._stage)}"
        source = select(
            *(cast(stage.c[column.name], column.type) if column.name in self._converters else stage.c[column.name]
              for column in declared),
            bindparam(LOADED_AT, type_=DateTime(timezone=True)),
            bindparam(RUN_ID, type_=BigInteger()),
        )
        upsert = upsert_statement(dialect.name, table, resource.primary_key, _cursor_column(resource), source, _instant_cursor(resource))
        merge = upsert.compile(dialect=dialect)
        self._merge = str(merge)
        self._merge_parameters = list(merge.positiontup or [])

    async def write(self, connection: AsyncConnection, rows: list[Row], now: datetime, run_id: int, again: bool = False) -> None:
        records = self.parameters(rows, now, run_id)
        await connection.exec_driver_sql(self._create)
        if again:
            await connection.exec_driver_sql(self._empty)
        driver = cast_to(asyncpg.Connection, (await connection.get_raw_connection()).driver_connection)
        await driver.copy_records_to_table(self._stage, records=records, columns=self.names)
        constants = {LOADED_AT: to_utc(now), RUN_ID: run_id}
        await connection.exec_driver_sql(self._merge, tuple(constants[name] for name in self._merge_parameters))


def row_writer(dialect: Dialect, resource: ResourceConfig, table: Table, max_statement: int | None = None) -> RowWriter:
    """The fastest way each database takes a batch; `max_statement` bounds a MySQL statement's bytes.

    On PostgreSQL, COPY + INSERT … SELECT loads 1M rows in 5,000-row batches at
    ~120,000 rows/s, where executemany of the upsert managed ~71,000 (bench/bench_load.py).
    """
    if dialect.name == "postgresql":
        return CopyWriter(dialect, resource, table)
    return ExecutemanyWriter(dialect, resource, table, max_statement)


def _shortened(text: str, limit: int = 80) -> str:
    """A value for a log line: a key of four 255-character strings filled a kilobyte of it."""
    return text if len(text) <= limit else text[:limit] + "…"


def _storable(text: str, limit: int) -> str:
    """Text every database stores, within the column's length: U+0000 and a lone surrogate as their
    escapes (\\u0000, \\ud800). A reject's key or error the database refused failed the batch of every run."""
    return escape_lone_surrogates(text).replace("\x00", "\\u0000")[:limit]


def _new_id(result: CursorResult[Any]) -> int:
    """The id the database gave the row just inserted."""
    key = result.inserted_primary_key
    if key is None:
        raise LoadError("the database did not say which id it gave the new row")
    return int(key[0])


def _cursor_column(resource: ResourceConfig) -> str | None:
    return resource.cursor_field if resource.cursor_field in resource.columns else None


def _instant_cursor(resource: ResourceConfig) -> bool:
    """Whether the cursor column holds instants, which compare with `_etl_loaded_at`."""
    cursor = _cursor_column(resource)
    return cursor is not None and resource.columns[cursor].type == "datetime"
