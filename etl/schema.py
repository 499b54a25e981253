"""The tables etl writes: its own `etl_*` bookkeeping and one table per resource.

The `etl_*` tables are created and changed only by the Alembic migrations in
`migrations/`; the definitions here are what the code queries and must match
the latest revision (a test checks this). Resource tables follow
`[resources.columns]` and evolve additively: a new column is added, a changed
type or key stops the run with a message instead of rewriting data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    delete,
    inspect,
    literal,
    select,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, Inspector
from sqlalchemy.engine.interfaces import ReflectedColumn
from sqlalchemy.exc import OperationalError
from sqlalchemy.types import TypeEngine

from etl.config import ResourceConfig
from etl.errors import ConfigError
from etl.sqltypes import UtcDateTime, column_type

log = logging.getLogger(__name__)

metadata = MetaData()
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql")
AutoId = BigInteger().with_variant(Integer(), "sqlite")

runs = Table(
    "etl_runs",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("command", String(32), nullable=False),
    Column("arguments", Text, nullable=False),
    Column("resources", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("ended_at", UtcDateTime),
    Column("pages", BigInteger, nullable=False, default=0),
    Column("records_fetched", BigInteger, nullable=False, default=0),
    Column("records_loaded", BigInteger, nullable=False, default=0),
    Column("records_rejected", BigInteger, nullable=False, default=0),
    Column("requests", BigInteger, nullable=False, default=0),
    Column("retries", BigInteger, nullable=False, default=0),
    Column("token_requests", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
)

watermarks = Table(
    "etl_watermarks",
    metadata,
    Column("resource", String(63), primary_key=True),
    Column("watermark", Text),
    Column("synced_until", UtcDateTime),
    Column("run_id", BigInteger),
    Column("updated_at", UtcDateTime, nullable=False),
)

windows = Table(
    "etl_windows",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("resource", String(63), nullable=False),
    Column("window_start", UtcDateTime),
    Column("window_end", UtcDateTime),
    Column("state", String(16), nullable=False),
    Column("position", Text),
    Column("pages", Integer, nullable=False, default=0),
    Column("records", BigInteger, nullable=False, default=0),
    Column("rejects", BigInteger, nullable=False, default=0),
    Column("max_cursor", Text),
    Column("run_id", BigInteger),
    Column("error", Text),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_etl_windows_lookup", "kind", "resource", "window_start"),
)

rejects = Table(
    "etl_rejects",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("run_id", BigInteger, nullable=False),
    Column("resource", String(63), nullable=False),
    Column("record_key", String(255)),
    Column("raw", LongText, nullable=False),
    Column("error", Text, nullable=False),
    Column("rejected_at", UtcDateTime, nullable=False),
    Index("ix_etl_rejects_resource_run", "resource", "run_id"),
)

resource_columns = Table(
    "etl_resource_columns",
    metadata,
    Column("table_name", String(63), primary_key=True),
    Column("column_name", String(63), primary_key=True),
    Column("declared_type", String(16), nullable=False),
    Column("key_position", Integer),
)

LOADED_AT = "_etl_loaded_at"
RUN_ID = "_etl_run_id"


UNKEYABLE_TYPES = ("text", "json")


def resource_table(resource: ResourceConfig, mysql_collation: str = "utf8mb4_bin") -> Table:
    """The table of a resource, from its columns; names are quoted by SQLAlchemy, never pasted.

    On MySQL the table is utf8mb4 (emoji) with a binary collation (`key_collation`), so that
    keys differing only in case, accents or trailing spaces stay distinct rows, as on the other databases.
    """
    table_metadata = MetaData()
    columns = [
        Column(
            name,
            column_type(spec.type),
            primary_key=name in resource.primary_key,
            autoincrement=False,
            nullable=name not in resource.primary_key,
        )
        for name, spec in resource.columns.items()
    ]
    columns.sort(key=lambda column: (not column.primary_key, resource.primary_key.index(column.name) if column.primary_key else 0))
    return Table(
        resource.table_name,
        table_metadata,
        *columns,
        Column(LOADED_AT, UtcDateTime, nullable=False),
        Column(RUN_ID, BigInteger, nullable=False),
        mysql_charset="utf8mb4",
        mysql_collate=mysql_collation,
    )


def key_collation(dialect: Dialect) -> str:
    """The binary NO PAD collation of the server: utf8mb4_bin is PAD SPACE, where 'A1' and 'A1 ' are one key.

    MySQL 5.7 has no NO PAD collation for utf8mb4: there trailing spaces still compare equal.
    """
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"
    if dialect.name == "mysql" and (dialect.server_version_info or (0,)) >= (8, 0):
        return "utf8mb4_0900_bin"
    return "utf8mb4_bin"


def ensure_resource_table(connection: Connection, resource: ResourceConfig) -> Table:
    """Create the table, or add newly declared columns; a changed type or key the table lacks is exit 2."""
    _check_key_types(resource)
    table = resource_table(resource, key_collation(connection.dialect))
    inspector = inspect(connection)
    if inspector.has_table(table.name):
        declared = _declared_columns(connection, table.name)
        _extend(connection, inspector, table, resource, declared)
    else:  # new, or dropped by its owner: what was declared for an earlier table of that name no longer holds
        connection.execute(delete(resource_columns).where(resource_columns.c.table_name == table.name))
        _forget_loads(connection, resource)  # before the CREATE, which MySQL commits with it
        _create(connection, table, resource)
        declared = {}
    _record_declaration(connection, resource, declared)
    return table


def _extend(
    connection: Connection, inspector: Inspector, table: Table, resource: ResourceConfig, declared: dict[str, Row[Any]]
) -> None:
    """Add the columns declared since the table was made, once the table is found to fit the config."""
    columns = {column["name"]: column for column in inspector.get_columns(table.name)}
    _check_compatible(connection.dialect, inspector, resource, declared, columns)
    _check_case_renames(resource, columns.keys())
    if not any(row.key_position is not None for row in declared.values()):
        _check_key_usable(inspector, resource)
    _check_key_collation(connection, resource)
    _forget_removed(connection, resource, declared, columns.keys())
    added = [column for column in table.columns if column.name not in columns]
    for column in added:
        _add_column(connection, table, column)
    if added and resource.filter is not None and _has_rows(connection, table):
        _warn_added(resource, [column.name for column in added if column.name in resource.columns])


def _forget_removed(connection: Connection, resource: ResourceConfig, declared: dict[str, Row[Any]], in_table: Collection[str]) -> None:
    """A column taken out of `columns` stays in the table as it is: said once, on the run that no longer declares it,
    and forgotten as declared (declared again, it is compared with the table as a column the table already has)."""
    removed = [name for name, row in declared.items()
               if row.key_position is None and name not in resource.columns and name in in_table]
    quote = connection.dialect.identifier_preparer.quote  # `ALTER TABLE Group DROP COLUMN from` ran nowhere
    for name in removed:
        log.warning("%s: column %r of table %r is no longer in resources.%s.columns: etl leaves it as it is, new rows "
                    "hold NULL in it and rows loaded again keep their old value; if it is not wanted, "
                    "ALTER TABLE %s DROP COLUMN %s;", resource.name, name, resource.table_name, resource.name,
                    quote(resource.table_name), quote(name))
    if removed:
        connection.execute(delete(resource_columns).where(
            resource_columns.c.table_name == resource.table_name, resource_columns.c.column_name.in_(removed)))


def _has_rows(connection: Connection, table: Table) -> bool:
    return connection.execute(select(literal(1)).select_from(table).limit(1)).first() is not None


def _warn_added(resource: ResourceConfig, names: list[str]) -> None:
    """Rows loaded before a column was declared hold NULL in it, and a sync reads only what changed since its
    watermark: which run fills them was for the user to guess (a resource without a filter is read whole anyway)."""
    start = resource.start.date().isoformat() if resource.start else "<its first day>"
    for name in names:
        log.warning("%s: column %r added to table %r: the rows loaded before hold NULL in it until they are loaded "
                    "again; `python -m etl backfill --restart --from %s --to <now> --resource %s` reloads them",
                    resource.name, name, resource.table_name, start, resource.name)


def _forget_loads(connection: Connection, resource: ResourceConfig) -> None:
    """A new table holds nothing, whatever was loaded into the one before it (dropped to reload it, or `table`
    changed): the resource's watermark and windows go with that table, so the next sync starts at `start` and a
    backfill reads every window. Kept, a sync went on from the watermark and left the table empty, exit 0."""
    forgotten = connection.execute(delete(watermarks).where(watermarks.c.resource == resource.name)).rowcount
    forgotten += connection.execute(delete(windows).where(windows.c.resource == resource.name)).rowcount
    if forgotten:
        log.warning("%s: its table %r is new (dropped, or `table` changed) though the resource was loaded before: "
                    "its watermark and windows are forgotten and it is loaded again from its start",
                    resource.name, resource.table_name)


def _create(connection: Connection, table: Table, resource: ResourceConfig) -> None:
    """CREATE TABLE; a key longer than MySQL/MariaDB's index limit (3,072 bytes, and a `string` is 1,020
    in utf8mb4) is the configuration's to change, said as such rather than as the driver's error 1071."""
    try:
        table.create(connection)
    except OperationalError as exc:
        if "key was too long" not in str(exc.orig).lower():
            raise
        strings = [name for name in resource.primary_key if resource.columns[name].type == "string"]
        raise ConfigError(
            f"resources.{resource.name}.primary_key: {resource.primary_key} is too long a key for this database: {exc.orig}",
            hint=f"MySQL/MariaDB index at most 3,072 bytes and a string column takes 1,020: key on fewer of {strings}, "
            "or on integer, date or datetime columns",
        ) from None


def _check_key_types(resource: ResourceConfig) -> None:
    for name in resource.primary_key:
        if resource.columns[name].type in UNKEYABLE_TYPES:
            raise ConfigError(
                f"resources.{resource.name}.primary_key: column {name!r} is {resource.columns[name].type!r}, "
                "which cannot be a key on every database",
                hint=f"declare {name} as string, integer, bigint, decimal, date or datetime",
            )


def _declared_columns(connection: Connection, table_name: str) -> dict[str, Row[Any]]:
    """What etl recorded about the table's columns when it created or extended it."""
    query = select(resource_columns).where(resource_columns.c.table_name == table_name)
    return {row.column_name: row for row in connection.execute(query)}


