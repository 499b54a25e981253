"""End to end against APIs that name their next page by URL in the body, not in a Link header.

OData and Microsoft Graph (`@odata.nextLink`), Salesforce (`nextRecordsUrl`, a path), HAL
(`_links.next.href`), JSON:API (`links.next`) and Django REST framework (`next`): a user sets
`style = "cursor"` with `next_cursor_path` at that value, and etl follows it as it follows a Link.
Each server filters by date and serves pages of 7, so a backfill of a month in 3-day windows walks
several pages in most windows; every record must be served, and loaded, exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from loopback import serving

import tomlwriter
from dbquery import sqlite_rows
from etlproc import Finished, run_etl

START = datetime(2024, 1, 1, tzinfo=UTC)
RECORDS = [
    {"id": n, "name": f"r{n}", "updated_at": (START + timedelta(hours=5 * n)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for n in range(1, 121)
]
SIZE = 7
Next = Callable[[str, dict[str, str], int], str]  # (origin, filter, next offset) -> the next page as the body names it


def in_window(query: Any) -> list[dict[str, Any]]:
    """The records the date filter selects, in the API's order."""
    low, high = query["updated_since"], query["updated_until"]
    return [r for r in RECORDS if low <= r["updated_at"] < high]


def bounds(query: Any) -> dict[str, str]:
    return {key: query[key] for key in ("updated_since", "updated_until")}


async def token(request: web.Request) -> web.Response:
    return web.json_response({"access_token": "nextlink-token", "expires_in": 3600, "token_type": "Bearer"})


def odata(records: list[Any], following: str | None) -> dict[str, Any]:
    return {"value": records, **({"@odata.nextLink": following} if following else {})}


def salesforce(records: list[Any], following: str | None) -> dict[str, Any]:
    return {"records": records, "done": following is None, **({"nextRecordsUrl": following} if following else {})}


def hal(records: list[Any], following: str | None) -> dict[str, Any]:
    return {"_embedded": {"items": records}, "_links": {"next": {"href": following}} if following else {}}


def jsonapi(records: list[Any], following: str | None) -> dict[str, Any]:
    return {"data": records, "links": {"next": following}}


def drf(records: list[Any], following: str | None) -> dict[str, Any]:
    return {"count": 0, "next": following, "previous": None, "results": records}


