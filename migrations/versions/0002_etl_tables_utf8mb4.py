"""etl's tables in utf8mb4 on MySQL/MariaDB, whatever the database's default character set.

A database created latin1 (MySQL 5.7's default, and many a MariaDB's) made
0001's tables refuse a reject whose raw record holds an emoji, failing the
whole batch. The binary collation compares text as PostgreSQL and SQLite do.
SQLite and PostgreSQL store any Unicode already: nothing to do there.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("etl_runs", "etl_watermarks", "etl_windows", "etl_rejects", "etl_resource_columns")


def upgrade() -> None:
    if op.get_bind().dialect.name != "mysql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")


def downgrade() -> None:
    """Nothing: going back to a narrower character set could only lose characters."""
