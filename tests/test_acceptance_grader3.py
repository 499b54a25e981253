"""An outside grader of `backfill`, `check`, `status`, `migrate` and `demo`, through SPEC.md only.

etl runs as a subprocess (as cron runs it) against this file's own mock: a
Cognito-like token endpoint and a paged API of orders and customers on
loopback, which counts every request. Nothing here reads etl's internals; the
database is read with plain SQL on the tables SPEC.md names.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import re
import shlex
import signal
import socket
import sqlite3
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from etlproc import Finished, etl_env, finish, run_etl, start_etl

CLIENT_ID = "grader3-client"
SECRET = "grader3-Secret-Value-9f8e7d"
T0 = datetime(2024, 3, 1, tzinfo=UTC)
DAYS = 8


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _parse(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Api:
    """Token endpoint + API. Knobs are plain attributes a test flips between runs."""

    token_error: tuple[int, str, str] | None = None  # (status, error, error_description)
    api_status: int | None = None  # every API request answered with this status
    bad_records: bool = False  # the page carries records that break the declared columns
    hang_from: datetime | None = None  # requests for windows starting at or after this wait for `release`
    release: asyncio.Event = field(default_factory=asyncio.Event)
    token_requests: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    port: int = 0
    scheme: str = "http"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/legacy/v2"

    @property
    def token_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/oauth2/token"

    def windows(self, resource: str = "orders") -> set[tuple[datetime, datetime]]:
        return {
            (_parse(q["since"]), _parse(q["until"])) for q in self.requests if q["_resource"] == resource
        }

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = dict(await request.post())
        if self.token_error:
            status, error, description = self.token_error
            return web.json_response({"error": error, "error_description": description}, status=status)
        client, secret = form.get("client_id"), form.get("client_secret")
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            client, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        if form.get("grant_type") != "client_credentials" or client != CLIENT_ID or secret != SECRET:
            return web.json_response({"error": "invalid_client", "error_description": "Client authentication failed"}, status=400)
        token = f"g3-token-{len(self.tokens) + 1}-zyxwvutsrq"
        self.tokens.add(token)
        return web.json_response({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    async def records(self, request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        query = dict(request.query)
        self.requests.append(query | {"_resource": resource})
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in self.tokens:
            return web.json_response({"message": "Unauthorized"}, status=401)
        if self.api_status:
            return web.json_response({"message": "User is not authorized to access this resource"}, status=self.api_status)
        since, until = _parse(query["since"]), _parse(query["until"])
        if self.hang_from and since >= self.hang_from:
            await self.release.wait()
        if self.bad_records:  # whatever the window: a page of records that break the declared columns
            return web.json_response({"result": {"items": _rows(resource, bad=True)[:10]}, "total": 10})
        rows = [row for row in _rows(resource) if since <= _parse(row["modified"]) < until]
        page, size = int(query.get("page", "1")), int(query.get("per_page", "50"))
        return web.json_response({"result": {"items": rows[(page - 1) * size : page * size]}, "total": len(rows)})


def _rows(resource: str, bad: bool = False) -> list[dict[str, Any]]:
    """One record an hour from T0 for DAYS days; `bad` spoils the first two."""
    rows = [
        {"id": i + 1, "amount": f"{i}.25", "modified": _iso(T0 + timedelta(hours=i)), "kind": resource}
        for i in range(24 * DAYS)
    ]
    if bad:
        rows[0]["id"] = "not-a-number"
        rows[1]["modified"] = "yesterday-ish"
    return rows


async def _serve(api: Api, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/oauth2/token", api.token)
    app.router.add_get("/legacy/v2/{resource}", api.records)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    api.port = runner.addresses[0][1]
    api.scheme = "https" if ssl_context else "http"
    return runner


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    mock = Api()
    runner = await _serve(mock)
    yield mock
    mock.release.set()
    await runner.cleanup()


def _resource(name: str) -> str:
    return f"""
[[resources]]
name = "{name}"
path = "/{name}"
records_path = "result.items"
primary_key = ["id"]
cursor_field = "modified"
start = "{T0.date().isoformat()}"
lookback = "0s"
window = "1d"

