"""The database connection: async driver chosen from the URL, and Alembic migrations.

Users write plain URLs (`sqlite:///etl.db`, `postgresql://…`, `mysql://…`);
the project's async driver is filled in here. Every message shows the URL with
its password hidden.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode, urlsplit

import aiosqlite
import asyncpg
from sqlalchemy import URL, Connection, event, make_url, text
from sqlalchemy import inspect as inspect_schema
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from etl import mysqltls
from etl.config import database_url_key
from etl.errors import ConfigError, LoadError
from etl.schema import metadata
from etl.sqltypes import json_text

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "etl_alembic_version"
SCHEMA_LOCK = "-schema-"  # the lock of etl's own tables: not an identifier, so no resource's lock
SCHEMA_LOCK_WAIT_S = 300
CONNECT_TIMEOUT_S = 60.0  # asyncpg's own default, given to aiomysql, which has none
# The newest revision in migrations/versions (test_migrations holds it to Alembic's own answer).
# Known here so that a run on an up-to-date database never imports Alembic: a tenth of a second
# of every start, which a nightly job pays for nothing.
HEAD_REVISION = "0003"
ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
    "mariadb": "mysql+aiomysql",
}


# make_url's errors: ArgumentError, or ValueError for a port that is no number, which is what a password
# with an unencoded `@` or `:` leaves (`u:p@ss:w0rd@h/db`); its message quotes that piece of the password.
URL_ERRORS = (ArgumentError, ValueError)


def parse_url(url: str) -> URL:
    """The URL parsed; one that does not parse is a ConfigError that does not show it, since it holds a password."""
    try:
        return make_url(url)
    except URL_ERRORS:
        raise ConfigError(
            f"{database_url_key()}: not a database URL like sqlite:///etl.db or postgresql://user:password@host/database "
            "(it is not shown here: it may hold a password)",
            hint="percent-encode a user name or password that holds @ : / % # ? or a space "
            "(@ is %40, : is %3A, / is %2F, % is %25, # is %23, ? is %3F, a space is %20)",
        ) from None


def async_url(url: str) -> URL:
    """The URL with the project's async driver when none is named."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "mariadb":
        parsed = _as_mysql(parsed)
    if "+" not in parsed.drivername or not _async_driver(parsed):
        driver = ASYNC_DRIVERS.get(parsed.get_backend_name())
        if driver is None:
            known = ", ".join(sorted(ASYNC_DRIVERS))
            raise ConfigError(f"{database_url_key()}: unsupported database {parsed.get_backend_name()!r} (supported: {known})")
        parsed = parsed.set(drivername=driver)
    if parsed.drivername == "mysql+aiomysql":
        parsed = _aiomysql_query(parsed)
    if parsed.get_backend_name() == "mysql" and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    if parsed.drivername == "postgresql+asyncpg":
        parsed = _asyncpg_query(parsed)
    return parsed


def _as_mysql(url: URL) -> URL:
    """`mariadb+aiomysql://` as `mysql+aiomysql://`, the same driver and server.

    SQLAlchemy names the dialect of a `mariadb` URL "mariadb", which etl's code, written for "mysql",
    did not know: migrate, status and check passed, and every sync failed on its first upsert.
    """
    driver = url.drivername.partition("+")[2]
    return url.set(drivername=f"mysql+{driver}" if driver else "mysql")


def _async_driver(url: URL) -> bool:
    """Whether the driver the URL names is an asyncio one.

    A URL copied from another tool names a blocking driver (`postgresql+psycopg2://`, `mysql+pymysql://`):
    SQLAlchemy's asyncio engine refused it with a traceback, or the driver was not even installed. The
    database is the same whichever driver talks to it, so such a URL gets the project's async driver.
    """
    try:
        return bool(url.get_dialect().is_async)
    except NoSuchModuleError:
        raise ConfigError(f"{database_url_key()}: {safe_url(url)}: SQLAlchemy knows no driver {url.drivername!r}") from None


