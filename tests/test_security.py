"""Security promises: TLS verification is never off silently, values are bound parameters, names are never SQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from loopback import Handler, serving
from sqlalchemy import select

from etl.config import config_from_document
from etl.db import create_engine
from etl.demo import demo_document
from etl.schema import resource_table
from etl.simulator import Simulator
from etl.store import LoadBatch, Store

import tomlwriter
from dbquery import rows
from etlproc import SECRET, etl_env, finish, run_etl, start_etl, write_config

HOSTILE = "x'); DROP TABLE probe; -- \" ; DELETE FROM etl_runs; \\\\ \u0000 ☃ 🎉"


async def test_verify_tls_false_is_warned_about_on_every_run(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """Turning TLS verification off works only with a loud warning, on each run, not just the first."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        config = write_config(tmp_path, sim, url, resources=["products"], api={"verify_tls": False})
        runs = [await run_etl("sync", "--config", str(config)) for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert "WARNING" in result.stderr and "TLS verification is OFF" in result.stderr


async def test_hostile_values_are_stored_verbatim(database_url: str) -> None:
    """A value that looks like SQL is data: stored and read back unchanged, on every dialect."""
    document = demo_document({"url": database_url}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")
    document["resources"] = [{
        "name": "probe", "path": "/probe", "primary_key": ["key"],
        "columns": {"key": "string", "note": "text", "order": "string", "select": "json"},
    }]
    resource = config_from_document(document).resources[0]
    value = HOSTILE.replace("\u0000", "")  # PostgreSQL text cannot hold NUL; that is a reject, see test_records.py
    engine = create_engine(database_url)
    try:
        store = Store(engine)
        await store.prepare([resource], auto_migrate=True)
        row = {"key": value[:200], "note": value, "order": value[:200], "select": {"q": value}}
        await store.commit(LoadBatch(rows={"probe": [row]}), run_id=1)
        async with engine.connect() as connection:
            stored = (await connection.execute(select(resource_table(resource)))).one()
            runs_left = (await connection.exec_driver_sql("SELECT COUNT(*) FROM etl_runs")).scalar()
    finally:
        await engine.dispose()
    assert stored.key == value[:200] and stored.note == value and stored.order == value[:200]
    assert stored.select == {"q": value}
    assert runs_left == 0


ECHOED_TOKEN = "TOKEN-SEKRIT-abc123"


def _echoing_servers(refuse_client: bool) -> dict[tuple[str, str], Handler]:
    """A token endpoint and an API that echo what they were sent in their error bodies, as careless servers do."""

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if refuse_client:
            description = f"secret {form.get('client_secret')} is wrong"
            return web.json_response({"error": "invalid_client", "error_description": description}, status=400)
        return web.json_response({"access_token": ECHOED_TOKEN, "expires_in": 3600, "token_type": "Bearer"})

    async def orders(request: web.Request) -> web.Response:
        return web.json_response({"message": f"bad request for token {request.headers.get('Authorization')}"}, status=400)

    return {("POST", "/oauth2/token"): token, ("GET", "/api/v1/orders"): orders}


@pytest.mark.parametrize("refuse_client", [True, False], ids=["secret-echoed-by-token-endpoint", "token-echoed-by-api"])
async def test_a_secret_or_token_echoed_by_a_server_is_masked_in_etl_runs_and_on_stdout(
    refuse_client: bool, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """Masking only the log lines left the echoed value in the summary on stdout and in etl_runs.error."""
    url = await fresh_database("sqlite")
    async with serving(_echoing_servers(refuse_client)) as origin:
        async with Simulator() as sim:  # only for write_config's shape; its URLs are replaced below
            config = write_config(tmp_path, sim, url, resources=["orders"], auth={"client_auth": "body"})
        text = config.read_text().replace(sim.base_url, f"{origin}/api/v1").replace(sim.token_url, f"{origin}/oauth2/token")
        config.write_text(text)
        result = await run_etl("sync", "--config", str(config))

    assert result.returncode == (3 if refuse_client else 1), result.stderr
    stored = [row.error for row in await rows(url, "SELECT error FROM etl_runs")]
    assert stored and all(stored)
    for where in (result.stdout, result.stderr, *stored):
        assert SECRET not in where and ECHOED_TOKEN not in where
    assert "***" in result.stdout


@pytest.mark.parametrize("client_auth", ["body", "basic"])
async def test_a_secret_with_a_tilde_echoed_as_it_was_sent_is_masked(
    client_auth: str, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """An Azure AD secret holds '~'. The form body sent it as `~`, but what was masked was `%7E`: a token endpoint
    echoing its raw request body put the secret on stderr, stdout and in etl_runs.error."""
    secret = "Abc8Q~d/e+f=g"
    url = await fresh_database("sqlite")

    async def token(request: web.Request) -> web.Response:
        sent = f"{request.headers.get('Authorization')} {(await request.read()).decode()}"
        return web.json_response({"error": "invalid_client", "error_description": f"refused: {sent}"}, status=400)

    async with serving({("POST", "/oauth2/token"): token}) as origin:
        document = demo_document({"url": url}, f"{origin}/api/v1", f"{origin}/oauth2/token")
        document["auth"]["client_auth"] = client_auth
        config = tomlwriter.write(tmp_path / "config.toml", document)
        result = await run_etl("sync", "--config", str(config), env=etl_env(ETL_CLIENT_SECRET=secret))
        check = await run_etl("check", "--config", str(config), env=etl_env(ETL_CLIENT_SECRET=secret))

    assert (result.returncode, check.returncode) == (3, 3), result.stderr
    stored = [row.error for row in await rows(url, "SELECT error FROM etl_runs")]
    for where in (result.stdout, result.stderr, check.stdout, check.stderr, *stored):
        assert "Abc8Q" not in where
    assert "refused: " in result.stderr and "***" in result.stderr


async def test_a_token_url_in_cleartext_off_this_machine_is_warned_about(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """An http:// token_url sends the client secret unencrypted on every run (Basic or form): verify_tls = false,
    a lesser exposure, was warned about on every run, this not at all. Loopback (the simulator, a tunnel) is not."""
    url = await fresh_database("sqlite")

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"error": "invalid_client"}, status=400)

    async with serving({("POST", "/oauth2/token"): token}) as origin:
        port = origin.rsplit(":", 1)[1]
        document = demo_document({"url": url}, f"{origin}/api/v1", f"http://localhost.localdomain.invalid:{port}/oauth2/token")
        config = tomlwriter.write(tmp_path / "config.toml", document)
        remote = await run_etl("sync", "--config", str(config))
        check = await run_etl("check", "--config", str(config))
        document["auth"]["token_url"] = f"{origin}/oauth2/token"
        local = await run_etl("sync", "--config", str(tomlwriter.write(tmp_path / "config.toml", document)))

    warning = "auth.token_url is http://: the client secret goes to localhost.localdomain.invalid unencrypted"
    assert warning in remote.stderr and warning in check.stdout + check.stderr
    assert "unencrypted" not in local.stderr


PROXY_PASSWORD = "Pr0xy-pa55:word"


async def test_proxy_credentials_echoed_by_a_server_are_masked(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """$HTTP_PROXY=http://user:password@proxy:port: aiohttp sends the credentials as a Proxy-Authorization header, and a
    proxy that forwards it to a token endpoint echoing its request put them on stderr, stdout and in etl_runs.error."""
    url = await fresh_database("sqlite")

    async def token(request: web.Request) -> web.Response:
        sent = request.headers.get("Proxy-Authorization")
        return web.json_response({"error": "invalid_client", "error_description": f"refused: {sent}"}, status=400)

    async with serving({("POST", "/oauth2/token"): token}) as origin:  # the server is its own forwarding proxy
        document = demo_document({"url": url}, f"{origin}/api/v1", f"{origin}/oauth2/token")
        config = tomlwriter.write(tmp_path / "config.toml", document)
        proxy = origin.replace("http://", f"http://proxy-user:{quote(PROXY_PASSWORD, safe='')}@")
        result = await run_etl("sync", "--config", str(config), env=etl_env(HTTP_PROXY=proxy, NO_PROXY=""))

    assert result.returncode == 3, result.stderr
    assert "refused: Basic ***" in result.stderr
    stored = [row.error for row in await rows(url, "SELECT error FROM etl_runs")]
    basic = base64.b64encode(f"proxy-user:{PROXY_PASSWORD}".encode()).decode()
    for where in (result.stdout, result.stderr, *stored):
        assert basic not in where and PROXY_PASSWORD not in where


QUERY_KEY = "QueryKey-9f8e7d/6c+5b"


@pytest.mark.parametrize(("name", "in_path"), [("api_key", False), ("subscription-key", False), ("code", True)])
async def test_a_key_in_a_query_parameter_echoed_by_the_api_is_masked(
    name: str, in_path: bool, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """An API key sent as a query parameter (Azure API Management's `subscription-key`, Azure Functions' `code`) was
    masked in the URL of a message, or not at all, but an API answering 400 with the query string it was sent put it
    on stderr, stdout and in etl_runs.error; `check` printed it too."""
    url = await fresh_database("sqlite")

    async def products(request: web.Request) -> web.Response:
        return web.json_response({"message": f"invalid query {request.query_string}"}, status=400)

    async with serving({("POST", "/oauth2/token"): _echoing_servers(False)[("POST", "/oauth2/token")],
                        ("GET", "/api/v1/products"): products}) as origin:
        document = demo_document({"url": url}, f"{origin}/api/v1", f"{origin}/oauth2/token")
        document["resources"] = [r for r in document["resources"] if r["name"] == "products"]
        if in_path:
            document["resources"][0]["path"] = f"/products?{urlencode({name: QUERY_KEY})}"
        else:
            document["resources"][0]["params"] = {name: QUERY_KEY}
        config = tomlwriter.write(tmp_path / "config.toml", document)
        result = await run_etl("sync", "--config", str(config))
        check = await run_etl("check", "--config", str(config))

    assert result.returncode == 1, result.stderr
    assert "invalid query" in result.stderr and "invalid query" in check.stdout
    stored = [row.error for row in await rows(url, "SELECT error FROM etl_runs")]
    for where in (result.stdout, result.stderr, check.stdout, check.stderr, *stored):
        assert "QueryKey" not in where


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
async def test_a_database_password_given_as_a_url_parameter_is_masked(scheme: str, tmp_path: Path) -> None:
    """`postgresql://user@host/db?password=...` (libpq's form; aiomysql takes it too) connects like the password in
    the user info, but every database error and check's `database url` step showed it, as SQLAlchemy hides only the latter."""
    url = f"{scheme}://etl@127.0.0.1:1/etl?password=Db-Pa55word-in-query" + ("&sslpassword=Key-Pa55word" if scheme == "postgresql" else "")
    results = [
        await finish(await start_etl(command, env=etl_env(ETL_DATABASE_URL=url), cwd=tmp_path))  # no config: the URL will do
        for command in ("migrate", "status")
    ]
    for result in results:
        assert result.returncode == 1 and "cannot use the database" in result.stderr, result.stderr
        assert "Pa55word" not in result.stderr + result.stdout and "password=***" in result.stderr


LATIN1_TOKEN = b'{"access_token": "latin1-token", "expires_in": 3600, "token_type": "Bearer"}'
LATIN1_FORBIDDEN = b'{"message": "Forbidden"}'


async def _latin1_challenge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A token endpoint, and an API answering 403 with a Latin-1 byte in WWW-Authenticate (aiohttp cannot send one)."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            if b"/oauth2/token" in head.split(b"\r\n")[0]:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(LATIN1_TOKEN), LATIN1_TOKEN))
            else:
                writer.write(b'HTTP/1.1 403 Forbidden\r\nWWW-Authenticate: Bearer realm="caf\xe9"\r\n'
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(LATIN1_FORBIDDEN), LATIN1_FORBIDDEN))
            await writer.drain()
    writer.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_a_header_that_is_not_utf8_in_an_error_is_recorded(dialect: str, tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """A 403 whose WWW-Authenticate holds a Latin-1 byte (realm="café"): aiohttp reads it as a lone surrogate, and
    the error quoting it could not be written to etl_runs: SQLite's run ended as "internal error: UnicodeEncodeError",
    PostgreSQL's as "the database refused a statement", the 403 itself never said. The byte is shown as its escape."""
    url = await fresh_database(dialect)
    server = await asyncio.start_server(_latin1_challenge, "127.0.0.1", 0)
    origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        document = demo_document({"url": url}, f"{origin}/api/v1", f"{origin}/oauth2/token")
        document["resources"] = [r for r in document["resources"] if r["name"] == "products"]
        result = await run_etl("--log-format", "json", "sync", "--config", str(tomlwriter.write(tmp_path / "config.toml", document)))

    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr and "refused a statement" not in result.stderr, result.stderr
    [run] = await rows(url, "SELECT status, error FROM etl_runs")
    assert run.status == "failed" and "403" in run.error and 'realm="caf\\udce9"' in run.error, run.error
