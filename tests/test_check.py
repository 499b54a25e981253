"""`python -m etl check`: each step that can fail fails against the simulator, by name, with its hint.

Config files are written to tmp_path and read back the way a user's would be;
`run_check` runs in-process and its stdout is the report. Every test also
asserts that the client secret appears nowhere in what check printed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from loopback import serving
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import make_url, text

from etl.check import run_check
from etl.db import create_engine, migrate, sqlite_file
from etl.demo import demo_document
from etl.simulator import Simulator, SimulatorSettings

import tomlwriter
from etlproc import etl_env, finish, run_etl, start_etl

SECRET = "demo-secret"
WriteConfig = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteConfig:
    """`write_config(base_url, token_url, resources=[...], api={...}, ...)`: the demo config as a file."""
    monkeypatch.setenv("ETL_CLIENT_SECRET", SECRET)
    monkeypatch.delenv("ETL_DATABASE_URL", raising=False)

    def write(
        base_url: str,
        token_url: str,
        database_url: str | None = None,
        resources: list[str] | None = None,
        records_path: str | None = None,
        **sections: dict[str, Any],
    ) -> Path:
        database = {"url": database_url or f"sqlite:///{tmp_path / 'etl.db'}"}
        document = demo_document(database, base_url, token_url)
        for section, values in sections.items():
            document[section] = {**document.get(section, {}), **values}
        if resources is not None:
            document["resources"] = [r for r in document["resources"] if r["name"] in resources]
        if records_path is not None:
            document["resources"][0]["records_path"] = records_path
        path = tmp_path / "config.toml"
        path.write_text(tomlwriter.dumps(document), encoding="utf-8")
        return path

    return write


async def check(
    capsys: pytest.CaptureFixture[str], path: Path, save_certs: str | None = None, output_format: str = "text"
) -> tuple[int, str]:
    """Exit code and stdout of one check; fails if the secret leaked, or if a failed step has no hint."""
    code = await run_check(path, save_certs=save_certs, output_format=output_format)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    if output_format == "json":
        assert all(step["hint"] for step in json.loads(captured.out)["steps"] if step["status"] == "failed")
    else:
        for block in re.split(r"\n(?=[✔!✘–] )", captured.out):
            assert not block.startswith("✘") or "\n    hint: " in block, block
    return code, captured.out


def line_of(out: str, start: str) -> str:
    """The report line that starts with `start` (a mark and a step name)."""
    return next(line for line in out.splitlines() if line.startswith(start))


def summary_of(line: str) -> str:
    """What a report line says after its mark, label and time."""
    return re.split(r" \d+\.\d\ds  ", line, maxsplit=1)[1]


@pytest.fixture
async def tls_simulator() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorSettings(tls=True)) as sim:
        yield sim


async def test_every_step_passes_against_the_simulator(
    simulator: Simulator, write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database_url = f"sqlite:///{tmp_path / 'migrated.db'}"
    engine = create_engine(database_url)
    await migrate(engine)
    await engine.dispose()
    path = write_config(simulator.base_url, simulator.token_url, database_url, resources=["customers", "events", "payments", "products"])

    code, out = await check(capsys, path)

    assert code == 0, out
    assert "✘" not in out and "–" not in out and "!" not in out.split("\n", 1)[1]
    steps = ("config", "secret", "database url", "trust", "dns token+api", "tcp token+api", "token", "database connect")
    for step in (*steps, "database schema", "database write"):
        assert line_of(out, f"✔ {step}")
    assert "200, lifetime 3600s, scope legacy-api/read" in line_of(out, "✔ token")
    assert "100 records at 'results' of 200; next page: offset=100" in line_of(out, "✔ resource customers")
    assert "next page: cursor=" in line_of(out, "✔ resource events")
    assert "next page: a Link rel=next" in line_of(out, "✔ resource payments")
    assert "20 records at 'products'; next page: none" in line_of(out, "✔ resource products")
    assert out.rstrip().endswith("check passed: 14 ok, 0 warning(s)")

    code, out = await check(capsys, path, output_format="json")
    document = json.loads(out)
    assert code == 0 and document["ok"] is True and document["exit_code"] == 0
    assert {step["status"] for step in document["steps"]} == {"ok"}
    token = next(step for step in document["steps"] if step["step"] == "token")
    assert token["summary"].startswith("200, lifetime 3600s") and token["hint"] is None


async def test_the_simulators_invalid_orders_are_shown_as_the_first_validation_errors(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The latest window is empty (the data is from 2024), so the first window from `start` is read."""
    path = write_config(simulator.base_url, simulator.token_url, resources=["orders"], sync={"max_rejects": 0})

    code, out = await check(capsys, path)

    assert code == 1
    line = line_of(out, "✘ resource orders")
    assert "100 records at 'data' of 1000, 1 invalid; next page: page=2" in line
    assert "no records in the latest window; this page is from the first, [2024-01-01T00:00:00Z, " in out
    assert out.count("invalid record ") == 1
    assert "hint: " in out and "[resources.columns]" in out and "max_rejects = 0" in out


