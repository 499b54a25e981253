"""Every exit code of SPEC.md, each from the real CLI, each with a message the user can act on."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from loopback import Handler, serving, silent_server
from sqlalchemy import make_url

from etl.db import create_engine
from etl.demo import demo_document
from etl.simulator import Faults, Simulator, SimulatorSettings

import tomlwriter
from dbquery import rows, scalar
from etlproc import Finished, etl_env, finish, run_etl, write_config
from refusals import CASES


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_exit_0_when_everything_loads(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        result = await run_etl("sync", "--config", str(write_config(tmp_path, sim, url)))
    assert result.returncode == 0, result.stderr


async def test_exit_1_when_rejects_exceed_max_rejects(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """The simulator's invalid orders are over max_rejects = 0: exit 1, and the message points at etl_rejects."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], sync={"max_rejects": 0})
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 1
    assert "more than [sync].max_rejects = 0" in result.stderr and "etl_rejects" in result.stderr


async def test_exit_1_when_the_api_path_is_wrong(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A 404 is not retried: exit 1 with the URL and the first bytes of the body."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["products"])
        text = config.read_text().replace('"path" = "/products"', '"path" = "/prodcts"')
        config.write_text(text)
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 1
    assert "404 from http://127.0.0.1:" in result.stderr and "/api/v1/prodcts" in result.stderr


async def test_exit_1_in_bounded_time_when_the_api_is_down_mid_run(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """An outage (every request 503): retries run out, exit 1, and etl_runs says failed with the last error."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(faults=Faults(outage=True))) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"max_retries": 2, "retry_backoff_s": 0.01})
        result = await run_etl("sync", "--config", str(config), timeout=60)
    assert result.returncode == 1
    assert "503 from" in result.stderr


async def test_exit_3_when_the_token_endpoint_refuses_the_secret(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
        result = await run_etl("sync", "--config", str(config), env=etl_env(ETL_CLIENT_SECRET="wrong-secret"))
    assert result.returncode == 3
    assert "invalid_client" in result.stderr and "client_auth" in result.stderr
    assert "wrong-secret" not in result.stderr + result.stdout


async def test_exit_3_when_the_scope_is_unknown(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], auth={"scopes": ["legacy-api/admin"]})
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 3 and "invalid_scope" in result.stderr


async def test_exit_5_when_nothing_listens(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A refused connection to the token host: retried, then exit 5 naming the host."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"max_retries": 1, "retry_backoff_s": 0.01})
    port = _free_port()
    text = config.read_text().replace(sim.origin, f"http://127.0.0.1:{port}")
    config.write_text(text)
    result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 5
    assert "cannot connect to" in result.stderr and str(port) in result.stderr


async def test_with_the_api_host_down_every_resource_is_marked_failed_in_the_summary(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """One resource said "FAILED: cannot connect"; the others, stopped by the same cause, printed a plain
    "0 loaded" line that a reader of cron's mail took for an empty but successful load."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, api={"max_retries": 1, "retry_backoff_s": 0.01})
        config.write_text(config.read_text().replace(sim.base_url, f"http://127.0.0.1:{_free_port()}/api/v1"))
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 5, result.stderr
    summary = [line for line in result.stdout.splitlines() if not line.startswith("run ")]
    assert len(summary) == len(sim.settings.all_counts()) > 1, result.stdout
    assert all("— FAILED: cannot connect to 127.0.0.1" in line for line in summary), result.stdout


async def test_an_unreachable_token_endpoint_is_named_as_such_and_reported_once(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """The API is up, the token endpoint is not: the message says it is the token endpoint, and
    says it once, not once per resource and window."""
    url = await fresh_database("sqlite")
    port = _free_port()
    async with Simulator() as sim:
        config = write_config(
            tmp_path, sim, url, resources=["orders", "customers", "events"],
            auth={"token_url": f"http://127.0.0.1:{port}/oauth2/token"}, api={"max_retries": 1, "retry_backoff_s": 0.01},
        )
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 5
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert errors and all(f"the token endpoint http://127.0.0.1:{port}/oauth2/token" in line for line in errors), result.stderr
    assert len(errors) == 1, result.stderr
    assert "[auth].token_url" in result.stderr


async def test_an_api_that_refuses_every_token_is_reported_once_not_once_per_window(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """Every worker in flight meets the refusal, each on its own URL: one ERROR line, and the summary still says why."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(faults=Faults(revoke_every_s=0.000001))) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders", "customers"], api={"concurrency": 4})
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "the API rejected a freshly issued token" in errors[0], result.stderr
    assert "FAILED: the API rejected a freshly issued token" in result.stdout


def _api_answering(status: int, body: dict[str, Any]) -> dict[tuple[str, str], Handler]:
    """A token endpoint, and /api/v1/orders answering `status` with `body` to every request, a little late."""

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "windows-token", "expires_in": 3600, "token_type": "Bearer"})

    async def orders(_request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)  # every worker has a window in flight when the first answer arrives
        return web.json_response(body, status=status)

    return {("POST", "/oauth2/token"): token, ("GET", "/api/v1/orders"): orders}


async def _backfill_orders_by_day(tmp_path: Path, base: str, url: str, **api: Any) -> Finished:
    """A 19-day backfill of the demo's orders in 1-day windows against `base`, four windows in flight unless `api` says."""
    document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
    document["resources"] = [r for r in document["resources"] if r["name"] == "orders"]
    document["resources"][0]["window"] = "1d"
    document["api"].update({"concurrency": 4, **api})
    config = tomlwriter.write(tmp_path / "config.toml", document)
    return await run_etl("backfill", "--config", str(config), "--from", "2024-01-01", "--to", "2024-01-20")


async def test_windows_in_flight_out_of_retries_on_the_same_5xx_log_one_error(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """Each window in flight ran out of its retries on the same 500 and logged its own ERROR line for it (a 4xx was
    already logged once per resource): one cause, one ERROR, in its resource's context."""
    url = await fresh_database("sqlite")
    async with serving(_api_answering(500, {"message": "boom"})) as base:
        result = await _backfill_orders_by_day(tmp_path, base, url, max_retries=1, retry_backoff_s=0.01)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "500 from" in errors[0] and "gave up after 2 attempts" in errors[0] and "resource=orders" in errors[0]
    assert "FAILED: 500 from" in result.stdout


async def test_a_wrong_records_path_is_one_error_naming_the_config_key(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """The records are under "items", not "data": each of 8 windows in flight logged the same error, and it said
    `records_path 'data'` without the key to edit, resources.orders.records_path."""
    url = await fresh_database("sqlite")
    records = {"items": [{"id": 1, "updated_at": "2024-01-01T00:00:00Z"}], "total": 1}
    async with serving(_api_answering(200, records)) as base:
        result = await _backfill_orders_by_day(tmp_path, base, url, concurrency=8)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    assert "resources.orders.records_path 'data' is not in the body; its top-level keys are: items, total" in errors[0]


async def test_exit_5_when_the_host_name_does_not_resolve(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"])
    config.write_text(config.read_text().replace(sim.origin, "http://no-such-host.invalid"))
    result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 5
    assert "no-such-host.invalid" in result.stderr and "DNS" in result.stderr


async def _run_against_database(tmp_path: Path, url: str, *command: str) -> Finished:
    """`command` with JSON logs on a config whose API nobody serves: only the database is contacted."""
    document = demo_document({"url": url}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    return await run_etl("--log-format", "json", *command, "--config", str(config), timeout=60)


def _assert_one_clean_database_error(result: Finished, words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [event for event in map(orjson.loads, result.stderr.splitlines()) if event["level"] == "error"]
    assert len(errors) == 1, result.stderr
    assert "cannot use the database" in errors[0]["message"] and words in errors[0]["message"]
    assert "hint: " in errors[0]["message"] and "[database].url" in errors[0]["message"]


SYNC_AND_BACKFILL = [("sync",), ("backfill", "--from", "2024-01-01", "--to", "2024-01-02")]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sqlite:////nonexistent/dir/etl.db", "No such file or directory"),
        ("postgresql://root@127.0.0.1:1/test", "Connect call failed"),
        ("mysql://root@127.0.0.1:1/test", "Can't connect to MySQL server"),
    ],
    ids=["sqlite-missing-directory", "postgresql-refused", "mysql-refused"],
)
@pytest.mark.parametrize("command", SYNC_AND_BACKFILL, ids=["sync", "backfill"])
async def test_exit_1_with_a_hint_when_the_database_cannot_be_reached(
    tmp_path: Path, url: str, words: str, command: tuple[str, ...]
) -> None:
    """The lock is the first thing to touch the database: its failure is one error line with a hint, as in
    status and migrate, not a traceback (whose lines would not be JSON)."""
    result = await _run_against_database(tmp_path, url, *command)
    _assert_one_clean_database_error(result, words)
    assert ("the file's directory must exist" in result.stderr) == url.startswith("sqlite"), result.stderr


@pytest.mark.parametrize(
    ("dialect", "words"),
    [("postgresql", 'database "etl_no_such_database" does not exist'), ("mysql", "Unknown database 'etl_no_such_database'")],
)
@pytest.mark.parametrize("command", [*SYNC_AND_BACKFILL, ("status",), ("migrate",)], ids=["sync", "backfill", "status", "migrate"])
async def test_exit_1_with_a_hint_when_the_database_does_not_exist(
    tmp_path: Path, fresh_database: Callable[[str], Any], command: tuple[str, ...], dialect: str, words: str
) -> None:
    """asyncpg raises its own error for an unknown database at connect time, not SQLAlchemy's. The hint says to
    create it: it told the user to check that the server is up and the credentials, which were both fine."""
    url = make_url(await fresh_database(dialect)).set(database="etl_no_such_database")
    result = await _run_against_database(tmp_path, url.render_as_string(hide_password=False), *command)
    _assert_one_clean_database_error(result, words)
    assert "CREATE DATABASE etl_no_such_database" in result.stderr and "credentials" not in result.stderr, result.stderr


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
async def test_a_url_naming_a_blocking_driver_loads_through_the_projects_async_driver(
    tmp_path: Path, fresh_database: Callable[[str], Any], dialect: str
) -> None:
    """`postgresql+psycopg2://` copied from another tool was a traceback (not async, or not installed), exit 1."""
    blocking = {"sqlite": "sqlite+pysqlite", "postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql"}[dialect]
    url = make_url(await fresh_database(dialect)).set(drivername=blocking).render_as_string(hide_password=False)
    async with Simulator() as sim:
        result = await run_etl("--log-format", "json", "sync", "--config", str(write_config(tmp_path, sim, url, resources=["products"])))
    assert result.returncode == 0, result.stderr
    assert "products: 20 loaded, 0 rejected, 1 page, " in result.stdout


@pytest.mark.parametrize("driver", ["mariadb+aiomysql", "mariadb+pymysql"])
async def test_a_mariadb_url_naming_a_driver_loads(tmp_path: Path, fresh_database: Callable[[str], Any], driver: str) -> None:
    """`mariadb+aiomysql://`, etl's own driver under SQLAlchemy's MariaDB name, passed migrate, status and check,
    and then every sync failed, exit 1: "no upsert for the mariadb dialect"."""
    url = make_url(await fresh_database("mysql")).set(drivername=driver).render_as_string(hide_password=False)
    async with Simulator() as sim:
        result = await run_etl("sync", "--config", str(write_config(tmp_path, sim, url, resources=["products"])))
    assert result.returncode == 0, result.stderr
    assert "products: 20 loaded" in result.stdout


@pytest.mark.parametrize("command", ["sync", "status", "migrate", "check"])
@pytest.mark.parametrize("url", ["mysql://etl:p@ss:w0rd@127.0.0.1/etl", "postgresql//etl:hunter2@127.0.0.1/etl"], ids=["unencoded", "no-colon"])
async def test_a_database_url_that_does_not_parse_is_exit_2_without_its_password(tmp_path: Path, url: str, command: str) -> None:
    """A password with an unencoded @ or : was a ValueError traceback ending in a piece of the password
    ("invalid literal for int(): 'w0rd'"); a URL SQLAlchemy could not parse was quoted whole, password and all."""
    result = await _run_against_database(tmp_path, url, command)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for piece in ("w0rd", "hunter2", "p@ss"):
        assert piece not in result.stderr + result.stdout
    assert "database.url" in result.stderr + result.stdout and "percent-encode" in result.stderr + result.stdout


@pytest.mark.parametrize(("query", "words"), [
    ("sslmode=require", "parameter 'sslmode' is not one etl's MySQL driver (aiomysql) takes"),
    ("charset=utf8", "charset=utf8 cannot carry"),
    ("charset=latin1", "charset=latin1 cannot carry"),
])
async def test_a_mysql_url_parameter_the_driver_cannot_use_is_exit_2_naming_it(
    tmp_path: Path, fresh_database: Callable[[str], Any], query: str, words: str
) -> None:
    """A parameter aiomysql does not take was a TypeError traceback, exit 1. `charset=utf8` (3-byte, as older
    tools write it) failed every run from the first emoji on, exit 1; `latin1` was a UnicodeEncodeError traceback."""
    url = f"{await fresh_database('mysql')}?{query}"
    async with Simulator() as sim:
        result = await run_etl("--log-format", "json", "sync", "--config", str(write_config(tmp_path, sim, url, resources=["orders"])))
    assert result.returncode == 2, result.stderr
    events = [orjson.loads(line) for line in result.stderr.splitlines()]  # a traceback line is not JSON
    assert [event["level"] for event in events] == ["error"], result.stderr
    assert "database.url" in events[0]["message"] and words in events[0]["message"], events


SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


@pytest.mark.parametrize(("query", "code", "words"), [
    ("ssl_mode=REQUIRED", 1, "did not start TLS, which ssl_mode=REQUIRED in the URL asks for"),
    (f"ssl_ca={SYSTEM_CAS}", 1, "did not start TLS, which ssl_ca in the URL asks for"),
    ("ssl_ca=/no/such/ca.pem", 2, "ssl_ca: cannot read"),
    ("ssl_mode=sometimes", 2, "ssl_mode=sometimes is not one of"),
    ("ssl_mode=preferred", 0, ""),
    ("ssl_mode=DISABLED", 0, ""),
])
async def test_a_mysql_url_asking_for_tls_gets_it_or_fails(
    tmp_path: Path, fresh_database: Callable[[str], Any], query: str, code: int, words: str
) -> None:
    """The test server offers no TLS. `ssl_ca=` loaded in plain text with exit 0: aiomysql starts TLS only when
    the server offers it, and was given SQLAlchemy's dict where it takes an SSLContext. MySQL's own
    `ssl_mode` was a TypeError traceback."""
    if query.startswith("ssl_ca=/etc") and not Path(SYSTEM_CAS).is_file():
        pytest.skip(f"no {SYSTEM_CAS}")
    url = f"{await fresh_database('mysql')}?{query}"
    async with Simulator() as sim:
        result = await run_etl("--log-format", "json", "sync", "--config", str(write_config(tmp_path, sim, url, resources=["products"])))
    assert result.returncode == code, result.stderr
    events = [orjson.loads(line) for line in result.stderr.splitlines()]  # a traceback line is not JSON
    errors = [event["message"] for event in events if event["level"] == "error"]
    assert [words in error for error in errors] == ([True] if words else []), errors


async def test_libpq_parameters_in_a_postgresql_url_are_used(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """`options=-csearch_path=…` (a schema of one's own), `application_name` and `connect_timeout`, as libpq URLs
    carry them, were exit 2 "asyncpg does not take the parameter": a schema could only be chosen by ALTER ROLE.
    asyncpg's own numbers (`statement_cache_size=0`, for pgbouncer) reached it as strings: a TypeError traceback."""
    url = await fresh_database("postgresql")
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.exec_driver_sql("CREATE SCHEMA etl_probe_s")
    await engine.dispose()
    query = "options=-csearch_path%3Detl_probe_s&application_name=etl-nightly&connect_timeout=10&statement_cache_size=0"
    async with Simulator() as sim:
        result = await run_etl("sync", "--config", str(write_config(tmp_path, sim, f"{url}?{query}", resources=["products"])))
    assert result.returncode == 0, result.stderr
    assert await scalar(url, "SELECT count(*) FROM etl_probe_s.products") == 20
    assert await scalar(url, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'") == 0


async def test_a_database_user_without_insert_privilege_is_told_what_to_grant(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A user that may read but not write a resource table failed with "refused a statement: <class
    'asyncpg.exceptions.InsufficientPrivilegeError'>: permission denied", and no word of what to grant."""
    url = await fresh_database("postgresql")
    role = f"etl_probe_{uuid.uuid4().hex[:8]}"
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["products"])
        assert (await run_etl("sync", "--config", str(config))).returncode == 0
        engine = create_engine(url)
        async with engine.begin() as connection:
            for statement in (f"CREATE ROLE {role} LOGIN", f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
                              f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}", f"REVOKE INSERT, UPDATE ON products FROM {role}"):
                await connection.exec_driver_sql(statement)
        try:
            limited = make_url(url).set(username=role).render_as_string(hide_password=False)
            result = await run_etl("sync", "--config", str(config), env=etl_env(ETL_DATABASE_URL=limited))
        finally:
            async with engine.begin() as connection:
                await connection.exec_driver_sql(f"DROP OWNED BY {role}")
                await connection.exec_driver_sql(f"DROP ROLE {role}")
            await engine.dispose()
    assert result.returncode == 1, result.stderr
    assert "<class" not in result.stderr and "permission denied for table products" in result.stderr
    assert "grant the database user" in result.stderr


async def test_a_url_naming_an_async_driver_that_is_not_installed_is_exit_2_naming_it(tmp_path: Path) -> None:
    result = await _run_against_database(tmp_path, "postgresql+psycopg_async://root@127.0.0.1:1/test", "status")
    assert result.returncode == 2, result.stderr
    events = [orjson.loads(line) for line in result.stderr.splitlines()]  # a traceback line is not JSON
    assert [event["level"] for event in events] == ["error"], result.stderr
    assert "database.url" in events[0]["message"] and "not installed (psycopg)" in events[0]["message"]


async def test_a_missing_sqlite_directory_leaves_every_stderr_line_json_run_after_run(tmp_path: Path) -> None:
    """aiosqlite's worker thread sometimes outlived the event loop after the failed open (4 runs in 15) and
    printed its traceback straight to stderr, between the JSON lines."""
    document = demo_document({"url": "sqlite:///no-such-directory/etl.db"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    commands = [("migrate",)] * 10 + [("status",), ("sync",)]  # migrate opens the file; status and sync stop before
    results = await asyncio.gather(*(run_etl("--log-format", "json", *command, "--config", str(config), timeout=60) for command in commands))
    for result in results:
        assert result.returncode == 1, result.stderr
        events = [orjson.loads(line) for line in result.stderr.splitlines()]  # a traceback line is not JSON
        assert [event["level"] for event in events] == ["error"], result.stderr
        assert "no-such-directory" in events[0]["message"]


async def test_exit_2_for_an_unknown_resource_before_the_interval_is_announced(tmp_path: Path) -> None:
    """`backfill --resource nope` printed "backfill from … to …" and then refused: a typo is refused first."""
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, "http://127.0.0.1:9/api", "http://127.0.0.1:9/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    result = await run_etl("--config", str(config), "backfill", "--from", "2024-01-01", "--to", "2024-01-02", "--resource", "nope")
    assert result.returncode == 2 and "nope" in result.stderr
    assert "backfill from" not in result.stdout


@pytest.mark.parametrize("command", [("sync",), ("backfill", "--from", "2024-01-01", "--to", "2024-01-02")], ids=["sync", "backfill"])
async def test_a_table_name_given_as_resource_names_the_resource_it_belongs_to(tmp_path: Path, command: tuple[str, ...]) -> None:
    """`--resource crm_customers`, the table name the database shows, listed the known resources without
    saying that crm_customers is the table of one of them."""
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, "http://127.0.0.1:9/api", "http://127.0.0.1:9/token")
    document["resources"][1]["table"] = "crm_customers"
    config = tomlwriter.write(tmp_path / "config.toml", document)
    result = await run_etl("--config", str(config), *command, "--resource", "crm_customers")
    assert result.returncode == 2, result.stderr
    assert "crm_customers is the table of resource 'customers': pass --resource customers" in result.stderr


async def test_check_on_an_ascii_terminal_reports_instead_of_crashing(tmp_path: Path) -> None:
    """PYTHONIOENCODING=ascii (LANG=C under cron): the ✘ of a failed step was a UnicodeEncodeError, exit 1."""
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, f"http://127.0.0.1:{_free_port()}/api", f"http://127.0.0.1:{_free_port()}/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    result = await run_etl("--config", str(config), "check", env=etl_env(PYTHONIOENCODING="ascii"))
    assert result.returncode == 5, result.stderr
    assert "UnicodeEncodeError" not in result.stderr and "\\u2718" in result.stdout


def _api_with_a_refused_record(dialect: str, records: int, refused_at: int) -> dict[tuple[str, str], Handler]:
    """Ten records a page; record `refused_at` is one the database refuses though it passes validation."""
    case = CASES[dialect]
    served = [case["refused" if n == refused_at else "good"](n) for n in range(1, records + 1)]

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "refusal-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        return web.json_response({"data": served[(page - 1) * 10: page * 10]})

    return {("POST", "/oauth2/token"): token, ("GET", "/api/v1/items"): items}


@pytest.mark.parametrize("max_rejects", [0, 1])
@pytest.mark.parametrize("dialect", ["mysql", "postgresql"])
async def test_a_record_the_database_refuses_is_a_reject_counted_against_max_rejects(
    dialect: str, max_rejects: int, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A record MariaDB or PostgreSQL refuses (json too deep, a key too large to index) failed every run on it
    with exit 1 and loaded nothing of its batch. Now it is a reject with the database's reason, the other records
    load, and it counts against max_rejects like any other reject."""
    url = await fresh_database(dialect)
    async with serving(_api_with_a_refused_record(dialect, records=25, refused_at=13)) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["sync"] = {"max_rejects": max_rejects}
        document["resources"] = [{
            "name": "items", "path": "/items", "records_path": "data", "primary_key": CASES[dialect]["primary_key"],
            "pagination": {"style": "page", "page_size": 10}, "columns": CASES[dialect]["columns"],
        }]
        config = tomlwriter.write(tmp_path / "config.toml", document)
        result = await run_etl("sync", "--config", str(config))

    assert result.returncode == (1 if max_rejects == 0 else 0), result.stderr
    assert "items: 24 loaded, 1 rejected" in result.stdout
    assert "items: the database refused 1 record(s)" in result.stderr
    assert await scalar(url, "SELECT COUNT(*) FROM items") == 24
    ((key, error),) = await rows(url, "SELECT record_key, error FROM etl_rejects")
    assert error.startswith("the database refused this record: ")
    refused = CASES[dialect]["refused"](13)
    assert key == "|".join(str(refused[name]) for name in CASES[dialect]["primary_key"])[:255]
    assert ("CONSTRAINT `items.doc` failed" if dialect == "mysql" else "index row size") in error
    if dialect == "mysql":  # MariaDB's words alone did not say why, nor what to do about it
        assert "nested 32 levels or more" in error and "resources.items.columns.doc" in error, error
    ((fetched, loaded, rejected),) = await rows(url, "SELECT records_fetched, records_loaded, records_rejected FROM etl_runs")
    assert (fetched, loaded, rejected) == (25, 24, 1)


async def test_etl_runs_names_every_resource_that_failed_and_why(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """Two resources failed, each for its own reason: etl_runs' error held only the first met, without its resource's
    name, so whoever read `status` the next morning fixed one and met the other the night after. The other
    resources are loaded whole."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders", "customers", "products"])
        text = config.read_text().replace('"path" = "/customers"', '"path" = "/v2/clients"')
        config.write_text(text.replace('"path" = "/products"', '"path" = "/catalogue"'))
        result = await run_etl("sync", "--config", str(config))
        expected_orders = sim.settings.all_counts()["orders"]
    assert result.returncode == 1, result.stderr
    error = await scalar(url, "SELECT error FROM etl_runs")
    first_line = error.splitlines()[0]  # what `status` shows
    assert "customers: 404 from" in first_line and "/v2/clients" in first_line, error
    assert "products: 404 from" in first_line and "/catalogue" in first_line, error
    assert await scalar(url, "SELECT COUNT(*) FROM orders") + await scalar(url, "SELECT COUNT(*) FROM etl_rejects") == expected_orders
    assert "orders" not in first_line


async def test_etl_runs_names_the_resource_whose_rejects_went_over_max_rejects(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """"31 records were rejected" said neither where they came from nor that the other resources were fine."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["orders", "products"], sync={"max_rejects": 0})
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 1, result.stderr
    rejected = await scalar(url, "SELECT COUNT(*) FROM etl_rejects WHERE resource = 'orders'")
    assert rejected > 0 and await scalar(url, "SELECT COUNT(*) FROM etl_rejects WHERE resource = 'products'") == 0
    error = await scalar(url, "SELECT error FROM etl_runs")
    assert f"(orders: {rejected})" in error, error
    assert f"(orders: {rejected})" in result.stderr


def _answering(answer: dict[str, str], status: int) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A token endpoint that answers every request with this OAuth2 error."""

    async def token(_request: web.Request) -> web.Response:
        return web.json_response(answer, status=status)

    return token


async def _sync_and_check_against(
    token: Callable[[web.Request], Awaitable[web.Response]], tmp_path: Path, url: str
) -> tuple[Finished, Finished]:
    """sync, then check, of the demo's config against this token endpoint (no API: the token is what is tested)."""
    async with serving({("POST", "/oauth2/token"): token}) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        config = tomlwriter.write(tmp_path / "config.toml", document)
        return await run_etl("sync", "--config", str(config)), await run_etl("check", "--config", str(config))


@pytest.mark.parametrize("answer", [
    {"error": "unauthorized_client", "error_description": "Invalid client or Invalid client credentials"},  # Keycloak
    {"error": "access_denied", "error_description": "Unauthorized"},  # Auth0
])
async def test_a_401_from_the_token_endpoint_gets_the_credentials_hint_whatever_its_error(
    answer: dict[str, str], tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """RFC 6749 §5.2: a 401 is a client that failed to authenticate. Keycloak says so with unauthorized_client and
    Auth0 with access_denied: sync hinted at the grant not enabled, check at the method and Content-Type."""
    sync, check = await _sync_and_check_against(_answering(answer, 401), tmp_path, await fresh_database("sqlite"))
    assert (sync.returncode, check.returncode) == (3, 3), sync.stderr + check.stdout
    assert f'error "{answer["error"]}", error_description "{answer["error_description"]}"' in sync.stderr
    assert 'hint: check auth.client_id and the client secret; if both are right, try auth.client_auth = "body"' in sync.stderr
    assert 'hint: check auth.client_id (\'demo-client\') and the client secret (from $ETL_CLIENT_SECRET); client_auth = "body" was tried too' in check.stdout


async def test_an_error_etl_has_no_advice_for_is_not_hinted_at_the_method(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """Auth0's 403 access_denied (an app client not authorised for the API) got check's hint that the endpoint wants
    POST with a form body, which etl sent; sync gave no hint at all."""
    answer = {"error": "access_denied", "error_description": "Client has not been granted scopes: read:items"}
    sync, check = await _sync_and_check_against(_answering(answer, 403), tmp_path, await fresh_database("sqlite"))
    assert (sync.returncode, check.returncode) == (3, 3), sync.stderr + check.stdout
    assert 'error_description: "Client has not been granted scopes: read:items"' in check.stdout
    for output in (sync.stderr, check.stdout):
        assert "hint: the token endpoint refused this app client for the reason it gives" in output
        assert "Content-Type" not in output


async def test_a_408_from_the_token_endpoint_is_retried_not_an_authentication_failure(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A load balancer's 408 Request Timeout before the token endpoint is transient, as it is for the API: sync
    failed at once with exit 3 ("authentication failed"), and check hinted at the method and Content-Type."""
    url = await fresh_database("sqlite")
    timeouts = [1]

    async def token(_request: web.Request) -> web.Response:
        if timeouts[0] > 0:
            timeouts[0] -= 1
            return web.Response(status=408, text="<html><h1>408 Request Time-out</h1></html>", content_type="text/html")
        return web.json_response({"access_token": "after-408", "expires_in": 3600, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": 1}] if request.query["page"] == "1" else []})

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/v1/items"): items}) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["api"] |= {"max_retries": 2, "retry_backoff_s": 0.01}
        document["resources"] = [{
            "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
            "pagination": {"style": "page", "page_size": 10}, "columns": {"id": "integer"},
        }]
        config = tomlwriter.write(tmp_path / "config.toml", document)
        sync = await run_etl("sync", "--config", str(config))
        timeouts[0] = 1_000
        check = await run_etl("check", "--config", str(config))

    assert sync.returncode == 0, sync.stderr
    assert "answered 408: " in sync.stderr and "Request Time-out" in sync.stderr and "; retrying in" in sync.stderr
    assert "2 token request(s)" in sync.stderr
    assert check.returncode == 1, check.stdout
    assert "hint: the token endpoint is overloaded or down: check again later" in check.stdout


async def test_an_endpoint_that_wants_body_credentials_and_says_invalid_request_points_at_client_auth(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """An endpoint that reads the client only from the form answers Basic with invalid_request, "Missing parameter:
    client_id": sync and check hinted only at the method and Content-Type, which were right, and check did not try
    client_auth = "body", which works."""
    url = await fresh_database("sqlite")

    async def token(request: web.Request) -> web.Response:
        if "client_id" not in await request.post():
            return web.json_response({"error": "invalid_request", "error_description": "Missing parameter: client_id"}, status=400)
        return web.json_response({"access_token": "form-client", "expires_in": 3600, "token_type": "Bearer"})

    sync, check = await _sync_and_check_against(token, tmp_path, url)
    assert (sync.returncode, check.returncode) == (3, 3), sync.stderr + check.stdout
    assert 'if it says the client_id or client_secret is missing, try auth.client_auth = "body"' in sync.stderr
    assert 'hint: the token endpoint accepts client_auth = "body": set it in [auth]' in check.stdout


@pytest.mark.parametrize(("location", "hint"), [
    ("https://sso.example.com/login?next=%2Foauth2%2Ftoken", "is no token endpoint (a login page, or a proxy's)"),
    ("/oauth2/token/", "set auth.token_url to the address it redirects to"),
])
async def test_a_token_endpoint_redirecting_to_a_login_page_is_not_told_to_be_followed(
    location: str, hint: str, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A token_url that an SSO proxy or a hosted UI sends to its login page was hinted "set auth.token_url to the
    address it redirects to": the login page. Only a redirect to another token endpoint (http to https, a slash)
    is one to follow."""
    url = await fresh_database("sqlite")

    async def token(_request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    sync, check = await _sync_and_check_against(token, tmp_path, url)
    assert (sync.returncode, check.returncode) == (3, 3), sync.stderr + check.stdout
    assert hint in sync.stderr and hint in check.stdout


async def test_a_secret_in_quotes_is_pointed_out_when_the_endpoint_refuses_it(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """docker's --env-file keeps the quotes of ETL_CLIENT_SECRET="..." as part of the value: invalid_client for the
    right secret, and nothing said that the quotes went out with it."""
    url = await fresh_database("sqlite")

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"error": "invalid_client"}, status=400)

    async with serving({("POST", "/oauth2/token"): token}) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        config = tomlwriter.write(tmp_path / "config.toml", document)
        environment = etl_env(ETL_CLIENT_SECRET='"s3cr3t-in-quotes"')
        sync = await run_etl("sync", "--config", str(config), env=environment)
        check = await run_etl("check", "--config", str(config), env=environment)

    assert (sync.returncode, check.returncode) == (3, 3)
    note = "the client secret starts and ends with a quote, which is sent as part of it"
    assert note in sync.stderr and note in check.stdout
    assert "s3cr3t-in-quotes" not in sync.stderr + sync.stdout + check.stdout + check.stderr


TEXT_EVENT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR|CRITICAL) "


async def test_a_message_of_many_lines_continues_indented_in_text_logs(tmp_path: Path) -> None:
    """A config with several errors logged them as one event whose later lines started at column 0, like events of
    their own without a time or level. Every line of an event after its first is indented now, so a line either
    starts an event or belongs to the one above."""
    config = tmp_path / "config.toml"
    config.write_text('[api]\nbase_url = 5\ntimeout_s = "soon"\n')
    result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 4 and re.match(TEXT_EVENT, lines[0]), result.stderr
    assert all(line.startswith("  ") and "Field required" in line for line in lines[2:]), result.stderr


async def test_a_library_warning_is_one_line_of_the_log(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A column etl did not make, of a type SQLAlchemy does not know (PostgreSQL's xml), makes it warn on every run.
    The warning came as etl's source file, the warning, a line of etl's code and an empty line: three lines of a
    text log for one event, one of them blank, and the code line meant nothing to the reader."""
    url = await fresh_database("postgresql")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["products"])
        assert (await run_etl("sync", "--config", str(config))).returncode == 0
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.exec_driver_sql("ALTER TABLE products ADD COLUMN notes_xml xml")
        finally:
            await engine.dispose()
        result = await run_etl("sync", "--config", str(config))

    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "notes_xml" in line]
    assert len(warned) == 1 and re.match(TEXT_EVENT, warned[0]), result.stderr
    assert "Did not recognize type 'xml'" in warned[0]
    assert all(re.match(TEXT_EVENT, line) for line in result.stderr.splitlines()), result.stderr


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
async def test_json_logs_stay_json_on_a_stderr_that_is_not_utf8(encoding: str, tmp_path: Path) -> None:
    """Under PYTHONIOENCODING=ascii (or a Latin-1 locale), é was written as `\\xe9` and 😀 as `\\U0001f600`, escapes
    JSON does not have, or as a Latin-1 byte: that line no longer parsed. It is written with JSON's own escapes."""
    document = demo_document({"url": f"sqlite:///{tmp_path / 'etl.db'}"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    config = tomlwriter.write(tmp_path / "config.toml", document)
    result = await run_etl(
        "--log-format", "json", "sync", "--resource", "café😀", "--config", str(config), env=etl_env(PYTHONIOENCODING=encoding)
    )
    assert result.returncode == 2, result.stderr
    events = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert len(events) == 1 and "café😀" in events[0]["message"], result.stderr


async def test_a_file_name_that_is_not_utf8_is_one_json_line(tmp_path: Path) -> None:
    """A --config path with a Latin-1 byte in it reaches Python as a lone surrogate, which orjson refuses: the JSON
    formatter raised, and stderr got "--- Logging error ---" and two tracebacks in plain text, the error itself lost."""
    path = os.fsencode(tmp_path) + b"/caf\xe9.toml"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etl", "--log-format", "json", "--config", path, "sync",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=etl_env(),
    )
    result = await finish(process)
    assert result.returncode == 2, result.stderr
    events = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert len(events) == 1 and "not found" in events[0]["message"] and "caf" in events[0]["message"], result.stderr


@pytest.mark.parametrize("log_format", [["--log", "json"], ["--log-f=json"]])
async def test_an_abbreviated_log_format_option_makes_usage_errors_json_too(log_format: list[str]) -> None:
    """argparse takes `--log json` for `--log-format json`, so runs logged JSON, but a refused command line was
    reported in text: the one line a JSON reader met that did not parse."""
    result = await run_etl(*log_format, "sync", "--bogus")
    assert result.returncode == 2
    [event] = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert "unrecognized arguments: --bogus" in event["message"]


async def test_no_arguments_at_all_is_a_usage_error() -> None:
    """`python -m etl` alone: exit 2 and the missing COMMAND named, not a traceback from reading the command line."""
    result = await run_etl()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "required: COMMAND" in result.stderr


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
async def test_a_database_that_does_not_answer_is_exit_1_in_bounded_time_saying_so(tmp_path: Path, scheme: str) -> None:
    """A server that takes the connection and never answers: asyncpg's timeout ended the run with "cannot use the
    database ...: " and nothing after the colon, and aiomysql (no timeout on its handshake) never ended it: a nightly
    job hung, and the next night's beside it. `connect_timeout` in the URL bounds both."""
    async with silent_server() as (port, _connected):
        result = await _run_against_database(tmp_path, f"{scheme}://root@127.0.0.1:{port}/x?connect_timeout=2", "sync")
    _assert_one_clean_database_error(result, "no answer from the server")
    assert "connect_timeout" in result.stderr, result.stderr
