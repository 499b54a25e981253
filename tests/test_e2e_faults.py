"""End to end on a misbehaving simulator: 503s, 429s with Retry-After, resets, cut bodies and delays.

Every valid record must land exactly once (and every invalid one in
etl_rejects), no page may be fetched twice, and the simulator must never see
more requests at once than api.concurrency. A run whose retries run out ends
with exit 1 having committed what it finished, and the next run completes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from loopback import Handler, serving

from etl import runs
from etl.config import Config, config_from_document
from etl.demo import demo_document
from etl.pipeline import RunOutcome
from etl.progress import NoProgress
from etl.simulator import Faults, Simulator, SimulatorSettings

from dbquery import rows, scalar

START, END = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 11, tzinfo=UTC)
COUNTS = {"orders": 2000, "customers": 600, "events": 1000, "payments": 600}
KEYS = {"orders": "id", "customers": "id", "events": "event_id", "payments": "payment_id", "products": "sku"}
CONCURRENCY = 4
FAULTS = Faults(
    rate_503=0.10,
    rate_429=0.05,
    retry_after_s=1,
    rate_reset=0.02,
    rate_truncated=0.01,
    delay_ms=2,
    delay_jitter_ms=8,
)


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's client secret, and the database of each test rather than $ETL_DATABASE_URL."""
    monkeypatch.setenv("ETL_CLIENT_SECRET", "demo-secret")
    monkeypatch.delenv("ETL_DATABASE_URL", raising=False)


def day_by_day(sim: Simulator, database_url: str, names: list[str] | None = None, **api: Any) -> Config:
    """The demo config with 1-day windows and 25-record pages: many pages and windows to interleave."""
    document = demo_document({"url": database_url}, sim.base_url, sim.token_url)
    document["api"] |= {"concurrency": CONCURRENCY, "retry_backoff_s": 0.01, "max_retries": 8, **api}
    document["resources"] = [r for r in document["resources"] if names is None or r["name"] in names]
    for resource in document["resources"]:
        resource["window"] = "1d"
        if resource["pagination"]["style"] != "none":
            resource["pagination"]["page_size"] = 25
    return config_from_document(document)


async def backfill(config: Config) -> RunOutcome:
    """The ten days of simulator data, resumed where an earlier backfill stopped."""
    return await runs.backfill(config, START, END, None, None, False, asyncio.Event(), NoProgress())


def is_valid_order(record: dict[str, Any]) -> bool:
    """Not one of the simulator's broken orders the demo columns refuse (`lines` is json: anything goes)."""
    return "id" in record and record["total"] != "n/a" and record["customer_id"] != "abc"


def expected_keys(sim: Simulator, name: str) -> set[Any]:
    """The keys the table must hold: every record the simulator has, less the broken orders."""
    truth = sim.truth(name)
    return {key for key, record in truth.items() if name != "orders" or is_valid_order(record)}




async def assert_each_record_once(sim: Simulator, database_url: str, name: str) -> None:
    """The table holds every valid key exactly once and nothing else; every invalid record is a reject."""
    keys = [row[0] for row in await rows(database_url, f"SELECT {KEYS[name]} FROM {name}")]
    # a page/offset window taken up after a failure is read again from its first page: its bad records are rejected again
    rejects = await scalar(database_url, f"SELECT COUNT(DISTINCT raw) FROM etl_rejects WHERE resource = '{name}'")
    assert len(keys) == len(set(keys)), name
    assert set(keys) == expected_keys(sim, name), name
    assert rejects == len(sim.truth(name)) - len(keys), name


async def test_with_faults_on_every_record_arrives_exactly_once(fresh_database: Callable[[str], Any]) -> None:
    """10% 503, 5% 429 (Retry-After 1), 2% resets, 1% cut bodies, delays: each record once, capped."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(counts=COUNTS, faults=FAULTS.model_copy())) as sim:
        outcome = await backfill(day_by_day(sim, url))

        assert outcome.exit_code == 0, outcome.error
        for name in KEYS:
            await assert_each_record_once(sim, url, name)
            assert sim.counters.records_served[name] == len(sim.truth(name)), (
                f"{name}: a page was served twice"
            )
        assert set(sim.counters.page_fetches.values()) == {1}
        assert sim.counters.max_in_flight <= CONCURRENCY
        assert sum(sim.counters.faults_injected.values()) > 0 and outcome.retries > 0
        print(
            f"\nfaulted e2e: {outcome.requests} requests by etl, "
            f"{sim.counters.api_requests} seen by the API, "
            f"{outcome.retries} retries, faults {sim.counters.faults_injected}, "
            f"max in flight {sim.counters.max_in_flight} / concurrency {CONCURRENCY}, "
            f"records compared {sum(len(sim.truth(n)) for n in KEYS)}, {outcome.seconds:.1f}s"
        )


async def test_retries_running_out_end_with_exit_1_and_the_next_run_completes(
    fresh_database: Callable[[str], Any],
) -> None:
    """An outage mid-run: exit 1 naming the 503, pages received are committed; the next run loads the rest."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(counts={"orders": 2000}, faults=Faults(delay_ms=5))) as sim:
        config = day_by_day(sim, url, ["orders"], max_retries=2)
        first = asyncio.create_task(backfill(config))
        while sim.counters.pages_served.get("orders", 0) < 6:
            await asyncio.sleep(0.005)
        sim.faults.outage = True
        outcome = await first

        assert outcome.exit_code == 1
        assert "503 from" in str(outcome.error)
        committed = await scalar(url, "SELECT COUNT(*) FROM orders")
        assert committed == outcome.resources["orders"].loaded > 0
        # what the unfinished windows hold is read again: from their first page (a list that moved may have shifted)
        read_again = await scalar(url, "SELECT COALESCE(SUM(records + rejects), 0) FROM etl_windows WHERE state <> 'done'")

        sim.faults.outage = False
        second = await backfill(config)

        assert second.exit_code == 0, second.error
        await assert_each_record_once(sim, url, "orders")
        assert sim.counters.records_served["orders"] == len(sim.truth("orders")) + read_again


