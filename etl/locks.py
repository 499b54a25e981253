"""One run at a time per database and resource, with locks the operating system or server releases.

PostgreSQL advisory locks and MySQL GET_LOCK belong to a connection, and an
flock (SQLite) to a process: when a run is killed, its locks go with it, so
nobody ever has to clean up by hand. The lock is taken before anything is
written and held until the run has recorded its end.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from etl.db import DRIVER_ERRORS, advisory_key, database_error, mysql_lock_name, sqlite_file
from etl.durations import isoformat_utc
from etl.errors import LockHeld
from etl.schema import runs

HOLDER_WAIT_SECONDS = 5.0


def process_gone(host: str, pid: int | None) -> bool:
    """Whether a process recorded on this host no longer exists: its run was killed (kill -9, OOM) or crashed.

    A process on another host, or another user's (PermissionError), cannot be told apart from a live one: not gone.
    """
    if host != socket.gethostname() or not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


async def _outside_a_transaction(connection: AsyncConnection, sql: str, parameters: dict[str, Any]) -> Any:
    """Run a lock statement and commit: the lock is the session's and outlives the transaction, while a connection
    left idle in one for the whole run was closed by PostgreSQL's idle_in_transaction_session_timeout (a usual
    setting on managed servers), and the lock went with it: the next cron run started beside this one."""
    value = await connection.scalar(text(sql), parameters)
    await connection.commit()
    return value


class ResourceLocks:
    """`async with ResourceLocks(engine, ["orders"]):` or LockHeld (exit 4) naming the holder."""

    def __init__(self, engine: AsyncEngine, resources: list[str]) -> None:
        self._engine = engine
        self._resources = sorted(set(resources))
        self._connection: AsyncConnection | None = None
        self._files: list[IO[bytes]] = []

    async def __aenter__(self) -> ResourceLocks:
        await self.acquire()
        return self

    async def acquire(self) -> None:
        """Every resource's lock, or none and LockHeld naming the holder."""
        dialect = self._engine.dialect.name
        try:
            for resource in self._resources:
                if not await self._acquire(dialect, resource):
                    raise LockHeld(await self._holder_message(resource))
        except BaseException:
            await self.release()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.release()

    async def _acquire(self, dialect: str, resource: str) -> bool:
        """False when another run holds the lock; the lock is the run's first contact with the database, so a
        server that is down or a SQLite directory that does not exist surfaces here, as etl's LoadError."""
        try:
            if dialect == "postgresql":
                connection = await self._lock_connection()
                # advisory locks are per database: the schema etl's tables are in (search_path) is part of the key
                schema = await connection.scalar(text("SELECT current_schema()")) or ""
                key = advisory_key(f"{schema}.{resource}")
                return bool(await _outside_a_transaction(connection, "SELECT pg_try_advisory_lock(:key)", {"key": key}))
            if dialect == "mysql":
                connection = await self._lock_connection()
                name = mysql_lock_name(self._engine.url.database or "", resource)
                return await _outside_a_transaction(connection, "SELECT GET_LOCK(:name, 0)", {"name": name}) == 1
            return self._flock(resource)
        except DRIVER_ERRORS as exc:
            raise database_error(exc, self._engine.url) from exc

    async def _lock_connection(self) -> AsyncConnection:
        """A connection kept open for the whole run: the server drops its locks when it closes."""
        if self._connection is None:
            self._connection = await self._engine.connect()
            await self._connection.commit()
        return self._connection

    def _flock(self, resource: str) -> bool:
        database = sqlite_file(self._engine.url)
        if database is None:
            return True
        directory = Path(os.path.realpath(database) + ".locks")  # one lock per file, however a symlink names it
        directory.mkdir(exist_ok=True)
        handle = open(directory / f"{resource}.lock", "a+b")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._files.append(handle)
        return True

    async def _holder_message(self, resource: str) -> str:
        """Who holds the lock, from etl_runs: the newest live run still marked running on that resource."""
        holder, alive = await self._holder(resource)
        message = f"another run holds the lock for resource {resource!r} on this database"
        if holder is not None:
            message += (
                f": run {holder.id} ({holder.command}, pid {holder.pid} on {holder.host}) "
                f"since {isoformat_utc(holder.started_at)}"
            )
            if not alive:
                message += " (its process has ended, but the database server has not yet dropped its session)"
        return message + "; this run exits without doing anything (it is safe to run again later)"

    async def _holder(self, resource: str) -> tuple[Any, bool]:
        """The holder takes its lock before it records its run (on a new database, before etl_runs exists):
        a run started at the same moment waits a little for that row, rather than name nobody or a dead run.
        Only when no live one appears is a dead one named: its session may outlive it (a host that vanished)."""
        deadline = time.monotonic() + HOLDER_WAIT_SECONDS
        while True:
            candidates = await self._running(resource)
            live = [row for row in candidates if not process_gone(row.host, row.pid)]
            if live:
                return live[0], True
            if time.monotonic() >= deadline:
                return (candidates[0] if candidates else None), False
            await asyncio.sleep(0.1)

    async def _running(self, resource: str) -> list[Any]:
        """The runs marked running on the resource, newest first."""
        try:
            async with self._engine.connect() as connection:
                rows = await connection.execute(
                    select(runs.c.id, runs.c.pid, runs.c.host, runs.c.started_at, runs.c.command, runs.c.resources)
                    .where(runs.c.status == "running")
                    .order_by(runs.c.id.desc())
                )
                return [row for row in rows if resource in row.resources.split(",")]
        except Exception:  # noqa: BLE001 - the table may not exist yet; the message does without it
            return []

    async def release(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            # Closing the DBAPI connection, not returning it to the pool, is what releases server-side locks.
            await connection.invalidate()
            await connection.close()