def _check_compatible(
    dialect: Dialect, inspector: Inspector, resource: ResourceConfig, declared: dict[str, Row[Any]],
    columns: dict[str, ReflectedColumn],
) -> None:
    """A type or key changed since etl recorded it is exit 2 with the statements that change the table, unless its
    owner already has: the table, not etl's record of it, decides. Compared with the record alone, a table changed
    as the hint said was refused for good."""
    differences: list[tuple[str, str, list[str]]] = []  # (key below resources.<name>, what changed, statements)
    for name, spec in resource.columns.items():
        before = declared.get(name)
        if before is None or before.declared_type == spec.type or (name in columns and _has_type(dialect, columns[name], spec.type)):
            continue
        if dialect.name == "sqlite" and (before.declared_type, spec.type) in SQLITE_WIDENINGS:
            continue
        differences.append((f"columns.{name}", f"column {name!r} was {before.declared_type!r}, is now {spec.type!r}",
                            _retype_sql(dialect, resource.table_name, name, spec.type)))
    old_key = [row.column_name for row in sorted(
        (row for row in declared.values() if row.key_position is not None), key=lambda row: row.key_position
    )]
    missing_key = [name for name in resource.primary_key if name not in columns]
    if old_key and old_key != resource.primary_key and not _has_key(inspector, resource):
        if missing_key:  # its rows hold NULL in a column added now, which no key takes: a new table, not an ALTER
            differences.append(("primary_key", f"primary_key was {old_key}, is now {resource.primary_key}, and the table "
                                f"has no column {missing_key} to key the rows it holds on", []))
        else:
            differences.append(("primary_key", f"primary_key was {old_key}, is now {resource.primary_key}",
                                _rekey_sql(dialect, inspector, resource, declared, old_key)))
    if not old_key and missing_key:
        differences.append(("primary_key", f"the existing table {resource.table_name!r} has no column {missing_key} of the primary key", []))
    if differences:
        statements = [statement for _, _, sql in differences for statement in sql]
        raise ConfigError(
            f"resources.{resource.name}.{differences[0][0]}: the table {resource.table_name!r} does not match the config: "
            + "; ".join(what for _, what, _ in differences),
            hint=_remedy(dialect, statements, len(statements) == len(differences)),
        )