async def test_a_bad_secret_shows_the_endpoints_error_verbatim(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(simulator.base_url, simulator.token_url)
    monkeypatch.setenv("ETL_CLIENT_SECRET", "not-the-right-secret")

    code, out = await check(capsys, path)

    assert code == 3
    assert "400 invalid_client" in line_of(out, "✘ token")
    assert 'error: "invalid_client"' in out and 'error_description: "Client authentication failed"' in out
    assert "check auth.client_id ('demo-client') and the client secret (from $ETL_CLIENT_SECRET)" in out
    assert 'client_auth = "body" was tried too and refused as well' in out
    assert line_of(out, "– resource orders")
    assert "not-the-right-secret" not in out


@pytest.fixture
async def body_only_token_endpoint() -> AsyncIterator[str]:
    """A token endpoint that takes the client credentials only as form fields, like some gateways."""

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        if "Authorization" in request.headers or form.get("client_secret") != SECRET:
            return web.json_response({"error": "invalid_client", "error_description": "Bad client"}, status=401)
        return web.json_response({"access_token": "issued-elsewhere", "expires_in": 600, "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/oauth2/token", token)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/oauth2/token"))
    await server.close()


async def test_wrong_client_auth_says_which_one_the_endpoint_accepts(
    simulator: Simulator, body_only_token_endpoint: str, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(simulator.base_url, body_only_token_endpoint, auth={"client_auth": "basic"})

    code, out = await check(capsys, path)

    assert code == 3
    assert "401 invalid_client" in line_of(out, "✘ token")
    assert 'hint: the token endpoint accepts client_auth = "body": set it in [auth]' in out


async def test_a_token_the_api_refuses_is_an_authentication_failure_with_the_audience_hint(
    simulator: Simulator, body_only_token_endpoint: str, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's story: the token endpoint says yes, and the API answers 401 to its token."""
    path = write_config(simulator.base_url, body_only_token_endpoint, resources=["products"], auth={"client_auth": "body"})

    code, out = await check(capsys, path)

    assert code == 3
    assert "200, lifetime 600s" in line_of(out, "✔ token")
    assert "the API rejected a freshly issued token" in line_of(out, "✘ resource products")
    assert "auth.token_url is the user pool the API trusts" in out


async def test_a_401_from_the_api_gets_one_new_token_before_the_verdict(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """As sync does (SPEC, "The token"): the rejected token is dropped and a new one tried once; check retried the same."""
    issued: list[str] = []

    async def token(_request: web.Request) -> web.Response:
        issued.append(f"not-for-this-api-{len(issued)}")
        return web.json_response({"access_token": issued[-1], "expires_in": 600, "token_type": "Bearer"})

    async with serving({("POST", "/oauth2/token"): token}) as origin:
        path = write_config(simulator.base_url, f"{origin}/oauth2/token", resources=["products"])
        code, _ = await check(capsys, path)

    assert code == 3
    assert len(issued) == 2


async def test_an_unknown_scope_gets_the_scope_hint(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(simulator.base_url, simulator.token_url, auth={"scopes": ["legacy-api/delete"]})

    code, out = await check(capsys, path)

    assert code == 3
    assert "400 invalid_scope" in line_of(out, "✘ token")
    assert 'error_description: "Invalid scope requested"' in out
    assert "auth.scopes is ['legacy-api/delete']: each must be `resource-server-id/scope-name`" in out


@pytest.mark.parametrize(("path", "status"), [("/oauth2/wrong", "404"), ("/_sim/counters", "405")])
async def test_a_token_url_that_is_not_the_token_endpoint(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], path: str, status: str
) -> None:
    config = write_config(simulator.base_url, simulator.origin + path)

    code, out = await check(capsys, config)

    assert code == 3
    assert summary_of(line_of(out, "✘ token")).startswith(f"{status}, not a token")
    assert "(application/x-www-form-urlencoded)" in out and "auth.token_url" in out
    assert f"auth.token_url's path is {path!r}, Cognito's token endpoint is /oauth2/token" in out


async def test_a_self_signed_server_without_ca_bundle_shows_the_chain(
    tls_simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tls_simulator.base_url, tls_simulator.token_url)
    assert tls_simulator.ca_pem_path is not None
    presented = x509.load_pem_x509_certificate(Path(tls_simulator.ca_pem_path).read_bytes())

    code, out = await check(capsys, path)

    assert code == 5
    assert "certificate not trusted" in line_of(out, "✘ tls token+api 127.0.0.1:")
    assert "OpenSSL: self-signed certificate" in out
    assert "the server's certificate is self-signed" in out
    assert "subject  CN=localhost" in out and "issuer   CN=localhost" in out
    assert presented.fingerprint(hashes.SHA256()).hex(":").upper() in out
    assert "--save-certs chain.pem" in out and "ca_bundle" in out
    assert "trusting the presented chain makes this step pass" in out
    assert "skipped: tls token+api" in line_of(out, "– token")


async def test_saved_certs_as_ca_bundle_make_check_pass(
    tls_simulator: Simulator, write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "chain.pem"
    path = write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"])

    code, out = await check(capsys, path, save_certs=str(saved))

    assert code == 5
    assert f'review it and set [api].ca_bundle = "{saved}"' in out
    assert "wrote 1 certificate(s) presented by 127.0.0.1:" in line_of(out, "✔ save-certs")
    assert saved.read_text().count("-----BEGIN CERTIFICATE-----") == 1

    path = write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"], api={"ca_bundle": str(saved)})
    code, out = await check(capsys, path)

    assert code == 0, out
    assert "trusted: CN=localhost" in line_of(out, "✔ tls token+api")
    assert "the system trust store + 1 certificate(s)" in line_of(out, "✔ trust")
    assert line_of(out, "✔ resource products")


async def test_save_certs_refuses_to_overwrite_the_configured_ca_bundle(
    tls_simulator: Simulator, write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check --save-certs ca.pem` with ca_bundle = ca.pem replaced the user's root with the presented chain,
    and every later run failed; it is refused, and the bundle is left as it was."""
    bundle = tmp_path / "ca.pem"
    await check(capsys, write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"]), save_certs=str(bundle))
    bundle.write_text(bundle.read_text() + "# the user's own CAs\n")
    path = write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"], api={"ca_bundle": str(bundle)})
    before = bundle.read_text()

    code, out = await check(capsys, path, save_certs=str(bundle))

    assert code == 2 and "is [api].ca_bundle" in out
    assert bundle.read_text() == before


async def test_the_save_certs_hint_names_the_file_so_that_config_toml_finds_it(
    tls_simulator: Simulator, write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--save-certs chain.pem` writes into the working directory, but config.toml reads a relative ca_bundle
    beside itself: the hint must give the path that works there."""
    path = write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    _, out = await check(capsys, path, save_certs="chain.pem")

    assert f'set [api].ca_bundle = "{elsewhere / "chain.pem"}"' in out


async def test_a_wrong_records_path_shows_the_top_level_keys(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(simulator.base_url, simulator.token_url, resources=["orders"], records_path="items")

    code, out = await check(capsys, path)

    assert code == 1
    line = line_of(out, "✘ resource orders")
    assert "200, but records_path 'items' is not in the body; its top-level keys are: data, page, page_size, total" in line
    assert 'hint: set records_path to the dotted key' in out


async def test_an_unreachable_database(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(simulator.base_url, simulator.token_url, "postgresql://root@127.0.0.1:1/x", resources=["products"])

    code, out = await check(capsys, path)

    assert code == 1
    assert "cannot use the database postgresql+asyncpg://root@127.0.0.1:1/x" in line_of(out, "✘ database connect")
    assert "hint: check [database].url (or $ETL_DATABASE_URL), that the server is up" in out
    assert "skipped: database connect did not pass" in line_of(out, "– database schema")
    assert line_of(out, "– database write")
    assert line_of(out, "✔ resource products")


async def test_a_postgresql_database_that_does_not_exist(
    simulator: Simulator, write_config: WriteConfig, fresh_database: Callable[[str], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """asyncpg's own error at connect time (not SQLAlchemy's) is a failed step with the hint, not a crash."""
    url = make_url(await fresh_database("postgresql")).set(database="etl_no_such_database")
    path = write_config(simulator.base_url, simulator.token_url, url.render_as_string(hide_password=False), resources=["products"])

    code, out = await check(capsys, path)

    assert code == 1
    assert 'database "etl_no_such_database" does not exist' in line_of(out, "✘ database connect")
    assert "hint: the server has no database of that name: create it (CREATE DATABASE etl_no_such_database)" in out


async def test_the_database_steps_leave_nothing_behind(
    simulator: Simulator, database_url: str, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite, PostgreSQL and MariaDB each treat DDL in a transaction differently; the probe table never stays."""
    if (file := sqlite_file(database_url)) is not None:
        file.touch()  # an empty file is an empty database: check probes it (a missing one it leaves missing)
    path = write_config(simulator.base_url, simulator.token_url, database_url, resources=["products"])

    code, out = await check(capsys, path)

    assert code == 0, out
    assert "etl's tables not created yet" in line_of(out, "! database schema")
    assert "in a transaction, rolled back" in line_of(out, "✔ database write")
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda sync: sa_inspect(sync).get_table_names())
            server = engine.dialect.name
            if server == "mysql" and "mariadb" in str(await connection.scalar(text("SELECT VERSION()"))).lower():
                server = "mariadb"  # check said "mysql 10.11.19" of a MariaDB server
        assert f"connected, {server} " in line_of(out, "✔ database connect"), out
    finally:
        await engine.dispose()
    assert not [table for table in tables if table.startswith("etl_check_probe")]


@pytest.mark.parametrize("key", ["auth.token_url", "api.base_url"])
async def test_http_aimed_at_a_tls_port_says_to_write_https(
    tls_simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """It read "the connection to 127.0.0.1 was dropped: ServerDisconnectedError", with the timeout hint, exit 1."""
    assert tls_simulator.ca_pem_path is not None
    base_url, token_url = tls_simulator.base_url, tls_simulator.token_url
    if key == "auth.token_url":
        token_url = token_url.replace("https://", "http://")
    else:
        base_url = base_url.replace("https://", "http://")
    path = write_config(base_url, token_url, resources=["products"], api={"ca_bundle": tls_simulator.ca_pem_path})

    code, out = await check(capsys, path)

    assert code == 5
    step = "✘ token" if key == "auth.token_url" else "✘ resource products"
    assert f"speaks TLS (https), but {key} says http://" in line_of(out, step)
    assert f"hint: write https:// in {key}" in out


async def test_https_aimed_at_a_plain_http_port_says_the_answer_was_not_tls(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """It read only "TLS handshake failed: WRONG_VERSION_NUMBER"."""
    https = simulator.base_url.replace("http://", "https://"), simulator.token_url.replace("http://", "https://")
    code, out = await check(capsys, write_config(*https, resources=["products"]))

    assert code == 5
    assert "the server answered in plain text, not TLS: is it http:// on this port?" in line_of(out, "✘ tls token+api")


async def test_a_404_names_base_url_and_path(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hint was the generic one, ending in "a 403 means the token's scopes do not cover this endpoint"."""
    base_url = simulator.base_url.replace("/api/v1", "/api/v9")
    code, out = await check(capsys, write_config(base_url, simulator.token_url, resources=["products"]))

    assert code == 1
    assert summary_of(line_of(out, "✘ resource products")).startswith("404 from")
    assert f"hint: no such endpoint: the URL is [api].base_url ({base_url}) + the path of 'products' ('/products')" in out


async def test_a_reset_during_the_tls_handshake_is_not_given_the_timeout_hint(
    tls_simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was told "check again; if the host is slow rather than down, raise [api].timeout_s"."""
    def reset(*args: object) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr("etl.certs.inspect_tls", reset)
    code, out = await check(capsys, write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"]))

    assert code == 5
    assert "the connection failed during TLS: [Errno 104] Connection reset by peer" in line_of(out, "✘ tls token+api")
    assert "closed the connection before TLS was set up" in out and "timeout_s" not in out


async def test_a_token_endpoint_that_never_answers_is_not_said_to_send_large_pages(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """It read "timed out waiting for URL: [api].timeout_s is the limit for the whole response; raise it if pages are large"."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    token_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/oauth2/token"
    path = write_config(simulator.base_url, token_url, resources=["products"], api={"timeout_s": 1})
    try:
        code, out = await check(capsys, path)
    finally:
        server.close()

    assert code == 1
    assert summary_of(line_of(out, "✘ token")) == "no answer within 1s ([api].timeout_s)"
    assert "pages" not in line_of(out, "✘ token")


async def test_verify_tls_false_is_a_warning_said_once(
    tls_simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """check passes with warnings; stderr carried the "TLS verification is OFF" warning twice."""
    path = write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"], api={"verify_tls": False})
    with caplog.at_level(logging.WARNING, logger="etl.transport"):
        code, out = await check(capsys, path)

    assert code == 0
    assert "TLS verification is OFF" in line_of(out, "! trust")
    assert len([r for r in caplog.records if "TLS verification is OFF" in r.getMessage()]) == 1


async def test_an_unknown_host_fails_at_dns(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(simulator.base_url, "https://no-such-host.invalid/oauth2/token", resources=["products"])

    code, out = await check(capsys, path, output_format="json")

    document = json.loads(out)
    assert code == 5 and document["exit_code"] == 5 and document["ok"] is False
    steps = {(step["step"], step["target"]): step for step in document["steps"]}
    dns = steps["dns", "token no-such-host.invalid:443"]
    assert dns["status"] == "failed" and "no-such-host.invalid could not be resolved" in dns["summary"]
    assert "auth.token_url" in dns["hint"]
    assert steps["tcp", "token no-such-host.invalid:443"]["status"] == "skipped"
    assert steps["token", "https://no-such-host.invalid/oauth2/token"]["status"] == "skipped"
    assert steps["dns", f"api 127.0.0.1:{simulator.base_url.split(':')[2].split('/')[0]}"]["status"] == "ok"


async def test_configuration_errors_are_a_check_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out = await check(capsys, tmp_path / "missing.toml")
    assert code == 2
    assert "not found" in line_of(out, "✘ config") and "hint: pass --config PATH or set $ETL_CONFIG" in out
    assert line_of(out, "– remaining steps")

    bad = tmp_path / "bad.toml"
    document = demo_document(None, "http://127.0.0.1:9/api", "http://127.0.0.1:9/oauth2/token")
    document["api"]["concurency"] = 8
    bad.write_text(tomlwriter.dumps(document), encoding="utf-8")
    code, out = await check(capsys, bad)
    assert code == 2 and "api.concurency: unknown key" in line_of(out, "✘ config")

    monkeypatch.delenv("ETL_CLIENT_SECRET", raising=False)
    good = tmp_path / "good.toml"
    good.write_text(tomlwriter.dumps(demo_document({"url": "sqlite:///:memory:"}, "http://127.0.0.1:9/api", "http://127.0.0.1:9/oauth2/token")))
    code, out = await check(capsys, good)
    assert code == 2 and "no client secret found" in line_of(out, "✘ secret")


async def test_through_an_https_proxy(
    tls_simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CONNECT proxy on loopback: TCP and TLS are checked through the tunnel aiohttp will use."""
    tunnels: list[bytes] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        head = await client_reader.readuntil(b"\r\n\r\n")
        tunnels.append(head.split(b"\r\n", 1)[0])
        host, port = head.split()[1].decode().rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        client_writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(relay(client_reader, upstream_writer), relay(upstream_reader, client_writer))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert tls_simulator.ca_pem_path is not None
    path = write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"], api={"ca_bundle": tls_simulator.ca_pem_path})
    try:
        code, out = await check(capsys, path)
    finally:
        proxy.close()

    assert code == 0, out
    assert f"through the proxy http://127.0.0.1:{proxy_port} ($HTTPS_PROXY)" in line_of(out, "✔ tcp token+api")
    assert line_of(out, "✔ tls token+api") and line_of(out, "✔ resource products")
    assert all(line.startswith(b"CONNECT 127.0.0.1:") for line in tunnels) and len(tunnels) >= 4


async def test_the_cli_runs_check_and_exits_with_its_code(
    simulator: Simulator, write_config: WriteConfig
) -> None:
    path = write_config(simulator.base_url, simulator.token_url, resources=["products"])
    env = {**os.environ, "ETL_CLIENT_SECRET": SECRET}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "etl", "check", "--config", str(path), *args],
            check=False, capture_output=True, text=True, env=env, timeout=60,
        )

    # the simulator answers from this event loop, so the child runs in a thread
    passed = await asyncio.to_thread(run)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert line_of(passed.stdout, "✔ token") and line_of(passed.stdout, "✔ resource products")
    assert SECRET not in passed.stdout + passed.stderr

    env["ETL_CLIENT_SECRET"] = "wrong-secret-value"
    refused = await asyncio.to_thread(run, "--format", "json")
    assert refused.returncode == 3
    assert json.loads(refused.stdout)["exit_code"] == 3
    assert "wrong-secret-value" not in refused.stdout + refused.stderr


async def test_an_empty_page_shows_the_top_level_keys(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Simulator(SimulatorSettings(counts={"products": 0})) as sim:
        path = write_config(sim.base_url, sim.token_url, resources=["products"])
        code, out = await check(capsys, path)

    assert code == 0
    assert "200, 0 records at 'products'; next page: none" in line_of(out, "! resource products")
    assert "top-level keys of the body: products" in out
    assert "hint: no records in these windows to check the columns against" in out


async def test_a_204_is_an_empty_page_not_a_json_error(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """An API that answers 204 No Content has no records there: a warning, as for an empty list."""

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/api/v1/products", no_content)
    async with TestServer(app, host="127.0.0.1") as api:
        path = write_config(str(api.make_url("/api/v1")), simulator.token_url, resources=["products"])
        code, out = await check(capsys, path)

    assert code == 0
    assert "204, 0 records at 'products'; next page: none" in line_of(out, "! resource products")
    assert "the body is empty (204 No Content) or null" in out


def _certificate(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None, ca: bool
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]) if issuer else subject
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key((issuer[1] if issuer else key).public_key()),
            critical=False,
        )
    )
    if not ca:  # what strict verification (Python 3.13's default) asks of a server certificate
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture
def ca_chain(tmp_path: Path) -> dict[str, Path]:
    """Root → intermediate → leaf for 127.0.0.1, as PEM files: what a server may present, what a bundle may hold."""
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _certificate("Test Root CA", root_key, None, ca=True)
    mid = _certificate("Test Intermediate CA", mid_key, ("Test Root CA", root_key), ca=True)
    leaf = _certificate("api.test", leaf_key, ("Test Intermediate CA", mid_key), ca=False)
    pem = {name: cert.public_bytes(serialization.Encoding.PEM) for name, cert in (("root", root), ("mid", mid), ("leaf", leaf))}
    files = {
        "root": pem["root"], "root+mid": pem["root"] + pem["mid"], "leaf": pem["leaf"], "leaf+mid": pem["leaf"] + pem["mid"]
    }
    files["key"] = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths = {name: tmp_path / f"{name}.pem" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    return paths


@pytest.fixture
async def private_ca_server(ca_chain: dict[str, Path]) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """`serve("leaf+mid")`: the token URL of a TLS server that presents that chain (and closes every connection)."""
    servers: list[asyncio.Server] = []

    async def serve(presented: str) -> str:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(ca_chain[presented], ca_chain["key"])
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0, ssl=context)
        servers.append(server)
        return f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/oauth2/token"

    yield serve
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    ("presented", "missing"),
    [
        ("leaf", "the certificate of its issuer CN=Test Intermediate CA (an intermediate, or a private root CA) is missing"),
        ("leaf+mid", "the root CA CN=Test Root CA is missing from the trust store"),
    ],
)
async def test_an_incomplete_chain_says_which_certificate_is_missing(
    simulator: Simulator,
    ca_chain: dict[str, Path],
    private_ca_server: Callable[[str], Awaitable[str]],
    write_config: WriteConfig,
    capsys: pytest.CaptureFixture[str],
    presented: str,
    missing: str,
) -> None:
    token_url = await private_ca_server(presented)
    path = write_config(simulator.base_url, token_url, resources=["products"])
    code, out = await check(capsys, path)
    assert code == 5
    assert "OpenSSL: unable to get local issuer certificate" in out
    assert missing in out
    assert "trusting the presented chain makes this step pass" in out
    issuer = "CN=Test Root CA" if presented == "leaf+mid" else "CN=Test Intermediate CA"
    assert f"hint: {issuer} is not a CA this machine trusts: run `python -m etl check --save-certs" in out
    assert out.count("sha256   ") == presented.count("+") + 1

    # what the CA would hand out: the missing certificate (and here its root, which no system store holds)
    bundle = ca_chain["root"] if presented == "leaf+mid" else ca_chain["root+mid"]
    path = write_config(simulator.base_url, token_url, resources=["products"], api={"ca_bundle": str(bundle)})
    code, out = await check(capsys, path)
    assert "trusted: CN=api.test, issued by CN=Test Intermediate CA" in line_of(out, "✔ tls token")


async def test_the_saved_chain_of_a_private_ca_without_its_root_makes_check_pass(
    simulator: Simulator,
    private_ca_server: Callable[[str], Awaitable[str]],
    write_config: WriteConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A private CA's server sends leaf and intermediate, rarely the root: the saved chain as ca_bundle
    trusted nothing before Python 3.13 (check said so, and sync's hint sent users to --save-certs anyway)."""
    token_url, saved = await private_ca_server("leaf+mid"), tmp_path / "chain.pem"
    await check(capsys, write_config(simulator.base_url, token_url, resources=["products"]), save_certs=str(saved))

    path = write_config(simulator.base_url, token_url, resources=["products"], api={"ca_bundle": str(saved)})
    _, out = await check(capsys, path)

    assert "trusted: CN=api.test, issued by CN=Test Intermediate CA" in line_of(out, "✔ tls token")


async def test_a_database_migrated_by_a_newer_etl_fails_the_schema_step(
    simulator: Simulator, fresh_database: Callable[[str], Any], write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """check passed with "the next sync migrates it" while migrate and sync ended in Alembic's traceback."""
    url = await fresh_database("sqlite")
    engine = create_engine(url)
    try:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE etl_alembic_version SET version_num = '0099'"))
    finally:
        await engine.dispose()

    code, out = await check(capsys, write_config(simulator.base_url, simulator.token_url, url, resources=["products"]))

    assert code == 1
    assert "a newer etl migrated them" in line_of(out, "✘ database schema")


async def _check_with_token_answer(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], answer: dict[str, Any]
) -> tuple[int, str]:
    """check's exit code and output against the simulator's API, with a token endpoint that answers `answer`."""

    async def token(_request: web.Request) -> web.Response:
        return web.json_response(answer)

    async with serving({("POST", "/oauth2/token"): token}) as origin:
        return await check(capsys, write_config(simulator.base_url, f"{origin}/oauth2/token", resources=["products"]))


@pytest.mark.parametrize("lifetime", [{}, {"expires_in": None}], ids=["absent", "null"])
async def test_a_token_without_expires_in_says_the_lifetime_is_assumed(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], lifetime: dict[str, None]
) -> None:
    """"lifetime 3600s" read as if the endpoint had said so; it said nothing, and etl assumes an hour.
    A null expires_in is no lifetime either: check failed it (exit 3) while sync used the token."""

    _, out = await _check_with_token_answer(
        simulator, write_config, capsys, {"access_token": "no-lifetime-token", "token_type": "Bearer", **lifetime}
    )
    assert "200, no expires_in, taken as 3600s" in line_of(out, "✔ token")


async def test_a_token_type_other_than_bearer_is_a_warning_of_the_token_step(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """sync warns that a "mac" token goes out as Bearer; check, where a user looks first, passed it without a word."""

    _, out = await _check_with_token_answer(
        simulator, write_config, capsys, {"access_token": "mac-token", "token_type": "mac", "expires_in": 600}
    )
    assert 'warning: token_type "mac", not Bearer: etl sends the token as a Bearer token' in out


async def test_a_token_with_a_line_break_fails_the_token_step_not_with_a_traceback(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """aiohttp refuses CR/LF in a header: check passed the token step, then the resource step raised a ValueError."""

    code, out = await _check_with_token_answer(simulator, write_config, capsys, {"access_token": "abc\r\nX-Injected: 1", "expires_in": 600})

    assert code == 3
    assert "access_token that holds a control character" in line_of(out, "✘ token")


def test_schema_errors_cut_short_say_so() -> None:
    from etl.check import _excerpt

    assert _excerpt("short") == "short"
    assert _excerpt("x" * 2000).endswith("…") and len(_excerpt("x" * 2000)) < 2000


async def test_a_proxy_that_is_down_is_named_in_the_hint(
    tls_simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """$HTTPS_PROXY at a port nobody listens on: the hint said to check auth.token_url's port and the service."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{dead_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    path = write_config(tls_simulator.base_url, tls_simulator.token_url, resources=["products"])

    code, out = await check(capsys, path)

    assert code == 5
    assert f"hint: the proxy http://127.0.0.1:{dead_port} is not answering: check $HTTPS_PROXY" in out


@pytest.mark.parametrize(("cap", "stored", "expected_code"), [(10, 25, 1), (10, 10, 0), (50, 25, 0)])
async def test_an_api_that_caps_its_pages_below_page_size_fails_with_the_size_to_set(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str], cap: int, stored: int, expected_code: int
) -> None:
    """page_size = 50 against an API that serves at most `cap` records a page and has `stored`, with no total.

    A short page ends a window, so a sync would keep the first `cap` records of each window and exit 0.
    Only a short page followed by more is a cap: 10 of 10 stored, or 25 of 25 under a cap of 50, passes.
    """
    products = [{"sku": f"S{n:03}", "name": "thing", "price": "1.50", "tags": [], "updated_at": "2024-01-02T00:00:00Z"} for n in range(stored)]

    async def capped(request: web.Request) -> web.Response:
        size = min(int(request.query["page_size"]), cap)
        first = (int(request.query["page"]) - 1) * size
        return web.json_response({"products": products[first:first + size]})

    async with serving({("GET", "/api/v1/products"): capped}) as api:
        path = write_config(f"{api}/api/v1", simulator.token_url, resources=["products"])
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        document["resources"][0]["pagination"] = {"style": "page", "page_size": 50}
        tomlwriter.write(path, document)
        code, out = await check(capsys, path)

    assert code == expected_code, out
    line = line_of(out, "✘ resource products" if expected_code else "✔ resource products")
    if expected_code:
        assert f"{cap} records where page_size = 50 asked for more, and the next page holds 10 more: the API caps its pages at {cap}" in line
        assert f"hint: set [resources.pagination].page_size = {cap} for 'products'" in out


@pytest.mark.parametrize(
    ("api_first", "first_page", "expected_code"),
    [(0, 1, 0), (1, 0, 1), (1, 1, 0), (0, 0, 0), ("all", 1, 0)],
    ids=["0-based-read-from-1", "1-based-read-from-0", "1-based", "0-based", "page-0-is-everything"],
)
async def test_first_page_that_misses_the_apis_own_numbering_fails_with_the_value_to_set(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str],
    api_first: int | str, first_page: int, expected_code: int,
) -> None:
    """first_page = 1 against an API that numbers pages from 0 skipped each window's first page (warned), and
    first_page = 0 against one that reads page 0 as page 1 stopped each window after its first page, as the repeat is
    taken as the end (failed): a sync lost records with exit 0, and check passed without a word. An API whose page 0
    is every record is not taken for 0-based."""
    products = [{"sku": f"S{n:03}", "name": "thing", "price": "1.50", "tags": [], "updated_at": "2024-01-02T00:00:00Z"} for n in range(25)]

    async def numbered(request: web.Request) -> web.Response:
        page, size = int(request.query["page"]), int(request.query["page_size"])
        if api_first == "all" and page == 0:
            return web.json_response({"products": products})
        index = max(page - (api_first if isinstance(api_first, int) else 1), 0)  # a 1-based API reads 0 as 1
        return web.json_response({"products": products[index * size:(index + 1) * size]})

    async with serving({("GET", "/api/v1/products"): numbered}) as api:
        path = write_config(f"{api}/api/v1", simulator.token_url, resources=["products"])
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        document["resources"][0]["pagination"] = {"style": "page", "page_size": 10, "first_page": first_page}
        tomlwriter.write(path, document)
        code, out = await check(capsys, path)

    assert code == expected_code, out
    told = f"hint: set [resources.pagination].first_page = {api_first} for 'products'" in out
    assert told == (api_first != first_page and api_first != "all"), out
    if api_first == 0 and first_page == 1:  # warned only: a mock that computes page 0's records looks the same
        assert "! resource products" in out and "page 0 holds 10 other records" in out, out
    if api_first == 1 and first_page == 0:  # what sync does then: it stops, it does not load a page a window with exit 0
        assert "sync would stop each window at its second page" in out and "exit 0" not in out, out


async def test_the_page_numbering_probe_of_a_large_page_size_takes_no_longer_than_the_pages(
    simulator: Simulator, write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe looked for each record of page 0 in page 1 by comparing it with every record there: with
    page_size = 20000 against a 0-based API (the case it warns of) that was 400 million comparisons, a minute of check."""
    size = 20_000
    bodies = [json.dumps({"products": [
        {"sku": f"S{n:06}", "name": "thing", "price": "1.50", "tags": [], "updated_at": "2024-01-02T00:00:00Z"}
        for n in range(page * size, (page + 1) * size)
    ]}) for page in range(2)]

    async def zero_based(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        return web.Response(text=bodies[page] if page < 2 else '{"products": []}', content_type="application/json")

    async with serving({("GET", "/api/v1/products"): zero_based}) as api:
        path = write_config(f"{api}/api/v1", simulator.token_url, resources=["products"])
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        document["resources"][0]["pagination"] = {"style": "page", "page_size": size, "first_page": 1}
        tomlwriter.write(path, document)
        started = asyncio.get_running_loop().time()
        code, out = await check(capsys, path)
        took = asyncio.get_running_loop().time() - started

    assert code == 0 and f"page 0 holds {size} other records" in out, out
    assert took < 15, f"check took {took:.1f}s"


async def test_a_certificate_for_another_name_from_an_untrusted_ca_says_both(
    simulator: Simulator,
    ca_chain: dict[str, Path],
    private_ca_server: Callable[[str], Awaitable[str]],
    write_config: WriteConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The issuer's certificate alone would not do: the hint sent users to fetch it, and the next check
    failed on the name. What trusting the chain still leaves wrong is said at once."""
    token_url = (await private_ca_server("leaf")).replace("127.0.0.1", "localhost")
    path = write_config(simulator.base_url, token_url, resources=["products"])

    code, out = await check(capsys, path)

    assert code == 5
    assert "OpenSSL: unable to get local issuer certificate" in out
    assert "with its issuer trusted, the certificate is for 127.0.0.1, not localhost" in out
    assert "hint: use a host name the certificate names (127.0.0.1) in auth.token_url" in out
    assert "Then trust CN=Test Intermediate CA too" in out


async def test_a_certificate_for_another_name_from_a_trusted_ca_says_it_once(
    simulator: Simulator,
    ca_chain: dict[str, Path],
    private_ca_server: Callable[[str], Awaitable[str]],
    write_config: WriteConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the CA in ca_bundle, the wrong name is the whole diagnosis: it was printed a second time as
    "with its issuer trusted, ...", as if trusting the issuer were still to do."""
    token_url = (await private_ca_server("leaf+mid")).replace("127.0.0.1", "localhost")
    path = write_config(simulator.base_url, token_url, resources=["products"], api={"ca_bundle": str(ca_chain["root"])})

    code, out = await check(capsys, path)

    assert code == 5
    assert out.count("the certificate is for 127.0.0.1, not localhost") == 1, out
    assert "with its issuer trusted" not in out


async def test_a_sqlite_file_that_does_not_exist_is_not_created(
    simulator: Simulator, write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Connecting creates the file: a check of a mistyped path left an empty database there, and passed."""
    missing = tmp_path / "typo.db"
    path = write_config(simulator.base_url, simulator.token_url, f"sqlite:///{missing}", resources=["products"])

    code, out = await check(capsys, path)

    assert code == 0, out
    assert f"{missing} does not exist yet: the first sync creates it" in line_of(out, "! database connect")
    assert "etl's tables not created yet" in line_of(out, "! database schema")
    assert line_of(out, "✔ database write")
    assert not missing.exists()

    path = write_config(simulator.base_url, simulator.token_url, f"sqlite:///{tmp_path / 'no' / 'x.db'}", resources=["products"])
    code, out = await check(capsys, path)
    assert code == 1
    assert "hint: check [database].url (or $ETL_DATABASE_URL): the file's directory must exist and be writable" in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_check_stopped_by_a_signal_still_prints_its_json_document(
    simulator: Simulator, write_config: WriteConfig, signum: signal.Signals
) -> None:
    """`timeout 60 etl check --format json | jq`: a stop during a slow step left stdout empty, and the wrapper had nothing."""
    asked, released = asyncio.Event(), asyncio.Event()

    async def slow_token(_request: web.Request) -> web.Response:
        asked.set()
        await asyncio.wait_for(released.wait(), 30)
        return web.json_response({"access_token": "late", "expires_in": 600, "token_type": "Bearer"})

    async with serving({("POST", "/oauth2/token"): slow_token}) as origin:
        path = write_config(simulator.base_url, f"{origin}/oauth2/token", resources=["orders"])
        process = await start_etl("check", "--format", "json", "--config", str(path), env=etl_env())
        await asyncio.wait_for(asked.wait(), 30)
        process.send_signal(signum)
        result = await finish(process, timeout=20)
        released.set()

    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 1
    assert [step["step"] for step in document["steps"]][-1] == "interrupted"
    assert document["steps"][-1]["hint"]


async def test_a_toml_syntax_error_gets_a_hint_about_the_line_not_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[api` unclosed names no key: the hint "fix the key named above" sent the user looking for one."""
    monkeypatch.setenv("ETL_CLIENT_SECRET", SECRET)
    path = tmp_path / "config.toml"
    path.write_text('[api\nbase_url = "http://127.0.0.1:1/api"\n', encoding="utf-8")

    code, out = await check(capsys, path)

    assert code == 2
    assert "not valid TOML" in out
    assert "key named above" not in out
    assert "line and column" in out


@pytest.mark.parametrize("args", [["--format", "json", "--no-such-flag"], ["--format=json", "--save-certs"]])
async def test_a_usage_error_of_check_format_json_is_still_one_json_document(args: list[str]) -> None:
    """A `check --format json | jq` wrapper got an empty stdout when argparse refused the command line."""
    result = await run_etl("check", *args, env=etl_env())

    assert result.returncode == 2, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 2
    assert document["steps"][0]["step"] == "arguments" and document["steps"][0]["hint"]


async def test_the_json_report_parses_on_a_stdout_that_is_not_utf8(tmp_path: Path) -> None:
    """Under PYTHONIOENCODING=ascii the report's é came out as `\\xe9`, an escape JSON does not have: `jq` refused
    the whole document. It is written with JSON's own \\u escapes when stdout is not UTF-8."""
    missing = tmp_path / "café😀.toml"
    result = await run_etl("check", "--format", "json", "--config", str(missing), env=etl_env(PYTHONIOENCODING="ascii"))
    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)
    assert "café😀.toml" in report["steps"][0]["summary"]
