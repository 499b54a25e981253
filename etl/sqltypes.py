"""Column types that store exactly what was validated, on every dialect.

SQLite has no decimal and no time zone: decimals are stored as text (never
through float) and datetimes as ISO-8601 text in UTC with its `+00:00`, so
`sqlite3 etl.db` shows them as they are and text order is time order. MySQL
keeps naive DATETIME(6), written and read as UTC. PostgreSQL has both natively.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Date, Double, Integer, Numeric, String, Text
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.types import DateTime, TypeDecorator, TypeEngine

MYSQL_DECIMAL = mysql.DECIMAL(precision=38, scale=10)


class SqliteDecimalText(String):
    """Declared `DECIMAL_TEXT`: TEXT affinity (a NUMERIC column would turn 123.40 into a float)."""


class SqliteUtcText(String):
    """Declared `DATETIME_UTC_TEXT`: ISO-8601 text in UTC, readable as it is."""


@compiles(SqliteDecimalText, "sqlite")
def _decimal_text(type_: SqliteDecimalText, compiler: Any, **kw: Any) -> str:
    return "DECIMAL_TEXT"


@compiles(SqliteUtcText, "sqlite")
def _utc_text(type_: SqliteUtcText, compiler: Any, **kw: Any) -> str:
    return "DATETIME_UTC_TEXT"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored as UTC and always read back aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(SqliteUtcText())
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.isoformat(sep=" ")
        if dialect.name == "mysql":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ExactDecimal(TypeDecorator[Decimal]):
    """A decimal that never passes through float: NUMERIC, DECIMAL(38,10) on MySQL, text on SQLite."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(SqliteDecimalText())
        if dialect.name == "mysql":
            return dialect.type_descriptor(MYSQL_DECIMAL)
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return str(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(str(value)) if not isinstance(value, Decimal) else value


def column_type(declared: str) -> TypeEngine[Any]:
    """The SQLAlchemy type of a `[resources.columns]` type name."""
    return {
        "string": String(255),
        "text": Text().with_variant(mysql.LONGTEXT(), "mysql"),
        "integer": Integer(),
        "bigint": BigInteger(),
        "float": Double(),
        "decimal": ExactDecimal(),
        "boolean": Boolean(create_constraint=False),
        "date": Date(),
        "datetime": UtcDateTime(),
        "json": JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql"),
    }[declared]