SQLITE_WIDENINGS = {("integer", "bigint"), ("string", "text")}
"""Changes SQLite stores alike (INTEGER affinity, 8 bytes; TEXT affinity, no length): the column already holds what the
new type validates. They were exit 2 with a new `table` as the remedy, a whole reload, though the rejects of a long
string name "text" as the fix."""


def _remedy(dialect: Dialect, statements: list[str], complete: bool) -> str:
    new_table = "point `table` at a new table (etl creates it and loads the resource again from its start)"
    if dialect.name == "sqlite":
        return f"SQLite cannot change a column's type or a table's key in place: {new_table}"
    if not complete:
        return f"etl only adds columns: {new_table}, or change this one to match the config"
    return f"etl only adds columns: change the table, then run again: {' '.join(sql + ';' for sql in statements)} or {new_table}"


def _has_type(dialect: Dialect, column: ReflectedColumn, declared: str) -> bool:
    """Whether the table's column has the type etl gives `declared` now (its owner changed it); never on SQLite,
    whose reflection names several of etl's types alike (TEXT) and which cannot change a column's type anyway."""
    if dialect.name == "sqlite":
        return False
    return _type_text(column["type"], dialect) == _type_text(column_type(declared), dialect)


MYSQL_REFLECTED = ((r"^TINYINT\(1\)$", "BOOL"), (r"^(SMALLINT|INTEGER|BIGINT)\(\d+\)", r"\1"),
                   (r"^LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin$", "JSON"))  # MariaDB's JSON is such a LONGTEXT


