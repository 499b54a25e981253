"""etl.paginators: each style walks a fake API (aioresponses) through the real ApiClient, as a worker does.

A walk stops where the API says the window ends (empty page, short page,
total, no next cursor or link) and a server that repeats itself ends the
window with an error instead of a loop. Page and offset windows with a known
total hand out their remaining pages for parallel fetching.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aioresponses import CallbackResult, aioresponses
from conftest import _MockedResponse as MockedResponse
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy
from pydantic import SecretStr

from etl.client import ApiClient, PageRequest, PageResponse, RequestCounters
from etl.config import (
    ApiConfig,
    AuthConfig,
    CursorPagination,
    LinkHeaderPagination,
    NoPagination,
    OffsetPagination,
    PagePagination,
    Pagination,
    ResourceConfig,
)
from etl.errors import SourceError
from etl.paginators import (
    EMPTY_PAGES_IN_A_ROW,
    Paginator,
    Seen,
    dig,
    more_to_come,
    paginator_for,
    path_break,
    window_paginator,
)
from etl.records import records_at
from etl.token import TokenManager
from etl.transport import RetryPolicy, open_session
from etl.windows import FULL_REFRESH

BASE = "https://api.example.test/api/v1"
TOKEN_URL = "https://auth.example.test/oauth2/token"
RECORDS = [{"id": n} for n in range(1, 251)]
Answer = Callable[[MultiDictProxy[str]], CallbackResult]


@pytest.fixture
async def client(http_mock: aioresponses) -> AsyncIterator[ApiClient]:
    """The real client, its token from a mocked token endpoint."""
    http_mock.post(TOKEN_URL, payload={"access_token": "token-abcdef", "expires_in": 3600}, repeat=True)
    api = ApiConfig(base_url=BASE, retry_backoff_s=0.001, max_retries=1)
    async with open_session(api) as session:
        tokens = TokenManager(
            AuthConfig(token_url=TOKEN_URL, client_id="etl"),
            SecretStr("secret-value"),
            session,
            RetryPolicy.from_api(api),
        )
        yield ApiClient(api, session, tokens, RequestCounters())


def serve(http_mock: aioresponses, answer: Answer, path: str = "/items") -> list[dict[str, str]]:
    """Answer every GET of BASE + path with `answer(query)`; returns the queries received, in order."""
    queries: list[dict[str, str]] = []

    def callback(url: Any, **kwargs: Any) -> CallbackResult:
        queries.append(dict(url.query))
        result = answer(url.query)
        result.response_class = MockedResponse  # the aiohttp 3.14 workaround of http_mock, for callbacks too
        return result

    http_mock.get(re.compile(re.escape(BASE + path) + r"(\?.*)?$"), callback=callback, repeat=True)
    return queries


async def walk(paginator: Paginator, client: ApiClient, records_path: str) -> list[Any]:
    """What a pipeline worker does with one window: request, get, records, advance, until done."""
    received: list[Any] = []
    while (request := paginator.request()) is not None:
        response = await client.get(request)
        records = records_at(response.body, records_path, response.url)
        received.extend(paginator.advance(response, records))
    return received


def pages(total_in_body: bool = False, server_max: int = 1000, records: list[Any] = RECORDS) -> Answer:
    """page/page_size numbering from 1; the server serves at most `server_max` records a page."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        size = min(int(query["page_size"]), server_max)
        start = (int(query["page"]) - 1) * size
        body: dict[str, Any] = {"data": records[start : start + size]}
        if total_in_body:
            body["total"] = len(records)
        return CallbackResult(payload=body)

    return answer


def page_paginator(**options: Any) -> Paginator:
    return paginator_for(PagePagination(style="page", **options), BASE + "/items", {"status": "all"})


async def test_page_style_stops_on_a_short_page(http_mock: aioresponses, client: ApiClient) -> None:
    """250 records by 100: pages 1, 2, 3 and no fourth request, static params on each."""
    queries = serve(http_mock, pages())
    received = await walk(page_paginator(page_size=100), client, "data")
    assert received == RECORDS
    assert [q["page"] for q in queries] == ["1", "2", "3"]
    assert all(q["status"] == "all" and q["page_size"] == "100" for q in queries)


