"""Alembic environment for etl's own `etl_*` tables.

`python -m etl migrate` (and `sync`/`backfill` with auto_migrate) hand an open
connection in `config.attributes["connection"]`. Run by hand (`alembic upgrade
head` with alembic.ini), the URL comes from $ETL_DATABASE_URL or config.toml.
The version table is `etl_alembic_version`, so a database whose own
application uses Alembic keeps its `alembic_version` untouched.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from etl.schema import metadata

VERSION_TABLE = "etl_alembic_version"


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url() -> None:
    from etl.config import config_path, load_config
    from etl.db import create_engine

    engine = create_engine(load_config(config_path(None)).database.url)
    async with engine.begin() as connection:
        await connection.run_sync(run_migrations)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    asyncio.run(run_from_url())
