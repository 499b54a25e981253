"""End to end against paging APIs etl did not write: each one a small aiohttp server of the test's own.

`sync` runs as a subprocess, as cron runs it; the table must hold every record once and
`etl_runs` must count what was loaded, not what was served twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loopback import Handler, serving

import tomlwriter
from dbquery import sqlite_rows
from etlproc import Finished, run_etl

RECORDS = [{"id": n, "name": f"r{n}", "updated_at": "2024-01-02T00:00:00Z"} for n in range(1, 251)]


async def token(request: web.Request) -> web.Response:
    return web.json_response({"access_token": "page-probe-token", "expires_in": 3600, "token_type": "Bearer"})


def items(pagination: dict[str, Any], records_path: str = "data") -> dict[str, Any]:
    """One resource without a date filter: every sync reads the API's whole list."""
    return {
        "name": "items", "path": "/items", "records_path": records_path, "primary_key": ["id"],
        "cursor_field": "updated_at", "pagination": pagination,
        "columns": {"id": "integer", "name": "string", "updated_at": "datetime"},
    }


async def sync(tmp_path: Path, handler: Handler, resource: dict[str, Any]) -> tuple[Finished, str]:
    """`etl sync` of `resource` against `handler` on /api/items; returns its outcome and the SQLite URL."""
    database = f"sqlite:///{tmp_path / 'etl.db'}"
    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/items"): handler}) as origin:
        config = tomlwriter.write(tmp_path / "config.toml", {
            "api": {"base_url": f"{origin}/api", "concurrency": 2, "max_retries": 0},
            "auth": {"token_url": f"{origin}/oauth2/token", "client_id": "probe"},
            "database": {"url": database},
            "resources": [resource],
        })
        return await run_etl("--config", str(config), "sync"), database


def loaded_ids(database: str) -> list[int]:
    return [row[0] for row in sqlite_rows(database, "SELECT id FROM items ORDER BY id")]


@pytest.mark.parametrize("style", ["page", "offset"])
async def test_a_last_page_served_again_past_the_end_is_neither_loaded_nor_counted_twice(tmp_path: Path, style: str) -> None:
    """Django's get_page answers a page past the end with the last page: 250 records by 50, the sixth request
    brings records 201-250 again. They were loaded a second time: "300 loaded" in the summary and etl_runs.
    The page that ends the window counts as a page, as an empty last page does."""

    async def clamped(request: web.Request) -> web.Response:
        query = request.query
        start = (int(query["page"]) - 1) * 50 if style == "page" else int(query["offset"])
        start = min(start, 200)
        return web.json_response({"data": RECORDS[start:start + 50]})

    finished, database = await sync(tmp_path, clamped, items({"style": style, "page_size": 50}))

    assert finished.returncode == 0, finished.stderr
    assert loaded_ids(database) == list(range(1, 251))
    assert "items: 250 loaded, 0 rejected, 6 pages" in finished.stdout
    assert sqlite_rows(database, "SELECT pages, records_fetched, records_loaded FROM etl_runs") == [(6, 250, 250)]


def camel_cursor(size: int | None = None) -> Handler:
    """A cursor API that names its next cursor `meta.nextCursor`, null on the last page."""

    async def answer(request: web.Request) -> web.Response:
        start = int(request.query.get("cursor", 0))
        end = start + (size or int(request.query["limit"]))
        following = str(end) if end < len(RECORDS) else None
        return web.json_response({"data": RECORDS[start:end], "meta": {"nextCursor": following}})

    return answer


@pytest.mark.parametrize("size_param", ["limit", ""])
async def test_a_next_cursor_path_no_page_holds_is_a_warning_naming_the_key(tmp_path: Path, size_param: str) -> None:
    """`next_cursor_path = "meta.next_cursor"` where the API says `meta.nextCursor`: every window ended after its
    first page (50 of 250 records) without a word, exit 0, as "missing" means the last page."""
    pagination = {"style": "cursor", "next_cursor_path": "meta.next_cursor", "size_param": size_param, "page_size": 50}

    finished, database = await sync(tmp_path, camel_cursor(None if size_param else 50), items(pagination))

    assert len(loaded_ids(database)) == 50
    assert (
        "items: next_cursor_path 'meta.next_cursor' was in no page of the run, though pages of 50 records "
        "(page_size) came without it: each such window ended after its first page. Keys at 'meta': nextCursor; "
        "check resources.items.pagination.next_cursor_path, then backfill what was missed"
    ) in finished.stderr


async def test_a_next_cursor_path_missing_only_from_the_last_page_is_no_warning(tmp_path: Path) -> None:
    """An API that drops the key on its last page (Go's omitempty), here a full one: the path was in the pages before."""

    async def omitempty(request: web.Request) -> web.Response:
        start = int(request.query.get("cursor", 0))
        meta = {"next": str(start + 50)} if start + 50 < len(RECORDS) else {}
        return web.json_response({"data": RECORDS[start:start + 50], "meta": meta})

    pagination = {"style": "cursor", "next_cursor_path": "meta.next", "size_param": "limit", "page_size": 50}
    finished, database = await sync(tmp_path, omitempty, items(pagination))

    assert finished.returncode == 0, finished.stderr
    assert loaded_ids(database) == list(range(1, 251))
    assert "next_cursor_path" not in finished.stderr


