"""`demo`: the bundled simulator on loopback, then a real sync into the configured database.

The resources are the simulator's (etl/demo_config.toml, the same file as
the repository's config.toml); only the database comes from your config
file or $ETL_DATABASE_URL, so a new user sees rows land where they expect.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from etl.config import (
    LOOPBACK_HOSTS,
    EnvSettings,
    config_from_document,
    config_named_by,
    config_path,
    read_document,
)
from etl.db import create_engine, safe_url, sqlite_file
from etl.errors import ConfigError
from etl.pipeline import RunOutcome
from etl.progress import ProgressDisplay
from etl.schema import runs as runs_table
from etl.simulator import Simulator, demo_settings

log = logging.getLogger(__name__)


def demo_document(database: dict[str, Any] | None, base_url: str, token_url: str) -> dict[str, Any]:
    """The bundled demo config aimed at a running simulator, with the user's [database] if given."""
    document = tomllib.loads(resources.files("etl").joinpath("demo_config.toml").read_text(encoding="utf-8"))
    document["api"]["base_url"] = base_url
    document["auth"]["token_url"] = token_url
    if database:
        document["database"] = database
    return document


def _user_config(explicit: str | None) -> tuple[dict[str, Any], Path]:
    """The user's config document and the path its relative file names are beside.

    With no config named and no ./config.toml, the demo's defaults (./etl.db). A file named by
    --config or $ETL_CONFIG must exist: a typo would otherwise load the demo into another database.
    """
    path, named_by = config_path(explicit), config_named_by(explicit)
    if named_by or path.is_file():
        return read_document(path, named_by), path
    return {}, Path("demo_config.toml")


def _on_loopback(url: Any) -> bool:
    return isinstance(url, str) and urlsplit(url).hostname in LOOPBACK_HOSTS


async def _refuse_a_real_database(url: str, user_api: Any) -> None:
    """The demo writes simulator records into its resources' tables and moves their watermarks.

    So it refuses a database that runs other than demos have loaded from an API that is not on
    this machine: with the orders of a real API, a demo would mix in fake rows and move the
    watermark to now, and the next sync would skip everything before it.
    """
    if not isinstance(user_api, dict) or _on_loopback(user_api.get("base_url")):
        return
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            loaded = (await connection.execute(select(runs_table.c.command).where(runs_table.c.command != "demo").limit(1))).first()
    except DBAPIError:
        return  # no etl tables yet: a new database, or one the sync will report on
    finally:
        await engine.dispose()
    if loaded is not None:
        raise ConfigError(
            f"database.url: {safe_url(url)} holds runs of `{loaded.command}` from {user_api.get('base_url')}; "
            "the demo would write simulator records into it and move its watermarks",
            hint="give the demo a database of its own: ETL_DATABASE_URL=sqlite:///demo.db python -m etl demo",
        )


async def run_demo(explicit_config: str | None, stop: asyncio.Event, progress: ProgressDisplay) -> tuple[RunOutcome, str | None]:
    """The demo's run, and a note to print after its summary (why a second demo loads almost nothing), if any."""
    from etl import runs

    settings = demo_settings()
    user, user_path = _user_config(explicit_config)
    async with Simulator(settings) as simulator:
        log.info("simulator serving %s (token endpoint %s)", simulator.base_url, simulator.token_url)
        database = user.get("database")
        document = demo_document(database if isinstance(database, dict) else None, simulator.base_url, simulator.token_url)
        config = config_from_document(document, user_path)
        await _refuse_a_real_database(config.database.url, user.get("api"))
        print(f"demo: simulator on {simulator.base_url}, loading into {safe_url(config.database.url)}", flush=True)
        outcome = await runs.sync(config, None, stop, progress, secret=SecretStr(settings.client_secret), command="demo")
    if outcome.run_id > 1 and outcome.error is None:
        return outcome, _after_an_earlier_run(config.database.url, _status_command(explicit_config, config.database.url))
    return outcome, None


def _status_command(explicit_config: str | None, url: str) -> str:
    """The `status` that reads the database the demo loaded, typed as the user would in this directory.

    With no config file and no $ETL_DATABASE_URL, plain `status` is exit 2 (it has no database to read):
    the demo's own SQLite file is named then, which holds no secret.
    """
    if explicit_config:
        return f"python -m etl --config {shlex.quote(explicit_config)} status"
    file = sqlite_file(url)
    if config_named_by(None) or config_path(None).is_file() or EnvSettings().database_url or file is None:
        return "python -m etl status"
    return f"ETL_DATABASE_URL={shlex.quote(f'sqlite:///{file}')} python -m etl status"


def _after_an_earlier_run(url: str, status_command: str) -> str:
    """Why a second demo loads almost nothing: the first moved each resource's watermark to now."""
    file = sqlite_file(url)
    again = f"delete {file}" if file is not None else "point [database].url at an empty database"
    return (
        "demo: this database holds an earlier run, so each resource loaded only what is new since its watermark "
        f"(one without a date filter, products, loads whole each time); `{status_command}` shows them; {again} "
        "to see a first run again"
    )
