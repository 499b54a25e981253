"""The numbers a run reports, as an outside reader sees them: stdout's summary, etl_runs and `status` agree.

Against a small API of the test's own (tests/loopback.py), so that every page, retry and token request is known.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from loopback import serving

import tomlwriter
from dbquery import rows
from etlproc import run_etl

DAY0 = datetime(2024, 1, 1, tzinfo=UTC)


def _records(count: int) -> list[dict[str, Any]]:
    """One record an hour from 2024-01-01: 24 a day."""
    return [{"id": i, "name": f"n{i}", "updated_at": (DAY0 + timedelta(hours=i - 1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
            for i in range(1, count + 1)]


class Api:
    """Pages of `page_size` records filtered by updated_since/updated_until; `pages` overrides a page's records."""

    def __init__(self, records: list[dict[str, Any]], page_size: int = 10) -> None:
        self.records, self.page_size = records, page_size
        self.pages: dict[int, list[dict[str, Any]]] = {}
        self.refusals: dict[int, list[int]] = {}  # page -> statuses answered before the page

    async def token(self, _request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t0ken", "expires_in": 3600, "token_type": "Bearer"})

    async def items(self, request: web.Request) -> web.Response:
        page = int(request.query["page"])
        if self.refusals.get(page):
            return web.json_response({"message": "busy"}, status=self.refusals[page].pop(0), headers={"Retry-After": "0"})
        since, until = request.query["updated_since"], request.query["updated_until"]
        inside = [r for r in self.records if since <= r["updated_at"] < until]
        return web.json_response({"data": self.pages.get(page, inside[(page - 1) * self.page_size: page * self.page_size])})

    def routes(self) -> dict[tuple[str, str], Any]:
        return {("POST", "/token"): self.token, ("GET", "/api/{name}"): self.items}


def _config(directory: Path, origin: str, url: str, names: tuple[str, ...] = ("items",), window: str = "1d", **api: Any) -> Path:
    resource = {
        "path": "/items", "records_path": "data", "primary_key": ["id"], "cursor_field": "updated_at",
        "start": "2024-01-01", "lookback": "0s", "window": window,
        "filter": {"from_param": "updated_since", "to_param": "updated_until", "format": "iso"},
        "pagination": {"style": "page", "page_param": "page", "size_param": "page_size", "page_size": 10},
        "columns": {"id": "integer", "name": "string", "updated_at": "datetime"},
    }
    return tomlwriter.write(directory / "config.toml", {
        "api": {"base_url": f"{origin}/api", "concurrency": 1, **api},
        "auth": {"token_url": f"{origin}/token", "client_id": "me", "scopes": ["read"]},
        "database": {"url": url},
        "sync": {"lag": "0s"},
        "resources": [{"name": name, **resource} for name in names],
    })


async def _table_names(url: str) -> set[str]:
    if url.startswith("sqlite"):
        found = await rows(url, "SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        found = await rows(url, "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
    return {row[0] for row in found}


async def _recorded_runs(url: str) -> int:
    return len(await rows(url, "SELECT id FROM etl_runs")) if "etl_runs" in await _table_names(url) else 0


async def test_an_unreadable_ca_bundle_is_exit_2_before_a_run_is_recorded(tmp_path: Path, sqlite_or_postgres_url: str) -> None:
    """Like a missing secret: no failed run in etl_runs, no windows left pending for status to show."""
    async with serving(Api(_records(5)).routes()) as origin:
        config = _config(tmp_path, origin, sqlite_or_postgres_url, ("items", "other"), ca_bundle=str(tmp_path / "missing.pem"))
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "api.ca_bundle" in result.stderr
    assert await _recorded_runs(sqlite_or_postgres_url) == 0


async def test_a_backfill_window_too_small_for_the_interval_is_exit_2_before_a_run_is_recorded(
    tmp_path: Path, sqlite_or_postgres_url: str
) -> None:
    async with serving(Api(_records(5)).routes()) as origin:
        config = _config(tmp_path, origin, sqlite_or_postgres_url, ("items", "other"))
        result = await run_etl("backfill", "--config", str(config), "--from", "2020-01-01", "--to", "2024-01-01", "--window", "1s")
    assert result.returncode == 2, result.stderr
    assert "use a larger --window" in result.stderr
    assert await _recorded_runs(sqlite_or_postgres_url) == 0


async def test_status_says_which_resources_a_sync_was_limited_to(tmp_path: Path, sqlite_or_postgres_url: str) -> None:
    """`sync --resource items` and a sync of everything looked the same in `status`: only etl_runs.resources told them apart."""
    async with serving(Api(_records(5)).routes()) as origin:
        config = _config(tmp_path, origin, sqlite_or_postgres_url, ("items", "other"), window="3650d")
        assert (await run_etl("sync", "--config", str(config), "--resource", "items")).returncode == 0
        assert (await run_etl("sync", "--config", str(config))).returncode == 0
    status = await run_etl("status", "--config", str(config))
    runs = status.stdout.split("recent runs:")[1].split("watermarks:")[0]
    second, first = runs.split("#1")
    assert "--resource items" in first and "--resource" not in second


async def test_a_key_on_two_pages_and_retried_pages_are_counted_alike_in_stdout_etl_runs_and_status(
    tmp_path: Path, sqlite_or_postgres_url: str
) -> None:
    """docs/DECISIONS.md: pages are pages read, not attempts; fetched = loaded + rejected, each record as received."""
    api = Api(_records(15))
    api.pages[2] = [*api.records[10:14], {**api.records[2], "name": "again"}]  # id 3 again, on the last page
    api.refusals[2] = [429, 503]
    async with serving(api.routes()) as origin:
        config = _config(tmp_path, origin, sqlite_or_postgres_url, window="3650d")
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "items: 15 loaded, 0 rejected, 2 pages" in result.stdout
    assert "4 requests, 2 retried, 1 token request(s)" in result.stderr
    (run,) = await rows(sqlite_or_postgres_url, "SELECT pages, records_fetched, records_loaded, records_rejected, requests, retries, "
                                                "token_requests FROM etl_runs")
    assert tuple(run) == (2, 15, 15, 0, 4, 2, 1)
    assert len(await rows(sqlite_or_postgres_url, "SELECT id FROM items")) == 14
    status = await run_etl("status", "--config", str(config))
    assert "pages 2  loaded 15  rejected 0  token requests 1" in status.stdout