[resources.filter]
from_param = "since"
to_param = "until"
format = "iso"

[resources.pagination]
style = "page"
page_param = "page"
size_param = "per_page"
page_size = 10
total_path = "total"

[resources.columns]
id = "integer"
amount = "decimal"
modified = "datetime"
kind = "string"
"""


def write_config(
    directory: Path, api: Api, database_url: str, *, resources: tuple[str, ...] = ("orders",), ca_bundle: str = "",
    token_url: str | None = None, concurrency: int = 4, max_rejects: int = 0,
) -> Path:
    text = f"""
[api]
base_url = "{api.base_url}"
concurrency = {concurrency}
timeout_s = 5
max_retries = 0
ca_bundle = "{ca_bundle}"

[auth]
token_url = "{token_url or api.token_url}"
client_id = "{CLIENT_ID}"
scopes = ["legacy/read"]
client_auth = "basic"

[database]
url = "{database_url}"

[sync]
lag = "5m"
max_rejects = {max_rejects}
""" + "".join(_resource(name) for name in resources)
    path = directory / "config.toml"
    path.write_text(text)
    return path


def env(**extra: str) -> dict[str, str]:
    return etl_env(ETL_CLIENT_SECRET=SECRET, **extra)


async def etl(config: Path, *args: str, **kwargs: Any) -> Finished:
    return await run_etl("--config", str(config), *args, env=kwargs.pop("env", None) or env(), **kwargs)


async def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Plain SQL through SQLAlchemy with the async drivers the project ships, as any reader of the tables would."""
    driver = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "mysql": "mysql+aiomysql"}
    scheme, _, rest = url.partition(":")
    engine = create_async_engine(f"{driver[scheme]}:{rest}")
    try:
        async with engine.connect() as connection:
            return [tuple(row) for row in (await connection.execute(text(sql))).all()]
    finally:
        await engine.dispose()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql).fetchall()


def sqlite_url(tmp_path: Path) -> tuple[str, Path]:
    db = tmp_path / "grader3.db"
    return f"sqlite:///{db}", db


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- backfill -----------------------------------------------------------------------------------


async def test_backfill_dates_load_half_open_interval_and_print_it_in_utc(api: Api, tmp_path: Path) -> None:
    url, db = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url)
    result = await etl(config, "backfill", "--from", "2024-03-02", "--to", "2024-03-05")
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert "2024-03-02T00:00:00" in printed and "2024-03-05T00:00:00" in printed, printed
    assert "UTC" in printed or "+00:00" in printed or "Z" in printed, printed
    stamps = [_parse(r[0]) for r in rows(db, "SELECT modified FROM orders")]
    assert len(stamps) == 72
    assert min(stamps) == datetime(2024, 3, 2, tzinfo=UTC)
    assert max(stamps) == datetime(2024, 3, 4, 23, tzinfo=UTC)  # [from, to): nothing of the 5th
    windows = sorted(api.windows())
    assert windows[0][0] == datetime(2024, 3, 2, tzinfo=UTC) and windows[-1][1] == datetime(2024, 3, 5, tzinfo=UTC)
    assert len(windows) == 3  # the resource's window, 1d


async def test_backfill_datetimes_with_offset_naive_is_utc_and_window_flag(api: Api, tmp_path: Path) -> None:
    url, db = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url)
    result = await etl(
        config, "backfill", "--from", "2024-03-02T05:00:00+02:00", "--to", "2024-03-02T10:00:00", "--window", "2h"
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert "2024-03-02T03:00:00" in printed and "2024-03-02T10:00:00" in printed, printed
    assert "05:00:00+02:00" not in printed, "the interval is printed in UTC"
    hours = sorted(_parse(r[0]).hour for r in rows(db, "SELECT modified FROM orders"))
    assert hours == [3, 4, 5, 6, 7, 8, 9]
    windows = sorted(api.windows())
    assert windows[0][0] == datetime(2024, 3, 2, 3, tzinfo=UTC) and windows[-1][1] == datetime(2024, 3, 2, 10, tzinfo=UTC)
    assert all(end - start <= timedelta(hours=2) for start, end in windows), windows
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False)), windows  # contiguous
    assert len(windows) >= 3