async def test_page_style_stops_on_an_empty_page(http_mock: aioresponses, client: ApiClient) -> None:
    """200 records by 100 and no total: the empty third page ends the window."""
    queries = serve(http_mock, pages(records=RECORDS[:200]))
    assert await walk(page_paginator(page_size=100), client, "data") == RECORDS[:200]
    assert [q["page"] for q in queries] == ["1", "2", "3"]


@pytest.mark.parametrize("style", ["page", "offset"])
async def test_a_page_past_the_end_answered_with_the_last_page_again_ends_the_window(
    http_mock: aioresponses, client: ApiClient, style: str
) -> None:
    """Django's get_page answers a page past the end with the last one: after two different full pages, that is the end.

    A window holding an exact multiple of page_size failed every run as "the API seems to ignore the page parameter".
    """

    def clamped(query: MultiDictProxy[str]) -> CallbackResult:
        start = (int(query["page"]) - 1) * 100 if style == "page" else int(query["offset"])
        return CallbackResult(payload={"data": RECORDS[min(start, 100) : min(start, 100) + 100]})

    queries = serve(http_mock, clamped)
    config = PagePagination(style="page") if style == "page" else OffsetPagination(style="offset")
    received = await walk(paginator_for(config, BASE + "/items", {}), client, "data")
    assert received == RECORDS[:200]
    assert len(queries) == 3