def _asyncpg_query(url: URL) -> URL:
    """libpq's `sslmode` as asyncpg's `ssl`, `connect_timeout` as its `timeout`; a parameter that neither asyncpg
    nor LIBPQ_DSN_PARAMETERS take, or a number that is none, is named now.

    SQLAlchemy hands each query parameter to asyncpg.connect as a keyword, as a string: an unknown one,
    and `timeout=10` or `statement_cache_size=0` (a string where asyncpg compares a number), were
    TypeError tracebacks at the first connection.
    """
    query = dict(url.query)
    for libpq, asyncpg_name in (("sslmode", "ssl"), ("connect_timeout", "timeout")):
        if libpq in query and asyncpg_name not in query:
            query[asyncpg_name] = query.pop(libpq)
    unknown = sorted(set(query) - ASYNCPG_PARAMETERS - set(ASYNCPG_NUMBERS) - LIBPQ_DSN_PARAMETERS)
    if unknown:
        raise ConfigError(
            f"{database_url_key()}: the PostgreSQL driver (asyncpg) does not take the parameter {unknown[0]!r}",
            hint="asyncpg takes ssl (disable, prefer, require, verify-ca, verify-full), sslmode as its alias, "
            "sslrootcert, sslcert, sslkey, sslcrl, application_name, options, connect_timeout, command_timeout, "
            "statement_cache_size and target_session_attrs; remove the others",
        )
    for name in set(query) & set(ASYNCPG_NUMBERS):
        try:
            ASYNCPG_NUMBERS[name](str(query[name]))
        except ValueError:
            raise ConfigError(f"{database_url_key()}: {name}={query[name]} is not a number") from None
    return url.set(query=query)


# What asyncpg.connect takes as a string from a URL, plus SQLAlchemy's own; not `direct_tls` ("false" is true)
# nor rich values (`server_settings`, `record_class`).
ASYNCPG_PARAMETERS = frozenset({
    "host", "port", "user", "password", "database", "passfile", "ssl", "target_session_attrs", "krbsrvname", "gsslib",
    "service", "servicefile", "prepared_statement_cache_size",
})
# asyncpg's numeric keywords: passed as numbers (connect_args), not as the URL's strings
ASYNCPG_NUMBERS: dict[str, type[float] | type[int]] = {
    "timeout": float, "command_timeout": float, "statement_cache_size": int,
    "max_cached_statement_lifetime": int, "max_cacheable_statement_size": int,
}
# libpq's parameters that asyncpg reads from a DSN but takes as no keyword: certificates, and the two server
# settings libpq URLs carry (`options=-csearch_path=etl` puts etl's tables in a schema of one's own)
LIBPQ_DSN_PARAMETERS = frozenset({
    "sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword", "sslnegotiation",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "application_name", "options",
})


def _asyncpg_connect_args(url: URL) -> tuple[URL, dict[str, Any]]:
    """The URL without the parameters SQLAlchemy would hand on as strings; those as asyncpg.connect wants them:
    numbers as numbers, libpq's as a DSN (its host, user, ... come from the keywords, which win over it)."""
    query = dict(url.query)
    arguments: dict[str, Any] = {name: ASYNCPG_NUMBERS[name](str(query.pop(name))) for name in set(query) & set(ASYNCPG_NUMBERS)}
    libpq = {name: query.pop(name) for name in set(query) & LIBPQ_DSN_PARAMETERS}
    if libpq:
        arguments["dsn"] = "postgresql://?" + urlencode(sorted(libpq.items()))
    return url.set(query=query), arguments


