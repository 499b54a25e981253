"""Cursor values of any length in etl_watermarks.watermark and etl_windows.max_cursor.

0001 made both VARCHAR(64): a string cursor_field longer than that (an opaque
version stamp, a composite sort key) was refused by PostgreSQL and MariaDB in
the bookkeeping of every batch, and every run failed with "value too long"
though each record was valid. SQLite does not enforce a VARCHAR's length.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("etl_watermarks", "watermark"), ("etl_windows", "max_cursor"))


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.Text(), existing_type=sa.String(64), existing_nullable=True)


def downgrade() -> None:
    """Back to VARCHAR(64): a longer value stored since is cut to its first 64 characters."""
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, column in COLUMNS:
        op.execute(sa.text(f"UPDATE {table} SET {column} = SUBSTRING({column}, 1, 64)"))
        op.alter_column(table, column, type_=sa.String(64), existing_type=sa.Text(), existing_nullable=True)