@pytest.mark.parametrize(("style", "key"), [("page", "page_param"), ("offset", "offset_param"), ("cursor", "cursor_param")])
async def test_an_api_that_ignores_the_paging_parameter_fails_naming_the_key_to_set(tmp_path: Path, style: str, key: str) -> None:
    """The API pages by `p`, `skip` or `after`, etl sends `page`, `offset` or `cursor`: every request gets the first page.
    The error said "stopping instead of looping", and the cursor's not even which parameter was ignored."""

    async def first_page_always(request: web.Request) -> web.Response:
        return web.json_response({"data": RECORDS[:50], "next": "50"})

    pagination = {"style": style, "page_size": 50} | ({"next_cursor_path": "next"} if style == "cursor" else {})
    finished, database = await sync(tmp_path, first_page_always, items(pagination))

    assert finished.returncode == 1
    assert loaded_ids(database) == list(range(1, 51))
    assert f"hint: if the API reads another name, set resources.items.pagination.{key}" in finished.stderr


@pytest.mark.parametrize("style", ["page", "offset"])
async def test_a_lone_surrogate_on_a_numbered_page_is_a_reject_not_an_internal_error(tmp_path: Path, style: str) -> None:
    """A JavaScript API that cuts a string inside an emoji writes "\\ud83d" alone, which is valid JSON. Records are
    rejected for it, but the page's fingerprint (for the repeated-page check) was made first and raised TypeError:
    "internal error" and a traceback, the run failed at its first page with nothing loaded or rejected."""
    page = '{"data": [{"id": 1, "name": "cut \\ud83d", "updated_at": "2024-01-02T00:00:00Z"}, ' \
           '{"id": 2, "name": "whole", "updated_at": "2024-01-02T00:00:00Z"}]}'

    async def served(request: web.Request) -> web.Response:
        first = request.query.get("page", "1") == "1" and request.query.get("offset", "0") == "0"
        return web.Response(text=page if first else '{"data": []}', content_type="application/json")

    finished, database = await sync(tmp_path, served, items({"style": style, "page_size": 50}))

    assert finished.returncode == 1, finished.stderr
    assert "internal error" not in finished.stderr and "Traceback" not in finished.stderr
    assert loaded_ids(database) == [2]
    assert "items: 1 loaded, 1 rejected" in finished.stdout
    assert "lone UTF-16 surrogate" in sqlite_rows(database, "SELECT error FROM etl_rejects")[0][0]


@pytest.mark.parametrize(("marker", "said"), [
    ({"next": "/api/items?page=2"}, "'next' holds '/api/items?page=2'"),
    ({"meta": {"has_more": True}}, "'meta.has_more' is true"),
    ({"links": {"next": {"href": "/api/items?page=2"}}}, "'links.next' holds"),
    ({"total": 250}, "its total (250) is above the 100 records"),
    ({"link": True}, 'Link header has rel="next"'),
])
async def test_a_single_page_resource_whose_api_says_there_is_more_is_a_warning(
    tmp_path: Path, marker: dict[str, Any], said: str
) -> None:
    """Without [resources.pagination] (style "none") a paging API's first page was all that was loaded, exit 0
    and no word, though the body, its Link header or its total said that more pages followed."""

    async def first_page(request: web.Request) -> web.Response:
        body = {"data": RECORDS[:100], **{key: value for key, value in marker.items() if key != "link"}}
        headers = {"Link": '</api/items?page=2>; rel="next"'} if "link" in marker else {}
        return web.json_response(body, headers=headers)

    resource = items({"style": "none", **({"total_path": "total"} if "total" in marker else {})})
    finished, database = await sync(tmp_path, first_page, resource)

    assert finished.returncode == 0, finished.stderr
    assert len(loaded_ids(database)) == 100
    warning = next((line for line in finished.stderr.splitlines() if "pagination.style" in line), "")
    assert "items: resources.items.pagination.style is \"none\"" in warning, finished.stderr
    assert said in warning and "the next sync reads it all again" in warning


async def test_a_single_page_resource_whose_api_says_this_is_all_is_no_warning(tmp_path: Path) -> None:
    """A null next, a false has_more and a total that the page holds are what a one-page API answers."""

    async def whole(request: web.Request) -> web.Response:
        return web.json_response({"data": RECORDS, "next": None, "has_more": False, "meta": {"total": 250}})

    finished, database = await sync(tmp_path, whole, items({"style": "none", "total_path": "meta.total"}))

    assert finished.returncode == 0, finished.stderr
    assert len(loaded_ids(database)) == 250
    assert "WARNING" not in finished.stderr, finished.stderr


async def test_check_warns_of_a_single_page_resource_whose_api_says_there_is_more(tmp_path: Path) -> None:
    """`check` read the first page of a paging API with style "none" and passed: sync would load that page alone."""

    async def first_page(request: web.Request) -> web.Response:
        return web.json_response({"data": RECORDS[:100], "nextLink": "/api/items?skip=100"})

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/items"): first_page}) as origin:
        config = tomlwriter.write(tmp_path / "config.toml", {
            "api": {"base_url": f"{origin}/api", "max_retries": 0},
            "auth": {"token_url": f"{origin}/oauth2/token", "client_id": "probe"},
            "database": {"url": f"sqlite:///{tmp_path / 'etl.db'}"},
            "resources": [items({"style": "none"})],
        })
        finished = await run_etl("--config", str(config), "check")

    assert finished.returncode == 0, finished.stdout + finished.stderr
    line = next(line for line in finished.stdout.splitlines() if "resource items" in line)
    assert line.startswith("!"), finished.stdout
    assert "'nextLink' holds '/api/items?skip=100'" in finished.stdout
