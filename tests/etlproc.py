"""Running `python -m etl` as a subprocess against an in-process simulator, the way cron would.

The subprocess is awaited with asyncio so that the test's event loop keeps
serving the simulator meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etl.demo import demo_document
from etl.simulator import Simulator

import tomlwriter

SECRET = "demo-secret"


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def write_config(
    directory: Path, sim: Simulator, database_url: str, resources: list[str] | None = None, **sections: dict[str, Any]
) -> Path:
    """The demo config aimed at `sim`, with per-section overrides, written as config.toml."""
    document = demo_document({"url": database_url}, sim.base_url, sim.token_url)
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    if resources is not None:
        document["resources"] = [r for r in document["resources"] if r["name"] in resources]
    return tomlwriter.write(directory / "config.toml", document)


def etl_env(**extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETL_")}
    return environment | {"ETL_CLIENT_SECRET": SECRET} | extra


async def start_etl(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "etl", *args,
        stdout=kwargs.pop("stdout", asyncio.subprocess.PIPE),
        stderr=kwargs.pop("stderr", asyncio.subprocess.PIPE),
        env=env or etl_env(),
        **kwargs,
    )


async def finish(process: asyncio.subprocess.Process, timeout: float = 120) -> Finished:
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Finished(process.returncode, (stdout or b"").decode(), (stderr or b"").decode())


async def run_etl(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Finished:
    return await finish(await start_etl(*args, env=env), timeout)
