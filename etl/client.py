"""GET one page of the API: concurrency cap, rate limit, token, retries, and the verdict on the answer.

Every request of a run goes through one `ApiClient`, so `api.concurrency`
caps requests in flight across all workers and resources, and
`api.requests_per_second` is one budget for the whole run. A request holds
its concurrency slot only while it is on the wire (plus its wait for the rate
limit): backoff sleeps happen outside it, so a slow retry never starves the
other workers. The token is taken once the slot and the rate-limit share are
held: a request that queued behind others for longer than the token's margin
would otherwise go out with an expired token (many workers, short tokens).
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import logging
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter
from multidict import CIMultiDictProxy
from tenacity import RetryCallState
from yarl import URL

from etl import jsonnumbers
from etl.config import ApiConfig, ResourceConfig
from etl.errors import ConnectionFailed, EtlError, RefusedRequest, RetryableError, SourceError, TokenRejected
from etl.logs import redact, register_secret
from etl.token import Token, TokenManager
from etl.transport import RetryPolicy, display_url, proxy_for, retry_after_seconds, translate

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# [api].headers whose values are credentials (X-Api-Key, Ocp-Apim-Subscription-Key, X-Auth-Token, Cookie): masked
CREDENTIAL_HEADER = re.compile(r"key|secret|token|auth|passw|signature|credential|cookie|session", re.IGNORECASE)
MAX_REDIRECTS = 10  # aiohttp's own limit
FOREIGN_REDIRECT_HINT = (
    "the API redirected to another host, where etl sends neither the token nor [api].headers; "
    "if that host is the API now, set [api].base_url to it"
)
NOT_ACCEPTABLE_HINT = (
    "the API refuses the media type etl asks for (Accept: {accept}): set the one it serves in [api].headers, "
    'as headers = {{ Accept = "application/vnd.api+json" }} for a JSON:API server'
)
XML_HINT = (
    "the API answers XML though etl asks for JSON (Accept: application/json, or the Accept in [api].headers); "
    "many take a query parameter instead: add it to the resource's params as the API's documentation names it "
    '(format = "json"; OData: "$format" = "json")'
)
STATUS_HINTS: dict[int, str] = {
    HTTPStatus.GONE: (
        "the API says this endpoint is gone for good, as APIs answer for a version they retired: compare the "
        "version in [api].base_url and the resource's path with the API's current documentation"
    ),
    HTTPStatus.REQUEST_URI_TOO_LONG: (
        "the URL is longer than the API takes: a list in params is sent as the parameter repeated, once per "
        "value; send fewer values (two resources, each with a part of the list)"
    ),
    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE: (
        "the request's headers are larger than the API takes: shorten [api].headers; if they are short, the token "
        "is what is too long (fewer auth.scopes, or fewer groups on the app client, make it shorter)"
    ),
}
SNIPPET_BYTES = 200
MASKED_BYTES = 16_384  # masked before the cut: a token that starts within the snippet ends within this
GZIP_MAGIC = b"\x1f\x8b"  # starts every gzip stream, and no JSON text in any charset
UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})  # read as they are: ASCII is UTF-8
# RFC 8288 Link: a comma or semicolon inside <target> or a quoted string does not end a link-value or a parameter.
# A link-value is <target> and its parameters, or (the second branch) a malformed one, skipped up to its comma.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_LINK_VALUE = re.compile(rf"\s*<([^>]*)>((?:{_QUOTED}|[^,])*)|(?:{_QUOTED}|[^,])+")
_LINK_PARAM = re.compile(rf'{_QUOTED}|;\s*([^\s=;,"]+)\s*(?:=\s*({_QUOTED}|[^\s;,"]*))?')


QueryValue = str | list[str]  # a list is sent as the parameter repeated, once per value


@dataclass(frozen=True)
class PageRequest:
    """An absolute URL and its query parameters (static, filter and pagination merged)."""

    url: str
    params: dict[str, QueryValue] = field(default_factory=dict)

    def page_url(self) -> str:
        """The URL with the parameters in its query, as aiohttp sends it: what a message names (through display_url)."""
        return str(URL(self.url).extend_query(self.params))


@dataclass(frozen=True)
class PageResponse:
    """A 2xx answer whose body parsed as JSON; None for a 204 No Content."""

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


@dataclass
class ApiClock:
    """How far the API's clock is surely behind this machine's, by the `Date` (and `Age`) of its answers.

    An API that stamps records by a clock behind ours stamps what it writes just after a sync before that
    sync's end: the sync must not count itself loaded up to our now. A Date has whole seconds, so the API's
    clock is read as the Date plus a second: clocks in step are never behind.
    """

    behind: timedelta = timedelta(0)

    def saw(self, headers: CIMultiDictProxy[str]) -> None:
        try:
            stamp = email.utils.parsedate_to_datetime(headers.get("Date", ""))
            age = int(headers.get("Age", "0"))
        except (TypeError, ValueError):
            return
        if stamp.tzinfo is None:  # "-0000": UTC by RFC 5322
            stamp = stamp.replace(tzinfo=UTC)
        self.behind = max(self.behind, datetime.now(UTC) - stamp - timedelta(seconds=1 + max(age, 0)))


def snippet(body: bytes) -> str:
    """The first characters of a body, printable, for error messages.

    Secrets are masked before the cut: a token echoed across it (a JWT is ~1,000 characters)
    left its first part in the message, which EtlError's masking no longer recognised.
    """
    text = redact(body[:MASKED_BYTES].decode("utf-8", errors="replace")).replace("\n", " ").strip()
    return text[:SNIPPET_BYTES] + ("…" if len(text) > SNIPPET_BYTES or len(body) > MASKED_BYTES else "")


class _TokenUnavailable(Exception):
    """A token endpoint failure the TokenManager already retried, carried past the client's retries."""

    def __init__(self, error: EtlError) -> None:
        super().__init__(error.message)
        self.error = error


