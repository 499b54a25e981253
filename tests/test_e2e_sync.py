"""End to end on the bundled simulator: sync into each database, then again incrementally."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from etl import runs
from etl.config import Config, config_from_document
from etl.db import create_engine
from etl.demo import demo_document
from etl.pipeline import Pipeline, ResourceStats
from etl.progress import NoProgress
from etl.schema import runs as runs_table
from etl.simulator import Simulator

from dbquery import scalar


async def _sync(config: Config, names: list[str] | None = None) -> runs.RunOutcome:
    return await runs.sync(config, names, asyncio.Event(), NoProgress())




async def test_first_sync_loads_every_valid_record_of_every_resource(
    simulator: Simulator, database_url: str, make_config: Callable[..., Config]
) -> None:
    """Every resource of the simulator arrives exactly once; invalid records land in etl_rejects."""
    outcome = await _sync(make_config(simulator, database_url))

    assert outcome.exit_code == 0, outcome.error
    for name in ("orders", "customers", "events", "payments", "products"):
        truth = simulator.truth(name)
        stats = outcome.resources[name]
        stored = await scalar(database_url, f"SELECT COUNT(*) FROM {name}")
        assert stored + stats.rejected == len(truth), name
        assert stats.loaded == stored
    rejected = await scalar(database_url, "SELECT COUNT(*) FROM etl_rejects")
    assert rejected == outcome.resources["orders"].rejected > 0
    assert outcome.token_requests == 1


class _CountingProgress(NoProgress):
    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def add_total(self, resource: str, records: int) -> None:
        self.totals[resource] = self.totals.get(resource, 0) + records

    def advance(self, resource: str, records: int) -> None:
        self.done[resource] = self.done.get(resource, 0) + records


async def test_the_progress_bar_counts_rejected_records_too(
    simulator: Simulator, database_url: str, make_config: Callable[..., Config]
) -> None:
    """The API's total counts every record; a bar that advanced by loaded rows only ended short of it (995/1000)."""
    progress = _CountingProgress()
    outcome = await runs.sync(make_config(simulator, database_url, resources=["orders"]), None, asyncio.Event(), progress)

    assert outcome.exit_code == 0, outcome.error
    assert outcome.resources["orders"].rejected > 0
    assert progress.done["orders"] == progress.totals["orders"] == len(simulator.truth("orders"))


async def test_decimals_and_datetimes_are_stored_exactly(
    simulator: Simulator, database_url: str, make_config: Callable[..., Config]
) -> None:
    """The API's "833.20" is read back as Decimal('833.20'); updated_at as an aware UTC datetime."""
    await _sync(make_config(simulator, database_url, resources=["orders"]))
    record = simulator.truth("orders")[3]

    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            from etl.schema import resource_table

            config = make_config(simulator, database_url, resources=["orders"])
            table = resource_table(config.resources[0])
            row = (await connection.execute(select(table).where(table.c.id == 3))).one()
    finally:
        await engine.dispose()
    assert row.total == Decimal(record["total"])
    assert str(row.total).rstrip("0").rstrip(".") == record["total"].rstrip("0").rstrip(".")
    assert row.updated_at.utcoffset().total_seconds() == 0
    assert row.updated_at.isoformat().replace("+00:00", "Z") == record["updated_at"]


async def test_second_sync_fetches_from_the_lookback_and_updates_changed_rows(
    simulator: Simulator, sqlite_or_postgres_url: str, make_config: Callable[..., Config]
) -> None:
    """After a first sync, changed records come in with one window per resource, not a full reload."""
    config = make_config(simulator, sqlite_or_postgres_url, resources=["orders"])
    await _sync(config)
    simulator.touch("orders", [1, 2, 3], at=datetime.now(UTC) - timedelta(minutes=10))  # late: inside the lookback
    simulator.counters.reset()

    outcome = await _sync(config)

    assert outcome.exit_code == 0
    assert outcome.resources["orders"].windows == 1
    assert outcome.resources["orders"].loaded == 3
    assert await scalar(sqlite_or_postgres_url, "SELECT COUNT(*) FROM orders WHERE version = 2") == 3
    assert await scalar(sqlite_or_postgres_url, "SELECT COUNT(*) FROM orders WHERE id IN (1, 2, 3)") == 3


async def test_a_backfill_into_the_future_does_not_make_the_next_sync_skip_what_changes_meanwhile(
    simulator: Simulator, fresh_database: Callable[[str], Any], make_config: Callable[..., Config]
) -> None:
    """`backfill --to` the day after tomorrow loads those days as they are now; a record changed after it is still synced.

    The watermark used to move to the end of the backfill, so the next syncs started after it and skipped
    every change until then.
    """
    url = await fresh_database("sqlite")
    config = make_config(simulator, url, resources=["orders"])
    await _sync(config)
    now = datetime.now(UTC)
    outcome = await runs.backfill(config, now - timedelta(days=1), now + timedelta(days=2), None, None, False, asyncio.Event(), NoProgress())
    assert outcome.exit_code == 0, outcome.error
    synced_until = await scalar(url, "SELECT synced_until FROM etl_watermarks WHERE resource = 'orders'")
    assert datetime.fromisoformat(synced_until) <= datetime.now(UTC) - config.sync.lag

    simulator.touch("orders", [7], at=datetime.now(UTC) - timedelta(minutes=6))  # settled: older than the lag
    outcome = await _sync(config)

    assert outcome.exit_code == 0, outcome.error
    assert await scalar(url, "SELECT version FROM orders WHERE id = 7") == 2


