"""The token across a whole run: shared by every worker, renewed after early revocation, never shown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loopback import Handler, serving

from etl import runs
from etl.config import Config, config_from_document
from etl.demo import demo_document
from etl.progress import NoProgress
from etl.simulator import Faults, Simulator, SimulatorSettings

import tomlwriter
from dbquery import rows, scalar
from etlproc import run_etl, write_config


async def test_tokens_revoked_every_3s_the_run_completes_with_every_record(
    make_config: Callable[..., Config], fresh_database: Callable[[str], Any]
) -> None:
    """The API revokes tokens older than 3 s; a ~8 s run renews after each 401 and loads every record."""
    url = await fresh_database("sqlite")
    settings = SimulatorSettings(counts={"orders": 6000}, faults=Faults(revoke_every_s=3, delay_ms=150))
    async with Simulator(settings) as sim:
        config = make_config(sim, url, resources=["orders"], api={"concurrency": 2})
        outcome = await runs.sync(config, None, asyncio.Event(), NoProgress())
        unauthorized = sim.counters.unauthorized

    assert outcome.exit_code == 0, outcome.error
    stats = outcome.resources["orders"]
    assert stats.loaded + stats.rejected == 6000
    assert unauthorized >= 1 and outcome.retries >= unauthorized
    assert outcome.token_requests >= 2
    print(f"revocation run: {outcome.seconds:.1f}s, {unauthorized} 401s, {outcome.retries} retried requests, "
          f"{outcome.token_requests} token requests")


async def test_requests_queued_behind_others_never_carry_an_expired_token(
    monkeypatch: pytest.MonkeyPatch, fresh_database: Callable[[str], Any]
) -> None:
    """3 s tokens, 64 lanes of 8 windows queued for 8 slots at 0.4 s a request: each takes its token once it has a slot.

    Taken before the wait, a token aged past its lifetime in the queue: the API answered 401, the retry
    queued and aged again, and the run failed with "the API rejected a freshly issued token" (exit 3).
    """
    url = await fresh_database("sqlite")
    settings = SimulatorSettings(counts={"orders": 3000}, token_lifetime_s=3, faults=Faults(delay_ms=400))
    async with Simulator(settings) as sim:
        monkeypatch.setenv("ETL_CLIENT_SECRET", "demo-secret")
        document = demo_document({"url": url}, sim.base_url, sim.token_url)
        document["api"]["concurrency"] = 8
        document["auth"]["refresh_margin_s"] = 1
        document["resources"] = [r | {"window": "1d"} for r in document["resources"] if r["name"] == "orders"]
        document["resources"][0]["pagination"]["page_size"] = 20
        config = config_from_document(document)
        outcome = await runs.backfill(config, settings.data_start, settings.data_end, None, None, False, asyncio.Event(), NoProgress())
        unauthorized = sim.counters.unauthorized

    assert outcome.exit_code == 0, outcome.error
    assert sum(stats.loaded + stats.rejected for stats in outcome.resources.values()) == 3000
    assert unauthorized == 0
    assert outcome.token_requests >= 2


async def test_neither_secret_nor_any_token_appears_in_any_output(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """Verbose runs, one succeeding with renewals and one failing at the token endpoint, print no secret or token."""
    url = await fresh_database("sqlite")
    settings = SimulatorSettings(counts={"orders": 600}, faults=Faults(revoke_every_s=1, delay_ms=30))
    async with Simulator(settings) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"concurrency": 2})
        good = await run_etl("-v", "sync", "--config", str(config))
        bad = await run_etl("-v", "sync", "--config", str(config), env=_env_with_secret("wrong-secret-value"))
        issued = sim.issued_tokens()
        database_text = repr(await rows(url, "SELECT * FROM etl_runs"))  # error and arguments columns too

    assert good.returncode == 0, good.stderr
    assert bad.returncode == 3
    assert issued
    everything = good.stdout + good.stderr + bad.stdout + bad.stderr + database_text
    for secret in ["demo-secret", "wrong-secret-value", *issued]:
        assert secret not in everything


def _paged(name: str, path: str = "/items") -> dict[str, Any]:
    """A resource of integer ids under `data`, 10 a page, read until a short page: what these token tests page through."""
    return {
        "name": name, "path": path, "records_path": "data", "primary_key": ["id"],
        "pagination": {"style": "page", "page_size": 10}, "columns": {"id": "integer"},
    }


def _env_with_secret(secret: str) -> dict[str, str]:
    from etlproc import etl_env

    return etl_env(ETL_CLIENT_SECRET=secret)



async def test_token_endpoint_retries_are_warnings_that_quiet_mode_shows(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """Token-endpoint retries were logged at INFO, so `-q` (cron) hid them while it showed the API's retries."""
    url = await fresh_database("sqlite")
    settings = SimulatorSettings(counts={"orders": 100}, faults=Faults(token_503_count=2))
    async with Simulator(settings) as sim:
        config = write_config(tmp_path, sim, url, resources=["orders"], api={"retry_backoff_s": 0.01})
        result = await run_etl("-q", "sync", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "WARNING token request 1 to 127.0.0.1 failed" in result.stderr
    assert "WARNING token request 2 to 127.0.0.1 failed" in result.stderr


def _audience_servers(sent: list[dict[str, str]]) -> dict[tuple[str, str], Handler]:
    """An Auth0-like token endpoint that issues a token only for an `audience`, and an API of ten records."""

    async def token(request: web.Request) -> web.Response:
        form = {name: str(value) for name, value in (await request.post()).items()}
        sent.append(form)
        if form.get("audience") != "https://api.example.com":
            description = "No audience parameter was provided, and no default audience has been configured"
            return web.json_response({"error": "access_denied", "error_description": description}, status=403)
        return web.json_response({"access_token": "audience-token", "expires_in": 86400, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer audience-token":
            return web.json_response({"message": "Unauthorized"}, status=401)
        first = (int(request.query["page"]) - 1) * 10
        return web.json_response({"data": [{"id": n} for n in range(first, min(first + 10, 10))]})

    return {("POST", "/oauth/token"): token, ("GET", "/api/items"): items}


async def test_auth_params_are_sent_with_the_token_request(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """Auth0 issues a client-credentials token only for an `audience` (Azure AD v1 wants `resource`): etl had no
    way to send one, and every run was exit 3 with Auth0's "No audience parameter was provided"."""
    url, sent = await fresh_database("sqlite"), []
    async with serving(_audience_servers(sent)) as origin:
        document = demo_document({"url": url}, f"{origin}/api", f"{origin}/oauth/token")
        document["auth"] |= {"client_auth": "body", "params": {"audience": "https://api.example.com"}}
        document["resources"] = [_paged("items")]
        config = tomlwriter.write(tmp_path / "config.toml", document)
        result = await run_etl("sync", "--config", str(config))
        check = await run_etl("check", "--config", str(config))

    assert (result.returncode, check.returncode) == (0, 0), result.stderr + check.stdout
    assert "items: 10 loaded" in result.stdout
    assert sent[0] == {
        "grant_type": "client_credentials", "scope": "legacy-api/read", "audience": "https://api.example.com",
        "client_id": "demo-client", "client_secret": "demo-secret",
    }


@pytest.mark.parametrize("name", ["scope", "grant_type", "client_id", "client_secret"])
async def test_auth_params_may_not_replace_what_etl_sends(name: str, tmp_path: Path) -> None:
    document = demo_document({"url": "sqlite:///etl.db"}, "http://127.0.0.1:1/api", "http://127.0.0.1:1/oauth2/token")
    document["auth"]["params"] = {name: "x"}
    result = await run_etl("sync", "--config", str(tomlwriter.write(tmp_path / "config.toml", document)))
    assert result.returncode == 2
    assert f"auth.params.{name}: etl sends {name} itself" in result.stderr


def _gateway_with_a_scope_per_path(tokens: list[str]) -> dict[tuple[str, str], Handler]:
    """API Gateway with a Cognito authorizer and a scope per method: a token without /customers' scope gets 401
    there (not 403), while /orders, 30 pages of 10 records, serves it."""

    async def token(_request: web.Request) -> web.Response:
        tokens.append(f"scoped-token-{len(tokens)}")
        return web.json_response({"access_token": tokens[-1], "expires_in": 3600, "token_type": "Bearer"})

    async def orders(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        first = (int(request.query["page"]) - 1) * 10
        return web.json_response({"data": [{"id": n} for n in range(first, min(first + 10, 300))]})

    async def customers(_request: web.Request) -> web.Response:
        return web.json_response({"message": "Unauthorized"}, status=401)

    return {("POST", "/oauth2/token"): token, ("GET", "/api/orders"): orders, ("GET", "/api/customers"): customers}


async def test_a_resource_whose_scope_the_token_lacks_fails_alone(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """The 401 to a fresh token on one resource stopped the whole run: orders, which the token may read, stopped
    after a page or two, and a nightly sync loaded nothing for any resource until the scope was granted."""
    url, tokens = await fresh_database("sqlite"), []
    async with serving(_gateway_with_a_scope_per_path(tokens)) as origin:
        document = demo_document({"url": url}, f"{origin}/api", f"{origin}/oauth2/token")
        document["api"]["concurrency"] = 2
        document["resources"] = [_paged(name, f"/{name}") for name in ("customers", "orders")]
        config = tomlwriter.write(tmp_path / "config.toml", document)
        result = await run_etl("sync", "--config", str(config))

    assert result.returncode == 3, result.stderr
    assert "orders: 300 loaded" in result.stdout
    assert "customers: 0 loaded" in result.stdout and "FAILED: the API rejected a freshly issued token" in result.stdout
    assert await scalar(url, "SELECT COUNT(*) FROM orders") == 300
    assert len(tokens) == 2


class _SlowRenewal:
    """A token endpoint whose renewal answers only once the API has served a request meanwhile (3 s at most), and an
    API that refuses a token past its own expiry and ends its pages once the renewed token has come."""

    def __init__(self) -> None:
        self.issued: dict[str, float] = {}  # token -> when the API considers it expired (the loop's clock)
        self.served_during_renewal = asyncio.Event()
        self.renewing = False
        self.stalled = False
        self.expired_sent = 0

    async def token(self, _request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        if self.issued:  # the renewal: every worker that waits for it sends nothing meanwhile
            self.renewing = True
            try:
                await asyncio.wait_for(self.served_during_renewal.wait(), 3)
            except TimeoutError:
                self.stalled = True
        value = f"slow-renewal-token-{len(self.issued)}"
        self.issued[value] = loop.time() + 8
        return web.json_response({"access_token": value, "expires_in": 8, "token_type": "Bearer"})

    async def items(self, request: web.Request) -> web.Response:
        value = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if asyncio.get_running_loop().time() >= self.issued.get(value, 0):
            self.expired_sent += 1
            return web.json_response({"message": "The incoming token has expired"}, status=401)
        if self.renewing:
            self.served_during_renewal.set()
        await asyncio.sleep(0.05)
        page = int(request.query["page"])
        size = 5 if value != "slow-renewal-token-0" else 10  # the renewed token's page is the last one
        return web.json_response({"data": [{"id": page * 10 + n} for n in range(size)]})


async def test_workers_keep_the_valid_token_while_a_renewal_is_slow(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """An 8 s token with refresh_margin_s = 4: renewal begins at 4 s, and the token endpoint takes its time.

    Every worker waited on that renewal, though the token had 4 s left: a slow token endpoint stalled the run, and
    one that failed for good stalled it for its whole retry cycle and then failed it, the token's rest unused."""
    url, mock = await fresh_database("sqlite"), _SlowRenewal()
    async with serving({("POST", "/oauth2/token"): mock.token, ("GET", "/api/items"): mock.items}) as origin:
        document = demo_document({"url": url}, f"{origin}/api", f"{origin}/oauth2/token")
        document["auth"]["refresh_margin_s"] = 4
        document["resources"] = [_paged("items")]
        result = await run_etl("sync", "--config", str(tomlwriter.write(tmp_path / "config.toml", document)))

    assert result.returncode == 0, result.stderr
    assert len(mock.issued) == 2 and mock.expired_sent == 0
    assert not mock.stalled, "no request was sent while the token endpoint renewed a token still valid for 4 s"


async def test_a_token_endpoint_failing_for_good_stops_the_run_after_one_retry_cycle(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A 2 s token, then a token endpoint that answers 500 to every renewal: one worker, four resources.

    The renewal's failure after all its retries failed only the resource whose worker met it: the next resource's
    first request began a whole new retry cycle on the same dead endpoint, one cycle per resource (with timeouts,
    minutes each), though no resource could get a token. Now one cycle while the token is valid (it may end
    before the token does, which is then kept) and one after, whatever the number of resources."""
    url, token_requests = await fresh_database("sqlite"), []

    async def token(_request: web.Request) -> web.Response:
        token_requests.append(1)
        if len(token_requests) > 1:
            return web.json_response({"message": "Internal server error"}, status=500)
        return web.json_response({"access_token": "short-lived-token", "expires_in": 2, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        page = int(request.query["page"])
        return web.json_response({"data": [{"id": page * 10 + n} for n in range(10)]})

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/items"): items}) as origin:
        document = demo_document({"url": url}, f"{origin}/api", f"{origin}/oauth2/token")
        document["api"] |= {"concurrency": 1, "max_retries": 2, "retry_backoff_s": 0.01}
        document["resources"] = [_paged(name) for name in ("first", "second", "third", "fourth")]
        result = await run_etl("sync", "--config", str(tomlwriter.write(tmp_path / "config.toml", document)))

    assert result.returncode == 1, result.stderr
    assert len(token_requests) <= 1 + 2 * 3, "at most two renewals, each retried twice, for the whole run"
    assert result.stderr.count("ERROR") == 1
    assert "the token endpoint" in result.stdout.split("second:")[1].splitlines()[0]
    assert "gave up after 3 attempts, [api].max_retries = 2" in result.stderr


async def test_a_renewal_under_way_when_the_run_ends_is_dropped_without_a_word(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A 4 s token renewed from 3 s on, by an endpoint that takes 2.5 s, and an API whose last page comes at 3.4 s.

    The workers do not wait on that renewal (the token is still good): the run ends while it is under way, and it
    must not outlive the session, which logged "token request 1 failed: ... Server disconnected" after the summary."""
    url, issued_at = await fresh_database("sqlite"), []

    async def token(_request: web.Request) -> web.Response:
        issued_at.append(asyncio.get_running_loop().time())
        if len(issued_at) > 1:
            await asyncio.sleep(2.5)
        return web.json_response({"access_token": f"ending-token-{len(issued_at)}", "expires_in": 4, "token_type": "Bearer"})

    async def items(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        page, age = int(request.query["page"]), asyncio.get_running_loop().time() - issued_at[0]
        return web.json_response({"data": [{"id": page * 10 + n} for n in range(10 if age < 3.4 else 5)]})

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/api/items"): items}) as origin:
        document = demo_document({"url": url}, f"{origin}/api", f"{origin}/oauth2/token")
        document["auth"]["refresh_margin_s"] = 1
        document["resources"] = [_paged("items")]
        result = await run_etl("sync", "--config", str(tomlwriter.write(tmp_path / "config.toml", document)))

    assert result.returncode == 0, result.stderr
    assert len(issued_at) == 2, "the renewal began while the last pages were read"
    assert "WARNING" not in result.stderr and "Task" not in result.stderr