def rate_limiter(requests_per_second: float) -> AsyncLimiter | None:
    """A bucket of one request refilled every 1/rps seconds: requests are spaced out, never sent in bursts."""
    if requests_per_second <= 0:
        return None
    return AsyncLimiter(1, 1 / requests_per_second)


class RetryAfterGate:
    """A server's Retry-After, kept by every request of the client rather than only the one it answered.

    Each request used to wait out its own 429's Retry-After while the other workers went on sending and
    used up the API's budget again: against an API that takes 5 requests a second, the default 8 workers
    ran requests out of their retries within seconds (exit 1). Now no request is sent before the latest
    Retry-After has passed, and a first attempt also waits while any request is owed a retry, so that
    those go first. Requests with a 429 or 503 but no Retry-After keep their own backoff.
    """

    def __init__(self, retry: RetryPolicy) -> None:
        self._retry = retry
        self._until = 0.0  # on time.monotonic()
        self._owed = 0  # requests that met a Retry-After and have not been answered since
        self._settled = asyncio.Event()
        self._settled.set()

    def hold(self, seconds: float) -> None:
        self._until = max(self._until, time.monotonic() + min(seconds, self._retry.retry_after_max_s))

    def is_open(self, first_attempt: bool) -> bool:
        return time.monotonic() >= self._until and (not first_attempt or self._settled.is_set())

    async def passage(self, first_attempt: bool) -> None:
        """Wait until a request may be sent: after the Retry-After, and for a first attempt, after the retries owed."""
        while not self.is_open(first_attempt):
            if (wait := self._until - time.monotonic()) > 0:
                await self._retry.sleep(wait)
            else:
                await self._settled.wait()

    def owe(self) -> None:
        self._owed += 1
        self._settled.clear()

    def repaid(self) -> None:
        self._owed -= 1
        if self._owed == 0:
            self._settled.set()