def _aiomysql_query(url: URL) -> URL:
    """Name now a parameter aiomysql does not take, and a connection charset that cannot carry every character.

    SQLAlchemy hands each query parameter to aiomysql.connect as a keyword: an unknown one (`ssl_mode`,
    `sslmode`) was a TypeError traceback. `charset=utf8`, as older tools write it, is MySQL's 3-byte
    utf8mb3: the first emoji an API sent failed its batch, every run; `latin1` was a UnicodeEncodeError.
    """
    unknown = sorted(set(url.query) - AIOMYSQL_PARAMETERS)
    if unknown:
        raise ConfigError(
            f"{database_url_key()}: the parameter {unknown[0]!r} is not one etl's MySQL driver (aiomysql) takes from a URL",
            hint="it takes charset, connect_timeout, unix_socket, read_default_file, init_command and sql_mode, "
            "and ssl_mode, ssl_ca, ssl_capath, ssl_cert, ssl_key, ssl_cipher and ssl_check_hostname; remove the others",
        )
    charset = url.query.get("charset", "utf8mb4")
    if charset != "utf8mb4":
        raise ConfigError(
            f"{database_url_key()}: charset={charset} cannot carry every character an API sends "
            "(emoji and others outside Unicode's first plane, or anything outside its character set)",
            hint="write charset=utf8mb4, or leave it out: etl's tables are utf8mb4",
        )
    return url


# What aiomysql.connect takes that a URL can give, plus SQLAlchemy's TLS parameters. Not `autocommit` (a string
# "false" is true: each statement would commit alone), `use_unicode` (bytes for text) nor rich values (`conv`).
AIOMYSQL_PARAMETERS = frozenset({
    "host", "port", "user", "password", "db", "unix_socket", "charset", "connect_timeout", "init_command", "sql_mode",
    "read_default_file", "read_default_group", "local_infile", "program_name", "auth_plugin", "server_public_key",
}) | mysqltls.PARAMETERS



# a query parameter holding a credential: libpq's and aiomysql's `password`, `sslpassword`, `passwd`
CREDENTIAL_QUERY_VALUE = re.compile(r"([?&][^=&]*(?:passw|secret|token)[^=&]*=)[^&]*", re.IGNORECASE)


def safe_url(url: str | URL) -> str:
    """The URL for messages: password hidden, in the user info and in a `?password=` alike (SQLAlchemy hides only the first)."""
    parsed = _parsed_or_none(url)
    if parsed is None:
        return "<unparseable database URL>"
    return CREDENTIAL_QUERY_VALUE.sub(r"\1***", parsed.render_as_string(hide_password=True))


def _parsed_or_none(url: str | URL) -> URL | None:
    """The URL parsed, or None for one that does not parse, where a message or a test must not fail on it."""
    try:
        return url if isinstance(url, URL) else make_url(url)
    except URL_ERRORS:
        return None


def create_engine(url: str, reading: bool = False) -> AsyncEngine:
    """An async engine; SQLite gets WAL and a busy timeout so a reader never blocks a run.

    `reading` (status, check) leaves the journal mode alone: WAL is written into the file's header for good,
    and a command that only reads had switched another program's SQLite database to it.
    """
    target = async_url(url)
    options: dict[str, Any] = {"json_serializer": json_text, "pool_pre_ping": target.get_backend_name() != "sqlite"}
    tls = mysqltls.mysql_tls(target, database_url_key()) if target.drivername == "mysql+aiomysql" else None
    if tls is not None:
        target = tls.url
        if tls.context is not None:
            options["connect_args"] = {"ssl": tls.context}
    if target.drivername == "postgresql+asyncpg":
        target, options["connect_args"] = _asyncpg_connect_args(target)
    try:
        if target.get_backend_name() == "sqlite":
            connect_args = target.get_dialect()().create_connect_args(target)
            options["async_creator"] = lambda: _open_sqlite(*connect_args)
        if target.drivername == "mysql+aiomysql":
            mysql_args, mysql_kwargs = target.get_dialect()().create_connect_args(target)
            mysql_kwargs = {**mysql_kwargs, **options.pop("connect_args", {})}
            options["async_creator"] = lambda: _open_mysql(mysql_args, mysql_kwargs)
        engine = create_async_engine(target, **options)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"{database_url_key()}: {safe_url(target)}: {exc}") from None
    except ImportError as exc:  # an async driver named in the URL that is not installed: a traceback, exit 1
        raise ConfigError(
            f"{database_url_key()}: {safe_url(target)}: its driver is not installed ({exc.name or exc})",
            hint="install it, or leave the driver out of the URL (postgresql://, mysql://, sqlite://) to use etl's own",
        ) from None
    if target.get_backend_name() == "sqlite":
        pragmas = SQLITE_READING_PRAGMAS if reading else SQLITE_LOADING_PRAGMAS
        event.listen(engine.sync_engine, "connect", partial(_sqlite_pragmas, pragmas))
    if tls is not None and tls.required_by is not None:
        event.listen(engine.sync_engine, "connect", partial(_require_tls, tls.required_by))
    if target.get_backend_name() == "mysql":
        event.listen(engine.sync_engine, "connect", _mysql_strict)
    return engine