def _capped_total_api(records: int, cap: int) -> dict[tuple[str, str], Handler]:
    """An API whose `total` stops counting at `cap`, as search backends do, and a token endpoint."""

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "capped-total-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        page, size = int(request.query["page"]), int(request.query["page_size"])
        data = [{"id": n, "name": f"item {n}"} for n in range((page - 1) * size + 1, min(page * size, records) + 1)]
        return web.json_response({"data": data, "total": min(records, cap)})

    return {("POST", "/oauth2/token"): token, ("GET", "/api/v1/items"): items}


@pytest.mark.parametrize("records", [95, 100])
async def test_a_total_lower_than_the_records_served_does_not_end_the_window_early(
    records: int, fresh_database: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """total = min(records, 45) with 10-record pages: the last page by that total arrives full, so etl pages on.

    It used to stop after 50 of 95 records and exit 0.
    """
    monkeypatch.setenv("ETL_CLIENT_SECRET", "demo-secret")
    url = await fresh_database("sqlite")
    async with serving(_capped_total_api(records, cap=45)) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["resources"] = [{
            "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"],
            "pagination": {"style": "page", "page_size": 10, "total_path": "total"},
            "columns": {"id": "integer", "name": "string"},
        }]
        outcome = await runs.sync(config_from_document(document), None, asyncio.Event(), NoProgress())

    assert outcome.exit_code == 0, outcome.error
    assert await scalar(url, "SELECT COUNT(*) FROM items") == records
    assert any("the API's total for this window is too low" in record.getMessage() for record in caplog.records)


def _page_numbers_api(records: int) -> dict[tuple[str, str], Handler]:
    """Django REST framework's page numbers: a page past the last is 404 {"detail": "Invalid page."}, not an empty page."""

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "page-numbers-token", "expires_in": 3600, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        page, size = int(request.query["page"]), int(request.query["page_size"])
        if page > 1 and (page - 1) * size >= records:
            return web.json_response({"detail": "Invalid page."}, status=404)
        results = [{"id": n} for n in range((page - 1) * size + 1, min(page * size, records) + 1)]
        return web.json_response({"count": records, "results": results})

    return {("POST", "/oauth2/token"): token, ("GET", "/api/v1/items"): items}


@pytest.mark.parametrize(("records", "path"), [(30, "/api/v1/items"), (30, "/api/v1/gone")])
async def test_a_404_after_a_full_page_ends_the_window_but_a_404_first_is_an_error(
    records: int, path: str, fresh_database: Callable[[str], Any]
) -> None:
    """30 records by 10 without total_path: page 4 is 404. That ended every run with exit 1 (the window never
    finished); it is the end of the window now. A path that is 404 from its first page stays an error."""
    url = await fresh_database("sqlite")
    async with serving(_page_numbers_api(records)) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["resources"] = [{
            "name": "items", "path": path.removeprefix("/api/v1"), "records_path": "results", "primary_key": ["id"],
            "pagination": {"style": "page", "page_size": 10}, "columns": {"id": "integer"},
        }]
        outcome = await runs.sync(config_from_document(document), None, asyncio.Event(), NoProgress())

    if path.endswith("gone"):
        assert outcome.exit_code == 1 and "404 from" in str(outcome.error)
        return
    assert outcome.exit_code == 0, outcome.error
    assert await scalar(url, "SELECT COUNT(*) FROM items") == records
    assert await scalar(url, "SELECT COUNT(*) FROM etl_windows WHERE state <> 'done'") == 0