class ThrottledCap:
    """How many requests may be in flight: `[api].concurrency`, halved by each 429, grown back by one per
    that many answers (TCP's congestion avoidance).

    After a 429 every worker sent again once its wait was over, `concurrency` requests at once at an API that had
    just said it takes fewer: most were 429 again, one and a half for every page read.
    """

    def __init__(self, most: int) -> None:
        self._most = most
        self._cap = float(most)
        self._busy = 0
        self._waiting = 0
        self._free = asyncio.Condition()

    async def __aenter__(self) -> None:
        if self._busy >= int(self._cap):
            self._waiting += 1
            try:
                async with self._free:
                    await self._free.wait_for(lambda: self._busy < int(self._cap))
            finally:
                self._waiting -= 1
        self._busy += 1

    async def __aexit__(self, *_: object) -> None:
        self._busy -= 1
        if self._waiting:
            async with self._free:
                self._free.notify_all()

    def throttled(self) -> None:
        self._cap = max(1.0, self._cap / 2)

    def answered(self) -> None:
        self._cap = min(float(self._most), self._cap + 1 / self._cap)


class ApiClient:
    """Sends GETs with the shared token; retries what is transient, fails fast on what is not."""

    def __init__(
        self,
        api: ApiConfig,
        session: aiohttp.ClientSession,
        tokens: TokenManager,
        counters: RequestCounters,
        retry: RetryPolicy | None = None,
        clock: ApiClock | None = None,
    ) -> None:
        self._session = session
        self._clock = clock or ApiClock()  # the pipeline holds the same one, for synced_until
        self._static_headers = _with_accept(api.headers)
        for name, value in api.headers.items():
            if CREDENTIAL_HEADER.search(name):  # an API that echoes what it was sent must not print an API key
                register_secret(value)
        self._foreign_headers = {name: value for name, value in self._static_headers.items() if name.lower() == "accept"}
        self._tokens = tokens
        self._counters = counters
        self._retry = retry or RetryPolicy.from_api(api)
        self._in_flight = ThrottledCap(api.concurrency)
        self._limiter = rate_limiter(api.requests_per_second)
        self._gate = RetryAfterGate(self._retry)

    async def get(self, request: PageRequest) -> PageResponse:
        """One page, retried on 429, 5xx, timeouts, resets and cut bodies; a 401 renews the token once."""
        response: PageResponse | None = None
        owed = False
        try:
            async for attempt in self._retry.retrying(on_retry=self._log_retry):
                with attempt:
                    try:
                        response = await self._send(request, first_attempt=not owed)
                    except RetryableError as exc:
                        if exc.throttled:
                            self._in_flight.throttled()
                        if exc.throttled and exc.retry_after is None:  # a 429 holds every request for its backoff
                            exc.retry_after = self._retry.backoff(attempt.retry_state.attempt_number)
                        if exc.retry_after is not None:
                            self._gate.hold(exc.retry_after)
                            if not owed:
                                owed = True
                                self._gate.owe()
                        raise
        except _TokenUnavailable as unavailable:
            raise unavailable.error from None
        except (RetryableError, ConnectionFailed) as exc:  # only the last attempt's error escapes the retries
            if self._retry.max_retries:
                exc.message = self._retry.gave_up(exc.message)
                exc.args = (exc.message,)
            raise
        finally:
            if owed:
                self._gate.repaid()
        assert response is not None  # tenacity ends with a result or re-raises the last error
        self._in_flight.answered()
        return response

    async def _send(self, request: PageRequest, first_attempt: bool) -> PageResponse:
        """One attempt: past the Retry-After gate, the token at hand, then a concurrency slot, the rate-limit share
        and the request. The gate is asked again once the slot is held, as a Retry-After may have come meanwhile;
        the slot is not held while waiting at the gate, or the retries it waits for could not be sent."""
        while True:
            await self._gate.passage(first_attempt)
            await self._token_at_hand()
            async with self._in_flight:
                if self._gate.is_open(first_attempt):
                    return await self._tokens.authorized(
                        lambda token: self._attempt(request, token), before=self._before_token
                    )

    async def _token_at_hand(self) -> None:
        """Make sure a token is at hand; a token endpoint failure is final here.

        The TokenManager has already retried it with the same policy; retrying it
        again per request would multiply the attempts on the token endpoint.
        """
        try:
            await self._tokens.token()
        except (RetryableError, ConnectionFailed) as exc:
            raise _TokenUnavailable(exc) from exc

    async def _before_token(self) -> None:
        """Before each token `authorized` takes: the rate-limit share, then the token at hand, so that the
        renewal after a 401 is final when it fails too (it was retried again per request: twice the attempts)."""
        await self._rate_limit()
        await self._token_at_hand()

    async def _rate_limit(self) -> None:
        """A share of `requests_per_second`, taken before the token so that the token sent is never one that aged in a queue."""
        if self._limiter is not None:
            await self._limiter.acquire()

    async def _attempt(self, request: PageRequest, token: Token) -> PageResponse:
        """One request on the wire, its redirects followed; the caller holds its concurrency slot and took its rate-limit share.

        Redirects are followed here, not by aiohttp: it drops only Authorization on the way to another
        host, and sent the [api].headers (an X-Api-Key) on. There only Accept goes, and a 401 from there
        is no refused token (it was not sent): renewing it and exiting 3 pointed at the wrong thing.
        """
        self._counters.requests += 1
        trusted = {**self._static_headers, "Authorization": token.authorization()}
        configured = URL(request.url)
        url, params, headers, came_from = configured, request.params, trusted, None
        for _ in range(MAX_REDIRECTS + 1):
            sent = time.monotonic()
            try:
                async with self._session.get(
                    url, params=params, headers=headers, proxy=proxy_for(str(url)), allow_redirects=False
                ) as resp:
                    body = await resp.read()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                where = request.page_url() if came_from is None else str(url)
                raise translate(exc, where, self._session.timeout.total) from exc
            if log.isEnabledFor(logging.DEBUG):  # -v: every request, for an API that behaves oddly
                log.debug("GET %s -> %d, %d bytes in %.0f ms", display_url(resp.url), resp.status, len(body), (time.monotonic() - sent) * 1000)
            location = resp.headers.get("Location") if resp.status in REDIRECT_STATUS else None
            if location is None:
                if 200 <= resp.status < 300:
                    self._clock.saw(resp.headers)
                return verdict(resp, body, came_from if headers is not trusted else None)
            came_from = came_from or resp.url
            try:
                url, params = resp.url.join(URL(location)), {}
            except ValueError:
                raise SourceError(f"{resp.status} from {display_url(resp.url)} redirects to an invalid URL") from None
            headers = trusted if same_site(configured, url) else self._foreign_headers
        raise SourceError(f"{display_url(request.page_url())} redirected more than {MAX_REDIRECTS} times")

    def _log_retry(self, state: RetryCallState) -> None:
        """Count and announce the retry (RetryPolicy calls this only while the run goes on)."""
        self._counters.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.warning(
            "retrying in %.1fs (attempt %d of %d%s): %s",
            wait,
            state.attempt_number + 1,
            self._retry.max_retries + 1,
            self._why_this_wait(exc),
            exc,
        )

    def _why_this_wait(self, exc: BaseException | None) -> str:
        """Where a wait other than the backoff comes from: the API's Retry-After (and the key that cut it), or a 429
        that holds every request. Without it, `retrying in 60.0s` six times did not say that the API asked for hours."""
        if not isinstance(exc, RetryableError):
            return ""
        asked, cap = (exc.asked or "").strip()[:40], self._retry.retry_after_max_s
        if asked and exc.retry_after is not None and exc.retry_after > cap:
            return f"; the API's Retry-After: {asked}, cut to [api].retry_after_max_s = {cap:g}"
        if asked and retry_after_seconds(asked) is not None:
            return f"; as the API's Retry-After: {asked} asks"
        if asked:
            return f"; the API's Retry-After: {asked} names no wait, the backoff applies"
        return "; every request waits: a 429 without Retry-After" if exc.throttled else ""


