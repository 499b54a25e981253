"""Walking the pages of one window, one small class per `[resources.pagination].style`.

A paginator belongs to one window and is never shared. It says which request
comes next (`request`), learns from each page (`advance`), and can be saved
and restored (`position`, `restore`); a window a later run takes up is read
again from its first page (`resume`): an offset, and many a cursor, names a
place in a list that may have moved meanwhile. A server that answers the same
cursor, link or page again ends the window with an error instead of looping forever (except
an empty or short page that points at itself: that is the last page);
what a window remembers for that is bounded, so memory stays flat however
long it is.

Page and offset windows whose total is known can also hand out every
remaining page at once (`remaining_requests`), for fetching them in parallel.
"""

from __future__ import annotations

import hashlib
import logging
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from yarl import URL

from etl import jsonnumbers
from etl.client import PageRequest, PageResponse, QueryValue
from etl.config import (
    CursorPagination,
    LinkHeaderPagination,
    NoPagination,
    OffsetPagination,
    PagePagination,
    Pagination,
    ParamScalar,
    ResourceConfig,
)
from etl.errors import SourceError
from etl.transport import display_url, register_query_credentials
from etl.windows import Window, filter_params

log = logging.getLogger(__name__)

SEEN_LIMIT = 4096  # pages, cursors or links a window remembers to recognise a loop
EMPTY_PAGES_IN_A_ROW = 100  # empty pages in a row, each naming a new next page, that end a cursor or link window


def dig(body: Any, dotted: str) -> Any:
    """The value at a dotted path (`meta.next_cursor`); None when any step is missing."""
    steps = dotted.split(".")
    held, value = _walk(body, steps)
    return value if held == len(steps) else None


def holds_path(body: Any, steps: Sequence[str]) -> bool:
    """Whether the body has a value at this path, whatever it is (null too)."""
    return _walk(body, steps)[0] == len(steps)


def path_break(body: Any, dotted: str) -> str | None:
    """Where a dotted path leaves the body, said with the keys found there; None when it is there (null included)."""
    steps = dotted.split(".")
    held, value = _walk(body, steps)
    if held == len(steps):
        return None
    reached = repr(".".join(steps[:held])) if held else "the top"
    if isinstance(value, dict):
        return f"Keys at {reached}: {', '.join(map(str, value)) or '(none)'}"
    return f"{reached} is {'null' if value is None else type(value).__name__}"


def _walk(body: Any, steps: Sequence[str]) -> tuple[int, Any]:
    """How many steps of the path the body holds, and the value the last of them reached.

    A key may hold dots itself (OData's `@odata.nextLink`): when a step is no key, the longest
    run of steps that is one key is taken, so `@odata.nextLink` is read whole. A number steps into
    a list, a negative one from its end: `data.-1.id` is the last record's id, Stripe's next cursor.
    """
    value, held = body, 0
    while held < len(steps):
        step = steps[held]
        if isinstance(value, dict):
            end = held + 1 if step in value else _longest_key(value, steps, held)
            if end is None:
                return held, value
            value, held = value[".".join(steps[held:end])], end
        elif isinstance(value, list) and step.removeprefix("-").isdigit() and -len(value) <= int(step) < len(value):
            value, held = value[int(step)], held + 1
        else:
            return held, value
    return held, value


def _longest_key(mapping: dict[Any, Any], steps: Sequence[str], start: int) -> int | None:
    """Where the longest run of steps from `start` that is one key of the mapping ends (a key holding dots)."""
    return next((end for end in range(len(steps), start + 1, -1) if ".".join(steps[start:end]) in mapping), None)


