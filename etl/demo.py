"""`demo`: the bundled simulator on loopback, then a real sync into the configured database.

The resources are the simulator's (etl/demo_config.toml, the same file as
the repository's config.toml); only the database comes from your config
file or $ETL_DATABASE_URL, so a new user sees rows land where they expect.
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from etl.config import config_from_document, config_path
from etl.db import safe_url
from etl.pipeline import RunOutcome
from etl.progress import ProgressDisplay
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


def _user_database(explicit: str | None) -> dict[str, Any] | None:
    path = config_path(explicit)
    if not path.is_file():
        return None
    database = tomllib.loads(path.read_text(encoding="utf-8")).get("database")
    return database if isinstance(database, dict) else None


async def run_demo(explicit_config: str | None, stop: asyncio.Event, progress: ProgressDisplay) -> RunOutcome:
    from etl import runs

    settings = demo_settings()
    async with Simulator(settings) as simulator:
        log.info("simulator serving %s (token endpoint %s)", simulator.base_url, simulator.token_url)
        document = demo_document(_user_database(explicit_config), simulator.base_url, simulator.token_url)
        config = config_from_document(document, Path("demo_config.toml"))
        print(f"demo: simulator on {simulator.base_url}, loading into {safe_url(config.database.url)}", flush=True)
        return await runs.sync(config, None, stop, progress, secret=SecretStr(settings.client_secret))