def _with_accept(headers: dict[str, str]) -> dict[str, str]:
    """The configured headers, with `Accept: application/json` unless they name their own Accept (in any case):
    a JSON:API server wants `application/vnd.api+json`, and it was replaced without a word."""
    if any(name.lower() == "accept" for name in headers):
        return dict(headers)
    return {**headers, "Accept": "application/json"}


def next_link(resp: aiohttp.ClientResponse) -> str | None:
    """The RFC 8288 rel="next" target, made absolute against the URL that was fetched.

    Every Link header counts, `rel` may list several types (`rel="next last"`)
    and is case-insensitive; a malformed link is ignored rather than fatal.
    """
    for header in resp.headers.getall("Link", []):
        for target, rel in _link_rels(header):
            if "next" in rel.lower().split():
                try:
                    return str(resp.url.join(URL(target)))
                except ValueError:  # not a URL (a bad port, a broken IPv6 address)
                    continue
    return None


def _link_rels(header: str) -> Iterator[tuple[str, str]]:
    """(target, rel) of each link-value in one Link header; a value that does not start with <target> is skipped.

    A stray quoted string is matched whole (and dropped), so a `;` inside it never starts a parameter;
    the first `rel` counts (RFC 8288 §3.3).
    """
    for link_value in _LINK_VALUE.finditer(header):
        target, params = link_value.groups()
        if target is None:
            continue
        rels = (value for name, value in _LINK_PARAM.findall(params) if name.lower() == "rel")
        yield target.strip(), _unquoted(next(rels, ""))


