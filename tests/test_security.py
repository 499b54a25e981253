"""Security promises: TLS verification is never off silently, values are bound parameters, names are never SQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from etl.config import config_from_document
from etl.db import create_engine
from etl.demo import demo_document
from etl.schema import resource_table
from etl.simulator import Simulator
from etl.store import LoadBatch, Store

from etlproc import run_etl, write_config

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
