"""Column types that store exactly what was validated, on every dialect.

SQLite has no decimal and no time zone: decimals are stored as text (never
through float) and datetimes as ISO-8601 text in UTC with its `+00:00`, so
`sqlite3 etl.db` shows them as they are and text order is time order. MySQL
keeps naive DATETIME(6), written and read as UTC. PostgreSQL has both natively.

SQLAlchemy writes etl's own tables through the TypeDecorators below; the bulk
loader (etl.store) hands resource rows to the driver itself, a column at a
time, through `driver_column`, which writes the same text and values.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import JSON, BigInteger, Boolean, Date, Double, Integer, Numeric, String, Text
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.types import DateTime, TypeDecorator, TypeEngine

from etl import jsonnumbers

DECIMAL_DIGITS = 38
DECIMAL_PLACES = 10
MYSQL_DECIMAL = mysql.DECIMAL(precision=DECIMAL_DIGITS, scale=DECIMAL_PLACES)


class SqliteDecimalText(String):
    """Declared `DECIMAL_TEXT`: TEXT affinity (a NUMERIC column would turn 123.40 into a float)."""


class SqliteUtcText(String):
    """Declared `DATETIME_UTC_TEXT`: ISO-8601 text in UTC, readable as it is."""


class SqliteJsonText(JSON):
    """Declared `JSON_TEXT`: TEXT affinity. `JSON` has NUMERIC affinity in SQLite, which stored a bare
    number such as 12345678901234567890123 as a rounded float; sqlite's json functions read the text alike."""


@compiles(SqliteDecimalText, "sqlite")
def _decimal_text(type_: SqliteDecimalText, compiler: Any, **kw: Any) -> str:
    return "DECIMAL_TEXT"


@compiles(SqliteUtcText, "sqlite")
def _utc_text(type_: SqliteUtcText, compiler: Any, **kw: Any) -> str:
    return "DATETIME_UTC_TEXT"


@compiles(SqliteJsonText, "sqlite")
def _json_text(type_: SqliteJsonText, compiler: Any, **kw: Any) -> str:
    return "JSON_TEXT"


def to_utc(moment: datetime) -> datetime:
    """Aware and in UTC; naive means UTC, as everywhere in etl."""
    if moment.tzinfo is UTC:
        return moment
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _sqlite_datetime(moment: datetime) -> str:
    return to_utc(moment).isoformat(sep=" ")


def _mysql_datetime(moment: datetime) -> datetime:
    return to_utc(moment).replace(tzinfo=None)


def _plain_decimal(value: Decimal) -> str:
    """Positional digits (0.0000000001, 100000), never str()'s exponent (1E-10, 1E+5), for whoever reads the text.

    str() first: it is positional for nearly every value, and format() costs 2.7 times as much.
    """
    text = str(value)
    return text if "E" not in text else format(value, "f")


def key_decimal_text(value: Decimal) -> str:
    """A decimal key on SQLite, one text per number: 1, 1.0 and 1.00 are one key on the other databases,
    but SQLite's text key held them as three rows."""
    return "0" if value.is_zero() else _plain_decimal(value.normalize())


def json_text(value: Any) -> str:
    """JSON text with every digit of its numbers (etl.jsonnumbers)."""
    return jsonnumbers.dumps(value).decode()


_DRIVER_VALUES: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("datetime", "sqlite"): _sqlite_datetime,
    ("datetime", "mysql"): _mysql_datetime,
    ("datetime", "postgresql"): to_utc,
    ("decimal", "sqlite"): _plain_decimal,
    ("date", "sqlite"): date.isoformat,
    # asyncpg sends 0001-01-01 and 9999-12-31 as -infinity and infinity; as text they stay dates
    ("date", "postgresql"): date.isoformat,
    ("json", "sqlite"): json_text,
    ("json", "mysql"): json_text,
    ("json", "postgresql"): json_text,
}


def driver_value(declared: str, dialect: str) -> Callable[[Any], Any] | None:
    """How one validated, non-NULL value of a column type is handed to the driver; None: as it is."""
    return _DRIVER_VALUES.get((declared, dialect))


ColumnConverter = Callable[[list[Any]], list[Any]]


def _each(convert: Callable[[Any], Any]) -> ColumnConverter:
    def column(values: list[Any]) -> list[Any]:
        return [None if value is None else convert(value) for value in values]

    return column


def _all_utc(values: list[datetime | None]) -> bool:
    return all(value.tzinfo is UTC for value in values if value is not None)


def _utc_datetimes(values: list[datetime | None]) -> list[datetime | None]:
    return values if _all_utc(values) else _each(to_utc)(values)


def _iso_datetimes(values: list[datetime | None]) -> list[str | None]:
    """ISO-8601 text in UTC (`2024-01-01T10:00:00.5+00:00`) for a whole column, formatted by orjson in Rust."""
    return orjson.loads(orjson.dumps(_utc_datetimes(values)))


def _sqlite_datetimes(values: list[datetime | None]) -> list[str | None]:
    """The text `_sqlite_datetime` writes, for a whole column at once, seven times faster.

    The orjson array holds nothing but datetimes and nulls, so its only `T`s
    are the date/time separators, swapped for the space of `isoformat(sep=" ")`.
    """
    return orjson.loads(orjson.dumps(_utc_datetimes(values)).replace(b"T", b" "))


_DRIVER_COLUMNS: dict[tuple[str, str], ColumnConverter] = {
    ("datetime", "sqlite"): _sqlite_datetimes,
    # On PostgreSQL every converter yields text, which etl.store.CopyWriter stages as text and the
    # server casts: asyncpg's binary encoders for numeric and timestamptz cost 0.5-0.8 µs a value.
    ("datetime", "postgresql"): _iso_datetimes,
    ("decimal", "postgresql"): _each(str),
}


def driver_column(declared: str, dialect: str) -> ColumnConverter | None:
    """How a column of validated values (NULLs included) is handed to the driver; None: as it is.

    The bulk loader converts whole columns with these instead of SQLAlchemy's
    per-value bind processing; they write what the TypeDecorators below write.
    """
    if (declared, dialect) in _DRIVER_COLUMNS:
        return _DRIVER_COLUMNS[(declared, dialect)]
    convert = driver_value(declared, dialect)
    return None if convert is None else _each(convert)


def key_column(declared: str, dialect: str) -> ColumnConverter | None:
    """How a primary-key column goes to the driver where it differs from `driver_column`: a key must
    compare as the number it is, and SQLite compares the decimal text."""
    return _each(key_decimal_text) if (declared, dialect) == ("decimal", "sqlite") else None


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
        convert = driver_value("datetime", dialect.name) or to_utc
        return None if value is None else convert(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return to_utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


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
        convert = driver_value("decimal", dialect.name)
        return value if value is None or convert is None else convert(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None or isinstance(value, Decimal):
            return value
        return Decimal(str(value))


def column_type(declared: str) -> TypeEngine[Any]:
    """The SQLAlchemy type of a `[resources.columns]` type name."""
    types: dict[str, TypeEngine[Any]] = {
        "string": String(255),
        "text": Text().with_variant(mysql.LONGTEXT(), "mysql"),
        "integer": Integer(),
        "bigint": BigInteger(),
        "float": Double(),
        "decimal": ExactDecimal(),
        "boolean": Boolean(create_constraint=False),
        "date": Date(),
        "datetime": UtcDateTime(),
        "json": JSON(none_as_null=True)
        .with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
        .with_variant(SqliteJsonText(none_as_null=True), "sqlite"),
    }
    return types[declared]