def _unquoted(value: str) -> str:
    """A parameter's value without its quotes and backslash escapes."""
    if value[:1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def same_site(configured: URL, target: URL) -> bool:
    """Whether a redirect target may have the token: the configured origin, or its host upgraded from http to https."""
    if (target.host or "").lower() != (configured.host or "").lower():
        return False
    upgrade = (configured.scheme, configured.port, target.scheme, target.port) == ("http", 80, "https", 443)
    return upgrade or (configured.scheme, configured.port) == (target.scheme, target.port)


def verdict(resp: aiohttp.ClientResponse, body: bytes, redirected_from: URL | None = None) -> PageResponse:
    """A usable page, or the error that says why not; only what may heal is a RetryableError.

    `redirected_from` is the configured URL when a redirect led to another host, which got no token.
    """
    status = resp.status
    if status == HTTPStatus.ACCEPTED:  # accepted for processing: the page is not ready, and is no empty page
        raise _retry_later(
            f"202 Accepted from {display_url(resp.url)}: the API is still preparing the page: {snippet(body) or '(empty body)'}", resp
        )
    if 200 <= status < 300:
        parsed = None if status == 204 else encoded_once(parse_json(status, resp, body))
        return PageResponse(url=str(resp.url), status=status, headers=resp.headers, body=parsed, next_link=next_link(resp))
    url = display_url(resp.url)
    if redirected_from is not None and status in (401, 403):
        raise RefusedRequest(
            f"{status} from {url} (redirected from {display_url(redirected_from)}): {snippet(body)}",
            status=status,
            hint=FOREIGN_REDIRECT_HINT,
        )
    if status == 401:  # the API's challenge may say why (RFC 6750 §3: invalid_token, its error_description)
        challenge = resp.headers.get("WWW-Authenticate")
        raise TokenRejected(f"401 from {url}: the API refused the token" + (f" (WWW-Authenticate: {challenge})" if challenge else ""))
    if status in RETRYABLE_STATUS:
        raise _retry_later(f"{status} from {url}: {snippet(body)}", resp)
    raise RefusedRequest(f"{status} from {url}: {snippet(body)}", status=status, hint=refusal_hint(status, resp))


def _retry_later(message: str, resp: aiohttp.ClientResponse) -> RetryableError:
    """An answer that may heal, with the Retry-After it asks for (the client's gate holds every request for it).

    A 429 is `throttled`: without a Retry-After, its backoff holds every request too. Each request used to back
    off on its own while the other workers went on sending, at 3 to 4 times the rate the API takes.
    """
    asked = resp.headers.get("Retry-After")
    throttled = resp.status == HTTPStatus.TOO_MANY_REQUESTS
    return RetryableError(message, retry_after=retry_after_seconds(asked), throttled=throttled, asked=asked)


def not_found_hint(base_url: str, name: str, path: str) -> str:
    """A 404 on a window's first page names the two keys its URL is made of, in check and in sync's log alike."""
    return (
        f"no such endpoint: the URL is [api].base_url ({display_url(base_url)}) + the path of "
        f"{name!r} ({path!r}); compare both with the API's documentation"
    )


def bad_request_hint(resource: ResourceConfig) -> str:
    """A 400 or 422 on a window's first page: the request is made of keys the API's documentation names otherwise."""
    filter_ = resource.filter
    bounds = (
        f", [resources.filter]'s from_param, to_param and format = {filter_.format!r} (the bounds above are written so)"
        if filter_ is not None
        else ""
    )
    return (
        f"the API refused the request (its answer above may name what): compare resources.{resource.name}.params{bounds} "
        "and [resources.pagination]'s parameter names and page_size (an API may cap it) with the API's documentation; "
        "python -m etl check sends one such request"
    )


def too_deep_hint(resource: ResourceConfig) -> str:
    """A 400 or 422 on a later page of a window whose first page the same parameters got: most often a paging depth."""
    return (
        "the API answered this window's first pages and refused a later one: many APIs refuse to page past a depth "
        f"(an offset of 10,000); a smaller resources.{resource.name}.window (backfill --window) puts fewer records in each window"
    )


def refusal_hint(status: int, resp: aiohttp.ClientResponse) -> str | None:
    """What to change for a refusal etl knows the cure of: a 403's scopes, a 406's Accept (the one sent: [api].headers
    may name its own), and the statuses that name what is wrong with the request (cron's log said only '405 from URL')."""
    headers = resp.headers
    if status == HTTPStatus.FORBIDDEN:
        return forbidden_hint(headers.get("WWW-Authenticate"))
    if status == HTTPStatus.NOT_ACCEPTABLE:
        return NOT_ACCEPTABLE_HINT.format(accept=resp.request_info.headers.get("Accept", "application/json"))
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        allow = headers.get("Allow")
        return (
            "the endpoint does not answer GET, the only method etl reads with"
            + (f" (it answered Allow: {allow})" if allow else "")
            + ": path may name an endpoint that writes, or searches with POST; compare path with the API's documentation"
        )
    return STATUS_HINTS.get(status)


def forbidden_hint(challenge: str | None) -> str:
    """A 403 to a token the API accepted is, most often, a scope the token lacks (RFC 6750 §3.1 insufficient_scope).

    The API's WWW-Authenticate is quoted: it may name the error and the scope it wants.
    """
    said = f"the API answered WWW-Authenticate: {challenge}; " if challenge else ""
    return (
        f"{said}the token's scopes may not cover this endpoint: add the scope it requires to auth.scopes "
        "(and allow it on the app client); otherwise the API's own access rules refuse this client"
    )


def parse_json(status: int, resp: aiohttp.ClientResponse, body: bytes) -> Any:
    """The parsed body; HTML, XML or other non-JSON is an error (not an empty page), cut-off JSON is retried.

    A body in another charset than UTF-8 is read as its Content-Type declares; in one that declares
    none, a byte that is not UTF-8 inside a string rejects that record (etl.records), and anywhere
    else is an error, not retried: another attempt brings the same bytes.
    JSON is read whatever the Content-Type says: PHP labels it `text/html` unless told otherwise.

    etl.jsonnumbers (orjson, and the standard library for a body with numbers orjson would round);
    its lenient reading for what orjson refuses (NaN, 1e400), and to say why a body is not JSON.
    """
    body = _as_utf8(_ungzipped(body), resp, status)
    try:
        return jsonnumbers.loads(body)
    except ValueError:
        pass
    url, stripped = display_url(resp.url), body.lstrip()
    markup = _markup(resp.headers.get("Content-Type", "").lower(), stripped)
    if markup == "XML":
        raise SourceError(f"{status} from {url} is XML, not JSON: {snippet(body)}", hint=XML_HINT)
    if markup == "HTML":
        raise SourceError(f"{status} from {url} is HTML, not JSON (a login page or a proxy?): {snippet(body)}")
    try:
        return jsonnumbers.loads_lenient(body)
    except RecursionError:  # orjson stops at 1,024 levels, the standard library at Python's recursion limit
        raise SourceError(f"{status} from {url} is JSON nested too deep to read (over 1,000 levels): the API is at fault") from None
    except UnicodeDecodeError as exc:
        if exc.end == len(body):  # cut inside a character: the body came short
            raise _not_json(status, url, body, exc) from None
        try:
            return jsonnumbers.loads_with_bad_bytes(body)
        except ValueError:
            raise _not_json(status, url, body, exc) from None
    except ValueError as exc:
        raise _not_json(status, url, body, exc) from None


def _not_json(status: int, url: str, body: bytes, exc: ValueError) -> EtlError:
    """Why the standard library could not read the body; only JSON that may have been cut short is retried."""
    if isinstance(exc, UnicodeDecodeError) and exc.end < len(body):  # a bad byte, not a body cut inside a character
        return SourceError(
            f"{status} from {url} is not UTF-8 ({exc.reason} at byte {exc.start}): an API that sends another "
            "charset must declare it, as in Content-Type: application/json; charset=ISO-8859-1"
        )
    if isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data":  # came whole: another attempt brings the same
        return SourceError(
            f"{status} from {url} holds more than one JSON value (text follows the first at character {exc.pos}: "
            f"NDJSON, or a comment after the JSON): the API is at fault, etl reads one JSON document a page: "
            f"{snippet(exc.doc[exc.pos:].encode())}"
        )
    if body.lstrip()[:1] in (b"{", b"["):
        return RetryableError(f"{status} from {url}: the JSON body is cut short or broken ({exc})")
    return SourceError(f"{status} from {url} is not JSON: {snippet(body) or '(empty body)'}")


def encoded_once(parsed: Any) -> Any:
    """A body that is one JSON string holding a JSON object or list (a .NET action that serialised its own
    answer, a gateway's mapping template) as that object or list; anything else as it is."""
    if not isinstance(parsed, str) or parsed.lstrip()[:1] not in ("{", "["):
        return parsed
    try:
        return jsonnumbers.loads(parsed.encode())
    except ValueError:
        return parsed


def _markup(content_type: str, stripped: bytes) -> str | None:
    """"HTML" or "XML" for a body that is markup, by its Content-Type or its first bytes; None for anything else.

    XML is told apart (an XML prolog, an XML Content-Type) because its cure differs: a WCF or JAX-RS
    service answers XML unless asked for JSON, where HTML is a login page or a proxy's.
    """
    if "html" in content_type:
        return "HTML"
    if "xml" in content_type or stripped[:5] == b"<?xml":
        return "XML"
    return "HTML" if stripped[:1] == b"<" else None


def _ungzipped(body: bytes) -> bytes:
    """A body still gzipped once its Content-Encoding is undone, decompressed: a `.json.gz` served without
    `Content-Encoding: gzip`, or a proxy's second layer on an answer already gzipped. One that does not
    decompress is left as it is, to fail as not JSON."""
    if body[:2] != GZIP_MAGIC:
        return body
    try:
        return gzip.decompress(body)
    except (OSError, EOFError, zlib.error):
        return body


def _as_utf8(body: bytes, resp: aiohttp.ClientResponse, status: int) -> bytes:
    """The body in UTF-8, which JSON is (RFC 8259 §8.1) and the parsers read; a charset the API declares is taken at its word."""
    charset = resp.charset
    if charset is None or charset.lower() in UTF8_CHARSETS:
        return body
    where = f"{status} from {display_url(resp.url)}"
    try:
        return body.decode(charset).encode()
    except LookupError:
        raise SourceError(f"{where} declares charset={charset}, which is not a known character set") from None
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{where} is not {charset} as its Content-Type says ({exc.reason} at byte {exc.start})"
        ) from None