@pytest.mark.parametrize("answer", [{"message": "search backend warming up, try later"}, "warming up", {"error": None}])
async def test_a_200_that_explains_why_it_has_no_records_leaves_its_window_for_the_next_run(
    answer: Any, fresh_database: Callable[[str], Any]
) -> None:
    """One order a day; the 2 January window is answered 200 with a message and no list. It was taken as an
    empty page: exit 0, order 2 never loaded, and the watermark past it. It fails that window now (exit 1),
    the other days load, and the next run, with the API well again, loads order 2."""
    url = await fresh_database("sqlite")
    warming = [True]

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "gap-token", "expires_in": 3600, "token_type": "Bearer"})

    async def orders(request: web.Request) -> web.Response:
        since = datetime.fromisoformat(request.query["updated_since"].replace("Z", "+00:00"))
        if warming[0] and since.day == 2:
            return web.json_response(answer)
        day = since.day
        return web.json_response({"data": [{"id": day, "updated_at": f"2024-01-{day:02}T12:00:00Z"}] if day <= 5 else []})

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/v1/orders"): orders}) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["resources"] = [{
            "name": "orders", "path": "/orders", "records_path": "data", "primary_key": ["id"], "cursor_field": "updated_at",
            "start": "2024-01-01", "window": "1d", "pagination": {"style": "none"},
            "filter": {"from_param": "updated_since", "to_param": "updated_until"},
            "columns": {"id": "integer", "updated_at": "datetime"},
        }]
        config = config_from_document(document)
        first = await runs.backfill(config, START, datetime(2024, 1, 8, tzinfo=UTC), None, None, False, asyncio.Event(), NoProgress())
        loaded_first = {row[0] for row in await rows(url, "SELECT id FROM orders")}
        warming[0] = False
        again = await runs.backfill(config, START, datetime(2024, 1, 8, tzinfo=UTC), None, None, False, asyncio.Event(), NoProgress())

    assert first.exit_code == 1 and ("no records" in str(first.error) or "not records" in str(first.error)), first.error
    assert loaded_first == {1, 3, 4, 5}
    assert again.exit_code == 0, again.error
    assert {row[0] for row in await rows(url, "SELECT id FROM orders")} == {1, 2, 3, 4, 5}


async def test_a_window_left_at_a_cursor_the_api_has_expired_is_read_again_from_its_start(
    fresh_database: Callable[[str], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A run fails on page 3 of a cursor window; by the next run the API has expired its cursors (400). The window
    was taken up at its saved cursor and failed on it every night, nothing after it loading; an unfinished
    window is read again from its start now, so the saved cursor is never sent."""
    url = await fresh_database("sqlite")
    records = [{"id": n, "updated_at": "2024-01-02T12:00:00Z"} for n in range(1, 31)]
    api = {"generation": 1, "failing": True}

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "cursor-token", "expires_in": 3600, "token_type": "Bearer"})

    async def events(request: web.Request) -> web.Response:
        cursor = request.query.get("cursor")
        offset = 0
        if cursor:
            generation, _, place = cursor.partition(":")
            if int(generation) != api["generation"]:
                return web.json_response({"error": "cursor expired"}, status=400)
            offset = int(place)
        if api["failing"] and offset >= 20:
            return web.json_response({"error": "boom"}, status=500)
        following = f"{api['generation']}:{offset + 10}" if offset + 10 < len(records) else None
        return web.json_response({"data": records[offset:offset + 10], "next": following})

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/v1/events"): events}) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["api"] |= {"max_retries": 0}
        document["resources"] = [{
            "name": "events", "path": "/events", "records_path": "data", "primary_key": ["id"], "cursor_field": "updated_at",
            "start": "2024-01-01", "window": "30d", "pagination": {"style": "cursor", "next_cursor_path": "next"},
            "filter": {"from_param": "updated_since", "to_param": "updated_until"},
            "columns": {"id": "integer", "updated_at": "datetime"},
        }]
        config = config_from_document(document)
        first = await runs.backfill(config, START, END, None, None, False, asyncio.Event(), NoProgress())
        loaded_first = await scalar(url, "SELECT COUNT(*) FROM events")
        api.update(generation=2, failing=False)
        again = await runs.backfill(config, START, END, None, None, False, asyncio.Event(), NoProgress())

    assert first.exit_code == 1 and loaded_first == 20
    assert again.exit_code == 0, again.error
    assert await scalar(url, "SELECT COUNT(*) FROM events") == 30
    assert any("reading this unfinished window again from its first page" in record.getMessage() for record in caplog.records)


async def test_a_403_for_a_missing_scope_is_one_error_that_points_at_the_scopes(
    fresh_database: Callable[[str], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The API refuses the token's scope on every window: each window in flight logged its own ERROR, hint and all."""
    url = await fresh_database("sqlite")

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "narrow-token", "expires_in": 3600, "token_type": "Bearer"})

    async def orders(_request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)  # every worker has a window in flight when the first 403 arrives
        challenge = 'Bearer error="insufficient_scope", scope="legacy-api/orders"'
        return web.json_response({"message": "Forbidden"}, status=403, headers={"WWW-Authenticate": challenge})

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/v1/orders"): orders}) as base:
        document = demo_document({"url": url}, f"{base}/api/v1", f"{base}/oauth2/token")
        document["resources"] = [r for r in document["resources"] if r["name"] == "orders"]
        document["resources"][0]["window"] = "1d"
        outcome = await runs.backfill(
            config_from_document(document), START, END, None, None, False, asyncio.Event(), NoProgress()
        )

    assert outcome.exit_code == 1
    errors = [record for record in caplog.records if record.levelname == "ERROR" and "403 from" in record.getMessage()]
    assert len(errors) == 1
    assert 'scope="legacy-api/orders"' in errors[0].getMessage() and "auth.scopes" in errors[0].getMessage()