async def test_backfill_resource_flag_repeated(api: Api, tmp_path: Path) -> None:
    url, db = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url, resources=("orders", "customers", "invoices"))
    result = await etl(config, "backfill", "--from", "2024-03-02", "--to", "2024-03-03",
                       "--resource", "orders", "--resource", "invoices")
    assert result.returncode == 0, result.stderr
    assert {q["_resource"] for q in api.requests} == {"orders", "invoices"}
    assert rows(db, "SELECT count(*) FROM orders") == [(24,)]
    assert rows(db, "SELECT count(*) FROM invoices") == [(24,)]
    unknown = await etl(config, "backfill", "--from", "2024-03-02", "--to", "2024-03-03", "--resource", "shipments")
    assert unknown.returncode == 2
    assert "shipments" in unknown.stdout + unknown.stderr


async def _backfill_killed(api: Api, config: Path, url: str, *args: str) -> int:
    """A backfill killed -9 while the windows from 2024-03-05 on hang; returns how many orders it committed."""
    api.hang_from = datetime(2024, 3, 5, tzinfo=UTC)
    process = await start_etl("--config", str(config), "backfill", "--from", "2024-03-01", "--to", "2024-03-09",
                              *args, env=env())
    for _ in range(300):
        if any(start >= api.hang_from for start, _ in api.windows()):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # what was fetched before the hang gets committed
    process.send_signal(signal.SIGKILL)
    await finish(process)
    api.hang_from = None
    api.release.set()
    return (await query(url, "SELECT count(*) FROM orders"))[0][0]


def _stamp(value: Any) -> datetime:
    """A datetime column as read back: a string from SQLite, a datetime (naive = UTC on MySQL) elsewhere."""
    return _parse(value) if isinstance(value, str) else value if value.tzinfo else value.replace(tzinfo=UTC)


async def test_backfill_resumes_after_kill_9_without_fetching_finished_windows(api: Api, tmp_path: Path, database_url: str) -> None:
    config = write_config(tmp_path, api, database_url, concurrency=2)
    committed = await _backfill_killed(api, config, database_url)
    per_day: dict[dt.date, int] = {}
    for (value,) in await query(database_url, "SELECT modified FROM orders"):
        per_day[_stamp(value).date()] = per_day.get(_stamp(value).date(), 0) + 1
    full_days = {day for day, count in per_day.items() if count == 24}
    assert committed > 0 and full_days, "the kill came before anything was committed: the test proves nothing"
    api.requests.clear()
    again = await etl(config, "backfill", "--from", "2024-03-01", "--to", "2024-03-09")
    assert again.returncode == 0, again.stderr
    fetched_days = {start.date() for start, _ in api.windows()}
    assert not fetched_days & full_days, f"finished windows fetched again: {sorted(fetched_days & full_days)}"
    assert fetched_days, "the unfinished windows are fetched"
    assert await query(database_url, "SELECT count(*), count(DISTINCT id) FROM orders") == [(24 * 8, 24 * 8)]


async def test_backfill_restart_forgets_finished_windows(api: Api, tmp_path: Path) -> None:
    url, db = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url, concurrency=2)
    assert await _backfill_killed(api, config, url) > 0
    api.requests.clear()
    again = await etl(config, "backfill", "--from", "2024-03-01", "--to", "2024-03-09", "--restart")
    assert again.returncode == 0, again.stderr
    assert {start.date() for start, _ in api.windows()} == {dt.date(2024, 3, d) for d in range(1, 9)}
    assert rows(db, "SELECT count(*) FROM orders") == [(24 * 8,)]


# --- check --------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for 127.0.0.1 (as a private CA's server presents it); returns cert, key, DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grader3 legacy api")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)


async def check(config: Path, *args: str, **kwargs: Any) -> tuple[Finished, dict[str, Any]]:
    """`check` in text, then in JSON: both exit alike, and `--format json` prints one JSON document."""
    text = await etl(config, "check", *args, **kwargs)
    as_json = await etl(config, "check", "--format", "json", **kwargs)
    document = json.loads(as_json.stdout)
    assert as_json.returncode == text.returncode == document["exit_code"], (text.stdout, as_json.stdout)
    assert document["ok"] is (text.returncode == 0)
    return text, document


