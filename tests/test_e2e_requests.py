"""Requests as an API etl did not write receives them, and what `sync` says when it refuses one: run as cron runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from loopback import serving

import tomlwriter
from etlproc import etl_env, run_etl

TOKEN = {"access_token": "requests-token", "expires_in": 3600, "token_type": "Bearer"}


def _config(directory: Path, base: str, **resource: Any) -> Path:
    document = {
        "api": {"base_url": f"{base}/api/v1", "max_retries": 0},
        "auth": {"token_url": f"{base}/oauth2/token", "client_id": "requests-client"},
        "database": {"url": f"sqlite:///{directory / 'etl.db'}"},
        "resources": [{
            "name": "orders", "path": "/orders", "records_path": "data", "primary_key": ["id"],
            "start": "2024-01-01", "window": "400d", "columns": {"id": "integer", "updated_at": "datetime"},
            "filter": {"from_param": "since", "to_param": "until"}, **resource,
        }],
    }
    return tomlwriter.write(directory / "config.toml", document)


async def _token(_request: web.Request) -> web.Response:
    return web.json_response(TOKEN)


async def test_a_400_on_a_windows_first_page_points_at_the_params_and_the_filter_format(tmp_path: Path) -> None:
    """An API that wants dates refused `since=2024-01-01T00:00:00Z` with a 400: cron's log quoted its body and
    said nothing of which keys make the request."""

    async def orders(request: web.Request) -> web.Response:
        return web.json_response({"error": f"invalid date: {request.query['since']}"}, status=400)

    async with serving({("POST", "/oauth2/token"): _token, ("GET", "/api/v1/orders"): orders}) as base:
        finished = await run_etl("--config", str(_config(tmp_path, base)), "sync", env=etl_env(ETL_CLIENT_SECRET="s3cret"))

    assert finished.returncode == 1
    assert "invalid date: 2024-01-01T00:00:00Z" in finished.stderr
    hint = finished.stderr.split("hint: ", 1)[-1]
    assert "resources.orders.params" in hint and "format = 'iso'" in hint and "check" in hint, finished.stderr


async def test_a_400_after_pages_were_served_points_at_a_smaller_window(tmp_path: Path) -> None:
    """Many APIs refuse a page past a depth (Elasticsearch: offset + size over 10,000, a 400): the first pages loaded,
    and the hint blamed the params and the filter, which the API had just taken."""

    async def orders(request: web.Request) -> web.Response:
        offset = int(request.query["offset"])
        if offset >= 4:
            return web.json_response({"error": "Result window is too large"}, status=400)
        return web.json_response({"data": [{"id": offset + n, "updated_at": "2024-01-02T00:00:00Z"} for n in range(2)]})

    pagination = {"style": "offset", "page_size": 2}
    async with serving({("POST", "/oauth2/token"): _token, ("GET", "/api/v1/orders"): orders}) as base:
        config = _config(tmp_path, base, pagination=pagination)
        finished = await run_etl("--config", str(config), "sync", env=etl_env(ETL_CLIENT_SECRET="s3cret"))

    assert finished.returncode == 1
    hint = finished.stderr.split("hint: ", 1)[-1]
    assert "Result window is too large" in finished.stderr and "resources.orders.window" in hint, finished.stderr
    assert "format" not in hint


async def test_a_400_on_a_page_fetched_by_the_total_points_at_a_smaller_window(tmp_path: Path) -> None:
    """With a total (what a search backend that caps the depth gives), the pages after the first are fetched in parallel
    lanes: their 400 went out with no hint at all, where the depth is most often refused."""

    async def orders(request: web.Request) -> web.Response:
        offset = int(request.query["offset"])
        if offset >= 4:
            return web.json_response({"error": "Result window is too large"}, status=400)
        records = [{"id": offset + n, "updated_at": "2024-01-02T00:00:00Z"} for n in range(2)]
        return web.json_response({"data": records, "total": 10})

    pagination = {"style": "offset", "page_size": 2, "total_path": "total"}
    async with serving({("POST", "/oauth2/token"): _token, ("GET", "/api/v1/orders"): orders}) as base:
        config = _config(tmp_path, base, pagination=pagination)
        finished = await run_etl("--config", str(config), "sync", env=etl_env(ETL_CLIENT_SECRET="s3cret"))

    assert finished.returncode == 1
    assert "Result window is too large" in finished.stderr and "hint: " in finished.stderr, finished.stderr
    assert "resources.orders.window" in finished.stderr.split("hint: ", 1)[-1], finished.stderr


async def test_check_shows_the_request_as_sent_when_path_carries_a_query(tmp_path: Path) -> None:
    """`path = "/orders?type=a"` with params: check showed `?type=a%3Fapi_key%3D***&since=...`, a request etl never
    sent, beside the one the API refused (`?type=a&api_key=...`)."""
    sent: list[str] = []

    async def orders(request: web.Request) -> web.Response:
        sent.append(request.query_string)
        return web.json_response({"error": "unknown type"}, status=400)

    async with serving({("POST", "/oauth2/token"): _token, ("GET", "/api/v1/orders"): orders}) as base:
        config = _config(tmp_path, base, path="/orders?type=a", params={"api_key": "K3yK3yK3y", "region": "eu"})
        finished = await run_etl("--config", str(config), "check", env=etl_env(ETL_CLIENT_SECRET="s3cret"))

    assert finished.returncode == 1 and sent and sent[0].startswith("type=a&api_key=K3yK3yK3y&region=eu&since=")
    shown = next(line for line in finished.stdout.splitlines() if "GET http" in line)
    assert "/api/v1/orders?type=a&api_key=***&region=eu&since=" in shown and "%3F" not in shown, finished.stdout
