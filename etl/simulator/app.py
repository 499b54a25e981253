"""HTTP face of the simulator: the Cognito-like token endpoint, the legacy API
with one pagination style per resource, fault injection, and /_sim control.

Everything runs on one event loop, so the state needs no locks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote_plus, urlencode

import orjson
from aiohttp import web
from multidict import MultiMapping
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .data import Dataset, Record, build_datasets, to_us

if TYPE_CHECKING:
    from .server import SimulatorSettings

MAX_PAGE = 1000
DEFAULT_PAGE = 100
FORM = "application/x-www-form-urlencoded"
ALLOW_POST = {"Allow": "POST"}
MAINTENANCE_PAGE = "<html><body><h1>Down for maintenance</h1></body></html>"
PROMISED_LENGTH = {"Content-Length": "4096"}  # of a truncated answer, more than is sent


class Faults(BaseModel):
    """Fault injection, all off by default; assignments are validated and apply to the next request."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    rate_503: float = Field(0.0, ge=0, le=1)
    rate_500: float = Field(0.0, ge=0, le=1)
    rate_429: float = Field(0.0, ge=0, le=1)
    retry_after_s: int = Field(1, ge=0)
    rate_reset: float = Field(0.0, ge=0, le=1)
    rate_truncated: float = Field(0.0, ge=0, le=1)
    rate_html: float = Field(0.0, ge=0, le=1)
    delay_ms: float = Field(0.0, ge=0)
    delay_jitter_ms: float = Field(0.0, ge=0)
    outage: bool = False
    revoke_every_s: float | None = Field(None, gt=0)
    repeat_cursor: bool = False
    absolute_links: bool = False
    token_503_count: int = Field(0, ge=0)
    token_delay_ms: float = Field(0.0, ge=0)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial update all at once, or raise ValidationError and change nothing."""
        merged = Faults.model_validate({**self.model_dump(), **changes})
        for name in changes:
            setattr(self, name, getattr(merged, name))

    def random_kinds(self) -> tuple[tuple[str, float], ...]:
        """Per-request random faults, in the order their rates stack up."""
        return (
            ("503", self.rate_503),
            ("500", self.rate_500),
            ("429", self.rate_429),
            ("reset", self.rate_reset),
            ("truncated", self.rate_truncated),
            ("html", self.rate_html),
        )


@dataclass
class Counters:
    """What the simulator saw; live, so tests can assert on load patterns."""

    token_requests: int = 0
    tokens_issued: int = 0
    api_requests: int = 0
    api_status: dict[int, int] = field(default_factory=dict)
    faults_injected: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    unauthorized: int = 0
    pages_served: dict[str, int] = field(default_factory=dict)
    records_served: dict[str, int] = field(default_factory=dict)
    page_fetches: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy (api_status keys become strings, as in JSON)."""
        return {
            "token_requests": self.token_requests,
            "tokens_issued": self.tokens_issued,
            "api_requests": self.api_requests,
            "api_status": {str(status): n for status, n in self.api_status.items()},
            "faults_injected": dict(self.faults_injected),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "unauthorized": self.unauthorized,
            "pages_served": dict(self.pages_served),
            "records_served": dict(self.records_served),
            "page_fetches": dict(self.page_fetches),
        }

    def reset(self) -> None:
        """Zero everything in place (holders keep their reference); requests in flight stay counted."""
        in_flight = self.in_flight
        self.__init__()  # type: ignore[misc]
        self.in_flight = self.max_in_flight = in_flight

    def enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1

    def fault(self, kind: str) -> None:
        _bump(self.faults_injected, kind)

    def page(self, resource: str, records: int, query: str) -> None:
        _bump(self.pages_served, resource)
        _bump(self.records_served, resource, records)
        _bump(self.page_fetches, query)