def failed(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The steps that failed; each has a verdict and a hint."""
    steps = [step for step in document["steps"] if step["status"] == "failed"]
    assert all(step["hint"] for step in steps), steps
    return steps


async def test_check_passes_every_step(api: Api, tmp_path: Path) -> None:
    url, _ = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url, resources=("orders", "customers"))
    result, document = await check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert failed(document) == []
    assert {s["target"] for s in document["steps"] if s["step"] == "resource"} == {"orders", "customers"}
    everything = result.stdout + result.stderr + json.dumps(document)
    assert SECRET not in everything and not any(token in everything for token in api.tokens)


async def test_check_token_endpoint_down_is_exit_5(api: Api, tmp_path: Path) -> None:
    url, _ = sqlite_url(tmp_path)
    port = _closed_port()
    config = write_config(tmp_path, api, url, token_url=f"http://127.0.0.1:{port}/oauth2/token")
    result, document = await check(config)
    assert result.returncode == 5, result.stdout + result.stderr
    [step] = failed(document)
    assert step["step"] == "tcp" and str(port) in step["target"] and "auth.token_url" in step["hint"]
    assert "✘" in result.stdout and "hint:" in result.stdout


async def test_check_untrusted_tls_names_ca_bundle_and_saves_the_chain(tmp_path: Path) -> None:
    cert, key, der = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    mock = Api()
    runner = await _serve(mock, context)
    try:
        url, _ = sqlite_url(tmp_path)
        config = write_config(tmp_path, mock, url)
        result, document = await check(config)
        assert result.returncode == 5, result.stdout + result.stderr
        [step] = failed(document)
        assert step["step"] == "tls" and "ca_bundle" in step["hint"]
        assert mock.token_requests == 0, "no secret is sent to an untrusted host"
        saved = tmp_path / "chain.pem"
        result = await etl(config, "check", "--save-certs", str(saved))
        assert result.returncode == 5
        pems = x509.load_pem_x509_certificates(saved.read_bytes())
        assert der in [p.public_bytes(serialization.Encoding.DER) for p in pems]
        trusted = write_config(tmp_path, mock, url, ca_bundle=str(saved))
        fixed, _ = await check(trusted)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        loaded = await etl(trusted, "backfill", "--from", "2024-03-02", "--to", "2024-03-03")
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    finally:
        await runner.cleanup()


async def test_check_invalid_client_is_exit_3_with_description_verbatim(api: Api, tmp_path: Path) -> None:
    url, _ = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url)
    description = "Client 3rd-party-app (grader3) is disabled: contact IAM <iam@example.com>"
    api.token_error = (400, "invalid_client", description)
    result, document = await check(config)
    assert result.returncode == 3, result.stdout + result.stderr
    [step] = failed(document)
    assert step["step"] == "token"
    assert description in result.stdout and "invalid_client" in result.stdout, result.stdout
    assert description in json.dumps(step, ensure_ascii=False)
    assert SECRET not in result.stdout + result.stderr + json.dumps(document)


async def test_check_invalid_scope_is_exit_3_and_hints_at_scopes(api: Api, tmp_path: Path) -> None:
    url, _ = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url)
    api.token_error = (400, "invalid_scope", "Invalid scope requested: legacy/read")
    result, document = await check(config)
    assert result.returncode == 3, result.stdout + result.stderr
    [step] = failed(document)
    assert step["step"] == "token" and "auth.scopes" in step["hint"]
    assert "invalid_scope" in result.stdout and "Invalid scope requested: legacy/read" in result.stdout


async def test_check_api_403_fails_the_resource_step_not_the_token(api: Api, tmp_path: Path) -> None:
    url, _ = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url, resources=("orders", "customers"))
    api.api_status = 403
    result, document = await check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = failed(document)
    assert {(s["step"], s["target"]) for s in steps} == {("resource", "orders"), ("resource", "customers")}
    assert all("403" in s["summary"] for s in steps)


async def test_check_page_with_schema_errors_shows_the_first(api: Api, tmp_path: Path) -> None:
    url, _ = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url)
    api.bad_records = True
    result, document = await check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    [step] = failed(document)
    assert step["step"] == "resource" and "10 records" in step["summary"]
    shown = "\n".join(step["details"])
    assert "id" in shown and "not-a-number" in shown and "modified" in shown and "yesterday-ish" in shown, shown


async def test_check_database_unreachable(api: Api, tmp_path: Path) -> None:
    config = write_config(tmp_path, api, f"postgresql://root@127.0.0.1:{_closed_port()}/nowhere")
    result, document = await check(config)
    assert result.returncode == 1, result.stdout + result.stderr
    [step] = failed(document)
    assert step["step"] == "database connect" and "database" in step["hint"]
    assert all(s["status"] == "ok" for s in document["steps"] if s["step"] in ("token", "resource"))


# --- status, migrate, demo ----------------------------------------------------------------------


async def test_status_shows_runs_watermarks_unfinished_windows_and_rejects_without_calling_out(
    api: Api, tmp_path: Path
) -> None:
    url, db = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url, resources=("orders", "customers"), concurrency=2, max_rejects=5)
    api.bad_records = True
    spoiled = await etl(config, "backfill", "--from", "2024-03-01", "--to", "2024-03-02", "--resource", "customers")
    assert spoiled.returncode == 0, spoiled.stderr
    api.bad_records = False
    await _backfill_killed(api, config, url)
    calls = (api.token_requests, len(api.requests))
    result = await etl(config, "status", env=etl_env())  # no secret: status needs none
    assert result.returncode == 0, result.stdout + result.stderr
    assert (api.token_requests, len(api.requests)) == calls, "status called the token endpoint or the API"
    out = result.stdout
    runs, _, rest = out.partition("watermarks")
    watermarks, _, rest = rest.partition("unfinished")
    unfinished, _, rejects = rest.partition("reject")
    assert runs.count("backfill") >= 2, out
    assert re.search(r"orders\s.*2024-03-04T23:00:00", watermarks), out  # the last hour of the finished windows
    assert re.search(r"orders\s.*pending", unfinished), out
    assert re.search(r"customers\s+2\b", rejects), out
    assert "2024-03-05" in out and "2024-03-09" in out, "the unfinished windows of the killed backfill"


async def test_migrate_is_idempotent_and_never_calls_out(api: Api, tmp_path: Path) -> None:
    url, db = sqlite_url(tmp_path)
    config = write_config(tmp_path, api, url)
    for _ in range(2):
        result = await etl(config, "migrate", env=etl_env())
        assert result.returncode == 0, result.stdout + result.stderr
    tables = {r[0] for r in rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"etl_runs", "etl_watermarks", "etl_windows", "etl_rejects"} <= tables
    assert (api.token_requests, api.requests) == (0, [])
    loaded = await etl(config, "backfill", "--from", "2024-03-01", "--to", "2024-03-02")
    assert loaded.returncode == 0, loaded.stderr
    again = await etl(config, "migrate", env=etl_env())
    assert again.returncode == 0, again.stdout + again.stderr
    assert rows(db, "SELECT count(*) FROM orders") == [(24,)]


async def _demo_in(directory: Path) -> Finished:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etl", "demo", cwd=directory, env=etl_env() | {"ETL_CLIENT_SECRET": ""},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    return await finish(process, timeout=60)


async def test_demo_runs_in_an_empty_directory_without_config_and_its_status_advice_works(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    first = await _demo_in(empty)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "loaded" in first.stdout, "demo prints its summary"
    second = await _demo_in(empty)
    assert second.returncode == 0, second.stdout + second.stderr
    advice = re.search(r"`([^`]*python -m etl status[^`]*)`", second.stdout + second.stderr)
    assert advice, second.stdout + second.stderr
    process = await asyncio.create_subprocess_shell(
        advice.group(1).replace("python", shlex.quote(sys.executable), 1), cwd=empty, env=etl_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    status = await finish(process, timeout=60)
    assert status.returncode == 0, f"{advice.group(1)!r} as demo advised: {status.stdout + status.stderr}"
    assert "demo" in status.stdout and "orders" in status.stdout