def _mysql_strict(dbapi_connection: Any, _record: Any) -> None:
    """STRICT_ALL_TABLES on every session, whatever the server's sql_mode: without it (RDS's default, an old my.cnf)
    MySQL stores a value too long or out of range for a column cut or clipped, with a warning no one reads: a DBA's
    VARCHAR(3) kept 'shi' of 'shipped', exit 0. Strict, the database refuses the row and it is a reject."""
    cursor = dbapi_connection.cursor()
    cursor.execute("SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), 'STRICT_ALL_TABLES')")
    cursor.close()


def _require_tls(required_by: str, dbapi_connection: Any, _record: Any) -> None:
    """A connection the server did not encrypt is closed before its first statement: aiomysql goes on in plain text."""
    if mysqltls.tls_started(dbapi_connection):
        return
    dbapi_connection.close()
    raise ConnectionError(
        f"the server did not start TLS, which {required_by} in the URL asks for "
        "(it offers none: see SHOW VARIABLES LIKE 'have_ssl'; ssl_mode=PREFERRED would go on without)"
    )


async def _open_sqlite(args: Sequence[Any], kwargs: Mapping[str, Any]) -> aiosqlite.Connection:
    """An aiosqlite connection that, when it cannot be opened, lets its thread end before the error goes on.

    aiosqlite (0.22) answers a failed open by queueing its thread's stop without awaiting it: when
    the error ended the run, the loop closed first and the thread died on "Event loop is closed",
    its traceback printed straight to stderr, between the JSON lines of `--log-format json`.
    """
    connection = aiosqlite.connect(*args, **{**kwargs, "timeout": 60})
    worker = connection._thread
    worker.daemon = True  # as SQLAlchemy's own aiosqlite connect does: a stuck file never holds up the exit
    try:
        return await connection
    except BaseException:
        if worker.is_alive():
            await asyncio.shield(asyncio.to_thread(worker.join, 5))
        raise