async def test_a_backfill_run_again_reads_again_the_windows_that_were_not_over_when_it_finished(
    simulator: Simulator, fresh_database: Callable[[str], Any], make_config: Callable[..., Config]
) -> None:
    """A backfill to the end of the month, run mid-month and again after it, must read the rest of the month.

    A window finished before its end (less lag) had passed was taken as finished: the same backfill run again
    fetched nothing, exit 0, and the records stamped in it since were never loaded.
    """
    url = await fresh_database("sqlite")
    config = make_config(simulator, url, resources=["orders"])
    now = datetime.now(UTC)
    interval = (now - timedelta(days=2), now + timedelta(days=2))
    first = await runs.backfill(config, *interval, None, timedelta(days=1), False, asyncio.Event(), NoProgress())
    assert first.exit_code == 0, first.error
    simulator.touch("orders", [7], at=now + timedelta(hours=1))  # stamped in a window that was not over

    again = await runs.backfill(config, *interval, None, timedelta(days=1), False, asyncio.Event(), NoProgress())

    assert again.exit_code == 0, again.error
    assert await scalar(url, "SELECT version FROM orders WHERE id = 7") == 2


async def test_each_run_is_recorded_with_its_counts(
    simulator: Simulator, make_config: Callable[..., Config], fresh_database: Callable[[str], Any]
) -> None:
    """etl_runs tells the truth: status, pages, records and token requests."""
    url = await fresh_database("sqlite")
    outcome = await _sync(make_config(simulator, url))
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(select(runs_table))).one()
    finally:
        await engine.dispose()
    assert row.status == "succeeded"
    assert row.records_loaded == sum(s.loaded for s in outcome.resources.values())
    assert row.records_rejected == sum(s.rejected for s in outcome.resources.values())
    assert row.pages == simulator.counters.as_dict()["api_requests"]
    assert row.token_requests == 1
    assert row.ended_at is not None


async def test_an_unexpected_worker_failure_still_commits_what_was_queued(
    simulator: Simulator, make_config: Callable[..., Config], fresh_database: Callable[[str], Any], monkeypatch: Any
) -> None:
    """A bug in a worker (not an EtlError) fails the run, but the pages already queued are committed first."""
    url = await fresh_database("sqlite")
    original = Pipeline._fetch_window
    calls = 0

    async def fetch_then_break(self: Pipeline, *args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise RuntimeError("a bug")
        await original(self, *args)

    monkeypatch.setattr(Pipeline, "_fetch_window", fetch_then_break)
    config = make_config(simulator, url, resources=["orders"], api={"concurrency": 1})
    with pytest.raises(RuntimeError, match="a bug"):
        await _sync(config)
    assert await scalar(url, "SELECT COUNT(*) FROM orders") > 0
    assert await scalar(url, "SELECT status FROM etl_runs") == "failed"


async def test_a_cursor_field_no_record_carries_is_warned_about(
    simulator: Simulator, fresh_database: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`updatedAt` for `updated_at`: the rows load, but the watermark cannot move, and the log says why."""
    monkeypatch.setenv("ETL_CLIENT_SECRET", "demo-secret")
    monkeypatch.delenv("ETL_DATABASE_URL", raising=False)
    document = demo_document({"url": await fresh_database("sqlite")}, simulator.base_url, simulator.token_url)
    document["resources"] = [r | {"cursor_field": "updatedAt"} for r in document["resources"] if r["name"] == "orders"]
    outcome = await _sync(config_from_document(document))
    assert outcome.exit_code == 0, outcome.error
    assert "orders: cursor_field 'updatedAt' was in none of the" in caplog.text
    assert "check resources.orders.cursor_field" in caplog.text


def test_no_cursor_warning_when_every_record_was_rejected(caplog: pytest.LogCaptureFixture, simulator: Simulator) -> None:
    """Records that carry updated_at but fail on another column are rejects: blaming cursor_field would mislead."""
    document = demo_document({"url": "sqlite://"}, simulator.base_url, simulator.token_url)
    resource = next(r for r in config_from_document(document, None).resources if r.name == "orders")
    Pipeline._warn_if_no_cursor(resource, ResourceStats("orders", pages=1, fetched=3, loaded=0, rejected=3))
    assert "cursor_field" not in caplog.text
    Pipeline._warn_if_no_cursor(resource, ResourceStats("orders", pages=1, fetched=3, loaded=3))
    assert "cursor_field 'updated_at' was in none of the 3 records loaded" in caplog.text