async def test_page_style_stops_at_total_path_without_an_extra_request(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """With total_path, 200 records by 100 take exactly two requests."""
    queries = serve(http_mock, pages(total_in_body=True, records=RECORDS[:200]))
    assert await walk(page_paginator(page_size=100, total_path="total"), client, "data") == RECORDS[:200]
    assert len(queries) == 2


async def test_a_server_capping_the_page_size_loses_nothing_when_the_total_is_known(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """Asked for 100, served 40: short pages go on until the total instead of ending the window early."""
    queries = serve(http_mock, pages(total_in_body=True, server_max=40))
    assert await walk(page_paginator(page_size=100, total_path="total"), client, "data") == RECORDS
    assert len(queries) == 7


@pytest.mark.parametrize("total", [50, 0, -1], ids=["below-one-page", "zero", "minus-one"])
async def test_a_total_the_records_already_exceed_does_not_end_the_window(
    http_mock: aioresponses, client: ApiClient, total: int
) -> None:
    """A total below what the pages hold (0 or 50 beside 100 records; -1 for "not counted") is not trusted:
    the window pages on to a short page instead of ending after the first one."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = (int(query["page"]) - 1) * 100
        return CallbackResult(payload={"data": RECORDS[start : start + 100], "total": total})

    queries = serve(http_mock, answer)
    assert await walk(page_paginator(page_size=100, total_path="total"), client, "data") == RECORDS
    assert [q["page"] for q in queries] == ["1", "2", "3"]


async def test_offset_style_steps_by_records_and_stops_at_total_header(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """offset/limit with X-Total-Count: offsets 0, 100, 200 and no request past the total."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        offset, limit = int(query["offset"]), int(query["limit"])
        return CallbackResult(
            payload={"results": RECORDS[offset : offset + limit]}, headers={"X-Total-Count": "250"}
        )

    queries = serve(http_mock, answer)
    paginator = paginator_for(
        OffsetPagination(style="offset", page_size=100, total_header="X-Total-Count"), BASE + "/items", {}
    )
    assert await walk(paginator, client, "results") == RECORDS
    assert [q["offset"] for q in queries] == ["0", "100", "200"]


def cursor_pages(last: dict[str, Any], repeat: bool = False) -> Answer:
    """Cursor = index of the next record; the last page's meta is `last`; `repeat` echoes the cursor."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = int(query.get("cursor", "0"))
        items = RECORDS[start : start + 100]
        following = start + 100
        meta = {"next_cursor": query.get("cursor", "100") if repeat else str(following)}
        return CallbackResult(payload={"items": items, "meta": meta if following < len(RECORDS) else last})

    return answer


@pytest.mark.parametrize(
    "last", [{"next_cursor": None}, {"next_cursor": ""}, {}], ids=["null", "empty", "missing"]
)
async def test_cursor_style_follows_next_cursor_until_it_is_gone(
    http_mock: aioresponses, client: ApiClient, last: dict[str, Any]
) -> None:
    """next_cursor is sent back as `cursor`; null, "" or a missing one ends the window."""
    queries = serve(http_mock, cursor_pages(last))
    paginator = paginator_for(
        CursorPagination(style="cursor", next_cursor_path="meta.next_cursor", size_param="limit"),
        BASE + "/items",
        {},
    )
    assert await walk(paginator, client, "items") == RECORDS
    assert [q.get("cursor") for q in queries] == [None, "100", "200"]
    assert all(q["limit"] == "100" for q in queries)


async def test_a_cursor_in_params_is_the_first_pages_cursor(http_mock: aioresponses, client: ApiClient) -> None:
    """Solr's cursor paging asks its first page with cursorMark=* and each next with the mark it was given:
    `params = { cursorMark = "*" }` beside cursor_param = "cursorMark" is how that is said, not a parameter etl
    overwrites on every request (it was refused as one, exit 2)."""
    marks = {"*": (RECORDS[:100], "AoE100"), "AoE100": (RECORDS[100:], "AoE250"), "AoE250": ([], "AoE250")}

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        docs, following = marks[query["cursorMark"]]
        return CallbackResult(payload={"response": {"docs": docs}, "nextCursorMark": following})

    queries = serve(http_mock, answer)
    resource = ResourceConfig.model_validate({
        "name": "items", "path": "/items", "records_path": "response.docs", "primary_key": ["id"], "columns": {"id": "integer"},
        "params": {"cursorMark": "*"},
        "pagination": {"style": "cursor", "cursor_param": "cursorMark", "next_cursor_path": "nextCursorMark"},
    })
    assert await walk(window_paginator(resource, BASE, FULL_REFRESH), client, "response.docs") == RECORDS
    assert [q["cursorMark"] for q in queries] == ["*", "AoE100", "AoE250"]


async def test_a_repeated_cursor_ends_the_window_with_an_error(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """A server that hands back the cursor it was sent is stopped on the second page, not looped on."""
    queries = serve(http_mock, cursor_pages({}, repeat=True))
    paginator = paginator_for(
        CursorPagination(style="cursor", next_cursor_path="meta.next_cursor"), BASE + "/items", {}
    )
    with pytest.raises(SourceError, match="returned the cursor '100' a second time"):
        await walk(paginator, client, "items")
    assert len(queries) == 2


@pytest.mark.parametrize(
    ("config", "records_path"),
    [
        (PagePagination(style="page", page_size=100), "data"),
        (OffsetPagination(style="offset", page_size=100), "data"),
        (CursorPagination(style="cursor", next_cursor_path="meta.next_cursor"), "data"),
        (LinkHeaderPagination(style="link_header"), ""),
        (NoPagination(style="none"), "data"),
    ],
    ids=["page", "offset", "cursor", "link_header", "none"],
)
async def test_a_204_ends_the_window_as_an_empty_page_does(
    http_mock: aioresponses, client: ApiClient, config: Pagination, records_path: str
) -> None:
    """204 No Content is a page without records: every style ends the window there, without an error."""
    queries = serve(http_mock, lambda query: CallbackResult(status=204, body=""))
    assert await walk(paginator_for(config, BASE + "/items", {}), client, records_path) == []
    assert len(queries) == 1


async def test_a_null_record_list_ends_a_page_window_as_an_empty_page_does(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """`"data": null` (Go's empty slice) after two full pages ends the window like `"data": []`."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = (int(query["page"]) - 1) * 100
        return CallbackResult(payload={"data": RECORDS[start : min(start + 100, 200)] or None})

    queries = serve(http_mock, answer)
    assert await walk(page_paginator(page_size=100), client, "data") == RECORDS[:200]
    assert [q["page"] for q in queries] == ["1", "2", "3"]


def scripted_cursor_pages(script: dict[str | None, tuple[list[Any], str | None]]) -> Answer:
    """`script[cursor sent]` is (items, next_cursor) of that page; None is the first request."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        items, following = script[query.get("cursor")]
        return CallbackResult(payload={"items": items, "meta": {"next_cursor": following}})

    return answer


async def test_an_empty_page_with_a_new_cursor_is_followed(http_mock: aioresponses, client: ApiClient) -> None:
    """A cursor API may serve an empty page mid-window (a filtered-out batch): its next_cursor, not its size, says whether more follow."""
    script = {None: (RECORDS[:100], "a"), "a": ([], "b"), "b": (RECORDS[100:200], None)}
    queries = serve(http_mock, scripted_cursor_pages(script))
    paginator = paginator_for(CursorPagination(style="cursor", next_cursor_path="meta.next_cursor"), BASE + "/items", {})
    assert await walk(paginator, client, "items") == RECORDS[:200]
    assert [q.get("cursor") for q in queries] == [None, "a", "b"]


async def test_an_empty_page_handing_back_its_own_cursor_ends_the_window(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """Some APIs answer the last, empty page with the cursor they were sent: that is the end, not a loop to report."""
    queries = serve(http_mock, scripted_cursor_pages({None: (RECORDS[:100], "a"), "a": ([], "a")}))
    paginator = paginator_for(CursorPagination(style="cursor", next_cursor_path="meta.next_cursor"), BASE + "/items", {})
    assert await walk(paginator, client, "items") == RECORDS[:100]
    assert [q.get("cursor") for q in queries] == [None, "a"]


async def test_empty_pages_that_never_stop_handing_out_new_cursors_end_the_window(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """A polling API always has a next cursor; EMPTY_PAGES_IN_A_ROW empty pages in a row end the window instead of walking forever."""
    script: dict[str | None, tuple[list[Any], str | None]] = {None: (RECORDS[:100], "c0")}
    script |= {f"c{n}": ([], f"c{n + 1}") for n in range(EMPTY_PAGES_IN_A_ROW + 20)}
    queries = serve(http_mock, scripted_cursor_pages(script))
    paginator = paginator_for(CursorPagination(style="cursor", next_cursor_path="meta.next_cursor"), BASE + "/items", {})
    assert await walk(paginator, client, "items") == RECORDS[:100]
    assert [q.get("cursor") for q in queries] == [None, *(f"c{n}" for n in range(EMPTY_PAGES_IN_A_ROW))]


async def test_records_after_a_run_of_empty_cursor_pages_are_loaded(http_mock: aioresponses, client: ApiClient) -> None:
    """A filtered scan (DynamoDB) may serve many empty pages, each with a new cursor, before the next records."""
    script: dict[str | None, tuple[list[Any], str | None]] = {None: (RECORDS[:50], "c0")}
    script |= {f"c{n}": ([], f"c{n + 1}") for n in range(7)}
    script["c7"] = (RECORDS[50:], None)
    serve(http_mock, scripted_cursor_pages(script))
    paginator = paginator_for(CursorPagination(style="cursor", next_cursor_path="meta.next_cursor"), BASE + "/items", {})
    assert await walk(paginator, client, "items") == RECORDS


@pytest.mark.parametrize(("size_param", "last_page"), [("limit", RECORDS[100:150]), ("", RECORDS[100:150])])
async def test_a_short_page_handing_back_its_own_cursor_is_the_last(
    http_mock: aioresponses, client: ApiClient, size_param: str, last_page: list[Any]
) -> None:
    """A short last page that returns the cursor it was sent ends the window with its records loaded, not as a loop."""
    queries = serve(http_mock, scripted_cursor_pages({None: (RECORDS[:100], "a"), "a": (last_page, "a")}))
    config = CursorPagination(style="cursor", next_cursor_path="meta.next_cursor", size_param=size_param)
    assert await walk(paginator_for(config, BASE + "/items", {}), client, "items") == RECORDS[:150]
    assert [q.get("cursor") for q in queries] == [None, "a"]


def linked_pages(link: Callable[[int], str]) -> Answer:
    """A bare list per page; `Link: <link(next index)>; rel="next"` while records remain."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = int(query.get("from_index", "0"))
        following = start + 100
        headers = {"Link": f'<{link(following)}>; rel="next"'} if following < len(RECORDS) else {}
        return CallbackResult(
            body=orjson.dumps(RECORDS[start:following]), content_type="application/json", headers=headers
        )

    return answer


@pytest.mark.parametrize(
    "link",
    [
        lambda n: f"?from_index={n}&per_page=100",
        lambda n: f"/api/v1/items?from_index={n}&per_page=100",
        lambda n: f"{BASE}/items?from_index={n}&per_page=100",
    ],
    ids=["relative-query", "relative-path", "absolute"],
)
async def test_link_header_style_follows_rel_next_relative_or_absolute(
    http_mock: aioresponses, client: ApiClient, link: Callable[[int], str]
) -> None:
    """The rel="next" URL is resolved against the page it came with and fetched as given."""
    queries = serve(http_mock, linked_pages(link))
    paginator = paginator_for(
        LinkHeaderPagination(style="link_header", size_param="per_page"),
        BASE + "/items",
        {"from": "2024-01-01"},
    )
    assert await walk(paginator, client, "") == RECORDS
    assert [q.get("from_index") for q in queries] == [None, "100", "200"]


async def test_a_link_back_to_a_fetched_page_ends_the_window_with_an_error(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """rel="next" pointing at the page just fetched (parameters in another order) is refused."""
    queries = serve(http_mock, linked_pages(lambda n: "?per_page=100&from_index=100"))
    paginator = paginator_for(LinkHeaderPagination(style="link_header"), BASE + "/items", {})
    with pytest.raises(SourceError, match="already fetched"):
        await walk(paginator, client, "")
    assert len(queries) == 2


async def test_a_short_last_page_linking_to_itself_ends_the_window(http_mock: aioresponses, client: ApiClient) -> None:
    """Some APIs put rel="next" on every page, the last one pointing at itself: its records are loaded and the window ends."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = int(query.get("from_index", "0"))
        following = start + 100 if start + 100 < len(RECORDS) else start
        headers = {"Link": f'<?from_index={following}&per_page=100>; rel="next"'}
        return CallbackResult(body=orjson.dumps(RECORDS[start : start + 100]), content_type="application/json", headers=headers)

    queries = serve(http_mock, answer)
    paginator = paginator_for(LinkHeaderPagination(style="link_header", size_param="per_page"), BASE + "/items", {})
    assert await walk(paginator, client, "") == RECORDS
    assert [q.get("from_index") for q in queries] == [None, "100", "200"]


async def test_empty_pages_that_never_stop_linking_to_a_next_one_end_the_window(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """An API that puts rel="next" (page + 1) on every page, empty ones too, was walked without end at thousands of requests a second."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = int(query.get("from_index", "0"))
        headers = {"Link": f'<?from_index={start + 100}>; rel="next"'}
        return CallbackResult(body=orjson.dumps(RECORDS[start : start + 100]), content_type="application/json", headers=headers)

    queries = serve(http_mock, answer)
    paginator = paginator_for(LinkHeaderPagination(style="link_header"), BASE + "/items", {})
    assert await walk(paginator, client, "") == RECORDS
    assert len(queries) == 3 + EMPTY_PAGES_IN_A_ROW


async def test_a_link_to_another_origin_is_not_followed(http_mock: aioresponses, client: ApiClient) -> None:
    """The bearer token is never sent to a host the config did not name."""
    queries = serve(http_mock, linked_pages(lambda n: f"https://elsewhere.example.test/items?from_index={n}"))
    paginator = paginator_for(LinkHeaderPagination(style="link_header"), BASE + "/items", {})
    with pytest.raises(SourceError, match="another origin"):
        await walk(paginator, client, "")
    assert len(queries) == 1


async def test_a_param_with_a_list_value_is_sent_once_per_value(http_mock: aioresponses, client: ApiClient) -> None:
    """`params = { status = ["open", "closed"] }` asks for status=open&status=closed on every page; it was a config error."""
    seen: list[list[str]] = []

    def answer(url: Any, **kwargs: Any) -> CallbackResult:
        seen.append(sorted(url.query.getall("status")))  # aioresponses sorts the query
        page = int(url.query["page"])
        result = CallbackResult(payload={"data": RECORDS[(page - 1) * 100 : page * 100]})
        result.response_class = MockedResponse
        return result

    http_mock.get(re.compile(re.escape(BASE + "/items") + r"(\?.*)?$"), callback=answer, repeat=True)
    resource = ResourceConfig.model_validate({
        "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"], "columns": {"id": "integer"},
        "params": {"status": ["open", "closed"]}, "pagination": {"style": "page"},
    })
    paginator = window_paginator(resource, BASE, FULL_REFRESH)
    assert await walk(paginator, client, "data") == RECORDS
    assert seen == [["closed", "open"]] * 3


async def test_style_none_makes_one_request(http_mock: aioresponses, client: ApiClient) -> None:
    """The body holds every record: one request, whatever it holds."""
    queries = serve(http_mock, lambda query: CallbackResult(payload={"products": RECORDS}))
    paginator = paginator_for(NoPagination(style="none"), BASE + "/items", {})
    assert await walk(paginator, client, "products") == RECORDS
    assert len(queries) == 1


@pytest.mark.parametrize("body", [
    {"users": RECORDS, "next_cursor": 0, "next_cursor_str": "0", "previous_cursor": 0},  # Twitter's last page
    {"data": RECORDS, "meta": {"next_page": "0"}},
    {"data": RECORDS, "paging": {"next": -1}},
])
def test_a_next_of_zero_is_no_next_page(body: dict[str, Any]) -> None:
    """A cursor or page of 0 (or -1) is how many APIs write "no more": style none warned of a next page on every run."""
    assert more_to_come(body) is None


@pytest.mark.parametrize("style", ["page", "offset"])
async def test_a_server_ignoring_the_page_parameter_ends_the_window_with_an_error(
    http_mock: aioresponses, client: ApiClient, style: str
) -> None:
    """The same full page again is an error naming the ignored parameter, not an endless walk."""
    serve(http_mock, lambda query: CallbackResult(payload={"data": RECORDS[:100]}))
    config = PagePagination(style="page") if style == "page" else OffsetPagination(style="offset")
    with pytest.raises(SourceError, match=f"ignore the '{style}' parameter"):
        await walk(paginator_for(config, BASE + "/items", {}), client, "data")


async def test_first_page_0_against_an_api_that_reads_0_as_1_names_first_page(http_mock: aioresponses, client: ApiClient) -> None:
    """Page 1 repeats page 0 there, and the window stops with "the API seems to ignore the 'page' parameter": its hint
    named page_param alone, which is right, where first_page = 1 is what fixes it."""
    serve(http_mock, lambda query: pages()(MultiDictProxy(MultiDict({**query, "page": str(max(int(query["page"]), 1))}))))
    with pytest.raises(SourceError, match="ignore the 'page' parameter") as raised:
        await walk(page_paginator(page_size=100, first_page=0), client, "data")
    assert "set [resources.pagination].first_page = 1" in (raised.value.hint or "")


def zero_based_pages(records: list[Any]) -> Answer:
    """An API whose first page is page 0, with its total: asked from page 1, it serves every page but the first."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = int(query["page"]) * 100
        return CallbackResult(payload={"data": records[start : start + 100], "total": len(records)})

    return answer


async def test_a_window_ending_a_page_or_more_short_of_its_total_is_a_warning(
    http_mock: aioresponses, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    """first_page = 1 against an API that counts from 0 loaded nothing of a 60-record window, with exit 0 and not a word."""
    serve(http_mock, zero_based_pages(RECORDS[:60]))
    assert await walk(page_paginator(page_size=100, total_path="total"), client, "data") == []
    assert "the API's total for this window is 60, but its pages ended after 0 records" in caplog.text
    assert "first_page" in caplog.text


async def test_a_planned_window_ending_a_page_or_more_short_of_its_total_is_a_warning(
    http_mock: aioresponses, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Fetched in parallel, the same wrong first_page lost the window's first page of 250 records without a word."""
    serve(http_mock, zero_based_pages(RECORDS))
    paginator = page_paginator(page_size=100, total_path="total")
    first = await client.get(paginator.request())  # type: ignore[arg-type]
    paginator.advance(first, records_at(first.body, "data", first.url))
    plan = paginator.remaining_requests(250)
    assert plan is not None
    for planned in plan:
        response = await client.get(planned.request)
        plan.check(planned, response, records_at(response.body, "data", response.url))
    assert "the API's total for this window is 250, but its pages ended after 150 records" in caplog.text


async def test_a_window_a_few_records_short_of_its_total_is_no_warning(
    http_mock: aioresponses, client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Records updated out of a window while it is read make it a little short: the next run's lookback reads them."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = (int(query["page"]) - 1) * 100
        return CallbackResult(payload={"data": RECORDS[start : min(start + 100, 245)], "total": 250})

    serve(http_mock, answer)
    assert len(await walk(page_paginator(page_size=100, total_path="total"), client, "data")) == 245
    assert "total for this window" not in caplog.text


async def test_remaining_requests_plan_every_page_with_resumable_positions(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """After a full first page of 250 records, pages 2 and 3 are planned; positions resume after each."""
    serve(http_mock, pages(total_in_body=True))
    paginator = page_paginator(page_size=100, total_path="total")
    first = await client.get(paginator.request())  # type: ignore[arg-type]
    paginator.advance(first, records_at(first.body, "data", first.url))

    plan = paginator.remaining_requests(250)

    assert plan is not None and len(plan) == 2
    planned = list(plan)
    assert [p.request.params["page"] for p in planned] == ["2", "3"]
    assert [(p.expected, p.finished) for p in planned] == [(100, False), (50, True)]
    resumed = page_paginator(page_size=100, total_path="total")
    resumed.restore(planned[0].position)
    assert resumed.request() == planned[1].request
    resumed.restore(planned[1].position)
    assert resumed.request() is None


async def test_remaining_requests_for_offsets_and_repeated_content(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """Offsets are planned by page_size; `check` refuses a planned page that repeats an earlier one."""
    serve(http_mock, lambda query: CallbackResult(payload={"results": RECORDS[:100]}))
    paginator = paginator_for(OffsetPagination(style="offset", page_size=100), BASE + "/items", {})
    response = await client.get(paginator.request())  # type: ignore[arg-type]
    paginator.advance(response, RECORDS[:100])

    plan = paginator.remaining_requests(250)

    assert plan is not None
    planned = list(plan)
    assert [(p.request.params["offset"], p.position["offset"]) for p in planned] == [("100", 200), ("200", 250)]
    with pytest.raises(SourceError, match="same records as an earlier page"):
        plan.check(planned[0], response, RECORDS[:100])


def test_remaining_requests_only_where_pages_are_addressable() -> None:
    """Cursor, link and unpaginated windows, and a server that served a short page, get no plan."""
    cursor = paginator_for(CursorPagination(style="cursor", next_cursor_path="next"), BASE, {})
    link = paginator_for(LinkHeaderPagination(style="link_header"), BASE, {})
    capped = page_paginator(page_size=100, total_path="total")
    capped.advance(_response({"data": RECORDS[:40], "total": 250}), RECORDS[:40])
    assert cursor.remaining_requests(250) is None
    assert link.remaining_requests(250) is None
    assert capped.remaining_requests(250) is None


def test_an_unfinished_cursor_window_is_taken_up_from_its_first_page() -> None:
    """Many a cursor is an offset in disguise, a place in a list that moves while the run is stopped: a window
    taken up asks for its first page again (it asked for the page after the last committed one, and lost a record)."""
    config = CursorPagination(style="cursor", next_cursor_path="next")
    walked = paginator_for(config, BASE, {})
    walked.advance(_response({"next": "abc"}), [{"id": 1}])
    resumed = paginator_for(config, BASE, {})
    resumed.resume(walked.position())
    assert resumed.request() == PageRequest(BASE, {})
    assert resumed.records_seen == 0


def test_what_a_window_remembers_to_spot_loops_is_bounded() -> None:
    """Seen keeps the last `limit` fingerprints only, so a long window does not grow memory."""
    seen = Seen(limit=2)
    for value in ("a", "b", "c"):
        seen.add(value)
    assert "a" not in seen
    assert "b" in seen and "c" in seen


def _response(body: Any) -> PageResponse:
    """A received page with this body and no headers."""
    return PageResponse(
        url=BASE, status=200, headers=CIMultiDictProxy(CIMultiDict()), body=body, next_link=None
    )


@pytest.mark.parametrize("saved_size", [50, 100])
async def test_an_unfinished_page_window_is_resumed_from_its_first_page(
    http_mock: aioresponses, client: ApiClient, saved_size: int
) -> None:
    """Saved at page 3: a record updated out of the window while the run was stopped shifts the rest back a
    place, and the one that moved onto page 2 was lost for good (so was page 3 of 100 after a change from 50).
    A window taken up is read from page 1; one saved finished stays finished."""
    serve(http_mock, pages())
    resumed = page_paginator(page_size=100)
    resumed.resume({"seen": 2 * saved_size, "finished": False, "page": 3, "page_size": saved_size})
    assert await walk(resumed, client, "data") == RECORDS
    finished = page_paginator(page_size=100)
    finished.resume({"seen": 250, "finished": True, "page": 4, "page_size": 100})
    assert finished.request() is None




@pytest.mark.parametrize(
    ("body", "dotted", "expected"),
    [
        ({"@odata.nextLink": "u", "value": []}, "@odata.nextLink", "u"),
        ({"meta": {"page.next": "c"}}, "meta.page.next", "c"),
        ({"a": {"b": 1}, "a.b": 2}, "a.b", 1),
    ],
    ids=["odata", "nested", "step-first"],
)
def test_a_key_that_holds_a_dot_is_read_whole(body: dict[str, Any], dotted: str, expected: Any) -> None:
    """OData names its next link `@odata.nextLink`: read as "@odata" then "nextLink" it was missing, the
    last page, and every window ended after its first page with exit 0. A step that is a key is taken first."""
    assert dig(body, dotted) == expected
    assert path_break(body, dotted) is None


def url_cursor_pages(link: Callable[[int], str]) -> Answer:
    """`{"data": [...], "next": link(next index)}`, the next page's URL in the body, null on the last page."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        start = int(query.get("from_index", "0"))
        following = start + 100
        body = {"data": RECORDS[start:following], "next": link(following) if following < len(RECORDS) else None}
        return CallbackResult(body=orjson.dumps(body), content_type="application/json")

    return answer


async def test_a_cursor_url_to_another_origin_is_not_followed(http_mock: aioresponses, client: ApiClient) -> None:
    """A next URL in the body goes where a Link may: the bearer token only to the configured origin."""
    queries = serve(http_mock, url_cursor_pages(lambda n: f"https://elsewhere.example.test/items?from_index={n}"))
    paginator = paginator_for(CursorPagination(style="cursor", next_cursor_path="next"), BASE + "/items", {})
    with pytest.raises(SourceError, match="pointed next_cursor_path 'next' at another origin"):
        await walk(paginator, client, "data")
    assert len(queries) == 1


async def test_a_cursor_url_back_to_a_fetched_page_ends_the_window_with_an_error(
    http_mock: aioresponses, client: ApiClient
) -> None:
    """A next URL naming a page fetched before in the window (parameters in another order) is a loop."""
    queries = serve(http_mock, url_cursor_pages(lambda n: f"/api/v1/items?x=1&from_index={min(n, 100)}"))
    paginator = paginator_for(CursorPagination(style="cursor", next_cursor_path="next"), BASE + "/items", {"x": "1"})
    with pytest.raises(SourceError, match="at a page already fetched"):
        await walk(paginator, client, "data")
    assert [q.get("from_index") for q in queries] == [None, "100"]


@pytest.mark.parametrize("cursor", ["eyJpZCI6MTAwfQ", "c2Vjb25k+cGFnZQ==", "100", "_next-page"])
async def test_an_opaque_cursor_is_still_sent_as_cursor_param(http_mock: aioresponses, client: ApiClient, cursor: str) -> None:
    """Only an absolute URL, a path or a reference with a query is followed; any other cursor goes out as cursor_param."""

    def answer(query: MultiDictProxy[str]) -> CallbackResult:
        body = {"data": RECORDS[:100] if "after" not in query else [], "next": cursor if "after" not in query else None}
        return CallbackResult(body=orjson.dumps(body), content_type="application/json")

    queries = serve(http_mock, answer)
    paginator = paginator_for(CursorPagination(style="cursor", cursor_param="after", next_cursor_path="next"), BASE + "/items", {})
    assert await walk(paginator, client, "data") == RECORDS[:100]
    assert [q.get("after") for q in queries] == [None, cursor]


@pytest.mark.parametrize("style", ["cursor", "link_header"])
async def test_a_next_url_downgraded_to_http_on_the_same_host_is_fetched_over_https(
    http_mock: aioresponses, client: ApiClient, style: str
) -> None:
    """Django REST framework behind a TLS proxy (no SECURE_PROXY_SSL_HEADER) names its next pages http://, on the
    host etl reached over https: every window failed at its second page, "another origin", and nothing in the
    config could change it. The same host on https's own port is what the link means; the token stays on TLS."""
    link = lambda n: f"http://api.example.test/api/v1/items?from_index={n}"  # noqa: E731
    queries = serve(http_mock, url_cursor_pages(link) if style == "cursor" else linked_pages(link))
    config = CursorPagination(style="cursor", next_cursor_path="next") if style == "cursor" else LinkHeaderPagination(style="link_header")
    paginator = paginator_for(config, BASE + "/items", {})
    assert await walk(paginator, client, "data" if style == "cursor" else "") == RECORDS
    assert [q.get("from_index") for q in queries] == [None, "100", "200"]