def _bump(counts: dict[Any, int], key: Any, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


class Tokens:
    """Opaque bearer tokens and when they were issued (monotonic clock)."""

    issued_in_process: ClassVar[deque[str]] = deque(maxlen=20_000)  # every simulator's, for leak checks in tests

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self._issued: dict[str, float] = {}
        self.history: deque[str] = deque(maxlen=1000)  # for tests that check no token leaks into output

    def issue(self) -> str:
        now = time.monotonic()
        if len(self._issued) > 10_000:  # long benchmark runs: forget expired ones
            self._issued = {t: at for t, at in self._issued.items() if now - at < self.lifetime_s}
        token = secrets.token_urlsafe(32)
        self._issued[token] = now
        self.history.append(token)
        Tokens.issued_in_process.append(token)
        return token

    def problem(self, header: str | None, max_age_s: float | None) -> str | None:
        """Why the Authorization header does not grant access, or None when it does."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Missing bearer token"
        issued = self._issued.get(token.strip())
        if issued is None:
            return "Invalid token"
        age = time.monotonic() - issued
        if age >= self.lifetime_s:
            return "Token expired"
        if max_age_s is not None and age >= max_age_s:
            return "Token revoked"
        return None

    def revoke_all(self) -> None:
        self._issued.clear()


class ApiError(Exception):
    """A 4xx answer of the legacy API: {"message": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OAuthError(Exception):
    """A 400 answer of the token endpoint: {"error", "error_description"}."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass
class Page:
    """One successful answer of a resource: body, record count, extra headers."""

    body: Any
    records: int
    headers: dict[str, str] = field(default_factory=dict)


class SimState:
    """Datasets, tokens, faults and counters of one simulator."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.datasets = build_datasets(
            settings.seed, settings.all_counts(), settings.data_start, settings.data_end
        )
        if settings.prebuild:
            for dataset in self.datasets.values():
                dataset.prebuild()
        self.tokens = Tokens(settings.token_lifetime_s)
        self.faults = settings.faults
        self.counters = Counters()
        self.rng = random.Random(settings.seed)

    def dataset(self, resource: str) -> Dataset:
        try:
            return self.datasets[resource]
        except KeyError:
            raise KeyError(f"unknown resource {resource!r}; one of {', '.join(self.datasets)}") from None

    def truth(
        self, resource: str, start: datetime | None = None, end: datetime | None = None
    ) -> dict[Any, Record]:
        lo = None if start is None else to_us(start)
        hi = None if end is None else to_us(end)
        return self.dataset(resource).truth(lo, hi)

    def touch(self, resource: str, ids: list[Any], at: datetime | None = None) -> int:
        return self.dataset(resource).touch(ids, at or datetime.now(UTC))


# --- responses -------------------------------------------------------------


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def api_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return json_response({"message": message}, status, headers)


def oauth_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response({"error": error, "error_description": description}, status, headers)


# --- query parameters ------------------------------------------------------


def int_param(query: MultiMapping[str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        limits = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name} must be {limits}, got {value}")
    return value


def parse_instant(raw: str) -> datetime:
    """ISO-8601 with 'Z' or an offset; a '+' sent unencoded in a query arrives as a space."""
    return datetime.fromisoformat(raw.strip().replace(" ", "+"))


def iso_param(query: MultiMapping[str], name: str) -> int | None:
    """An ISO-8601 instant as epoch microseconds (naive = UTC)."""
    raw = query.get(name)
    if not raw:
        return None
    try:
        return to_us(parse_instant(raw))
    except ValueError:
        raise ApiError(400, f"{name} must be an ISO-8601 datetime, got {raw!r}") from None


def epoch_param(query: MultiMapping[str], name: str, us_per_unit: int) -> int | None:
    raw = query.get(name)
    if not raw:
        return None
    try:
        return int(raw) * us_per_unit
    except ValueError:
        unit = "seconds" if us_per_unit == 1_000_000 else "milliseconds"
        raise ApiError(400, f"{name} must be an integer of epoch {unit}, got {raw!r}") from None


def date_param(query: MultiMapping[str], name: str, days_after: int = 0) -> int | None:
    """A YYYY-MM-DD day as the epoch microseconds of its midnight (+ days_after)."""
    raw = query.get(name)
    if not raw:
        return None
    try:
        day = date.fromisoformat(raw) if len(raw) == 10 else None
    except ValueError:
        day = None
    if day is None:
        raise ApiError(400, f"{name} must be a date YYYY-MM-DD, got {raw!r}")
    return to_us(datetime.combine(day + timedelta(days=days_after), datetime.min.time(), UTC))


def encode_token(values: list[Any]) -> str:
    """Opaque cursors: unpadded URL-safe base64 of a JSON list."""
    return base64.urlsafe_b64encode(orjson.dumps(values)).rstrip(b"=").decode()


def decode_token(name: str, raw: str, length: int) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        values = None
    well_formed = isinstance(values, list) and len(values) == length
    if not (well_formed and all(v is None or type(v) is int for v in values) and None not in values[:2]):
        raise ApiError(400, f"invalid {name}")
    return values


# --- the five resources ----------------------------------------------------


def page_orders(ds: Dataset, request: web.Request, faults: Faults) -> Page:
    """Page numbers from 1, ISO filter, total in the body."""
    query = request.query
    page = int_param(query, "page", 1, 1)
    size = int_param(query, "page_size", DEFAULT_PAGE, 1, MAX_PAGE)
    selection = ds.select(iso_param(query, "updated_since"), iso_param(query, "updated_until"))
    served = min(page, 2) if faults.repeat_cursor else page  # stuck on page 2
    records = ds.served(selection.indices((served - 1) * size, size))
    return Page({"data": records, "page": page, "page_size": size, "total": len(selection)}, len(records))


def page_customers(ds: Dataset, request: web.Request, faults: Faults) -> Page:
    """Offset and limit, epoch-seconds filter, total as "count"."""
    query = request.query
    offset = int_param(query, "offset", 0, 0)
    limit = int_param(query, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    selection = ds.select(
        epoch_param(query, "modified_after", 1_000_000), epoch_param(query, "modified_before", 1_000_000)
    )
    served = min(offset, limit) if faults.repeat_cursor else offset  # stuck on the second window
    records = ds.served(selection.indices(served, limit))
    return Page({"results": records, "count": len(selection)}, len(records))


def page_events(ds: Dataset, request: web.Request, faults: Faults) -> Page:
    """Keyset cursor carrying the filter; epoch-milliseconds filter."""
    query = request.query
    limit = int_param(query, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    raw = query.get("cursor")
    if raw:
        last_ticks, last_index, since, until = decode_token("cursor", raw, 4)
        resume = (last_ticks, last_index + 1)
    else:
        since, until = epoch_param(query, "since", 1000), epoch_param(query, "until", 1000)
    selection = ds.select(since, until)
    start = selection.rank(resume) if raw else 0
    indices = selection.indices(start, limit)
    if raw and faults.repeat_cursor:
        next_cursor: str | None = raw
    elif start + len(indices) < len(selection):
        last = indices[-1]
        next_cursor = encode_token([ds.ticks_of(last), last, since, until])
    else:
        next_cursor = None
    records = ds.served(indices)
    return Page({"items": records, "meta": {"next_cursor": next_cursor}}, len(records))


def page_payments(ds: Dataset, request: web.Request, faults: Faults) -> Page:
    """RFC 8288 Link rel="next"; day filter whose `to` is inclusive; a bare list."""
    query = request.query
    per_page = int_param(query, "per_page", DEFAULT_PAGE, 1, MAX_PAGE)
    selection = ds.select(date_param(query, "from"), date_param(query, "to", days_after=1))
    raw = query.get("page_token")
    start = selection.rank(_resume_key(raw)) if raw else 0
    indices = selection.indices(start, per_page)
    if raw and faults.repeat_cursor:
        token: str | None = raw
    elif start + len(indices) < len(selection):
        token = encode_token([ds.ticks_of(indices[-1]), indices[-1]])
    else:
        token = None
    records = ds.served(indices)
    headers = {"Link": f'<{_next_link(request, token, per_page, faults)}>; rel="next"'} if token else {}
    return Page(records, len(records), headers)


def _resume_key(raw: str) -> tuple[int, int]:
    ticks, index = decode_token("page_token", raw, 2)
    return ticks, index + 1


def _next_link(request: web.Request, token: str, per_page: int, faults: Faults) -> str:
    params = {"page_token": token, "per_page": per_page}
    params.update({name: request.query[name] for name in ("from", "to") if request.query.get(name)})
    relative = f"{request.path}?{urlencode(params)}"
    return f"{request.scheme}://{request.host}{relative}" if faults.absolute_links else relative


def page_products(ds: Dataset, request: web.Request, faults: Faults) -> Page:
    """No pagination, no filter: the whole list at once."""
    records = ds.served(ds.select().indices(0, ds.count))
    return Page({"products": records}, len(records))


PAGERS: dict[str, Callable[[Dataset, web.Request, Faults], Page]] = {
    "orders": page_orders,
    "customers": page_customers,
    "events": page_events,
    "payments": page_payments,
    "products": page_products,
}


# --- handlers --------------------------------------------------------------


class Handlers:
    """The routes, bound to one SimState."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    # token endpoint

    async def token(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return oauth_error(405, "invalid_request", "The token endpoint only accepts POST", ALLOW_POST)
        state = self.state
        state.counters.token_requests += 1
        faults = state.faults
        if faults.token_delay_ms:
            await asyncio.sleep(faults.token_delay_ms / 1000)
        if faults.token_503_count:
            faults.token_503_count -= 1
            state.counters.fault("token_503")
            return json_response({"message": "Service Unavailable"}, 503)
        try:
            scope = await self._grant(request)
        except OAuthError as exc:
            return oauth_error(400, exc.error, exc.description)
        state.counters.tokens_issued += 1
        body = {
            "access_token": state.tokens.issue(),
            "expires_in": state.settings.token_lifetime_s,
            "token_type": "Bearer",
            "scope": scope,
        }
        return json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def _grant(self, request: web.Request) -> str:
        """Check a client-credentials request like Cognito; the granted scope string."""
        if request.content_type != FORM:
            raise OAuthError("invalid_request", f"Content-Type must be {FORM}")
        form = await request.post()
        client_id, secret = _client_credentials(request.headers.get("Authorization"), form)
        settings = self.state.settings
        if not (
            secrets.compare_digest(client_id.encode(), settings.client_id.encode())
            and secrets.compare_digest(secret.encode(), settings.client_secret.encode())
        ):
            raise OAuthError("invalid_client", "Client authentication failed")
        if form.get("grant_type") != "client_credentials":
            raise OAuthError("unsupported_grant_type", "Only client_credentials is supported")
        requested = str(form.get("scope", "")).split()
        if any(scope not in settings.scopes for scope in requested):
            raise OAuthError("invalid_scope", "Invalid scope requested")
        return " ".join(requested or sorted(settings.scopes))

    # legacy API

    async def api(self, request: web.Request) -> web.StreamResponse:
        """Every /api/v1 request; in-flight spans handler entry to the last byte sent."""
        counters = self.state.counters
        counters.api_requests += 1
        counters.enter()
        try:
            response = await self._api_response(request)
            if response is None:  # the connection was reset on purpose
                return web.Response()
            _bump(counters.api_status, response.status)
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:
                pass
            return response
        finally:
            counters.leave()

    async def _api_response(self, request: web.Request) -> web.StreamResponse | None:
        state = self.state
        faults = state.faults
        await self._delay(faults)
        fault = "outage" if faults.outage else self._draw_fault(faults)
        if fault:
            state.counters.fault(fault)
            return _fault_response(fault, request, faults)
        problem = state.tokens.problem(request.headers.get("Authorization"), faults.revoke_every_s)
        if problem:
            state.counters.unauthorized += 1
            return api_error(401, problem, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        resource = request.match_info["resource"]
        pager = PAGERS.get(resource)
        if pager is None:
            return api_error(404, f"No such resource: /{resource}")
        if request.method != "GET":
            return api_error(405, f"{request.method} not allowed", {"Allow": "GET"})
        try:
            page = pager(state.datasets[resource], request, faults)
        except ApiError as exc:
            return api_error(exc.status, exc.message)
        state.counters.page(resource, page.records, _fetch_key(resource, request))
        return json_response(page.body, headers=page.headers)

    async def _delay(self, faults: Faults) -> None:
        delay_ms = faults.delay_ms
        if faults.delay_jitter_ms:
            delay_ms += self.state.rng.uniform(0, faults.delay_jitter_ms)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)

    def _draw_fault(self, faults: Faults) -> str | None:
        """One seeded draw per request picks at most one random fault."""
        draw = self.state.rng.random()
        for kind, rate in faults.random_kinds():
            if draw < rate:
                return kind
            draw -= rate
        return None

    # control

    async def get_counters(self, request: web.Request) -> web.Response:
        return json_response(self.state.counters.as_dict())

    async def reset_counters(self, request: web.Request) -> web.Response:
        self.state.counters.reset()
        return json_response({"ok": True})

    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.state.faults.model_dump())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json(loads=orjson.loads)
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            self.state.faults.update(changes)
        except (ValueError, ValidationError) as exc:
            return api_error(400, str(exc))
        return json_response(self.state.faults.model_dump())

    async def touch(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=orjson.loads)
            at = body.get("at")
            touched = self.state.touch(body["resource"], list(body["ids"]), parse_instant(at) if at else None)
        except KeyError as exc:
            return api_error(400, f"unknown resource, id or missing field: {exc}")
        except (ValueError, TypeError, AttributeError) as exc:
            return api_error(400, str(exc))
        return json_response({"touched": touched})

    async def revoke(self, request: web.Request) -> web.Response:
        self.state.tokens.revoke_all()
        return json_response({"ok": True})

    async def truth(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            start, end = (parse_instant(query[b]) if query.get(b) else None for b in ("start", "end"))
            records = self.state.truth(query.get("resource", ""), start, end)
        except (KeyError, ValueError) as exc:
            return api_error(400, str(exc))
        return json_response({"count": len(records), "records": records})


def _client_credentials(authorization: str | None, form: MultiMapping[Any]) -> tuple[str, str]:
    """Client id and secret from HTTP Basic and/or the form; both must agree."""
    header_id = header_secret = None
    if authorization:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise OAuthError("invalid_client", "Client authentication failed")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError("invalid_client", "Client authentication failed") from None
        raw_id, _, raw_secret = decoded.partition(":")
        header_id, header_secret = unquote_plus(raw_id), unquote_plus(raw_secret)
    form_id, form_secret = form.get("client_id"), form.get("client_secret")
    if (header_id is not None and form_id is not None and form_id != header_id) or (
        header_secret is not None and form_secret is not None and form_secret != header_secret
    ):
        raise OAuthError("invalid_request", "Client credentials in the header and the body differ")
    client_id, secret = header_id or form_id, header_secret or form_secret
    if not isinstance(client_id, str) or not isinstance(secret, str):
        raise OAuthError("invalid_client", "Client authentication failed")
    return client_id, secret


def _fetch_key(resource: str, request: web.Request) -> str:
    """'orders?page=1&updated_since=...': the page asked for, whatever the parameter order."""
    query = urlencode(sorted(request.query.items()))
    return f"{resource}?{query}" if query else resource


def _fault_response(kind: str, request: web.Request, faults: Faults) -> web.Response | None:
    if kind in ("outage", "503"):
        return api_error(503, "Service Unavailable")
    if kind == "500":
        return api_error(500, "Internal Server Error")
    if kind == "429":
        return api_error(429, "Too Many Requests", {"Retry-After": str(faults.retry_after_s)})
    if kind == "html":
        return web.Response(text=MAINTENANCE_PAGE, content_type="text/html")
    if kind == "truncated":
        body = b'{"data": [{"id": 1, "status": "pa'
        response = web.Response(body=body, content_type="application/json", headers=PROMISED_LENGTH)
        response.force_close()  # the client sees the connection end before Content-Length bytes
        return response
    if request.transport is not None:  # reset
        request.transport.abort()
    return None


def build_app(state: SimState) -> web.Application:
    handlers = Handlers(state)
    app = web.Application()
    app.router.add_route("*", "/oauth2/token", handlers.token)
    app.router.add_route("*", "/api/v1/{resource:.*}", handlers.api)
    app.router.add_get("/_sim/counters", handlers.get_counters)
    app.router.add_post("/_sim/counters/reset", handlers.reset_counters)
    app.router.add_get("/_sim/faults", handlers.get_faults)
    app.router.add_post("/_sim/faults", handlers.set_faults)
    app.router.add_post("/_sim/touch", handlers.touch)
    app.router.add_post("/_sim/revoke", handlers.revoke)
    app.router.add_get("/_sim/truth", handlers.truth)
    return app
