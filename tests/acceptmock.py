"""An outside grader's own mock: a Cognito-like token endpoint and a paged orders API, on loopback.

Independent of etl.simulator on purpose: it checks the wire contract of SPEC.md
(form-encoded client_credentials, basic or body client auth, space-separated
scope, bearer tokens with `expires_in`) and counts every request.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

CLIENT_ID = "grader-client"
SECRET = "grader-s3cret-value"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def hourly_orders(hours: int) -> list[dict[str, Any]]:
    """One order per hour from T0, ids 1..hours."""
    return [
        {"id": i + 1, "total": f"{i}.50", "status": "open", "updated_at": (T0 + timedelta(hours=i)).isoformat()}
        for i in range(hours)
    ]


@dataclass
class Mock:
    records: list[dict[str, Any]] = field(default_factory=lambda: hourly_orders(24 * 10))
    expires_in: int = 3600
    token_error: str | None = None
    fail_after: datetime | None = None  # 500 for any window starting at or after this
    revoke_first_token: bool = False  # the first token is answered 401 once
    delay_s: float = 0.0
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    api_requests: list[dict[str, str]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    port: int = 0
    reject_all: bool = False  # every API request gets 401
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth2/token"

    def reset_counts(self) -> None:
        self.token_requests.clear()
        self.api_requests.clear()

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        entry = {"content_type": request.content_type, "form": form, "authorization": request.headers.get("Authorization")}
        self.token_requests.append(entry)
        client, secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            client, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        if self.token_error:
            return web.json_response({"error": self.token_error, "error_description": "grader says no"}, status=400)
        if request.content_type != "application/x-www-form-urlencoded" or form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if client != CLIENT_ID or secret != SECRET:
            return web.json_response({"error": "invalid_client"}, status=400)
        token = f"tok-{len(self.issued) + 1}-abcdefghijklmnop"
        self.issued.append(token)
        self.valid.add(token)
        return web.json_response({"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"})

    async def orders(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.api_requests.append(q | {"_token": bearer})
        if bearer not in self.valid or self.reject_all:
            return web.json_response({"message": "unauthorized"}, status=401)
        if self.revoke_first_token and bearer == self.issued[0]:
            self.valid.discard(bearer)
            self.revoke_first_token = False
            return web.json_response({"message": "expired"}, status=401)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        since = datetime.fromisoformat(q["updated_since"].replace("Z", "+00:00"))
        until = datetime.fromisoformat(q["updated_until"].replace("Z", "+00:00"))
        if self.fail_after and since >= self.fail_after:
            return web.json_response({"message": "boom"}, status=500)
        page, size = int(q.get("page", 1)), int(q.get("page_size", 100))
        chosen = [r for r in self.records if since <= datetime.fromisoformat(r["updated_at"]) < until]
        return web.json_response({"data": chosen[(page - 1) * size: page * size]})

    async def _token(self, request: web.Request) -> web.Response:
        return await self.token(request)  # looked up per request: a test may replace `token`

    async def _orders(self, request: web.Request) -> web.Response:
        return await self.orders(request)

    async def serve(self) -> web.AppRunner:
        """Serve on the caller's event loop (it keeps serving while a test awaits etl); cleanup() the runner."""
        app = web.Application()
        app.router.add_post("/oauth2/token", self._token)
        app.router.add_get("/api/v1/orders", self._orders)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        return runner


def config_text(mock: Mock, db_url: str, **over: str) -> str:
    """A config.toml for the mock; `over` replaces whole lines by key (e.g. client_auth='"body"')."""
    values = {
        "concurrency": "8", "max_retries": "0", "client_auth": '"basic"', "scopes": '["legacy-api/read", "legacy-api/write"]',
        "lag": '"5m"', "window": '"1d"', "start": '"2024-01-01"', "lookback": '"1h"', "page_size": "10",
        "auto_migrate": "true", "max_rejects": "0", "secret_line": "",
    } | over
    return f"""
[api]
base_url = "{mock.base_url}"
concurrency = {values['concurrency']}
timeout_s = 10
max_retries = {values['max_retries']}

[auth]
token_url = "{mock.token_url}"
client_id = "{CLIENT_ID}"
scopes = {values['scopes']}
client_auth = {values['client_auth']}
{values['secret_line']}

[database]
url = "{db_url}"
auto_migrate = {values['auto_migrate']}

[sync]
lag = {values['lag']}
max_rejects = {values['max_rejects']}

[[resources]]
name = "orders"
path = "/orders"
records_path = "data"
primary_key = ["id"]
cursor_field = "updated_at"
start = {values['start']}
lookback = {values['lookback']}
window = {values['window']}

[resources.filter]
from_param = "updated_since"
to_param = "updated_until"
format = "iso"

[resources.pagination]
style = "page"
page_param = "page"
size_param = "page_size"
page_size = {values['page_size']}

[resources.columns]
id = "integer"
total = "decimal"
status = "string"
updated_at = "datetime"
"""