def _type_text(type_: TypeEngine[Any], dialect: Dialect) -> str:
    """A column type as DDL, MySQL's reflected display widths and aliases as etl writes them."""
    text = type_.compile(dialect=dialect)
    if dialect.name == "mysql":
        for pattern, replacement in MYSQL_REFLECTED:
            text = re.sub(pattern, replacement, text)
    return text


def _retype_sql(dialect: Dialect, table_name: str, name: str, declared: str) -> list[str]:
    quote = dialect.identifier_preparer.quote
    ddl = column_type(declared).compile(dialect=dialect)
    if dialect.name == "postgresql":  # an explicit cast to VARCHAR(255) cuts longer values without a word: none to string
        using = "" if declared == "string" else f" USING {quote(name)}::{ddl}"
        return [f"ALTER TABLE {quote(table_name)} ALTER COLUMN {quote(name)} TYPE {ddl}{using}"]
    if dialect.name == "mysql":
        return [f"ALTER TABLE {quote(table_name)} MODIFY {quote(name)} {ddl}"]
    return []  # SQLite has no ALTER COLUMN


def _rekey_sql(
    dialect: Dialect, inspector: Inspector, resource: ResourceConfig, declared: dict[str, Row[Any]], old_key: list[str]
) -> list[str]:
    """The new key, and NULL allowed in the old key's columns that leave it, as in a table etl creates: dropping a
    key keeps its columns NOT NULL, and every record without them was refused once the table had been changed."""
    quote = dialect.identifier_preparer.quote
    table, key = quote(resource.table_name), ", ".join(quote(name) for name in resource.primary_key)
    left = [name for name in old_key if name not in resource.primary_key]
    if dialect.name == "postgresql":
        constraint = inspector.get_pk_constraint(resource.table_name).get("name")
        nullable = "".join(f", ALTER COLUMN {quote(name)} DROP NOT NULL" for name in left)
        return [f"ALTER TABLE {table} DROP CONSTRAINT {quote(constraint)}, ADD PRIMARY KEY ({key}){nullable}"] if constraint else []
    if dialect.name == "mysql":
        nullable = "".join(f", MODIFY {quote(name)} {column_type(declared[name].declared_type).compile(dialect=dialect)} NULL"
                           for name in left)
        return [f"ALTER TABLE {table} DROP PRIMARY KEY, ADD PRIMARY KEY ({key}){nullable}"]
    return []


def _check_case_renames(resource: ResourceConfig, existing: Collection[str]) -> None:
    """A column declared anew under a table column's name in other case (`Total` for `total`) is one column to SQLite
    and MySQL, whose ALTER failed with "duplicate column name" (exit 1), and a second one to PostgreSQL, beside the
    first with its old values: refused on all three, as two such columns in one config are."""
    by_case = {name.lower(): name for name in existing}
    for name, spec in resource.columns.items():
        if name not in existing and (old := by_case.get(name.lower())) is not None:
            raise ConfigError(
                f"resources.{resource.name}.columns.{name}: the table {resource.table_name!r} has a column {old!r}, "
                "which differs only in case (SQLite and MySQL take them for one column)",
                hint=f'keep the name {old} and read the field through source: {old} = {{ type = "{spec.type}", '
                f'source = "{spec.source or name}" }}',
            )