class Seen:
    """Fingerprints of the last `limit` values of a window: a loop is recognised in bounded memory."""

    def __init__(self, limit: int = SEEN_LIMIT) -> None:
        self._limit = limit
        self._order: deque[bytes] = deque()
        self._members: set[bytes] = set()

    @staticmethod
    def _fingerprint(value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else value
        return hashlib.blake2b(data, digest_size=16).digest()

    def __contains__(self, value: str | bytes) -> bool:
        return self._fingerprint(value) in self._members

    def add(self, value: str | bytes) -> None:
        fingerprint = self._fingerprint(value)
        if fingerprint in self._members:
            return
        self._order.append(fingerprint)
        self._members.add(fingerprint)
        if len(self._order) > self._limit:
            self._members.discard(self._order.popleft())


@dataclass(frozen=True, slots=True)
class PlannedPage:
    """One page of a window whose total is known, fetchable independently of the others."""

    request: PageRequest
    expected: int  # records it should hold: page_size, or what is left of the total
    position: dict[str, Any]  # the paginator's position once this page and every page before it are committed
    finished: bool  # the window's last page


class Paginator(ABC):
    """The pages of one window: `request()` until it returns None, `advance()` after each page."""

    def __init__(self, config: Pagination, url: str, params: dict[str, QueryValue]) -> None:
        self.config = config
        self.url = url
        self.params = params
        self.finished = False
        self.records_seen = 0
        self.total_understated = False  # the API served more than its total said: the total no longer ends the window
        self.key = "[resources.pagination]"  # the config table, named in hints: window_paginator names the resource
        self.cursor_path_found = False  # cursor style: a page carried next_cursor_path, null included
        self.cursor_path_absent: str | None = None  # cursor style: where next_cursor_path left a page of page_size records
        self.more_pages: str | None = None  # style none: where the API said that another page follows

    @abstractmethod
    def request(self) -> PageRequest | None:
        """The next page to fetch, or None when the window is complete."""

    def advance(self, response: PageResponse, records: list[Any]) -> list[Any]:
        """Move past a page that has been received; returns its records to load. Raises SourceError when the server loops.

        A page that only repeats the one before it, served for a page past the end, ends the
        window and loads nothing: its records were loaded with that page already.
        """
        if self._repeats_previous(response, records):
            self.finished = True
            return []
        self.records_seen += len(records)
        self._advance(response, records)
        total = self._total(response)
        if total is not None and self.records_seen > total:
            self._distrust_total(response, total)
        elif total is not None and self.records_seen >= total:
            self.finished = True
        return records

    def _repeats_previous(self, response: PageResponse, records: list[Any]) -> bool:
        """Whether this page is the page before it served again as the end of the list; only page and offset styles say so."""
        return False

    def _distrust_total(self, response: PageResponse, total: int) -> None:
        """The API served more records than its total says (0 with records, a total capped by a search backend).

        Ending the window at that total would drop the rest without a word: from here on the window
        ends on an empty or short page, as it does without a total.
        """
        self.total_understated = True
        log.warning(
            "%s: the API's total (%d) is below the %d records already served in this window; "
            "paging on until an empty or short page", display_url(response.url), total, self.records_seen,
        )

    @abstractmethod
    def _advance(self, response: PageResponse, records: list[Any]) -> None: ...

    def position(self) -> dict[str, Any]:
        """Where the next request starts, JSON-able, stored with each committed page."""
        understated = {"total_understated": True} if self.total_understated else {}
        return {"seen": self.records_seen, "finished": self.finished, **understated, **self._position()}

    def resume(self, position: dict[str, Any]) -> None:
        """A window an earlier run left unfinished is read again from its first page.

        A page number or an offset counts places in a list that moves, and so do many cursors and Links
        (an offset in disguise): a record updated out of its place while the run was stopped shifts every
        later one back a place, and the one that moved onto a page already read would be lost for good.
        The upsert stores what is read twice once.
        """
        if position.get("finished"):
            self.restore(position)
            return
        log.info("%s: reading this unfinished window again from its first page (an earlier run stopped after %s records)",
                 display_url(self.url), position.get("seen", 0))

    def restore(self, position: dict[str, Any]) -> None:
        """Continue from a position saved with a committed page."""
        self.records_seen = int(position.get("seen", 0))
        self.finished = bool(position.get("finished", False))
        self.total_understated = bool(position.get("total_understated", False))
        self._restore(position)

    def _position(self) -> dict[str, Any]:
        """What of this style's own state a taken-up window needs: a page number or an offset. A cursor or next link
        is not kept: such a window is read again from its first page, and a cursor of over 64 KB, saved with each
        page, failed every commit on MySQL (`etl_windows.position` is TEXT)."""
        return {}

    def _restore(self, position: dict[str, Any]) -> None:  # noqa: B027 (a no-op unless a style keeps state)
        """Take up this style's own state from `_position`'s."""

    def _total(self, response: PageResponse) -> int | None:
        if self.total_understated:
            return None
        raw: Any = None
        if self.config.total_path:
            raw = dig(response.body, self.config.total_path)
        elif self.config.total_header:
            raw = response.headers.get(self.config.total_header)
        try:
            total = int(raw) if raw is not None else None
        except (TypeError, ValueError):
            return None
        return None if total is None or total < 0 else total  # -1 is a common "not counted"

    def ends_at(self, status: int) -> bool:
        """Whether the API's refusal (`status`) of the next request ends the window; it is an error, except where a style says."""
        return False

    def known_total(self, response: PageResponse) -> int | None:
        """Records in the whole window when the API says so (for progress, ETA and parallel pages)."""
        return self._total(response)

    def remaining_requests(self, total: int) -> PagePlan | None:
        """Every page still to fetch, when this style can address pages independently; else None.

        Only page and offset styles can, and only once a full page has shown that
        the server honours page_size. See PagePlan for how to use the answer.
        """
        return None


class PagePlan:
    """The remaining pages of a page or offset window with a known total, to fetch in any order.

    Iteration is lazy (a window of millions of records is never held in
    memory), in page order; call `check` on each page received, which refuses a page whose
    records repeat another page's; commit `PlannedPage.position` only when that
    page and every page before it are committed, so a resumed window restarts
    at the first page not committed. The paginator must not be used after it
    handed out its plan.
    """

    def __init__(self, paginator: _NumberedPaginator, total: int) -> None:
        self._paginator = paginator
        self._total = total
        self._count = math.ceil(max(0, total - paginator.records_seen) / paginator.config.page_size)
        self._received = paginator.records_seen  # records of the pages checked, and of those before the plan

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[PlannedPage]:
        paginator, size = self._paginator, self._paginator.config.page_size
        seen = paginator.records_seen
        for ahead in range(self._count):
            expected = min(size, self._total - seen)
            seen += expected
            finished = seen >= self._total
            position = {"seen": seen, "finished": finished, **paginator.position_after(ahead, expected)}
            yield PlannedPage(paginator.request_ahead(ahead), expected, position, finished)

    def check(self, planned: PlannedPage, response: PageResponse, records: list[Any]) -> None:
        """Refuse a page that repeats another page of the window (the server ignores the page parameter);
        on the last page, warn if the window came out a page or more short of its total."""
        self._paginator.refuse_repeat(response, records)
        self._received += len(records)
        if planned.finished:
            warn_if_short(response, self._total, self._received, self._paginator.config)

    def beyond(self, planned: PlannedPage, records: list[Any]) -> dict[str, Any] | None:
        """Where to page on from when the last page holds more records than the total left for it, else None.

        A total capped by the server (search backends stop counting at some number) would
        otherwise end the window early and lose the rest without a word. From that position
        on the total is ignored: the window ends on an empty or short page.
        """
        extra = len(records) - planned.expected
        if not planned.finished or extra <= 0:
            return None
        seen = planned.position["seen"] + extra
        # the last planned page is `count - 1` pages ahead; its style position follows the records received
        return {**self._paginator.position_after(self._count - 1, len(records)), "seen": seen, "finished": False, "total_understated": True}


class _NumberedPaginator(Paginator):
    """Page and offset styles: stop on an empty page, a short page or the total; refuse a repeated page.

    With a total, a short page does not end the window: the server may cap the
    page size below page_size, and stopping there would lose records silently.
    The page before, served again once two different pages have shown that the
    server honours the page parameter, is the end too (a page past the end
    answered with the last one, as Django's `get_page` does).
    """

    config: PagePagination | OffsetPagination
    STEP_KEY: str  # the config key naming the parameter that moves through the pages

    def __init__(self, config: PagePagination | OffsetPagination, url: str, params: dict[str, QueryValue]) -> None:
        super().__init__(config, url, params)
        self._pages = Seen()
        self._last_count: int | None = None
        self._previous: bytes | None = None  # the content of the page before, as refuse_repeat compares it
        self._received: bytes | None = None  # the content of the page being advanced past, made once for both checks
        self._stepped = 0  # pages walked one by one in this run
        self._said_total: int | None = None  # the total the API gave last, for a window that ends short of it

    def request(self) -> PageRequest | None:
        return None if self.finished else self.request_ahead(0)

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        self._last_count = len(records)
        total = self._total(response)
        self._said_total = self._said_total if total is None else total
        if not records or (len(records) < self.config.page_size and total is None):
            self.finished = True
            if self._said_total is not None and not self.total_understated:
                warn_if_short(response, self._said_total, self.records_seen, self.config)
            return
        content = self._received  # made by _repeats_previous, which advance() asks first
        assert content is not None  # a page with records
        self._previous = content
        self._refuse_content(response, content)
        self._step(len(records))
        self._stepped += 1

    def _repeats_previous(self, response: PageResponse, records: list[Any]) -> bool:
        """A full page that repeats the one before, once two different pages have shown that the page parameter is honoured.

        The page's content is kept for `_advance`, which follows: serialising it once a page, not twice."""
        self._received = _page_content(records) if records else None
        if self._received is None or self._stepped < 2 or self._received != self._previous:
            return False
        log.info("%s served the page before it again: taken as the end of the window", display_url(response.url))
        return True

    def refuse_repeat(self, response: PageResponse, records: list[Any]) -> None:
        """SourceError when these records are those of a page already received in this window."""
        if records:
            self._refuse_content(response, _page_content(records))

    def _refuse_content(self, response: PageResponse, content: bytes) -> None:
        if content in self._pages:
            raise SourceError(
                f"{display_url(response.url)} returned the same records as an earlier page: the API seems to "
                f"ignore the {getattr(self.config, self.STEP_KEY)!r} parameter; stopping instead of looping",
                hint=self._repeat_hint(),
            )
        self._pages.add(content)

    def _repeat_hint(self) -> str:
        return f"if the API reads another name, set {self.key}.{self.STEP_KEY} to it"

    def remaining_requests(self, total: int) -> PagePlan | None:
        if self.finished or self._last_count != self.config.page_size:
            return None
        return PagePlan(self, total)

    def ends_at(self, status: int) -> bool:
        """Whether a refusal of the next page is the end of the window: a 404 right after a full page.

        Without a total a full last page can only be told from the rest by asking for the next one,
        and some APIs (Django REST framework's page numbers) answer that with 404, not an empty page:
        the same path and parameters served the page before it, so "no such page" is all it can mean.
        """
        if status != HTTPStatus.NOT_FOUND or self._last_count != self.config.page_size:
            return False
        log.info("%s answered 404 after a full page: taken as the end of the window", display_url(self.url))
        self.finished = True
        return True

    @abstractmethod
    def request_ahead(self, ahead: int) -> PageRequest:
        """The request `ahead` full pages after the next one."""

    @abstractmethod
    def position_after(self, ahead: int, count: int) -> dict[str, Any]:
        """The style's own position keys once the page `ahead` pages on, holding `count` records, is done."""

    @abstractmethod
    def _step(self, count: int) -> None: ...


def warn_if_short(response: PageResponse, total: int, received: int, config: PagePagination | OffsetPagination) -> None:
    """A warning when a window ended a whole page or more short of its total (all of it, for a total below a page).

    That is a first page the walk never asked for (first_page = 1 where the API counts from 0: every
    window lost its first page, with exit 0), or records deleted meanwhile. A few records short is
    the usual drift of records updated out of the window while it was read: the next lookback has them.
    """
    if total - received < min(config.page_size, total) or total == 0:
        return
    check = "check first_page (does the API number its pages from 0?), or " if isinstance(config, PagePagination) else ""
    log.warning(
        "%s: the API's total for this window is %d, but its pages ended after %d records: %srecords were "
        "deleted while the window was read", display_url(response.url), total, received, check,
    )


def _page_content(records: list[Any]) -> bytes:
    """What tells pages apart: first and last record stand for the page, as serialising every record costs too much.

    A lone UTF-16 surrogate (valid JSON, and a reject once validated) is written as its escape: orjson refused it
    here, before validation, and the run ended as an internal error."""
    sample = [len(records), records[0], records[-1]]
    try:
        return jsonnumbers.dumps(sample)
    except TypeError:
        return jsonnumbers.dumps(sample, as_read=True)


class PagePaginator(_NumberedPaginator):
    config: PagePagination
    STEP_KEY = "page_param"

    def __init__(self, config: PagePagination, url: str, params: dict[str, QueryValue]) -> None:
        super().__init__(config, url, params)
        self.page = config.first_page

    def request_ahead(self, ahead: int) -> PageRequest:
        page = {
            self.config.page_param: str(self.page + ahead),
            self.config.size_param: str(self.config.page_size),
        }
        return PageRequest(self.url, {**self.params, **page})

    def position_after(self, ahead: int, count: int) -> dict[str, Any]:
        return {"page": self.page + ahead + 1, "page_size": self.config.page_size}

    def _step(self, count: int) -> None:
        self.page += 1

    def _position(self) -> dict[str, Any]:
        return {"page": self.page, "page_size": self.config.page_size}

    def _restore(self, position: dict[str, Any]) -> None:
        self.page = int(position["page"])

    def _repeat_hint(self) -> str:
        """A 1-based API asked from page 0 reads 0 as 1, so page 1 repeats it: first_page is the key to change then."""
        if self.config.first_page != 0:
            return super()._repeat_hint()
        return f"if the API numbers its pages from 1 (and reads 0 as 1), set {self.key}.first_page = 1; {super()._repeat_hint()}"


class OffsetPaginator(_NumberedPaginator):
    config: OffsetPagination
    STEP_KEY = "offset_param"

    def __init__(self, config: OffsetPagination, url: str, params: dict[str, QueryValue]) -> None:
        super().__init__(config, url, params)
        self.offset = 0

    def request_ahead(self, ahead: int) -> PageRequest:
        offset = self.offset + ahead * self.config.page_size
        window = {self.config.offset_param: str(offset), self.config.limit_param: str(self.config.page_size)}
        return PageRequest(self.url, {**self.params, **window})

    def position_after(self, ahead: int, count: int) -> dict[str, Any]:
        return {"offset": self.offset + ahead * self.config.page_size + count}

    def _step(self, count: int) -> None:
        self.offset += count

    def _position(self) -> dict[str, Any]:
        return {"offset": self.offset}

    def _restore(self, position: dict[str, Any]) -> None:
        self.offset = int(position["offset"])


class _FollowingPaginator(Paginator):
    """Cursor and link styles: the server names the next page, and may name the page just served.

    Pointing at itself from an empty or short page is how some APIs mark their last page; from
    a full page it is a loop (a server that ignores the cursor), which stays an error.
    """

    config: CursorPagination | LinkHeaderPagination

    def __init__(self, config: CursorPagination | LinkHeaderPagination, url: str, params: dict[str, QueryValue]) -> None:
        super().__init__(config, url, params)
        self._largest_page = 0
        self._empty_in_a_row = 0
        self.next_url: str | None = None
        self._visited = Seen()

    def _first_params(self) -> dict[str, QueryValue]:
        """The first page's parameters: the window's, and size_param when set (a next URL carries its own)."""
        params = dict(self.params)
        if self.config.size_param:
            params[self.config.size_param] = str(self.config.page_size)
        return params

    def _follow(self, response: PageResponse, records: list[Any], link: str | None, named_by: str) -> None:
        """Take `link`, already absolute, as the next page: fetched as given, on the configured origin only.

        The bearer token is never sent to a host the configuration did not name, and a link
        to a page already fetched in the window is a loop. `named_by` says where the link came from.
        """
        here = canonical_url(response.url)
        self._visited.add(here)
        link = link if link is None else over_tls(link, self.url)
        if (
            link is None
            or self._ends_here(response, records, canonical_url(link) == here)
            or self._too_many_empty(response, records)
        ):
            self.finished = True
            return
        if origin(link) != origin(self.url):
            raise SourceError(
                f"{display_url(response.url)} pointed {named_by} at another origin ({display_url(link)}): "
                "the token is only sent to the configured base_url"
            )
        if canonical_url(link) in self._visited:
            raise SourceError(
                f"{display_url(response.url)} pointed {named_by} at a page already fetched: stopping instead of looping"
            )
        self.next_url = link

    def _too_many_empty(self, response: PageResponse, records: list[Any]) -> bool:
        """Whether EMPTY_PAGES_IN_A_ROW empty pages, each naming a new next page, end the window.

        An empty page that names a next one is followed (a filtered scan may serve many before the
        next records), but an API that names a next page on every page, polling or page + 1 for ever,
        would be walked without end.
        """
        self._empty_in_a_row = 0 if records else self._empty_in_a_row + 1
        if self._empty_in_a_row < EMPTY_PAGES_IN_A_ROW:
            return False
        log.warning("%s: %d empty pages in a row, each naming a new next page: taking the window as complete",
                    display_url(response.url), self._empty_in_a_row)
        return True

    def _ends_here(self, response: PageResponse, records: list[Any], points_at_itself: bool) -> bool:
        """Whether a page pointing at itself is the last one: empty, or shorter than a full page."""
        full = self.config.page_size if self.config.size_param else self._largest_page
        self._largest_page = max(self._largest_page, len(records))
        if not points_at_itself or (records and len(records) >= full):
            return False
        log.debug(
            "%s points at itself from a page of %d records: taken as the last page", display_url(response.url), len(records)
        )
        return True


class CursorPaginator(_FollowingPaginator):
    """Follows `next_cursor_path`; null, "" or missing means the last page.

    An empty page with a new cursor is followed: the cursor, not the page, says whether more
    follow (a filtered scan may serve many empty pages). An empty or short page that hands back
    the cursor it was sent is the last page, not a loop, and so are EMPTY_PAGES_IN_A_ROW empty pages
    in a row (a polling API always has a next cursor).
    """

    config: CursorPagination

    def __init__(self, config: CursorPagination, url: str, params: dict[str, QueryValue]) -> None:
        super().__init__(config, url, params)
        self.cursor: str | None = None
        self._sent = Seen()

    def request(self) -> PageRequest | None:
        if self.finished:
            return None
        if self.next_url is not None:
            return PageRequest(self.next_url, {})
        params = self._first_params()
        if self.cursor is not None:
            params[self.config.cursor_param] = self.cursor
        return PageRequest(self.url, params)

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        if self.cursor is not None:
            self._sent.add(self.cursor)
        self._note_cursor_path(response, records)
        cursor = dig(response.body, self.config.next_cursor_path)
        link = next_page_url(response.url, cursor)
        if link is not None:
            self._follow(response, records, link, f"next_cursor_path {self.config.next_cursor_path!r}")
            return
        self.next_url = None
        if (
            cursor in (None, "")
            or self._ends_here(response, records, str(cursor) == self.cursor)
            or self._too_many_empty(response, records)
        ):
            self.finished = True
            return
        cursor = str(cursor)
        if cursor in self._sent:
            raise SourceError(
                f"{display_url(response.url)} returned the cursor {cursor[:40]!r} a second time: the API seems to "
                f"ignore the {self.config.cursor_param!r} parameter; stopping instead of looping",
                hint=f"if the API reads another name, set {self.key}.cursor_param to it",
            )
        self.cursor = cursor

    def _note_cursor_path(self, response: PageResponse, records: list[Any]) -> None:
        """Whether next_cursor_path is in the body: a full page without it ends the window, as a last page
        does, so a typo in the path (`next_cursor` for `nextCursor`) loads one page a window; the run warns."""
        where = path_break(response.body, self.config.next_cursor_path)
        if where is None:
            self.cursor_path_found = True
        elif len(records) >= self.config.page_size:
            self.cursor_path_absent = self.cursor_path_absent or where


class LinkHeaderPaginator(_FollowingPaginator):
    """Follows the RFC 8288 `Link: <...>; rel="next"` URL, which carries every parameter itself.

    The link is followed only on the origin of the first request: the bearer
    token is never sent to a host the configuration did not name. As for cursors,
    EMPTY_PAGES_IN_A_ROW empty pages in a row end the window.
    """

    config: LinkHeaderPagination

    def request(self) -> PageRequest | None:
        if self.finished:
            return None
        if self.next_url is not None:
            return PageRequest(self.next_url, {})
        return PageRequest(self.url, self._first_params())

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        self._follow(response, records, response.next_link, 'rel="next"')


def next_page_url(fetched: str, cursor: Any) -> str | None:
    """The next page's URL when a cursor is one, made absolute against the page that named it; else None.

    OData, Salesforce, HAL, JSON:API and Django REST framework put the next page's URL in the body:
    absolute, a path (`/services/data/...`) or relative with a query (`items?page=2`, `?page[offset]=7`).
    Sent as `?cursor=<URL>` to the first page's address, it fetched that page again. An opaque cursor
    holds no `?` and starts with no `/` (base64url has neither), so it is still sent as cursor_param.
    """
    if not isinstance(cursor, str) or not cursor:
        return None
    text = cursor.strip()
    absolute = text.lower().startswith(("http://", "https://"))
    if not (absolute or text.startswith("/") or "?" in text):
        return None
    try:
        return str(URL(fetched).join(URL(text)))
    except ValueError:  # not a URL after all (a bad port): an opaque cursor
        return None


def over_tls(link: str, configured: str) -> str:
    """`link` on https when it is plain http on the very host and default port that `configured` reaches over https.

    An API behind a TLS-terminating proxy often believes it is served over http and names its next
    pages so (Django REST framework without SECURE_PROXY_SSL_HEADER): the page is the same, and
    following it over https keeps the token on TLS; refused as another origin, no setting could help.
    """
    target, base = URL(link), URL(configured)
    if target.scheme != "http" or base.scheme != "https" or (target.host or "").lower() != (base.host or "").lower():
        return link
    if not target.is_default_port():
        return link
    return str(target.with_scheme("https").with_port(base.explicit_port))


def origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port (default ports filled in), as the same-origin rule compares them."""
    parsed = URL(url)
    return parsed.scheme.lower(), (parsed.host or "").lower(), parsed.port


def canonical_url(url: str) -> str:
    """The URL with its query parameters sorted and no fragment, so equal pages compare equal."""
    parsed = URL(url)
    return str(parsed.with_query(sorted(parsed.query.items())).with_fragment(None))


# where a paging API says that another page follows: a key of the body, or of an object in it (`meta`, `links`, `paging`)
NEXT_KEYS = frozenset({
    "next", "nextLink", "@odata.nextLink", "next_link", "next_page", "nextPage", "next_page_url", "nextPageUrl", "next_url",
    "nextUrl", "next_page_token", "nextPageToken", "next_cursor", "nextCursor", "nextRecordsUrl",
})
MORE_KEYS = frozenset({"has_more", "hasMore", "has_next", "hasNext", "has_next_page", "hasNextPage"})


def more_to_come(body: Any) -> str | None:
    """Where a body says that another page follows (`'next' holds '/items?page=2'`, `'meta.has_more' is true`), if it does."""
    if not isinstance(body, dict):
        return None
    places = [("", body)] + [(f"{key}.", value) for key, value in body.items() if isinstance(value, dict)]
    for prefix, place in places:
        for key, value in place.items():
            link = value.get("href") if isinstance(value, dict) else value
            if key in NEXT_KEYS and _names_a_page(link):
                return f"{prefix + key!r} holds {str(link)[:80]!r}"
            if key in MORE_KEYS and value is True:
                return f"{prefix + key!r} is true"
    return None


def _names_a_page(link: Any) -> bool:
    """Whether a next key's value names a page: a string or a number, but not "", 0 or -1, which many APIs write for
    "no more" (Twitter's `next_cursor: 0` on its last page)."""
    if isinstance(link, bool) or not isinstance(link, str | int):
        return False
    text = str(link)
    return text != "" and not (text.lstrip("-").isdigit() and int(text) <= 0)


class SinglePagePaginator(Paginator):
    """`style = "none"`: the body holds every record."""

    config: NoPagination

    def request(self) -> PageRequest | None:
        return None if self.finished else PageRequest(self.url, dict(self.params))

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        """One request a window: a paging API's first page would be all that is loaded, so what says there is more is kept."""
        self.finished = True
        total = self._total(response)
        if response.next_link is not None:
            self.more_pages = 'its Link header has rel="next"'
        elif total is not None and total > len(records):
            self.more_pages = f"its total ({total}) is above the {len(records)} records of the page"
        else:
            self.more_pages = more_to_come(response.body)


PAGINATORS: dict[str, type[Paginator]] = {
    "page": PagePaginator,
    "offset": OffsetPaginator,
    "cursor": CursorPaginator,
    "link_header": LinkHeaderPaginator,
    "none": SinglePagePaginator,
}


def paginator_for(config: Pagination, url: str, params: dict[str, QueryValue]) -> Paginator:
    """The paginator class the config's `style` discriminator names."""
    return PAGINATORS[config.style](config, url, params)  # type: ignore[arg-type]


def window_paginator(resource: ResourceConfig, base_url: str, window: Window) -> Paginator:
    """The paginator of one window of a resource: its static params plus the window's filter bounds."""
    params = {key: _query_value(value) for key, value in resource.params.items()}
    if resource.filter is not None:
        params |= filter_params(window, resource.filter)
    register_query_credentials(base_url + resource.path, params)
    paginator = paginator_for(resource.pagination, base_url + resource.path, params)
    paginator.key = f"resources.{resource.name}.pagination"
    return paginator


def _query_value(value: ParamScalar | list[ParamScalar]) -> QueryValue:
    if isinstance(value, list):
        return [_query_text(item) for item in value]
    return _query_text(value)


def _query_text(value: ParamScalar) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)
