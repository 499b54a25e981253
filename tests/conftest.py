"""Fixtures shared by the test modules.

Databases: every test that takes `database_url` gets a database of its own,
dropped afterwards. PostgreSQL and MariaDB are found at $ETL_TEST_POSTGRES_URL
and $ETL_TEST_MYSQL_URL (defaults: the services this machine kind starts).
Where they cannot be reached the tests that need them skip, saying why,
unless $ETL_TEST_REQUIRE_DATABASES is set (as .ci/run does): then they fail.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine
from yarl import URL

from etl.config import Config, config_from_document
from etl.db import async_url
from etl.demo import demo_document
from etl.simulator import Simulator, demo_settings
from etl.simulator.app import Tokens

POSTGRES_URL = os.environ.get("ETL_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("ETL_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
REQUIRE_DATABASES = bool(os.environ.get("ETL_TEST_REQUIRE_DATABASES"))
DIALECTS = ["sqlite", "postgresql", "mysql"]


class _MockedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 omits the `stream_writer` aiohttp 3.14 requires (pnuckowski/aioresponses#289)."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Aioresponses(aioresponses):
    def add(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _MockedResponse)
        super().add(*args, **kwargs)


@pytest.fixture
def http_mock() -> Iterator[aioresponses]:
    """aioresponses that works with aiohttp 3.14: requests are answered by what the test registers."""
    with _Aioresponses() as mock:
        yield mock


async def _server_reachable(url: str) -> str | None:
    """None when the server answers, else why not."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable", and says why
        return f"{type(exc).__name__}: {exc}"
    finally:
        await engine.dispose()


async def on_server(server_url: str, statement: str) -> None:
    """One statement outside any transaction (CREATE DATABASE, ALTER DATABASE cannot run in one)."""
    engine = create_async_engine(async_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def _create_database(server_url: str, name: str) -> str:
    """A new empty database on the server; returns its URL."""
    await on_server(server_url, f"CREATE DATABASE {name}")
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def _drop_database(server_url: str, name: str) -> None:
    force = " WITH (FORCE)" if make_url(server_url).get_backend_name() == "postgresql" else ""
    await on_server(server_url, f"DROP DATABASE IF EXISTS {name}{force}")


_unreachable: dict[str, str | None] = {}


@pytest.fixture
async def fresh_database(tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    """A factory: `await fresh_database("postgresql")` gives the URL of a new, empty database."""
    created: list[tuple[str, str]] = []

    async def make(dialect: str) -> str:
        if dialect == "sqlite":
            return f"sqlite:///{tmp_path / f'etl-{uuid.uuid4().hex[:8]}.db'}"
        server = POSTGRES_URL if dialect == "postgresql" else MYSQL_URL
        if dialect not in _unreachable:
            _unreachable[dialect] = await _server_reachable(server)
        if _unreachable[dialect] is not None:
            reason = f"{dialect} at {make_url(server).render_as_string(hide_password=True)} unreachable: {_unreachable[dialect]}"
            if REQUIRE_DATABASES:
                pytest.fail(reason + " ($ETL_TEST_REQUIRE_DATABASES is set, so this fails instead of skipping)")
            pytest.skip(reason)
        name = f"etl_test_{uuid.uuid4().hex[:12]}"
        url = await _create_database(server, name)
        created.append((server, name))
        return url

    yield make
    for server, name in created:
        await _drop_database(server, name)


@pytest.fixture(params=DIALECTS)
async def database_url(request: pytest.FixtureRequest, fresh_database: Callable[[str], Any]) -> str:
    """A fresh database of each dialect in turn: SQLite, PostgreSQL, MariaDB."""
    return await fresh_database(request.param)


@pytest.fixture(params=["sqlite", "postgresql"])
async def sqlite_or_postgres_url(request: pytest.FixtureRequest, fresh_database: Callable[[str], Any]) -> str:
    return await fresh_database(request.param)


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    """The demo simulator on a free loopback port."""
    async with Simulator(demo_settings()) as sim:
        yield sim


@pytest.fixture
def make_config(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Config]:
    """`make_config(sim, database_url, **section_overrides)`: the demo config aimed at a simulator.

    Overrides are merged per section, e.g. `api={"max_retries": 2}`; `resources=[...]`
    keeps only the named resources.
    """
    monkeypatch.setenv("ETL_CLIENT_SECRET", "demo-secret")
    monkeypatch.delenv("ETL_DATABASE_URL", raising=False)

    def make(sim: Simulator, database_url: str, resources: list[str] | None = None, **sections: dict[str, Any]) -> Config:
        document = demo_document({"url": database_url}, sim.base_url, sim.token_url)
        for section, values in sections.items():
            document[section] = {**document.get(section, {}), **values}
        if resources is not None:
            document["resources"] = [r for r in document["resources"] if r["name"] in resources]
        return config_from_document(document)

    return make



KNOWN_SECRETS = ("demo-secret",)


@pytest.fixture(autouse=True)
def no_secret_or_token_in_output(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails any test whose log lines or captured output show the client secret or an issued token.

    Subprocess output is checked by the tests that run the CLI (tests/test_e2e_tokens.py).
    """
    caplog.set_level(logging.DEBUG)
    capsys = request.getfixturevalue("capsys") if "capfd" not in request.fixturenames else None
    issued_before = len(Tokens.issued_in_process)
    yield
    output = caplog.text
    if capsys is not None:
        captured = capsys.readouterr()
        output += captured.out + captured.err
        print(captured.out, end="")  # keep what the test printed visible under pytest -s
    tokens = list(Tokens.issued_in_process)[max(0, issued_before - 100):]
    leaked = [secret for secret in (*KNOWN_SECRETS, *tokens) if secret in output]
    assert not leaked, f"a secret or token appeared in the output of {request.node.nodeid}"