def _check_key_usable(inspector: Inspector, resource: ResourceConfig) -> None:
    """A table etl did not create must have a primary key or unique index on exactly primary_key: the upsert stands
    on it. Without one MySQL's ON DUPLICATE KEY inserted every record again on every run, and PostgreSQL and SQLite
    failed every batch, with the rows of every other resource in it."""
    table_name, quote = resource.table_name, inspector.dialect.identifier_preparer.quote
    if not _has_key(inspector, resource):
        raise ConfigError(
            f"resources.{resource.name}.primary_key: the existing table {table_name!r} has no primary key or unique index "
            f"on {resource.primary_key}, which etl's upsert needs to store a record seen twice once",
            hint=f"add one (CREATE UNIQUE INDEX ... ON {quote(table_name)} ({', '.join(map(quote, resource.primary_key))})), "
            "or point `table` at a new table for etl to create",
        )


def _check_key_collation(connection: Connection, resource: ResourceConfig) -> None:
    """A text key column must compare as the API does, byte for byte, or records the API keeps apart overwrite
    each other (a DBA's table keyed under a case-insensitive collation or citext): exit 2 with the ALTER TABLE."""
    if connection.dialect.name == "mysql":
        _check_mysql_key_collation(connection, resource)
    elif connection.dialect.name == "postgresql":
        _check_postgresql_key_collation(connection, resource)
    elif connection.dialect.name == "sqlite":
        _check_sqlite_key_collation(connection, resource)


def _check_mysql_key_collation(connection: Connection, resource: ResourceConfig) -> None:
    """Under a collation that ignores case or accents (a DBA's table in the database's default, utf8mb4_general_ci)
    'A1', 'a1' and 'é1' were one row, the last record written over the others with exit 0: exit 2. A binary one
    that pads with spaces (utf8mb4_bin, as an older etl made its tables) only merges 'a1' and 'a1 ': a warning."""
    wanted = key_collation(connection.dialect)
    found = connection.execute(
        text("SELECT column_name AS column_name, collation_name AS collation_name, column_type AS column_type "
             "FROM information_schema.columns "
             "WHERE table_schema = DATABASE() AND table_name = :table AND collation_name IS NOT NULL"),
        {"table": resource.table_name},
    ).all()
    keyed = [row for row in found if row.column_name in resource.primary_key]
    loose = [(row.column_name, row.collation_name) for row in keyed if not _binary(row.collation_name)]
    padded = [(row.column_name, row.collation_name) for row in keyed if _binary(row.collation_name) and not _no_pad(row.collation_name)]
    if not loose and not (padded and _no_pad(wanted)):
        return
    fix = " ".join(_recollate_sql(connection.dialect, resource.table_name, row.column_name, row.column_type, wanted) + ";"
                   for row in keyed if not _no_pad(row.collation_name))
    if loose:
        raise _loose_key(resource, *loose[0], fix)
    name, collation = padded[0]
    log.warning("%s: the key column %r of the table %r has the collation %s, under which keys that differ only in "
                "trailing spaces ('a1', 'a1 ') are one row, the last loaded kept; %s makes them two",
                resource.name, name, resource.table_name, collation, fix)


def _check_postgresql_key_collation(connection: Connection, resource: ResourceConfig) -> None:
    """A citext key, or one under a nondeterministic collation (ICU's `und-u-ks-level2`), took 'A1' and 'a1' for one
    key: in one batch every run failed on "ON CONFLICT DO UPDATE command cannot affect row a second time", and in two
    runs the second overwrote the first without a word."""
    deterministic = "c.collisdeterministic" if (connection.dialect.server_version_info or (0,)) >= (12,) else "true"
    found = connection.execute(
        text(f"SELECT a.attname AS name, t.typname AS type_name, c.collname AS collation, {deterministic} AS exact "
             "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_collation c ON c.oid = a.attcollation "
             "WHERE a.attrelid = to_regclass(quote_ident(:table)) AND a.attnum > 0 AND NOT a.attisdropped"),
        {"table": resource.table_name},
    ).all()
    loose = [row for row in found if row.name in resource.primary_key and (row.type_name == "citext" or row.exact is False)]
    if not loose:
        return
    quote = connection.dialect.identifier_preparer.quote
    fix = " ".join(
        f"ALTER TABLE {quote(resource.table_name)} ALTER COLUMN {quote(row.name)} TYPE "
        f"{column_type(resource.columns[row.name].type).compile(dialect=connection.dialect)} COLLATE \"default\";"
        for row in loose
    )
    row = loose[0]
    raise _loose_key(resource, row.name, "type citext" if row.type_name == "citext" else f"collation {row.collation}", fix)