SHAPES = {  # records_path, next_cursor_path, body, the next page's reference
    "odata": ("value", "@odata.nextLink", odata,
              lambda origin, window, at: f"{origin}/api/items?" + urlencode({**window, "$skiptoken": at})),
    "salesforce": ("records", "nextRecordsUrl", salesforce,
                   lambda origin, window, at: f"/api/query/01gD-{at}?" + urlencode(window)),
    "hal-relative": ("_embedded.items", "_links.next.href", hal,
                     lambda origin, window, at: "items?" + urlencode({**window, "skip": at})),
    "jsonapi-query": ("data", "links.next", jsonapi,
                      lambda origin, window, at: "?" + urlencode({**window, "page[offset]": at})),
    "jsonapi-absolute": ("data", "links.next", jsonapi,
                         lambda origin, window, at: f"{origin}/api/items?" + urlencode({**window, "page[offset]": at})),
    "drf-page": ("results", "next", drf,
                 lambda origin, window, at: f"{origin}/api/items?" + urlencode({**window, "page": at // SIZE + 1})),
    "drf-cursor": ("results", "next", drf,
                   lambda origin, window, at: f"{origin}/api/items?" + urlencode({**window, "cursor": f"cD0{at}"})),
}


def offset_of(request: web.Request) -> int:
    """Where the page starts, however the shape's link said it."""
    query = request.query
    if "page" in query:
        return (int(query["page"]) - 1) * SIZE
    if "cursor" in query:
        return int(query["cursor"].removeprefix("cD0"))
    if "token" in request.match_info:
        return int(request.match_info["token"].removeprefix("01gD-"))
    return int(query.get("$skiptoken", query.get("skip", query.get("page[offset]", 0))))


async def backfill(
    tmp_path: Path, shape: str, served: Counter[int], fail_once: set[tuple[str, int]] | None = None
) -> tuple[Finished, str]:
    """A month's backfill in 3-day windows against the shape's API; `served` counts each record the API sent.

    A page in `fail_once` (window start, offset) is answered 500 the first time it is asked for.
    """
    records_path, next_path, body, reference = SHAPES[shape]
    failing = set() if fail_once is None else fail_once

    async def page(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer nextlink-token"
        selected, start = in_window(request.query), offset_of(request)
        if (request.query["updated_since"], start) in failing:
            failing.discard((request.query["updated_since"], start))
            return web.json_response({"error": "backend down"}, status=500)
        chunk = selected[start:start + SIZE]
        served.update(r["id"] for r in chunk)
        more = start + SIZE < len(selected)
        return web.json_response(body(chunk, reference(str(request.url.origin()), bounds(request.query), start + SIZE) if more else None))

    database = f"sqlite:///{tmp_path / 'etl.db'}"
    routes = {("POST", "/oauth2/token"): token, ("GET", "/api/items"): page, ("GET", "/api/query/{token}"): page}
    async with serving(routes) as origin:
        config = tomlwriter.write(tmp_path / "config.toml", {
            "api": {"base_url": f"{origin}/api", "concurrency": 2, "max_retries": 0},
            "auth": {"token_url": f"{origin}/oauth2/token", "client_id": "probe"},
            "database": {"url": database},
            "resources": [{
                "name": "items", "path": "/items", "records_path": records_path, "primary_key": ["id"],
                "cursor_field": "updated_at", "start": "2024-01-01", "window": "3d",
                "filter": {"from_param": "updated_since", "to_param": "updated_until"},
                "pagination": {"style": "cursor", "next_cursor_path": next_path},
                "columns": {"id": "integer", "name": "string", "updated_at": "datetime"},
            }],
        })
        return await run_etl("--config", str(config), "backfill", "--from", "2024-01-01", "--to", "2024-02-01"), database


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_next_page_url_in_the_body_is_followed_and_every_record_loads_once(tmp_path: Path, shape: str) -> None:
    """The URL was sent as `?cursor=<the URL>` to the first page's address: the API served page 1 again,
    named the same URL, and the run failed "the API seems to ignore the 'cursor' parameter"; OData's
    key, read as `@odata` then `nextLink`, ended every window after its first page with exit 0."""
    served: Counter[int] = Counter()

    finished, database = await backfill(tmp_path, shape, served)

    assert finished.returncode == 0, finished.stderr
    assert served == Counter(r["id"] for r in RECORDS)
    assert [row[0] for row in sqlite_rows(database, "SELECT id FROM items ORDER BY id")] == [r["id"] for r in RECORDS]
    assert sqlite_rows(database, "SELECT records_fetched, records_loaded FROM etl_runs") == [(120, 120)]


@pytest.mark.parametrize("shape", ["drf-cursor", "salesforce"])
async def test_a_window_stopped_after_a_next_url_is_read_again_from_its_first_page(tmp_path: Path, shape: str) -> None:
    """The run fails on the second page of one window; the backfill run again resumes: finished windows are not
    fetched again, the stopped one is read from its first page (its saved next URL may have expired), none twice."""
    first: Counter[int] = Counter()
    stopped, database = await backfill(tmp_path, shape, first, fail_once={("2024-01-13T00:00:00Z", SIZE)})
    assert stopped.returncode == 1, stopped.stderr
    assert set(first) < {r["id"] for r in RECORDS}

    second: Counter[int] = Counter()
    finished, _ = await backfill(tmp_path, shape, second)

    assert finished.returncode == 0, finished.stderr
    assert [row[0] for row in sqlite_rows(database, "SELECT id FROM items ORDER BY id")] == [r["id"] for r in RECORDS]
    assert max(second.values()) == 1
    window = [r["id"] for r in RECORDS if "2024-01-13" <= r["updated_at"] < "2024-01-16"]
    assert all(second[n] == 1 for n in window)
    assert sum(second.values()) < len(RECORDS)  # the windows the first run finished were not read again


async def test_a_stripe_like_api_pages_by_the_last_id_of_each_page(tmp_path: Path) -> None:
    """Stripe pages with `starting_after` = the last record's id and says `has_more`: `next_cursor_path =
    "data.-1.id"` names that id. A path could not step to a list's last item: such an API could not be paged
    at all. The page after the last one is empty, and ends the window (one request more than has_more needs)."""
    by_id = {r["id"]: r for r in RECORDS}
    served: Counter[int] = Counter()

    async def stripe(request: web.Request) -> web.Response:
        low, high = int(request.query["created[gte]"]), int(request.query["created[lt]"])
        selected = [r for r in RECORDS if low <= datetime.fromisoformat(by_id[r["id"]]["updated_at"]).timestamp() < high]
        after = request.query.get("starting_after")
        start = 0 if after is None else [r["id"] for r in selected].index(int(after)) + 1
        chunk = selected[start:start + int(request.query["limit"])]
        served.update(r["id"] for r in chunk)
        return web.json_response({"object": "list", "data": chunk, "has_more": start + len(chunk) < len(selected)})

    database = f"sqlite:///{tmp_path / 'etl.db'}"
    async with serving({("POST", "/oauth2/token"): token, ("GET", "/v1/charges"): stripe}) as origin:
        config = tomlwriter.write(tmp_path / "config.toml", {
            "api": {"base_url": f"{origin}/v1", "concurrency": 2, "max_retries": 0},
            "auth": {"token_url": f"{origin}/oauth2/token", "client_id": "probe"},
            "database": {"url": database},
            "resources": [{
                "name": "items", "path": "/charges", "records_path": "data", "primary_key": ["id"],
                "cursor_field": "updated_at", "start": "2024-01-01", "window": "3d",
                "filter": {"from_param": "created[gte]", "to_param": "created[lt]", "format": "epoch"},
                "pagination": {"style": "cursor", "cursor_param": "starting_after", "next_cursor_path": "data.-1.id",
                               "size_param": "limit", "page_size": SIZE},
                "columns": {"id": "integer", "name": "string", "updated_at": "datetime"},
            }],
        })
        finished = await run_etl("--config", str(config), "backfill", "--from", "2024-01-01", "--to", "2024-02-01")

    assert finished.returncode == 0, finished.stderr
    assert served == Counter(r["id"] for r in RECORDS)
    assert [row[0] for row in sqlite_rows(database, "SELECT id FROM items ORDER BY id")] == [r["id"] for r in RECORDS]
