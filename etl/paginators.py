"""Walking the pages of one window, one small class per `[resources.pagination].style`.

A paginator belongs to one window and is never shared. It says which request
comes next (`request`), learns from each page (`advance`), and can be saved
and restored (`position`, `restore`) so a resumed backfill starts at the first
page that was not committed. A server that answers the same cursor, link or
page again ends the window with an error instead of looping forever.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import orjson

from etl.client import PageRequest, PageResponse
from etl.config import (
    CursorPagination,
    LinkHeaderPagination,
    NoPagination,
    OffsetPagination,
    PagePagination,
    Pagination,
)
from etl.errors import SourceError


def dig(body: Any, dotted: str) -> Any:
    """The value at a dotted path (`meta.next_cursor`); None when any step is missing."""
    value = body
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


class Paginator(ABC):
    """The pages of one window: `request()` until it returns None, `advance()` after each page."""

    def __init__(self, config: Pagination, url: str, params: dict[str, str]) -> None:
        self.config = config
        self.url = url
        self.params = params
        self.finished = False
        self.records_seen = 0

    @abstractmethod
    def request(self) -> PageRequest | None:
        """The next page to fetch, or None when the window is complete."""

    def advance(self, response: PageResponse, records: list[Any]) -> None:
        """Move past a page that has been received."""
        self.records_seen += len(records)
        self._advance(response, records)
        total = self._total(response)
        if total is not None and self.records_seen >= total:
            self.finished = True

    @abstractmethod
    def _advance(self, response: PageResponse, records: list[Any]) -> None: ...

    def position(self) -> dict[str, Any]:
        """Where the next request starts, JSON-able, stored with each committed page."""
        return {"seen": self.records_seen, "finished": self.finished, **self._position()}

    def restore(self, position: dict[str, Any]) -> None:
        self.records_seen = int(position.get("seen", 0))
        self.finished = bool(position.get("finished", False))
        self._restore(position)

    @abstractmethod
    def _position(self) -> dict[str, Any]: ...

    @abstractmethod
    def _restore(self, position: dict[str, Any]) -> None: ...

    def _total(self, response: PageResponse) -> int | None:
        raw: Any = None
        if self.config.total_path:
            raw = dig(response.body, self.config.total_path)
        elif self.config.total_header:
            raw = response.headers.get(self.config.total_header)
        try:
            return int(raw) if raw is not None else None
        except (TypeError, ValueError):
            return None

    def known_total(self, response: PageResponse) -> int | None:
        """Records in the whole window when the API says so (for progress and ETA)."""
        return self._total(response)


class _NumberedPaginator(Paginator):
    """Page and offset styles: stop on an empty or short page; refuse a page repeated verbatim."""

    config: PagePagination | OffsetPagination

    def __init__(self, config: PagePagination | OffsetPagination, url: str, params: dict[str, str]) -> None:
        super().__init__(config, url, params)
        self._last_page_digest: int | None = None

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        if not records or len(records) < self.config.page_size:
            self.finished = True
            return
        digest = hash(orjson.dumps(records))
        if digest == self._last_page_digest:
            raise SourceError(
                f"{response.url} returned the same records as the page before it: "
                f"the API seems to ignore the {self._step_name()!r} parameter; stopping instead of looping"
            )
        self._last_page_digest = digest
        self._step(len(records))

    @abstractmethod
    def _step(self, count: int) -> None: ...

    @abstractmethod
    def _step_name(self) -> str: ...


class PagePaginator(_NumberedPaginator):
    config: PagePagination

    def __init__(self, config: PagePagination, url: str, params: dict[str, str]) -> None:
        super().__init__(config, url, params)
        self.page = config.first_page

    def request(self) -> PageRequest | None:
        if self.finished:
            return None
        return PageRequest(
            self.url,
            {**self.params, self.config.page_param: str(self.page), self.config.size_param: str(self.config.page_size)},
        )

    def _step(self, count: int) -> None:
        self.page += 1

    def _step_name(self) -> str:
        return self.config.page_param

    def _position(self) -> dict[str, Any]:
        return {"page": self.page}

    def _restore(self, position: dict[str, Any]) -> None:
        self.page = int(position["page"])


class OffsetPaginator(_NumberedPaginator):
    config: OffsetPagination

    def __init__(self, config: OffsetPagination, url: str, params: dict[str, str]) -> None:
        super().__init__(config, url, params)
        self.offset = 0

    def request(self) -> PageRequest | None:
        if self.finished:
            return None
        return PageRequest(
            self.url,
            {**self.params, self.config.offset_param: str(self.offset), self.config.limit_param: str(self.config.page_size)},
        )

    def _step(self, count: int) -> None:
        self.offset += count

    def _step_name(self) -> str:
        return self.config.offset_param

    def _position(self) -> dict[str, Any]:
        return {"offset": self.offset}

    def _restore(self, position: dict[str, Any]) -> None:
        self.offset = int(position["offset"])


class CursorPaginator(Paginator):
    """Follows `next_cursor_path`; null, "" or missing means the last page."""

    config: CursorPagination

    def __init__(self, config: CursorPagination, url: str, params: dict[str, str]) -> None:
        super().__init__(config, url, params)
        self.cursor: str | None = None
        self._seen: set[str] = set()

    def request(self) -> PageRequest | None:
        if self.finished:
            return None
        params = dict(self.params)
        if self.config.size_param:
            params[self.config.size_param] = str(self.config.page_size)
        if self.cursor is not None:
            params[self.config.cursor_param] = self.cursor
        return PageRequest(self.url, params)

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        cursor = dig(response.body, self.config.next_cursor_path)
        if cursor in (None, "") or not records:
            self.finished = True
            return
        cursor = str(cursor)
        if cursor in self._seen:
            raise SourceError(
                f"{response.url} returned the cursor {cursor[:40]!r} a second time: stopping instead of looping"
            )
        self._seen.add(cursor)
        self.cursor = cursor

    def _position(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def _restore(self, position: dict[str, Any]) -> None:
        self.cursor = position.get("cursor")


class LinkHeaderPaginator(Paginator):
    """Follows the RFC 8288 `Link: <...>; rel="next"` URL, which carries every parameter itself."""

    config: LinkHeaderPagination

    def __init__(self, config: LinkHeaderPagination, url: str, params: dict[str, str]) -> None:
        super().__init__(config, url, params)
        self.next_url: str | None = None
        self._seen: set[str] = set()

    def request(self) -> PageRequest | None:
        if self.finished:
            return None
        if self.next_url is not None:
            return PageRequest(self.next_url, {})
        params = dict(self.params)
        if self.config.size_param:
            params[self.config.size_param] = str(self.config.page_size)
        return PageRequest(self.url, params)

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        if response.next_link is None:
            self.finished = True
            return
        if response.next_link in self._seen or response.next_link == response.url:
            raise SourceError(
                f"{response.url} pointed rel=\"next\" at a page already fetched: stopping instead of looping"
            )
        self._seen.add(response.next_link)
        self.next_url = response.next_link

    def _position(self) -> dict[str, Any]:
        return {"next_url": self.next_url}

    def _restore(self, position: dict[str, Any]) -> None:
        self.next_url = position.get("next_url")


class SinglePagePaginator(Paginator):
    """`style = "none"`: the body holds every record."""

    config: NoPagination

    def request(self) -> PageRequest | None:
        return None if self.finished else PageRequest(self.url, dict(self.params))

    def _advance(self, response: PageResponse, records: list[Any]) -> None:
        self.finished = True

    def _position(self) -> dict[str, Any]:
        return {}

    def _restore(self, position: dict[str, Any]) -> None:
        pass


PAGINATORS: dict[str, type[Paginator]] = {
    "page": PagePaginator,
    "offset": OffsetPaginator,
    "cursor": CursorPaginator,
    "link_header": LinkHeaderPaginator,
    "none": SinglePagePaginator,
}


def paginator_for(config: Pagination, url: str, params: dict[str, str]) -> Paginator:
    return PAGINATORS[config.style](config, url, params)  # type: ignore[arg-type]
