"""GET one page of the API: concurrency cap, rate limit, token, retries, and the verdict on the answer.

Every request of a run goes through one `ApiClient`, so `api.concurrency`
caps requests in flight across all workers and resources, and
`api.requests_per_second` is one budget for the whole run.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiolimiter import AsyncLimiter
from multidict import CIMultiDictProxy
from tenacity import RetryCallState

from etl.config import ApiConfig
from etl.errors import RetryableError, SourceError, TokenRejected
from etl.token import Token, TokenManager
from etl.transport import RetryPolicy, display_url, retry_after_seconds, translate

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
SNIPPET_BYTES = 200


@dataclass(frozen=True)
class PageRequest:
    """An absolute URL and its query parameters (static, filter and pagination merged)."""

    url: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PageResponse:
    """A 2xx answer whose body parsed as JSON."""

    url: str
    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    next_link: str | None


@dataclass
class RequestCounters:
    """What the client did, for `etl_runs` and the summary."""

    requests: int = 0
    retries: int = 0


def snippet(body: bytes) -> str:
    """The first bytes of a body, printable, for error messages."""
    text = body[:SNIPPET_BYTES].decode("utf-8", errors="replace").replace("\n", " ").strip()
    return text + ("…" if len(body) > SNIPPET_BYTES else "")


class ApiClient:
    """Sends GETs with the shared token; retries what is transient, fails fast on what is not."""

    def __init__(
        self, api: ApiConfig, session: aiohttp.ClientSession, tokens: TokenManager, counters: RequestCounters
    ) -> None:
        self._session = session
        self._static_headers = {**api.headers, "Accept": "application/json"}
        self._tokens = tokens
        self._counters = counters
        self._retry = RetryPolicy.from_api(api)
        self._in_flight = asyncio.Semaphore(api.concurrency)
        self._limiter = AsyncLimiter(api.requests_per_second, 1) if api.requests_per_second > 0 else None

    async def get(self, request: PageRequest) -> PageResponse:
        """One page, retried on 429, 5xx, timeouts and resets; a 401 renews the token once."""
        response: PageResponse | None = None
        async for attempt in self._retry.retrying(on_retry=self._log_retry):
            with attempt:
                response = await self._tokens.authorized(lambda token: self._attempt(request, token))
        assert response is not None
        return response

    async def _attempt(self, request: PageRequest, token: Token) -> PageResponse:
        if self._limiter is not None:
            await self._limiter.acquire()
        async with self._in_flight:
            self._counters.requests += 1
            headers = {**self._static_headers, "Authorization": token.authorization()}
            try:
                async with self._session.get(request.url, params=request.params, headers=headers) as resp:
                    body = await resp.read()
                    next_link = _next_link(resp)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise translate(exc, request.url) from exc
        return _verdict(resp, body, next_link)

    def _log_retry(self, state: RetryCallState) -> None:
        self._counters.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.warning(
            "retrying in %.1fs (attempt %d of %d): %s",
            wait,
            state.attempt_number + 1,
            self._retry.max_retries + 1,
            exc,
        )


def _next_link(resp: aiohttp.ClientResponse) -> str | None:
    """RFC 8288 rel="next", made absolute against the URL that was fetched."""
    link = resp.links.get("next")
    if not link or "url" not in link:
        return None
    return str(resp.url.join(link["url"]))  # type: ignore[arg-type]


def _verdict(resp: aiohttp.ClientResponse, body: bytes, next_link: str | None) -> PageResponse:
    url = display_url(resp.url)
    status = resp.status
    if status == 401:
        raise TokenRejected(f"401 from {url}: the API refused the token")
    if status in RETRYABLE_STATUS:
        raise RetryableError(
            f"{status} from {url}: {snippet(body)}", retry_after=retry_after_seconds(resp.headers.get("Retry-After"))
        )
    if not 200 <= status < 300:
        raise SourceError(f"{status} from {url}: {snippet(body)}")
    content_type = resp.headers.get("Content-Type", "")
    stripped = body.lstrip()
    if "html" in content_type or stripped[:1] == b"<":
        raise SourceError(f"{status} from {url} is HTML, not JSON (a login page or a proxy?): {snippet(body)}")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if stripped[:1] in (b"{", b"["):
            raise RetryableError(f"{status} from {url}: the JSON body is cut short or broken ({exc})") from None
        raise SourceError(f"{status} from {url} is not JSON: {snippet(body)}") from None
    return PageResponse(url=str(resp.url), status=status, headers=resp.headers, body=parsed, next_link=next_link)