def _check_sqlite_key_collation(connection: Connection, resource: ResourceConfig) -> None:
    """A key column under NOCASE (or a unique index on the key under RTRIM), in a table of one's own: 'A1' and 'a1'
    (or 'a1 ') were one row, exit 0. The upsert's conflict target is the index on the key: its collations decide."""
    quote = connection.dialect.identifier_preparer.quote
    for index in connection.exec_driver_sql(f"PRAGMA index_list({quote(resource.table_name)})").all():
        if not index.unique:
            continue
        columns = [row for row in connection.exec_driver_sql(f"PRAGMA index_xinfo({quote(index.name)})").all() if row.key]
        if sorted(row.name or "" for row in columns) != sorted(resource.primary_key):
            continue
        for row in columns:
            if row.coll.upper() != "BINARY" and resource.columns[row.name].type in ("string", "text"):
                raise _loose_key(resource, row.name, f"collation {row.coll}", "")


def _loose_key(resource: ResourceConfig, name: str, comparison: str, fix: str) -> ConfigError:
    comparison = comparison if " " in comparison else f"collation {comparison}"
    return ConfigError(
        f"resources.{resource.name}.primary_key: the key column {name!r} of the table {resource.table_name!r} has "
        f"the {comparison}, under which keys that differ in case, accents or trailing spaces ('A1', 'a1', "
        "'á1', 'a1 ') can be one row: records the API keeps apart would overwrite each other",
        hint=f"make the key compare exactly, then run again: {fix} or point `table` at a new table for etl to create"
        if fix else "SQLite cannot change a column's collation: point `table` at a new table (etl creates it and loads "
        "the resource again from its start)",
    )


def _binary(collation: str) -> bool:
    return collation == "binary" or collation.endswith("_bin")


def _no_pad(collation: str) -> bool:
    """MariaDB's `_nopad_` collations, MySQL 8's `_0900_` ones, and `binary` compare trailing spaces."""
    return collation == "binary" or "_nopad_" in collation or "_0900_" in collation


def _recollate_sql(dialect: Dialect, table_name: str, name: str, column_type: str, collation: str) -> str:
    """MODIFY to the binary NO PAD collation; a CHAR becomes a VARCHAR, since a CHAR drops trailing spaces as it stores."""
    quote = dialect.identifier_preparer.quote
    column_type = re.sub(r"^char\(", "varchar(", column_type, flags=re.IGNORECASE)
    return (f"ALTER TABLE {quote(table_name)} MODIFY {quote(name)} {column_type} "
            f"CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL")


def _has_key(inspector: Inspector, resource: ResourceConfig) -> bool:
    """Whether the table has a primary key or unique index on exactly primary_key, which the upsert needs."""
    table_name, wanted = resource.table_name, set[str | None](resource.primary_key)
    keys: list[set[str | None]] = [set(inspector.get_pk_constraint(table_name).get("constrained_columns") or [])]
    keys += [set(constraint["column_names"]) for constraint in inspector.get_unique_constraints(table_name)]
    keys += [set(index["column_names"]) for index in inspector.get_indexes(table_name) if index.get("unique")]
    return wanted in keys


def _add_column(connection: Connection, table: Table, column: Column) -> None:
    preparer = connection.dialect.identifier_preparer
    ddl = column.type.compile(dialect=connection.dialect)
    connection.exec_driver_sql(
        f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {preparer.format_column(column)} {ddl}"
    )


def _record_declaration(connection: Connection, resource: ResourceConfig, declared: dict[str, Row[Any]]) -> None:
    """Remember each column's declared type and key position, the next run compares against them: new columns, and
    changed ones the table was found to have (a column that left the key keeps its type, and no longer a position)."""
    wanted = {name: (spec.type, resource.primary_key.index(name) if name in resource.primary_key else None)
              for name, spec in resource.columns.items()}
    wanted |= {name: (row.declared_type, None) for name, row in declared.items()
               if name not in wanted and row.key_position is not None}
    changed = [name for name, record in wanted.items()
               if name not in declared or (declared[name].declared_type, declared[name].key_position) != record]
    stale = [name for name in changed if name in declared]
    if stale:
        connection.execute(delete(resource_columns).where(
            resource_columns.c.table_name == resource.table_name, resource_columns.c.column_name.in_(stale)))
    if changed:
        connection.execute(resource_columns.insert(), [
            {"table_name": resource.table_name, "column_name": name, "declared_type": wanted[name][0], "key_position": wanted[name][1]}
            for name in changed
        ])