async def _open_mysql(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """aiomysql.connect with its handshake bounded too: its connect_timeout bounds the TCP connect only (and, not
    given, nothing), so a server that took the connection and never answered held a nightly run for ever."""
    import aiomysql

    timeout = float(kwargs.get("connect_timeout") or CONNECT_TIMEOUT_S)

    async def connect() -> Any:
        return await aiomysql.connect(*args, **{**kwargs, "connect_timeout": timeout})

    try:
        return await asyncio.wait_for(connect(), timeout)
    except TimeoutError:
        raise TimeoutError(f"no answer from the server within {timeout:g}s (`connect_timeout` in the URL sets how long to wait)") from None


SQLITE_READING_PRAGMAS = ("busy_timeout=60000",)
SQLITE_LOADING_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", *SQLITE_READING_PRAGMAS)


def _sqlite_pragmas(pragmas: Sequence[str], dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in pragmas:
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


# asyncpg raises its own errors at connect time and in the raw COPY, which bypass SQLAlchemy.
DRIVER_ERRORS = (DBAPIError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
_CONNECTION_SQLSTATES = ("08", "28", "3D")  # connection exception, invalid authorization, unknown database
# MySQL/MariaDB on a statement bigger than max_allowed_packet: the error, or the connection cut under it
_TOO_LARGE_WORDS = ("max_allowed_packet", "lost connection to mysql server during query", "server has gone away")
_CONNECTION_WORDS = ("connect", "refused", "could not translate host", "unable to open", "timeout", "password", "authentication", "access denied", "unknown database", "does not exist")


# What the database says when it refuses a value, a key or a constraint, not the statement or the connection:
# SQLSTATE classes 22 (data exception), 23 (integrity) and 54 (program limit exceeded: an index row too large).
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")
# MySQL/MariaDB numbers for the same, where the SQLSTATE is the generic HY000: column cannot be null (1048),
# duplicate entry (1062), out of range (1264), truncated (1265), incorrect value (1292, 1366), too long (1406),
# invalid JSON (3140), JSON nested deeper than MySQL 8's 100 levels (3157), CHECK failed (3819 on MySQL, 4025 on
# MariaDB, e.g. JSON_VALID on a json column).
_MYSQL_DATA_ERRORS = frozenset({1048, 1062, 1264, 1265, 1292, 1366, 1406, 3140, 3157, 3819, 4025})


def refused_data(exc: BaseException) -> bool:
    """Whether the database refused what a statement carried, so that some row of it is to blame.

    A lock, a deadlock, a lost connection or a missing table is not: no row is, and retrying row by
    row would only repeat the failure.
    """
    original = getattr(exc, "orig", None) or exc
    sqlstate = str(getattr(original, "sqlstate", None) or "")
    number = original.args[0] if original.args and isinstance(original.args[0], int) else None
    return (
        isinstance(exc, IntegrityError | DataError)
        or sqlstate[:2] in _DATA_SQLSTATE_CLASSES
        or number in _MYSQL_DATA_ERRORS
    )


def driver_message(exc: BaseException) -> str:
    """The first line of the driver's own words, without SQLAlchemy's wrapping or asyncpg's class name."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).split("\n", 1)[0]
    if text.startswith("<class '"):
        text = text.split(">: ", 1)[-1]
    return text


def database_error(exc: Exception, url: str | URL) -> LoadError:
    """A driver error as etl's, with the URL (no password) and the driver's own words.

    Only failures to reach or log in get the hint about the URL and the server; a
    statement the database refused (a missing table, a constraint) says so instead.
    """
    original = getattr(exc, "orig", None) or exc
    if isinstance(original, TimeoutError) and not str(original):  # asyncpg's, of its connect timeout: said nothing
        original = TimeoutError(f"no answer from the server in time (`connect_timeout` in the URL sets how long to wait for a connection, "
                                f"{CONNECT_TIMEOUT_S:g}s by default)")
    text = str(original).lower()
    sqlstate = str(getattr(original, "sqlstate", None) or "")
    reaching = (
        isinstance(exc, OSError | ConnectionError)
        or "connect" in type(original).__name__.lower()
        or sqlstate[:2] in _CONNECTION_SQLSTATES
    )
    if any(words in text for words in _TOO_LARGE_WORDS):
        return LoadError(
            f"the database {safe_url(url)} closed the connection in the middle of a statement: {original}",
            hint="a record larger than the server's max_allowed_packet (16 MB by default on MariaDB) does this: "
            "raise it (SET GLOBAL max_allowed_packet = 1073741824), or see the server's log",
        )
    if "readonly database" in text:  # SQLite: the file, or its directory for the -wal and -shm files beside it
        return LoadError(
            f"cannot write to the database {safe_url(url)}: {original}",
            hint="the user running etl needs write permission on the SQLite file and on its directory "
            "(SQLite writes its -wal and -shm files beside it)",
        )
    if reaching or (isinstance(exc, OperationalError) and any(word in text for word in _CONNECTION_WORDS) and "no such table" not in text):
        return LoadError(f"cannot use the database {safe_url(url)}: {original}", hint=_reaching_hint(original, sqlstate, url))
    if isinstance(exc, DBAPIError):
        return LoadError(f"the database {safe_url(url)} refused a statement: {driver_message(exc)}", hint=_privilege_hint(exc, sqlstate))
    return LoadError(f"database {safe_url(url)}: {type(exc).__name__}: {exc}")


def _reaching_hint(original: BaseException, sqlstate: str, url: str | URL) -> str:
    """What to check when the database cannot be used: the file's directory, the database's name, or the server."""
    if _is_sqlite(url):
        return "check [database].url (or $ETL_DATABASE_URL): the file's directory must exist and be writable"
    if sqlstate == "3D000" or (original.args and original.args[0] == 1049):  # PostgreSQL's, MySQL's unknown database
        parsed = _parsed_or_none(url)
        name = parsed.database if parsed is not None and parsed.database else "..."
        return (f"the server has no database of that name: create it (CREATE DATABASE {name}) or correct its name in "
                "[database].url (or $ETL_DATABASE_URL); etl creates its tables, not the database")
    return "check [database].url (or $ETL_DATABASE_URL), that the server is up, and the credentials"


def _privilege_hint(exc: Exception, sqlstate: str) -> str | None:
    """What a user that may not write a table needs (SQLSTATE 42501; MySQL 1142 and 1044 deny a command or a database)."""
    original = getattr(exc, "orig", None) or exc
    number = original.args[0] if original.args and isinstance(original.args[0], int) else None
    if sqlstate != "42501" and number not in (1044, 1142):
        return None
    return ("grant the database user SELECT, INSERT, UPDATE and DELETE on etl's tables (etl_*) and on each resource's "
            "table, and CREATE on the schema or database for etl's own tables (`migrate`, a newer etl's first run) and "
            "for new resources (or run etl as the tables' owner)")


def sqlite_file(url: str | URL) -> Path | None:
    """The absolute path of a SQLite database's file; None for another database or an in-memory one.

    A URI filename (`sqlite:///file:/srv/etl.db?uri=true`) names its file after `file:`.
    """
    parsed = _parsed_or_none(url)
    if parsed is None:
        return None
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite":
        return None
    if database.startswith("file:"):
        database = unquote(urlsplit(database).path)
    if not database or database == ":memory:" or parsed.query.get("mode") == "memory":
        return None
    return Path(database).absolute()


def require_lasting(url: str) -> None:
    """Refuse a SQLite URL that names no file; warn about one that asks for memory by name.

    `sqlite:///` is what a crontab's `sqlite:///$DB_FILE` becomes when the variable is not set: a sync
    into it "succeeded", exit 0, and kept nothing, so every night began again at `start`. `:memory:`
    is asked for on purpose (a trial run): it runs, with a word that nothing it loads is kept.
    """
    if not _is_sqlite(url) or sqlite_file(url) is not None:
        return
    if make_url(url).database:
        log.warning("%s: %s is an in-memory SQLite database: what etl loads into it is gone when etl exits",
                    database_url_key(), safe_url(url))
        return
    raise ConfigError(
        f"{database_url_key()}: {safe_url(url)} names no database file, so it would be an in-memory SQLite database: "
        "what etl loads into it would be gone when etl exits",
        hint="name a file, e.g. sqlite:///etl.db (in config.toml: beside it) or sqlite:////var/lib/etl/etl.db",
    )


def _is_sqlite(url: str | URL) -> bool:
    """SQLite has no server and no credentials: its hint is about the file."""
    parsed = _parsed_or_none(url)
    return parsed is not None and parsed.get_backend_name() == "sqlite"


async def begin_explicitly(connection: AsyncConnection) -> None:
    """Open SQLite's transaction before the first CREATE, ALTER or SAVEPOINT, so that all of it is one transaction.

    Python's sqlite3 opens a transaction only before INSERT, UPDATE and DELETE. DDL run first was
    committed on its own: a run killed mid-migration left tables without their version row, so every
    later run failed on "table etl_runs already exists". A SAVEPOINT sent first started a transaction
    of its own, which its RELEASE committed, whatever the rest of the batch did. IMMEDIATE takes the
    write lock up front, so two runs migrating at once take turns. PostgreSQL's DDL is transactional
    already; MySQL's commits implicitly and cannot be made so.
    """
    if connection.dialect.name == "sqlite":
        await connection.exec_driver_sql("BEGIN IMMEDIATE")


def _alembic_config(connection: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


def _scripts() -> ScriptDirectory:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config)


def newer_schema_error(revision: str | None, url: str | URL) -> LoadError | None:
    """A database whose revision this etl has no migration for was migrated by a newer etl: Alembic
    would fail on it with a traceback ("Can't locate revision"), and downgrading is not etl's to do."""
    if revision in (None, HEAD_REVISION) or revision in {script.revision for script in _scripts().walk_revisions()}:
        return None
    return LoadError(
        f"etl's tables in {safe_url(url)} are at revision {revision}, which this etl (revision {HEAD_REVISION}) "
        "does not know: a newer etl migrated them",
        hint="run the newer etl here too (pip install -U the project), or point [database].url at another database",
    )


def _current_revision(connection: Connection) -> str | None:
    """What Alembic's MigrationContext.get_current_revision reads, without importing Alembic."""
    if not inspect_schema(connection).has_table(VERSION_TABLE):
        return None
    found = sorted(connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    return found[0] if len(found) == 1 else _one_revision(found, connection.engine.url) if found else None


def _one_revision(found: list[str], url: URL) -> str:
    """Of several version rows (etl writes one), a revision this etl does not know, which a newer etl wrote.

    Several rows were a MultipleResultsFound traceback in every command. With none unknown, one row is wrong
    and only the user can tell which: the run stops.
    """
    unknown = [revision for revision in found if newer_schema_error(revision, url) is not None]
    if unknown:
        return unknown[-1]
    raise LoadError(
        f"{VERSION_TABLE} in {safe_url(url)} holds {len(found)} revisions ({', '.join(found)}) where etl keeps one: "
        "it was changed by hand or by another tool",
        hint=f"keep the row of the revision etl's tables are at, e.g. the newest: DELETE FROM {VERSION_TABLE} "
        f"WHERE version_num <> '{found[-1]}'; then run `python -m etl migrate`",
    )


# What is gone with each of etl's tables that was dropped by hand and is created again, empty.
LOST_WITH = {
    "etl_runs": "the history of runs is gone",
    "etl_watermarks": "each resource's next sync starts again at its `start` (rows loaded again are updated, not duplicated)",
    "etl_windows": "unfinished backfills start their intervals over",
    "etl_rejects": "the rejected records it kept are gone",
    "etl_resource_columns": "the declared columns are read again from the resource tables",
}


def _missing_tables(connection: Connection) -> list[str]:
    """etl's tables that are not in a database whose version row says they were made: dropped by hand."""
    inspector = inspect_schema(connection)
    return sorted(name for name in metadata.tables if not inspector.has_table(name))


def _schema_state(connection: Connection) -> tuple[str | None, list[str]]:
    """The revision, and at the newest one the tables of etl's that are missing."""
    revision = _current_revision(connection)
    return revision, _missing_tables(connection) if revision == HEAD_REVISION else []


async def schema_state(engine: AsyncEngine) -> tuple[str | None, list[str]]:
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_schema_state)
    except DRIVER_ERRORS as exc:
        raise database_error(exc, engine.url) from exc


def missing_tables_error(missing: list[str], url: str | URL) -> LoadError:
    return LoadError(
        f"etl's tables {', '.join(missing)} are missing from {safe_url(url)}, though its schema revision "
        f"({HEAD_REVISION}) says they were made: dropped by hand?",
        hint="`python -m etl migrate` creates them again, empty (a sync or backfill does too, unless [database].auto_migrate = false)",
    )


def _create_again(connection: Connection) -> None:
    """Make again, empty, the tables of etl's someone dropped: Alembic, at the newest revision, has nothing to do,
    and every sync after the DROP ended in an internal error ("no such table: etl_windows")."""
    missing = _missing_tables(connection)
    if not missing:
        return
    metadata.create_all(connection, tables=[metadata.tables[name] for name in missing])
    if connection.dialect.name == "mysql":  # as migration 0002 makes them, whatever the database's default
        for name in missing:
            connection.execute(text(f"ALTER TABLE {name} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"))
    log.warning(
        "etl's tables %s were missing from %s (dropped by hand?): created again, empty; %s",
        ", ".join(missing), safe_url(connection.engine.url), "; ".join(LOST_WITH[name] for name in missing),
    )


async def migrate(engine: AsyncEngine) -> tuple[str | None, str | None]:
    """Bring etl's tables to the newest revision, and make again any dropped by hand; harmless when they are there.
    Returns (before, after)."""
    before, missing = await schema_state(engine)
    if before == HEAD_REVISION and not missing:
        return before, before
    try:
        async with engine.connect() as connection, schema_lock(connection), connection.begin():
            await begin_explicitly(connection)
            before = await connection.run_sync(_current_revision)  # another run may have migrated meanwhile
            if before == HEAD_REVISION:
                await connection.run_sync(_create_again)
                return before, before
            if (newer := newer_schema_error(before, engine.url)) is not None:
                raise newer
            await connection.run_sync(_upgrade)
            after = await connection.run_sync(_current_revision)
    except DRIVER_ERRORS as exc:
        raise database_error(exc, engine.url) from exc
    return before, after


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks, of a resource or of SCHEMA_LOCK."""
    digest = hashlib.blake2b(f"etl:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def mysql_lock_name(database: str, name: str) -> str:
    """GET_LOCK names are server-wide: the database is part of the name (at most 64 characters)."""
    return "etl:" + hashlib.blake2b(f"{database}/{name}".encode(), digest_size=16).hexdigest()


@asynccontextmanager
async def schema_lock(connection: AsyncConnection) -> AsyncIterator[None]:
    """One run at a time changes the schema, whatever its resources: a lock of the session, taken before its
    transaction begins and released after it ends.

    Runs of different resources started together on a new database (or on the first day of a newer
    etl) migrated at once: PostgreSQL refused one's CREATE TABLE, MySQL's implicitly committed DDL
    interleaved, and that run exited 1. Released before the commit (MySQL's lock), it let the next run read the
    revision before the version row moved, migrate again, and fail on "expected to match one row". SQLite's
    BEGIN IMMEDIATE (begin_explicitly) takes turns already.
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        key = advisory_key(SCHEMA_LOCK)
        await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        release = text("SELECT pg_advisory_unlock(:key)").bindparams(key=key)
    elif dialect == "mysql":
        name = mysql_lock_name(connection.engine.url.database or "", SCHEMA_LOCK)
        if await connection.scalar(text("SELECT GET_LOCK(:name, :wait)"), {"name": name, "wait": SCHEMA_LOCK_WAIT_S}) != 1:
            raise LoadError(
                f"another run has been changing etl's tables in {safe_url(connection.engine.url)} for {SCHEMA_LOCK_WAIT_S}s",
                hint="see what holds the MySQL lock (SELECT * FROM information_schema.processlist) and run again later",
            )
        release = text("SELECT RELEASE_LOCK(:name)").bindparams(name=name)
    else:
        yield
        return
    await connection.commit()  # the statement began a transaction: the one that changes the schema comes next
    try:
        yield
    finally:
        with suppress(*DRIVER_ERRORS):  # a session that is gone has released it
            await connection.execute(release)
            await connection.commit()


async def require_current(engine: AsyncEngine) -> None:
    """With auto_migrate = false, tables an older etl left (a migration pending) stop the run before any request:
    run on them, a batch failed on a column the migration changes ("value too long"), with no word of `migrate`."""
    revision, missing = await schema_state(engine)
    if missing:
        raise missing_tables_error(missing, engine.url)
    if revision == HEAD_REVISION or revision is None:  # None: prepare says the tables are missing
        return
    if (newer := newer_schema_error(revision, engine.url)) is not None:
        raise newer
    raise LoadError(
        f"etl's tables in {safe_url(engine.url)} are at revision {revision}, this etl needs {HEAD_REVISION}, "
        "and [database].auto_migrate is false",
        hint="run `python -m etl migrate`",
    )


async def current_revision(engine: AsyncEngine) -> str | None:
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_revision)
    except DRIVER_ERRORS as exc:
        raise database_error(exc, engine.url) from exc
