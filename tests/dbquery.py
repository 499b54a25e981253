"""Reading a test's database: any dialect through etl's engine, SQLite also synchronously.

The synchronous form reads SQLite while a subprocess is writing to it (WAL lets it).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Row, text

from etl.db import create_engine


async def rows(url: str, sql: str) -> list[Row[Any]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return list((await connection.execute(text(sql))).all())
    finally:
        await engine.dispose()


async def scalar(url: str, sql: str) -> Any:
    found = await rows(url, sql)
    return found[0][0] if found else None


def sqlite_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as connection:
        return connection.execute(sql).fetchall()
