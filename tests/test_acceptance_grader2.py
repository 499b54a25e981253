"""An outside grader's acceptance tests: SPEC.md checked through the CLI only.

etl runs as a subprocess (as under cron) against this file's own Cognito-like
token endpoint and a legacy API with four resources, each paginated and
date-filtered its own way (offset + total_path / epoch, cursor / epoch_ms,
Link header / strftime with the body as the list, page + total_header / iso).
What etl wrote is read back from SQLite, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import secrets
import signal as signal_module
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import tomlwriter
from dbquery import rows
from etlproc import Finished, etl_env, finish, run_etl, start_etl

CLIENT_ID = "grader2-client"
SECRET = "grader2-S3cret-value-9f8e7d"
SCOPES = ["legacy/read", "legacy/audit"]
STAMP = "%Y%m%d%H%M%S"


def parse_iso(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def from_epoch(value: str) -> datetime:
    return datetime.fromtimestamp(int(value), UTC)


def from_epoch_ms(value: str) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, UTC)


def from_stamp(value: str) -> datetime:
    return datetime.strptime(value, STAMP).replace(tzinfo=UTC)


# resource -> (from_param, to_param, how the API reads a bound, how a record's cursor reads)
FILTERS: dict[str, tuple[str, str, Callable[[str], datetime], Callable[[dict[str, Any]], datetime]]] = {
    "invoices": ("since", "until", from_epoch, lambda r: parse_iso(r["updated_at"])),
    "customers": ("modified_from", "modified_to", from_epoch_ms, lambda r: datetime.fromtimestamp(r["modified"], UTC)),
    "events": ("from", "to", from_stamp, lambda r: parse_iso(r["at"])),
    "tickets": ("updated_after", "updated_before", parse_iso, lambda r: parse_iso(r["updated_at"])),
}
KEYS: dict[str, tuple[str, ...]] = {
    "invoices": ("id",), "customers": ("cid",), "events": ("event_id",), "tickets": ("tenant", "number"),
}
PLUS2 = timezone(timedelta(hours=2))


def invoice(i: int, moment: datetime) -> dict[str, Any]:
    amount: Any = float(f"{i * 1111}.{i:02d}") if i % 2 else f"{i * 1111}.{i:02d}"
    return {
        "id": i, "amount": amount, "updated_at": moment.astimezone(PLUS2).isoformat(),
        "customer": {"name": f"Cüstomer {i}"},
        "meta": {
            "lines": [{"sku": f"Ä-{i}", "qty": i, "price": "1.50"}], "note": None, "flag": i % 3 == 0, "ratio": 0.25,
        },
    }


def dataset(now: datetime) -> dict[str, list[dict[str, Any]]]:
    """Records from three days ago up to an hour ago, every resource with its own shapes, a few on window edges."""
    base = now - timedelta(days=3)
    midnight = datetime.combine(base.date(), datetime.min.time(), UTC)
    edges: list[dict[str, Any]] = [
        invoice(90, midnight) | {"amount": "12345678901234.56"},
        invoice(91, midnight + timedelta(days=1)) | {"amount": "0.000001"},
        invoice(92, midnight + timedelta(days=1, microseconds=250000)) | {"amount": -0.5},
    ]
    return {
        "invoices": [invoice(i, base + timedelta(hours=5 * i, minutes=7)) for i in range(1, 14)] + edges,
        "customers": [
            {"cid": 1000 + i, "name": f"Zoë {i} — 東京", "active": i % 2 == 0,
             "modified": int((base + timedelta(hours=7 * i, minutes=3)).timestamp())}
            for i in range(9)
        ],
        "events": [
            {"event_id": f"ev-{i:03d}", "kind": "click" if i % 2 else "view", "score": i * 0.5,
             "at": (base + timedelta(hours=5, minutes=30 * i)).strftime("%Y-%m-%dT%H:%M:%SZ")}
            for i in range(12)
        ],
        "tickets": [
            {"tenant": "ab"[i % 2], "number": i // 2 + 1,
             "updated_at": (base + timedelta(hours=8 * i, minutes=11)).replace(tzinfo=None).isoformat(),
             "due": f"2024-05-{i + 1:02d}", "body": "Lörem ipsum " * 40}
            for i in range(8)
        ],
    }


@dataclass
class Call:
    resource: str
    query: dict[str, str]
    at: float
    status: int
    token: str


@dataclass
class LegacyApi:
    """A Cognito-like token endpoint and a legacy API that counts and checks every request."""

    now: datetime
    data: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    expires_in: int = 3600
    token_delay_s: float = 0.0
    token_error: tuple[int, dict[str, str]] | None = None
    tokens: dict[str, float] = field(default_factory=dict)  # live token -> monotonic expiry
    issued: list[str] = field(default_factory=list)
    token_requests: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    faults: dict[str, list[int]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    revoke_at_call: int | None = None
    delay_s: float = 0.0
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth2/token"

    def reset(self) -> None:
        self.calls.clear()
        self.token_requests.clear()

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(time.monotonic())
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        form = await request.post()
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
        problems = [
            what for what, wrong in [
                ("content type", request.content_type != "application/x-www-form-urlencoded"),
                ("grant_type", form.get("grant_type") != "client_credentials"),
                ("scope", form.get("scope") != " ".join(SCOPES)),
                ("basic auth", request.headers.get("Authorization") != expected),
                ("secret in body", "client_secret" in form),
            ] if wrong
        ]
        self.violations.extend(problems)
        if self.token_error:
            status, body = self.token_error
            return web.json_response(body, status=status)
        if problems:
            return web.json_response({"error": "invalid_request", "error_description": ", ".join(problems)}, status=400)
        token = secrets.token_urlsafe(24)
        self.issued.append(token)
        self.tokens[token] = time.monotonic() + self.expires_in
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in})

    def _status(self, name: str, token: str, query: dict[str, str]) -> int:
        if self.tokens.get(token, 0.0) <= time.monotonic():
            return 401
        if self.faults.get(name):
            return self.faults[name].pop(0)
        if name in self.broken:
            return 500
        if request_problems(name, query):
            return 400
        return 200

    async def api(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["resource"]
        if name not in self.data:
            raise web.HTTPNotFound()
        if self.revoke_at_call is not None and len(self.calls) == self.revoke_at_call:
            self.tokens.clear()
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        query = dict(request.query)
        status = self._status(name, token, query)
        if request.headers.get("X-Grader") != "grader2":
            self.violations.append("static header missing")
        self.calls.append(Call(name, query, time.monotonic(), status, token))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if status == 401:
            return web.json_response({"message": "Unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if status == 429:
            return web.json_response({"message": "Too Many Requests"}, status=429, headers={"Retry-After": "1"})
        if status == 400:
            return web.json_response({"message": "; ".join(request_problems(name, query))}, status=400)
        if status != 200:
            return web.Response(status=status, text="upstream unavailable")
        low_param, high_param, bound, cursor = FILTERS[name]
        low, high = bound(query[low_param]), bound(query[high_param])
        chosen = sorted((r for r in self.data[name] if low <= cursor(r) < high), key=lambda r: (cursor(r), str(r)))
        return getattr(self, f"page_{name}")(request, query, chosen)

    def page_invoices(self, request: web.Request, query: dict[str, str], chosen: list[Any]) -> web.Response:
        offset, limit = int(query.get("offset", "0")), int(query["limit"])
        return web.json_response({"data": {"items": chosen[offset:offset + limit]}, "meta": {"total": len(chosen)}})

    def page_customers(self, request: web.Request, query: dict[str, str], chosen: list[Any]) -> web.Response:
        offset = int(base64.urlsafe_b64decode(query["after"]).decode()) if "after" in query else 0
        more = offset + 2 < len(chosen)
        cursor = base64.urlsafe_b64encode(str(offset + 2).encode()).decode() if more else None
        return web.json_response({"results": chosen[offset:offset + 2], "paging": {"next": cursor}})

    def page_events(self, request: web.Request, query: dict[str, str], chosen: list[Any]) -> web.Response:
        offset = int(query.get("page_token", "0").removeprefix("pt"))
        headers = {}
        if offset + 3 < len(chosen):
            following = request.url.with_query({**query, "page_token": f"pt{offset + 3}"})
            headers["Link"] = f'<{following}>; rel="next", <{request.url.with_query({})}>; rel="first"'
        return web.json_response(chosen[offset:offset + 3], headers=headers)

    def page_tickets(self, request: web.Request, query: dict[str, str], chosen: list[Any]) -> web.Response:
        page, size = int(query["p"]), int(query["per_page"])
        total = {"X-Total-Count": str(len(chosen))}
        return web.json_response({"tickets": chosen[(page - 1) * size:page * size]}, headers=total)


def request_problems(name: str, query: dict[str, str]) -> list[str]:
    """What a strict API would answer 400 for: missing or unreadable bounds, missing static params."""
    low_param, high_param, bound, _ = FILTERS[name]
    problems = []
    for param in (low_param, high_param):
        try:
            bound(query[param])
        except (KeyError, ValueError) as exc:
            problems.append(f"{param}: {exc!r}")
    if name == "tickets" and query.get("status") != "all":
        problems.append("status=all missing")
    if name == "invoices" and "limit" not in query:
        problems.append("limit missing")
    return problems


@pytest.fixture
async def legacy() -> AsyncIterator[LegacyApi]:
    now = datetime.now(UTC).replace(microsecond=0)
    api = LegacyApi(now=now, data=dataset(now))
    app = web.Application()

    async def token(request: web.Request) -> web.StreamResponse:
        return await api.token(request)  # looked up per request: a test may replace it

    async def resource(request: web.Request) -> web.StreamResponse:
        return await api.api(request)

    app.router.add_post("/oauth2/token", token)
    app.router.add_get("/api/v1/{resource}", resource)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api.port = runner.addresses[0][1]
    yield api
    await runner.cleanup()


def start_day(api: LegacyApi) -> date:
    return (api.now - timedelta(days=4)).date()


def resources(api: LegacyApi) -> list[dict[str, Any]]:
    common = {"start": start_day(api).isoformat(), "lookback": "1h", "window": "1d"}
    return [
        {
            "name": "invoices", "path": "/invoices", "records_path": "data.items", "primary_key": ["id"],
            "cursor_field": "updated_at", **common,
            "filter": {"from_param": "since", "to_param": "until", "format": "epoch"},
            "pagination": {"style": "offset", "offset_param": "offset", "limit_param": "limit", "page_size": 3,
                           "total_path": "meta.total"},
            "columns": {"id": "integer", "amount": "decimal", "updated_at": "datetime", "meta": "json",
                        "customer_name": {"type": "string", "source": "customer.name"}},
        },
        {
            "name": "customers", "table": "crm_customers", "path": "/customers", "records_path": "results",
            "primary_key": ["cid"], "cursor_field": "modified", **common,
            "filter": {"from_param": "modified_from", "to_param": "modified_to", "format": "epoch_ms"},
            "pagination": {"style": "cursor", "cursor_param": "after", "next_cursor_path": "paging.next"},
            "columns": {"cid": "bigint", "name": "string", "modified": "datetime", "active": "boolean"},
        },
        {
            "name": "events", "path": "/events", "records_path": "", "primary_key": ["event_id"],
            "cursor_field": "at", **common,
            "filter": {"from_param": "from", "to_param": "to", "format": STAMP},
            "pagination": {"style": "link_header"},
            "columns": {"event_id": "string", "at": "datetime", "kind": "string", "score": "float"},
        },
        {
            "name": "tickets", "path": "/tickets", "records_path": "tickets", "primary_key": ["tenant", "number"],
            "cursor_field": "updated_at", "params": {"status": "all"}, **common,
            "filter": {"from_param": "updated_after", "to_param": "updated_before", "format": "iso"},
            "pagination": {"style": "page", "page_param": "p", "size_param": "per_page", "page_size": 2,
                           "first_page": 1, "total_header": "X-Total-Count"},
            "columns": {"tenant": "string", "number": "integer", "updated_at": "datetime", "due": "date",
                        "body": "text"},
        },
    ]


def write_config(directory: Path, legacy: LegacyApi, database_url: str, **sections: dict[str, Any]) -> Path:
    document: dict[str, Any] = {
        "api": {"base_url": legacy.base_url, "concurrency": 4, "timeout_s": 10, "max_retries": 3,
                "headers": {"X-Grader": "grader2"}},
        "auth": {"token_url": legacy.token_url, "client_id": CLIENT_ID, "scopes": SCOPES, "client_auth": "basic",
                 "refresh_margin_s": 60},
        "database": {"url": database_url},
        "sync": {"lag": "5m", "max_rejects": 0},
    }
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    document["resources"] = resources(legacy)
    return tomlwriter.write(directory / "config.toml", document)


def env(**extra: str) -> dict[str, str]:
    return etl_env(ETL_CLIENT_SECRET=SECRET, **extra)


async def etl(config: Path, *args: str, **extra_env: str) -> Finished:
    return await run_etl("--config", str(config), *args, env=env(**extra_env), timeout=60)


def assert_no_secret(api: LegacyApi, *texts: str) -> None:
    for text in texts:
        assert SECRET not in text, "the client secret leaked"
        assert not [t for t in api.issued if t in text], "a bearer token leaked"


def utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime), value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def from_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def table(name: str) -> str:
    return "crm_customers" if name == "customers" else name


async def table_rows(url: str, name: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    found = await rows(url, f"SELECT * FROM {table(name)}")
    return {tuple(r._mapping[k] for k in KEYS[name]): dict(r._mapping) for r in found}


async def assert_loaded_exactly(url: str, api: LegacyApi, dialect: str) -> None:
    """Every record once, with its values as sent: decimals exact, datetimes in UTC, json round trip."""
    for name, records in api.data.items():
        stored = await table_rows(url, name)
        assert len(stored) == len(records), name
        count = (await rows(url, f"SELECT COUNT(*) FROM {table(name)}"))[0][0]
        assert count == len(records), name
        for record in records:
            row = stored[tuple(record[k] for k in KEYS[name])]
            cursor = FILTERS[name][3](record)
            if name == "invoices":
                assert Decimal(str(row["amount"])) == Decimal(str(record["amount"])), row
                assert utc(row["updated_at"]) == cursor
                assert from_json(row["meta"]) == record["meta"]
                assert row["customer_name"] == record["customer"]["name"]
            elif name == "customers":
                assert utc(row["modified"]) == cursor
                assert row["name"] == record["name"]
                assert bool(row["active"]) is record["active"]
            elif name == "events":
                assert utc(row["at"]) == cursor
                assert row["kind"] == record["kind"] and row["score"] == pytest.approx(record["score"])
            else:
                assert utc(row["updated_at"]) == cursor
                assert str(row["due"]) == record["due"] and row["body"] == record["body"]
            if dialect == "postgresql":
                timestamp = row["updated_at" if "updated_at" in row else "modified" if "modified" in row else "at"]
                assert timestamp.tzinfo is not None, "PostgreSQL datetimes are stored timezone-aware"


def windows_of(api: LegacyApi, name: str) -> list[tuple[datetime, datetime]]:
    low_param, high_param, bound, _ = FILTERS[name]
    return sorted({(bound(c.query[low_param]), bound(c.query[high_param])) for c in api.calls
                   if c.resource == name and c.status == 200})


def assert_windows_cover(api: LegacyApi, name: str, start: datetime, run_started: datetime) -> None:
    """The windows asked for tile [start, now - lag) with no gap and no overlap."""
    spans = windows_of(api, name)
    assert spans[0][0] == start, (name, spans[0])
    for (_, high), (low, _) in zip(spans, spans[1:], strict=False):
        assert high == low, (name, spans)
    assert abs(spans[-1][1] - (run_started - timedelta(minutes=5))) < timedelta(seconds=30), (name, spans[-1])


def assert_pages_stop_on_total(api: LegacyApi, name: str, size: int) -> None:
    """With total_path / total_header given, no page past the total is asked for."""
    low_param, high_param, bound, cursor = FILTERS[name]
    for low, high in windows_of(api, name):
        asked = [c for c in api.calls if c.resource == name and c.status == 200
                 and (bound(c.query[low_param]), bound(c.query[high_param])) == (low, high)]
        matching = sum(1 for r in api.data[name] if low <= cursor(r) < high)
        assert len(asked) == max(1, math.ceil(matching / size)), (name, low, high, matching, len(asked))


async def run_table(url: str) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in await rows(url, "SELECT * FROM etl_runs")]


def assert_json_lines(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "etl -v logged nothing"
    for line in lines:
        assert isinstance(json.loads(line), dict), line


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
async def test_sync_loads_every_record_once_and_resumes_from_the_watermark(
    dialect: str, legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    url = await fresh_database(dialect)
    config = write_config(tmp_path, legacy, url)
    started = datetime.now(UTC)
    first = await etl(config, "sync")
    assert first.returncode == 0, first.stderr
    assert legacy.violations == []
    assert len(legacy.token_requests) == 1, "one token for the whole run"
    assert len(first.stdout.splitlines()) <= len(FILTERS) + 1, "not on a terminal: one summary line per resource"
    await assert_loaded_exactly(url, legacy, dialect)
    start = datetime.combine(start_day(legacy), datetime.min.time(), UTC)
    for name in FILTERS:
        assert_windows_cover(legacy, name, start, started)
    assert_pages_stop_on_total(legacy, "invoices", 3)
    assert_pages_stop_on_total(legacy, "tickets", 2)
    first_run_id = (await table_rows(url, "invoices"))[(1,)]["_etl_run_id"]

    # New and changed records: the re-run reads only the lookback before where the last sync ended, moves the watermark.
    legacy.reset()
    legacy.data["invoices"].append(invoice(100, legacy.now - timedelta(minutes=30)))
    changed = invoice(3, legacy.now - timedelta(minutes=20)) | {"amount": "777.77"}
    legacy.data["invoices"] = [changed if r["id"] == 3 else r for r in legacy.data["invoices"]]
    legacy.data["events"].append({"event_id": "ev-new", "at": (legacy.now - timedelta(minutes=15)).isoformat(),
                                  "kind": "view", "score": 1.25})
    second = await etl(config, "--log-format", "json", "-v", "sync")
    assert second.returncode == 0, second.stderr
    assert_json_lines(second.stderr)
    await assert_loaded_exactly(url, legacy, dialect)
    invoices = await table_rows(url, "invoices")
    assert Decimal(str(invoices[(3,)]["amount"])) == Decimal("777.77")
    assert invoices[(1,)]["_etl_run_id"] == first_run_id, "a record older than the lookback was loaded again"
    # DECISIONS.md: a sync goes on from where the last one's windows ended (not from the highest cursor), less lookback.
    since = min(low for low, _ in windows_of(legacy, "invoices"))
    assert abs(since - (started - timedelta(minutes=5, hours=1))) < timedelta(seconds=30), since
    marks = [dict(r._mapping) for r in await rows(url, "SELECT * FROM etl_watermarks")]
    invoice_mark = [m for m in marks if "invoices" in m.values()]
    assert len(invoice_mark) == 1, marks
    assert any(_is_moment(v, legacy.now - timedelta(minutes=20)) for v in invoice_mark[0].values()), invoice_mark

    # status and migrate never call out.
    legacy.reset()
    status = await etl(config, "status")
    migrate = await etl(config, "migrate")
    assert (status.returncode, migrate.returncode) == (0, 0), status.stderr + migrate.stderr
    assert legacy.calls == [] and legacy.token_requests == []
    for name in FILTERS:
        assert name in status.stdout, status.stdout
    runs = await run_table(url)
    assert len([r for r in runs if "sync" in map(str, r.values())]) == 2, runs
    assert_no_secret(legacy, first.stdout, first.stderr, second.stdout, second.stderr, status.stdout, status.stderr,
                     migrate.stdout, migrate.stderr, json.dumps(runs, default=str))


def _is_moment(value: Any, expected: datetime) -> bool:
    try:
        return utc(value) == expected
    except (AssertionError, ValueError, TypeError):
        return False


async def test_token_expiring_mid_run_is_renewed_once_per_lifetime(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    legacy.expires_in, legacy.token_delay_s, legacy.delay_s = 3, 0.3, 0.2
    url = await fresh_database("sqlite")
    config = write_config(tmp_path, legacy, url, api={"concurrency": 3}, auth={"refresh_margin_s": 1})
    began = time.monotonic()
    done = await etl(config, "sync")
    took = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert [c for c in legacy.calls if c.status != 200] == [], "a request went out with an expired token"
    requested = legacy.token_requests
    assert len(requested) >= 2, f"run took {took:.1f}s but the token was never renewed"
    assert len(requested) <= took / 2 + 1
    gaps = [b - a for a, b in zip(requested, requested[1:], strict=False)]
    assert min(gaps) >= 1.8, f"tokens requested {gaps} apart: more than one per lifetime"
    assert_no_secret(legacy, done.stdout, done.stderr, json.dumps(await run_table(url), default=str))


async def test_429_and_503_are_retried_honouring_retry_after_at_the_api_and_token_endpoint(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    legacy.faults = {"invoices": [429], "customers": [503, 503], "events": [429], "tickets": [503]}
    real_token = legacy.token

    async def token(request: web.Request) -> web.Response:
        if len(legacy.token_requests) > 0:
            return await real_token(request)
        legacy.token_requests.append(time.monotonic())
        return web.Response(status=503, text="busy")

    legacy.token = token  # type: ignore[method-assign]
    url = await fresh_database("sqlite")
    done = await etl(write_config(tmp_path, legacy, url), "sync")
    assert done.returncode == 0, done.stderr
    assert len(legacy.token_requests) == 2
    assert "every attempt" not in done.stderr, "a retry that then succeeded was reported as failing every attempt"
    await assert_loaded_exactly(url, legacy, "sqlite")
    for refused in [c for c in legacy.calls if c.status == 429]:
        again = [c for c in legacy.calls
                 if (c.resource, c.query) == (refused.resource, refused.query) and c.at > refused.at]
        assert again, "a 429 was not retried"
        assert again[0].at - refused.at >= 0.9, "Retry-After: 1 was not honoured"


async def test_401_mid_run_renews_the_token_once(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    legacy.revoke_at_call, legacy.delay_s, legacy.token_delay_s = 6, 0.05, 0.2
    url = await fresh_database("sqlite")
    done = await etl(write_config(tmp_path, legacy, url), "sync")
    assert done.returncode == 0, done.stderr
    assert [c.status for c in legacy.calls].count(401) >= 1
    assert len(legacy.token_requests) == 2, "a 401 gets exactly one new token"
    await assert_loaded_exactly(url, legacy, "sqlite")
    token_counts = [v for r in await run_table(url) for k, v in r.items() if "token" in k.lower()]
    assert 2 in token_counts, token_counts


async def test_wire_variants_relative_link_missing_cursor_string_expiry_and_a_timeout(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    """A relative Link with other parameters and an unquoted rel, a last page without the cursor key, expires_in as
    a string, and one page that outlasts timeout_s: all still load everything."""
    url = await fresh_database("sqlite")
    real_token, real_api, hung = legacy.token, legacy.api, []

    def page_events(request: web.Request, query: dict[str, str], chosen: list[Any]) -> web.Response:
        offset = int(query.get("page_token", "0").removeprefix("pt"))
        headers = {}
        if offset + 3 < len(chosen):
            following = request.rel_url.with_query({**query, "page_token": f"pt{offset + 3}"})
            headers["Link"] = f'<{following}>; title="more, please"; rel=next'
        return web.json_response(chosen[offset:offset + 3], headers=headers)

    def page_customers(request: web.Request, query: dict[str, str], chosen: list[Any]) -> web.Response:
        offset = int(base64.urlsafe_b64decode(query["after"]).decode()) if "after" in query else 0
        more = offset + 2 < len(chosen)
        paging = {"next": base64.urlsafe_b64encode(str(offset + 2).encode()).decode()} if more else {}
        return web.json_response({"results": chosen[offset:offset + 2], "paging": paging})

    async def token(request: web.Request) -> web.Response:
        answer = await real_token(request)
        body = json.loads(answer.text or "{}")
        if "expires_in" in body:
            body["expires_in"] = str(body["expires_in"])
        return web.json_response(body, status=answer.status)

    async def api(request: web.Request) -> web.StreamResponse:
        if not hung and request.match_info["resource"] == "tickets":
            hung.append(request.query_string)
            await asyncio.sleep(3)
        return await real_api(request)

    legacy.page_events = page_events  # type: ignore[method-assign]
    legacy.page_customers = page_customers  # type: ignore[method-assign]
    legacy.token = token  # type: ignore[method-assign]
    legacy.api = api  # type: ignore[method-assign]
    done = await etl(write_config(tmp_path, legacy, url, api={"timeout_s": 1}), "sync")
    assert done.returncode == 0, done.stderr
    assert hung and "timeout_s" in done.stderr
    await assert_loaded_exactly(url, legacy, "sqlite")


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
async def test_numbers_are_read_exactly_and_bad_records_kept_raw(
    dialect: str, legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    """A JSON number with more digits than a float holds is stored exactly; a record without its key or with an
    impossible date is rejected, raw, and counted; within max_rejects the run exits 0."""
    url = await fresh_database(dialect)
    moment = legacy.now - timedelta(hours=3)
    raw = (
        '{"data": {"items": ['
        '{"id": 1, "amount": 1234567890.123456789, "updated_at": "WHEN", "meta": {"x": 1.10},'
        ' "customer": {"name": "a"}},'
        '{"amount": 1.5, "updated_at": "WHEN", "meta": {}, "customer": {"name": "no key"}},'
        '{"id": 4, "amount": 7, "updated_at": "2024-02-30T00:00:00Z", "meta": "s", "customer": {"name": "bad date"}}'
        ']}, "meta": {"total": 3}}'
    ).replace("WHEN", moment.isoformat())

    async def api(request: web.Request) -> web.StreamResponse:
        low, high = from_epoch(request.query["since"]), from_epoch(request.query["until"])
        if low <= moment < high:
            return web.Response(text=raw, content_type="application/json")
        return web.json_response({"data": {"items": []}, "meta": {"total": 0}})

    legacy.api = api  # type: ignore[method-assign]
    done = await etl(write_config(tmp_path, legacy, url, sync={"max_rejects": 2}), "sync", "--resource", "invoices")
    assert done.returncode == 0, done.stderr
    stored = await table_rows(url, "invoices")
    assert list(stored) == [(1,)]
    assert Decimal(str(stored[(1,)]["amount"])) == Decimal("1234567890.123456789")
    assert from_json(stored[(1,)]["meta"]) == {"x": 1.1}
    rejects = [dict(r._mapping) for r in await rows(url, "SELECT * FROM etl_rejects")]
    raws = [from_json(v) for r in rejects for v in r.values() if isinstance(v, str) and v.startswith("{")]
    sent = json.loads(raw)["data"]["items"]
    assert sorted(map(str, raws)) == sorted(map(str, sent[1:])), rejects
    assert any("updated_at" in str(v) for r in rejects for v in r.values())


async def test_the_latest_version_of_a_record_seen_twice_wins(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    url = await fresh_database("mysql")
    old = invoice(7, legacy.now - timedelta(days=2, hours=3)) | {"amount": "1.00"}
    new = invoice(7, legacy.now - timedelta(hours=2)) | {"amount": "2.00"}
    legacy.data["invoices"] = [r for r in legacy.data["invoices"] if r["id"] != 7] + [new, old]
    done = await etl(write_config(tmp_path, legacy, url), "sync", "--resource", "invoices")
    assert done.returncode == 0, done.stderr
    assert Decimal(str((await table_rows(url, "invoices"))[(7,)]["amount"])) == Decimal("2.00")


async def test_a_failed_resource_exits_1_and_the_next_run_completes_it(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    legacy.broken = {"tickets"}
    url = await fresh_database("postgresql")
    config = write_config(tmp_path, legacy, url, api={"max_retries": 1})
    failed = await etl(config, "--log-format", "json", "sync")
    assert failed.returncode == 1, failed.stderr
    assert_json_lines(failed.stderr)
    assert "tickets" in failed.stdout + failed.stderr
    for name in ("invoices", "customers", "events"):
        assert len(await table_rows(url, name)) == len(legacy.data[name]), name
    legacy.broken = set()
    done = await etl(config, "sync")
    assert done.returncode == 0, done.stderr
    await assert_loaded_exactly(url, legacy, "postgresql")


async def test_rejected_records_over_max_rejects_exit_1(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    bad = invoice(50, legacy.now - timedelta(hours=2)) | {"amount": "twelve euros"}
    legacy.data["invoices"].append(bad)
    url = await fresh_database("mysql")
    over = await etl(write_config(tmp_path, legacy, url), "sync", "--resource", "invoices")
    assert over.returncode == 1, over.stderr
    rejects = [dict(r._mapping) for r in await rows(url, "SELECT * FROM etl_rejects")]
    assert len(rejects) == 1, rejects
    assert bad in [from_json(v) for v in rejects[0].values() if isinstance(v, str) and v.startswith("{")], rejects
    assert "amount" in " ".join(str(v) for v in rejects[0].values())
    assert len(await table_rows(url, "invoices")) == len(legacy.data["invoices"]) - 1


async def test_a_killed_run_loses_nothing_and_a_stopped_one_exits_1(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    url = await fresh_database("postgresql")
    legacy.delay_s = 0.3
    config = write_config(tmp_path, legacy, url, api={"concurrency": 2})
    for signal, calls in ((signal_module.SIGKILL, 10), (signal_module.SIGTERM, 16)):
        process = await start_etl("--config", str(config), "sync", env=env())
        while len(legacy.calls) < calls and process.returncode is None:
            await asyncio.sleep(0.05)
        process.send_signal(signal)
        stopped = await finish(process, 30)
        assert stopped.returncode == (-signal_module.SIGKILL if signal == signal_module.SIGKILL else 1), stopped.stderr
    legacy.delay_s = 0
    again = await etl(config, "sync")
    assert again.returncode == 0, again.stderr
    await assert_loaded_exactly(url, legacy, "postgresql")


async def test_usage_and_configuration_errors_exit_2_before_any_request(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    config = write_config(tmp_path, legacy, await fresh_database("sqlite"))
    no_secret = await run_etl("--config", str(config), "--log-format", "json", "sync",
                              env=etl_env(ETL_CLIENT_SECRET=""))
    assert no_secret.returncode == 2, no_secret.stderr
    assert_json_lines(no_secret.stderr)
    assert "secret" in no_secret.stderr.lower()
    text = config.read_text().replace('"style" = "cursor"', '"style" = "cursors"')
    (tmp_path / "bad.toml").write_text(text)
    style = await etl(tmp_path / "bad.toml", "sync")
    assert style.returncode == 2 and "style" in style.stderr, style.stderr
    for args, named in [
        (["sync", "--no-such-flag"], "--no-such-flag"),
        (["sync", "--resource", "nope"], "nope"),
        (["backfill", "--from", "2024-02-01", "--to", "2024-01-01"], "--from"),
        (["backfill", "--from", "2024-01-01", "--to", "2024-01-02", "--window", "fortnight"], "--window"),
    ]:
        done = await etl(config, *args)
        assert done.returncode == 2 and named in done.stderr, (args, done.stderr)
    assert legacy.calls == [] and legacy.token_requests == []


async def test_token_endpoint_refusal_exits_3_and_says_what_it_answered(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    legacy.token_error = (400, {"error": "invalid_client", "error_description": "Client authentication failed"})
    done = await etl(write_config(tmp_path, legacy, await fresh_database("sqlite")), "--log-format", "json", "sync")
    assert done.returncode == 3, done.stderr
    assert_json_lines(done.stderr)
    assert "invalid_client" in done.stderr
    assert legacy.calls == []
    assert_no_secret(legacy, done.stdout, done.stderr)


async def test_unreachable_or_untrusted_hosts_exit_5(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path, unused_tcp_port: int
) -> None:
    url = await fresh_database("sqlite")
    closed = f"http://127.0.0.1:{unused_tcp_port}"
    for auth, api in [
        ({"token_url": f"{closed}/oauth2/token"}, {}),
        ({}, {"base_url": f"{closed}/api/v1", "max_retries": 1}),
        ({"token_url": f"https://127.0.0.1:{legacy.port}/oauth2/token"}, {}),
        ({"token_url": "https://no-such-host.invalid/oauth2/token"}, {}),
    ]:
        done = await etl(write_config(tmp_path, legacy, url, auth=auth, api=api), "sync")
        assert done.returncode == 5, (auth, api, done.stderr)


async def test_a_second_run_on_the_same_resources_exits_4(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    legacy.delay_s = 1.0
    url = await fresh_database("postgresql")
    config = write_config(tmp_path, legacy, url, api={"concurrency": 1})
    first = await start_etl("--config", str(config), "sync", "--resource", "events", env=env())
    while not legacy.calls and first.returncode is None:
        await asyncio.sleep(0.05)
    second = await etl(config, "sync", "--resource", "events")
    legacy.delay_s = 0
    done = await finish(first, 60)
    assert second.returncode == 4, second.stderr
    assert done.returncode == 0, done.stderr
    assert len(await table_rows(url, "events")) == len(legacy.data["events"])


async def test_backfill_prints_its_interval_in_utc_and_loads_only_it(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    url = await fresh_database("sqlite")
    low = (legacy.now - timedelta(days=2)).date()
    high = low + timedelta(days=1)
    done = await etl(write_config(tmp_path, legacy, url), "backfill", "--from", f"{low}T02:00:00+02:00",
                     "--to", high.isoformat(), "--resource", "events", "--window", "6h")
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert f"{low}T00:00:00Z" in output and f"{high}T00:00:00Z" in output, output
    begin, end = (datetime.combine(d, datetime.min.time(), UTC) for d in (low, high))
    expected = [r for r in legacy.data["events"] if begin <= parse_iso(r["at"]) < end]
    assert expected and len(await table_rows(url, "events")) == len(expected)
    spans = windows_of(legacy, "events")
    assert spans[0][0] == begin and spans[-1][1] == end and len(spans) == 4, spans


async def test_where_the_config_and_secret_come_from(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    """$ETL_CONFIG, ./config.toml, options after the command, client_secret_file, and client_secret with a warning."""
    url = await fresh_database("sqlite")
    config = write_config(tmp_path, legacy, url)
    by_env = await run_etl("migrate", env=env(ETL_CONFIG=str(config)))
    assert by_env.returncode == 0, by_env.stderr
    by_cwd = await finish(await start_etl("status", env=env(), cwd=str(tmp_path)))
    assert by_cwd.returncode == 0, by_cwd.stderr
    (tmp_path / "secret").write_text(SECRET + "\n")
    from_file = write_config(tmp_path, legacy, url, auth={"client_secret_file": str(tmp_path / "secret")})
    after = await run_etl("sync", "--resource", "tickets", "--config", str(from_file), "--log-format", "json",
                          env=etl_env(ETL_CLIENT_SECRET=""))
    assert after.returncode == 0, after.stderr
    assert_json_lines(after.stderr)
    inline = write_config(tmp_path, legacy, url, auth={"client_secret": SECRET})
    warned = await run_etl("--config", str(inline), "sync", "--resource", "tickets", env=etl_env(ETL_CLIENT_SECRET=""))
    assert warned.returncode == 0, warned.stderr
    assert "client_secret" in warned.stderr
    assert legacy.violations == []
    assert_no_secret(legacy, by_env.stderr, by_cwd.stdout, after.stderr, warned.stdout, warned.stderr)


async def test_check_passes_against_a_working_api_as_one_json_document(
    legacy: LegacyApi, fresh_database: Callable[[str], Any], tmp_path: Path
) -> None:
    check = await etl(write_config(tmp_path, legacy, await fresh_database("sqlite")), "check", "--format", "json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert isinstance(json.loads(check.stdout), dict)
    assert {c.resource for c in legacy.calls} == set(FILTERS)
    assert_no_secret(legacy, check.stdout, check.stderr)
