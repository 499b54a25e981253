"""etl's bookkeeping tables: runs, watermarks, windows, rejects, declared columns.

MySQL and MariaDB commit each CREATE on its own: a first migration killed half-way
leaves some tables and no version row, and every later run failed on "table
etl_runs already exists". So each table and index is created only when absent,
and running this again completes what was cut short. (SQLite and PostgreSQL roll
the whole migration back instead.)

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from etl.sqltypes import UtcDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql")


def _create_table(name: str, *columns: sa.Column[Any]) -> None:
    if not sa.inspect(op.get_bind()).has_table(name):
        op.create_table(name, *columns)


def _create_index(name: str, table: str, columns: list[str]) -> None:
    if name not in {index["name"] for index in sa.inspect(op.get_bind()).get_indexes(table)}:
        op.create_index(name, table, columns)


def upgrade() -> None:
    _create_table(
        "etl_runs",
        sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("command", sa.String(32), nullable=False),
        sa.Column("arguments", sa.Text, nullable=False),
        sa.Column("resources", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("ended_at", UtcDateTime),
        sa.Column("pages", sa.BigInteger, nullable=False),
        sa.Column("records_fetched", sa.BigInteger, nullable=False),
        sa.Column("records_loaded", sa.BigInteger, nullable=False),
        sa.Column("records_rejected", sa.BigInteger, nullable=False),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("retries", sa.BigInteger, nullable=False),
        sa.Column("token_requests", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
    )
    _create_table(
        "etl_watermarks",
        sa.Column("resource", sa.String(63), primary_key=True),
        sa.Column("watermark", sa.String(64)),
        sa.Column("synced_until", UtcDateTime),
        sa.Column("run_id", sa.BigInteger),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    _create_table(
        "etl_windows",
        sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("resource", sa.String(63), nullable=False),
        sa.Column("window_start", UtcDateTime),
        sa.Column("window_end", UtcDateTime),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("position", sa.Text),
        sa.Column("pages", sa.Integer, nullable=False),
        sa.Column("records", sa.BigInteger, nullable=False),
        sa.Column("rejects", sa.BigInteger, nullable=False),
        sa.Column("max_cursor", sa.String(64)),
        sa.Column("run_id", sa.BigInteger),
        sa.Column("error", sa.Text),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    _create_index("ix_etl_windows_lookup", "etl_windows", ["kind", "resource", "window_start"])
    _create_table(
        "etl_rejects",
        sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("resource", sa.String(63), nullable=False),
        sa.Column("record_key", sa.String(255)),
        sa.Column("raw", LONG_TEXT, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("rejected_at", UtcDateTime, nullable=False),
    )
    _create_index("ix_etl_rejects_resource_run", "etl_rejects", ["resource", "run_id"])
    _create_table(
        "etl_resource_columns",
        sa.Column("table_name", sa.String(63), primary_key=True),
        sa.Column("column_name", sa.String(63), primary_key=True),
        sa.Column("declared_type", sa.String(16), nullable=False),
        sa.Column("key_position", sa.Integer),
    )


def downgrade() -> None:
    for table in ("etl_resource_columns", "etl_rejects", "etl_windows", "etl_watermarks", "etl_runs"):
        op.drop_table(table)
