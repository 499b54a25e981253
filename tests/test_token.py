"""etl.token: one shared, single-flight token; RFC 6749 §4.4 requests; endpoint errors; no leaked secrets.

Request details and error answers are driven with aioresponses; concurrency is
counted against a real aiohttp server on 127.0.0.1. Lifetimes run on a fake
clock, so no test sleeps through a token's life.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from loopback import serving
from pydantic import SecretStr
from yarl import URL

from etl.config import AuthConfig
from etl.errors import (
    AuthError,
    ConnectionFailed,
    SourceError,
    TokenEndpointFailed,
    TokenRejected,
)
from etl.token import Token, TokenManager, refresh_after
from etl.transport import RetryPolicy

TOKEN_URL = "https://my-pool.auth.us-east-1.amazoncognito.com/oauth2/token"
CLIENT_ID = "etl-client"
SECRET = "S3cr3t-client-VALUE"
BASIC_VALUE = "ZXRsLWNsaWVudDpTM2NyM3QtY2xpZW50LVZBTFVF"  # base64("etl-client:S3cr3t-client-VALUE")
FORM = "application/x-www-form-urlencoded"
FAST_RETRY = RetryPolicy(max_retries=3, backoff_s=0.01)
REJECTED = "the API at https://legacy.example.com/api/v1/orders answered 401 invalid_token"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TokenEndpoint:
    """A real token endpoint on loopback that records every request it sees."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.lifetime_s = 3600
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append(
            {
                "method": request.method,
                "content_type": request.content_type,
                "headers": request.headers,
                "form": dict(form),
            }
        )
        await asyncio.sleep(self.delay_s)
        number = len(self.requests)
        return web.json_response(
            {"access_token": f"tok-{number}", "expires_in": self.lifetime_s, "token_type": "Bearer"}
        )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def endpoint() -> AsyncIterator[TokenEndpoint]:
    fake = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/oauth2/token", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/oauth2/token"))
    yield fake
    await server.close()


def make_manager(
    session: aiohttp.ClientSession,
    *,
    url: str = TOKEN_URL,
    secret: str = SECRET,
    clock: Callable[[], float] = time.monotonic,
    **auth: Any,
) -> TokenManager:
    config = AuthConfig(token_url=url, client_id=auth.pop("client_id", CLIENT_ID), **auth)
    return TokenManager(config, SecretStr(secret), session, FAST_RETRY, clock=clock)


def sent(mock: aioresponses, index: int = 0) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Headers and parsed form body of the index-th POST to TOKEN_URL."""
    call = mock.requests[("POST", URL(TOKEN_URL))][index]
    return call.kwargs["headers"], parse_qs(call.kwargs["data"].decode("ascii"), keep_blank_values=True)


def grant(value: str = "tok-1", lifetime: float = 3600) -> dict[str, Any]:
    return {"access_token": value, "expires_in": lifetime, "token_type": "Bearer"}


# --- sharing, single flight and renewal ---------------------------------------------------------


async def test_64_concurrent_callers_make_one_token_request(
    session: aiohttp.ClientSession, endpoint: TokenEndpoint
) -> None:
    """Workers that all need a token at once share one request and one token."""
    endpoint.delay_s = 0.05
    manager = make_manager(session, url=endpoint.url)

    tokens = await asyncio.gather(*(manager.token() for _ in range(64)))

    assert len(endpoint.requests) == 1
    assert manager.token_requests == 1
    assert all(token is tokens[0] for token in tokens)


async def test_short_lived_token_renews_once_per_lifetime_not_in_a_loop(
    session: aiohttp.ClientSession, endpoint: TokenEndpoint
) -> None:
    """A 2 s token with a 60 s margin renews at 95% of its life: <= 11 requests in 20 s, and no token goes out
    past the middle of its margin (it may while its renewal is under way)."""
    endpoint.lifetime_s = 2
    clock = FakeClock()
    manager = make_manager(session, url=endpoint.url, clock=clock, refresh_margin_s=60)
    handed_out = 0

    async def worker() -> None:
        nonlocal handed_out
        while clock.now < 20:
            token = await manager.token()
            assert token.is_sendable_while_renewing(clock()), f"stale token handed out at {clock.now:.3f}"
            handed_out += 1
            clock.now += 0.005
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(8)))

    assert handed_out > 3000
    assert manager.token_requests == len(endpoint.requests)
    assert 10 <= manager.token_requests <= 11


async def test_token_is_reused_until_refresh_margin_before_expiry(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A 3600 s token is served until 60 s before it expires, then renewed; while the renewal is under way it is
    still served until 30 s before it expires, and after that the callers wait for the new one."""
    renewal_may_answer = asyncio.Event()

    async def answer_when_allowed(_url: URL, **_kwargs: Any) -> None:
        await renewal_may_answer.wait()

    http_mock.post(TOKEN_URL, payload=grant("tok-1"))
    http_mock.post(TOKEN_URL, payload=grant("tok-2"), callback=answer_when_allowed)
    clock = FakeClock()
    manager = make_manager(session, clock=clock, refresh_margin_s=60)

    first = await manager.token()
    clock.now = 3539.9
    assert await manager.token() is first
    clock.now = 3540.1
    assert await manager.token() is first
    await asyncio.sleep(0.01)
    assert manager.token_requests == 2  # the renewal is under way
    clock.now = 3569.9
    assert await manager.token() is first
    clock.now = 3570.1
    waiting = asyncio.create_task(manager.token())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    renewal_may_answer.set()
    second = await waiting

    assert second is not first
    assert manager.token_requests == 2


async def test_renewal_failure_keeps_serving_a_valid_token(
    session: aiohttp.ClientSession, http_mock: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """When renewal fails but the token has not expired, workers keep it and a warning says so."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1", 200))
    http_mock.post(TOKEN_URL, status=503, repeat=True)
    clock = FakeClock()
    manager = make_manager(session, clock=clock, refresh_margin_s=60)
    first = await manager.token()
    clock.now = 175  # past the middle of the margin: callers wait on the renewal

    with caplog.at_level(logging.WARNING, logger="etl.token"):
        kept = await manager.token()

    assert kept is first
    assert kept.is_valid(clock()) and not kept.is_fresh(clock())
    assert "token renewal failed, keeping the current Token(expires in 25s)" in caplog.text
    assert manager.token_requests == 1 + 4


async def test_failed_renewal_is_not_retried_on_every_call(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """After a failed renewal the kept token is served, with no request, for half its remaining life."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1", 200))
    http_mock.post(TOKEN_URL, status=400, payload={"error": "invalid_client"}, repeat=True)
    clock = FakeClock()
    manager = make_manager(session, clock=clock, refresh_margin_s=60)
    await manager.token()
    clock.now = 175
    await manager.token()
    requests_after_failure = manager.token_requests

    clock.now = 187
    await manager.token()
    assert manager.token_requests == requests_after_failure
    clock.now = 188
    await manager.token()  # still the kept token, while the renewal runs
    await asyncio.sleep(0.01)
    assert manager.token_requests == requests_after_failure + 1


async def test_a_token_kept_after_a_failed_renewal_is_served_while_the_next_renewal_runs(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A renewal failed and the token, valid 25 s more, was kept; the next renewal, past the middle of the margin,
    made every worker wait on it: the run stalled for a whole retry cycle while it still had a token to send."""
    renewal_may_answer = asyncio.Event()

    async def hang(_url: URL, **_kwargs: Any) -> None:
        await renewal_may_answer.wait()

    http_mock.post(TOKEN_URL, payload=grant("tok-1", 200))
    http_mock.post(TOKEN_URL, status=400, payload={"error": "invalid_client"})
    http_mock.post(TOKEN_URL, payload=grant("tok-2", 200), callback=hang)
    clock = FakeClock()
    manager = make_manager(session, clock=clock, refresh_margin_s=60)
    first = await manager.token()
    clock.now = 175
    assert await manager.token() is first  # the renewal failed: kept until 187.5

    clock.now = 190  # the next renewal hangs
    served = await asyncio.wait_for(manager.token(), 1)
    assert served is first
    renewal_may_answer.set()
    await asyncio.sleep(0.05)
    clock.now = 199
    assert (await manager.token()).authorization() == "Bearer tok-2"
    assert manager.token_requests == 3


async def test_renewal_failure_with_an_expired_token_raises(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """An expired token is never served: the renewal's error reaches the caller."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1", 100))
    http_mock.post(TOKEN_URL, status=400, payload={"error": "invalid_client"})
    clock = FakeClock()
    manager = make_manager(session, clock=clock)
    await manager.token()
    clock.now = 100

    with pytest.raises(AuthError) as excinfo:
        await manager.token()

    assert excinfo.value.exit_code == 3


async def test_a_failed_renewal_no_worker_waits_for_leaves_no_unretrieved_exception(session: aiohttp.ClientSession) -> None:
    """SIGTERM cancels the workers waiting on a renewal: its failure then printed 'Task exception was never retrieved'."""
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))

    async def slow_refusal(_request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.json_response({"error": "invalid_client"}, status=400)

    async with serving({("POST", "/oauth2/token"): slow_refusal}) as origin:
        manager = make_manager(session, url=f"{origin}/oauth2/token")
        waiter = asyncio.create_task(manager.token())
        await asyncio.sleep(0.01)  # the waiter started the renewal and waits on it
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.sleep(0.2)  # the renewal runs on alone, and fails
    del waiter
    gc.collect()
    assert manager.token_requests == 1
    assert not reported


async def test_invalidate_of_an_older_token_keeps_the_newer_one(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A late 401 for a token already replaced does not drop the replacement."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1"))
    http_mock.post(TOKEN_URL, payload=grant("tok-2"))
    manager = make_manager(session)
    old = await manager.token()
    await manager.invalidate(old)
    new = await manager.token()

    await manager.invalidate(old)

    assert await manager.token() is new
    assert manager.token_requests == 2


async def test_invalidate_of_the_current_token_makes_one_request_for_many_callers(
    session: aiohttp.ClientSession, endpoint: TokenEndpoint
) -> None:
    """Dropping the current token makes exactly one new request, however many workers then need one."""
    endpoint.delay_s = 0.05
    manager = make_manager(session, url=endpoint.url)
    old = await manager.token()

    await manager.invalidate(old)
    tokens = await asyncio.gather(*(manager.token() for _ in range(32)))

    assert len(endpoint.requests) == 2
    assert all(token is tokens[0] and token is not old for token in tokens)


# --- authorized(): 401 -> new token -> retry once ---------------------------------------------


async def test_authorized_retries_a_401_once_with_a_new_token(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A 401 drops the token the request carried and the request is sent again with a new one."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1"))
    http_mock.post(TOKEN_URL, payload=grant("tok-2"))
    manager = make_manager(session)
    carried: list[str] = []

    async def send(token: Token) -> str:
        carried.append(token.authorization())
        if len(carried) == 1:
            raise TokenRejected(REJECTED)
        return "page"

    assert await manager.authorized(send) == "page"
    assert carried == ["Bearer tok-1", "Bearer tok-2"]
    assert manager.token_requests == 2
    assert manager.retried_after_401 == 1


async def test_authorized_two_401s_is_auth_error_about_a_fresh_token(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A fresh token rejected too is a misconfiguration (exit 3), not something to retry forever."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1"))
    http_mock.post(TOKEN_URL, payload=grant("tok-2"))
    manager = make_manager(session)
    calls = 0

    async def send(token: Token) -> str:
        nonlocal calls
        calls += 1
        raise TokenRejected(REJECTED)

    with pytest.raises(AuthError) as excinfo:
        await manager.authorized(send)

    assert excinfo.value.exit_code == 3
    assert "rejected a freshly issued token" in str(excinfo.value)
    assert "audience" in str(excinfo.value)
    assert calls == 2
    assert manager.token_requests == 2
    assert manager.retried_after_401 == 1, "the second 401 ends the request: it is no retry"


async def test_a_token_type_other_than_bearer_is_warned_about_and_named_when_the_api_refuses_it(
    session: aiohttp.ClientSession, http_mock: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """etl sends every token as Bearer (SPEC): a "mac" or "DPoP" token went out so without a word, and the API's
    refusal was hinted at the audience and scopes only."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1") | {"token_type": "mac"}, repeat=True)
    manager = make_manager(session)

    async def send(token: Token) -> str:
        raise TokenRejected(REJECTED)

    with caplog.at_level(logging.WARNING, logger="etl.token"), pytest.raises(AuthError) as excinfo:
        await manager.authorized(send)

    assert caplog.text.count('answered token_type "mac", not Bearer') == 1, "once a run, not once a token"
    assert 'token_type "mac"' in (excinfo.value.hint or "")


async def test_a_bearer_token_type_in_any_case_is_no_warning(
    session: aiohttp.ClientSession, http_mock: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 6749 §5.1: the type is case-insensitive (Keycloak once answered "bearer"); an absent one is no warning either."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1") | {"token_type": "bearer"})
    http_mock.post(TOKEN_URL, payload={"access_token": "tok-2"})
    manager = make_manager(session)
    with caplog.at_level(logging.WARNING, logger="etl.token"):
        first = await manager.token()
        await manager.invalidate(first)
        await manager.token()
    assert "token_type" not in caplog.text


async def test_a_token_renewed_while_the_refused_request_was_in_flight_is_no_fresh_token(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """The API revokes every token it issued so far (a key rotation) while a request with tok-1 is in flight, and
    just after another worker renewed tok-1 into tok-2 at the margin. That request's 401 was retried with tok-2,
    revoked too, and the run stopped with exit 3, "the API rejected a freshly issued token": tok-2 predates the
    401, and only a token asked for after it tells whether the API refuses new tokens."""
    for value in ("tok-1", "tok-2", "tok-3"):
        http_mock.post(TOKEN_URL, payload=grant(value, 200))
    clock = FakeClock()
    manager = make_manager(session, clock=clock, refresh_margin_s=60)
    revoked: set[str] = set()
    await manager.token()

    async def send(token: Token) -> str:
        if token.authorization() == "Bearer tok-1":  # in flight while another worker renews, then the rotation
            clock.now = 175
            await manager.token()
            clock.now = 176  # the 401 comes after the renewal
            revoked.update({"Bearer tok-1", "Bearer tok-2"})
        if token.authorization() in revoked:
            raise TokenRejected(REJECTED)
        return token.authorization()

    assert await manager.authorized(send) == "Bearer tok-3"
    assert manager.token_requests == 3


async def test_a_token_asked_for_after_the_401_and_refused_too_ends_the_request(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """Only once: a token asked for after the 401 and refused as well is the API refusing this client's tokens."""
    for value in ("tok-1", "tok-2", "tok-3", "tok-4"):
        http_mock.post(TOKEN_URL, payload=grant(value, 200))
    clock = FakeClock()
    manager = make_manager(session, clock=clock, refresh_margin_s=60)
    sent: list[str] = []
    await manager.token()

    async def send(token: Token) -> str:
        sent.append(token.authorization())
        if token.authorization() == "Bearer tok-1":
            clock.now = 175
            await manager.token()
            clock.now = 176
        raise TokenRejected(REJECTED)

    with pytest.raises(AuthError, match="freshly issued token"):
        await manager.authorized(send)
    assert sent == ["Bearer tok-1", "Bearer tok-2", "Bearer tok-3"]
    assert manager.token_requests == 3


async def test_authorized_403_does_not_renew(session: aiohttp.ClientSession, http_mock: aioresponses) -> None:
    """A 403 is about permissions, not the token: it passes through untouched and no token is requested."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1"))
    manager = make_manager(session)
    forbidden = SourceError("the API at https://legacy.example.com/api/v1/orders answered 403")
    calls = 0

    async def send(token: Token) -> str:
        nonlocal calls
        calls += 1
        raise forbidden

    with pytest.raises(SourceError) as excinfo:
        await manager.authorized(send)

    assert excinfo.value is forbidden
    assert calls == 1
    assert manager.token_requests == 1


# --- the token request (RFC 6749 §4.4.2, §2.3.1) -------------------------------------------------


async def test_request_is_a_form_urlencoded_post_of_client_credentials(
    session: aiohttp.ClientSession, endpoint: TokenEndpoint
) -> None:
    """On the wire: POST, Content-Type application/x-www-form-urlencoded, grant_type=client_credentials."""
    await make_manager(session, url=endpoint.url, scopes=["legacy-api/read"]).token()

    request = endpoint.requests[0]
    assert request["method"] == "POST"
    assert request["content_type"] == FORM
    assert request["form"] == {"grant_type": "client_credentials", "scope": "legacy-api/read"}
    assert request["headers"]["Authorization"] == f"Basic {BASIC_VALUE}"


async def test_basic_auth_urlencodes_id_and_secret_before_base64(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """RFC 6749 §2.3.1: "a:b" and "s p+/=~" become base64("a%3Ab:s+p%2B%2F%3D%7E")."""
    http_mock.post(TOKEN_URL, payload=grant())

    await make_manager(session, client_id="a:b", secret="s p+/=~").token()

    headers, form = sent(http_mock)
    assert headers["Authorization"] == "Basic YSUzQWI6cytwJTJCJTJGJTNEJTdF"
    assert "client_id" not in form and "client_secret" not in form


async def test_body_auth_sends_form_fields_and_no_authorization_header(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """client_auth = "body" puts the credentials in the form, and only there."""
    http_mock.post(TOKEN_URL, payload=grant())

    await make_manager(session, client_id="a:b", secret="s p+/=", client_auth="body").token()

    headers, form = sent(http_mock)
    assert "Authorization" not in headers
    assert form["client_id"] == ["a:b"]
    assert form["client_secret"] == ["s p+/="]
    assert form["grant_type"] == ["client_credentials"]
    assert headers["Content-Type"] == FORM


async def test_scopes_are_one_space_separated_field(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """Several scopes go out as a single `scope` field joined by spaces."""
    http_mock.post(TOKEN_URL, payload=grant())

    await make_manager(session, scopes=["legacy-api/read", "legacy-api/write"]).token()

    _, form = sent(http_mock)
    assert form["scope"] == ["legacy-api/read legacy-api/write"]


async def test_no_scope_field_without_scopes(session: aiohttp.ClientSession, http_mock: aioresponses) -> None:
    """No configured scopes means no `scope` field at all (the app client's defaults apply)."""
    http_mock.post(TOKEN_URL, payload=grant())

    await make_manager(session, scopes=[]).token()

    _, form = sent(http_mock)
    assert form == {"grant_type": ["client_credentials"]}


# --- the token endpoint's answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "hint"),
    [
        (400, "invalid_client", 'auth.client_auth = "body"'),
        (400, "invalid_scope", "resource-server-id/scope-name"),
        (400, "unauthorized_client", "client credentials grant"),
        (400, "invalid_grant", "allowed flows"),
        (401, "unsupported_grant_type", "grant_type=client_credentials"),
    ],
)
async def test_endpoint_refusals_are_auth_errors_quoting_the_endpoint(
    session: aiohttp.ClientSession, http_mock: aioresponses, status: int, error: str, hint: str
) -> None:
    """The endpoint's error and error_description are quoted verbatim with the URL and a hint, exit 3."""
    description = 'Client "etl-client" is not <allowed> here'
    http_mock.post(TOKEN_URL, status=status, payload={"error": error, "error_description": description})
    manager = make_manager(session)

    with pytest.raises(AuthError) as excinfo:
        await manager.token()

    message = str(excinfo.value)
    assert excinfo.value.exit_code == 3
    assert TOKEN_URL in message
    assert f'"{error}"' in message and f'"{description}"' in message
    assert hint in (excinfo.value.hint or "")
    assert manager.token_requests == 1


@pytest.mark.parametrize(
    ("status", "payload"),
    [(404, None), (405, None), (400, {"error": "invalid_request", "error_description": "unsupported content type"})],
)
async def test_method_or_content_type_problems_get_a_method_hint(
    session: aiohttp.ClientSession, http_mock: aioresponses, status: int, payload: dict[str, str] | None
) -> None:
    """404, 405 and invalid_request say etl sent the form POST a token endpoint takes, and point at auth.token_url
    (the hint said the endpoint "wants POST", as if etl had sent something else)."""
    http_mock.post(TOKEN_URL, status=status, payload=payload)

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    hint = excinfo.value.hint or ""
    assert excinfo.value.exit_code == 3
    assert "POST" in hint and FORM in hint and "/oauth2/token" in hint and "auth.token_url" in hint
    assert "wants" not in hint
    assert str(status) in str(excinfo.value)


async def test_a_token_endpoint_failing_on_its_side_every_time_says_so_with_its_words(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A 500 on every attempt ended the run with "the token endpoint ... answered 500" and nothing more: not the
    endpoint's own words, nor whether the config could be at fault (exit 1, as a failed run; not 3 nor 5)."""
    for _ in range(4):
        http_mock.post(TOKEN_URL, status=500, body='{"code":"InternalErrorException","message":"An error occurred"}')

    with pytest.raises(TokenEndpointFailed) as excinfo:
        await make_manager(session).token()

    assert excinfo.value.exit_code == 1
    assert "InternalErrorException" in str(excinfo.value)
    assert "on its side" in (excinfo.value.hint or "") and "auth.token_url" in (excinfo.value.hint or "")


async def test_503_twice_then_200_succeeds_counting_every_attempt(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """Transient 5xx answers are retried, and each attempt counts as a token request."""
    http_mock.post(TOKEN_URL, status=503)
    http_mock.post(TOKEN_URL, status=503)
    http_mock.post(TOKEN_URL, payload=grant())
    manager = make_manager(session)

    token = await manager.token()

    assert token.authorization() == "Bearer tok-1"
    assert manager.token_requests == 3


async def test_429_retry_after_is_honoured(session: aiohttp.ClientSession, http_mock: aioresponses) -> None:
    """A 429's Retry-After replaces the (here 10 ms) backoff."""
    http_mock.post(TOKEN_URL, status=429, headers={"Retry-After": "1"})
    http_mock.post(TOKEN_URL, payload=grant())
    manager = make_manager(session)

    started = time.monotonic()
    await manager.token()

    assert time.monotonic() - started >= 0.95
    assert manager.token_requests == 2


async def test_connection_reset_is_retried(session: aiohttp.ClientSession, http_mock: aioresponses) -> None:
    """A dropped connection is transient: the next attempt gets the token."""
    http_mock.post(TOKEN_URL, exception=aiohttp.ServerDisconnectedError())
    http_mock.post(TOKEN_URL, payload=grant())
    manager = make_manager(session)

    await manager.token()

    assert manager.token_requests == 2


async def test_a_token_endpoint_that_times_out_is_named_without_words_about_pages(http_mock: aioresponses) -> None:
    """It read 'the token endpoint URL: timed out waiting for URL: ... raise it if pages are large', then named
    the key without its value."""
    http_mock.post(TOKEN_URL, exception=TimeoutError(), repeat=True)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=7)) as session:
        with pytest.raises(TokenEndpointFailed) as excinfo:
            await make_manager(session).token()

    assert str(excinfo.value) == (
        f"the token endpoint {TOKEN_URL} did not answer within 7s ([api].timeout_s) (gave up after 4 attempts, [api].max_retries = 3)"
    )


async def test_5xx_after_all_retries_is_not_an_auth_error(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """An endpoint that keeps failing is a transient failure (exit 1), not a refusal of our credentials; after all
    its retries, final for the run (TokenEndpointFailed stops it), since every worker needs the token."""
    http_mock.post(TOKEN_URL, status=502, repeat=True)
    manager = make_manager(session)

    with pytest.raises(TokenEndpointFailed) as excinfo:
        await manager.token()

    assert excinfo.value.exit_code == 1
    assert "502" in str(excinfo.value)
    assert manager.token_requests == 4


async def test_unreachable_token_host_is_exit_5(session: aiohttp.ClientSession) -> None:
    """A refused connection is retried, then reported as the host being unreachable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = make_manager(session, url=f"http://127.0.0.1:{port}/oauth2/token")

    with pytest.raises(ConnectionFailed) as excinfo:
        await manager.token()

    assert excinfo.value.exit_code == 5
    assert manager.token_requests == 4


async def test_non_json_200_is_auth_error_with_its_first_bytes(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A 200 that is not JSON (a login page, a proxy) is shown by status and its first 200 characters."""
    body = "<html><title>Sign in</title>" + "x" * 400
    http_mock.post(TOKEN_URL, status=200, body=body, content_type="text/html")

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    message = str(excinfo.value)
    assert excinfo.value.exit_code == 3
    assert "200" in message
    assert body[:200] in message and body[:201] not in message


async def test_200_without_access_token_is_auth_error(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A JSON 200 without access_token is malformed, named by its fields (not values, which may be secret)."""
    http_mock.post(TOKEN_URL, payload={"id_token": "eyJ-not-for-us", "expires_in": 3600})

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    message = str(excinfo.value)
    assert "access_token" in message and "expires_in, id_token" in message
    assert "eyJ-not-for-us" not in message


async def test_200_with_an_oauth_error_quotes_the_error_and_its_description(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """Some gateways answer 200 with the endpoint's refusal: it showed only 'fields: error, error_description'."""
    http_mock.post(TOKEN_URL, payload={"error": "invalid_client", "error_description": "Client secret expired"})

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    assert 'refused the request (200): error "invalid_client", error_description "Client secret expired"' in str(excinfo.value)
    assert excinfo.value.hint is not None and "auth.client_id" in excinfo.value.hint


async def test_a_token_with_a_control_character_is_auth_error_not_a_traceback(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """aiohttp refuses CR or LF in a header: the first API request ended in a ValueError traceback."""
    http_mock.post(TOKEN_URL, payload={"access_token": "abc\r\nX-Injected: 1", "expires_in": 3600})

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    assert "access_token that holds a control character" in str(excinfo.value)
    assert "X-Injected" not in str(excinfo.value)


async def test_an_error_etl_has_no_hint_for_is_quoted_whole(session: aiohttp.ClientSession, http_mock: aioresponses) -> None:
    """A 403 access_denied showed the raw body, cut at 200 characters: the end of error_description was lost."""
    description = "Client is disabled by policy " + "x" * 250 + " contact the pool administrator"
    http_mock.post(TOKEN_URL, status=403, payload={"error": "access_denied", "error_description": description})

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    assert f'refused the request (403): error "access_denied", error_description "{description}"' in str(excinfo.value)


async def test_other_4xx_is_auth_error_with_status_and_body(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """A 4xx without a recognised OAuth error is still the endpoint refusing us: status and first bytes."""
    http_mock.post(TOKEN_URL, status=403, body="Forbidden by WAF rule 17")

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    assert "403" in str(excinfo.value) and "Forbidden by WAF rule 17" in str(excinfo.value)


@pytest.mark.parametrize("expires_in", [True, "inf", "NaN", 0, -5, "soon"])
async def test_an_expires_in_that_is_not_a_lifetime_is_refused(
    session: aiohttp.ClientSession, http_mock: aioresponses, expires_in: Any
) -> None:
    """`true` read as 1 second, and "inf" as a token never renewed: both are answers to refuse, naming the field."""
    http_mock.post(TOKEN_URL, payload={"access_token": "tok", "expires_in": expires_in})

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    assert "expires_in" in str(excinfo.value)
    assert "check that auth.token_url is the token endpoint" in str(excinfo.value), "check's hint, in sync too"


async def test_a_bare_401_gets_the_credentials_hint(session: aiohttp.ClientSession, http_mock: aioresponses) -> None:
    """RFC 6749 §5.2: 401 is a client that failed to authenticate, even with an empty body and only WWW-Authenticate."""
    http_mock.post(TOKEN_URL, status=401, body="", headers={"WWW-Authenticate": "Basic"})

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    assert excinfo.value.exit_code == 3 and "401" in str(excinfo.value)
    assert "auth.client_id" in (excinfo.value.hint or "")


async def test_a_redirect_names_where_it_leads(session: aiohttp.ClientSession, http_mock: aioresponses) -> None:
    """A 301 (http:// to https://, a moved domain) says where to, and that auth.token_url should be that address."""
    http_mock.post(TOKEN_URL, status=301, headers={"Location": "https://login.example.com/oauth2/token"})

    with pytest.raises(AuthError) as excinfo:
        await make_manager(session).token()

    assert "a redirect to https://login.example.com/oauth2/token" in str(excinfo.value)
    assert "auth.token_url" in (excinfo.value.hint or "")


# --- logs and secrets ----------------------------------------------------------------------------


async def test_obtaining_a_token_is_logged_with_host_and_lifetime(
    session: aiohttp.ClientSession, http_mock: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """One INFO line says where the token came from and how long it lives."""
    http_mock.post(TOKEN_URL, payload=grant("tok-1", 3600))

    with caplog.at_level(logging.INFO, logger="etl.token"):
        await make_manager(session).token()

    assert "token obtained from my-pool.auth.us-east-1.amazoncognito.com, lifetime 3600s" in caplog.messages


async def test_no_secret_or_token_in_logs_of_a_successful_flow(
    session: aiohttp.ClientSession, http_mock: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """Obtaining, retrying, invalidating and renewing log nothing secret."""
    caplog.set_level(logging.DEBUG)
    http_mock.post(TOKEN_URL, status=503)
    http_mock.post(TOKEN_URL, payload=grant("tok-SECRET-1"))
    http_mock.post(TOKEN_URL, payload=grant("tok-SECRET-2"))
    manager = make_manager(session)
    carried: list[Token] = []

    async def send(token: Token) -> None:
        carried.append(token)
        if len(carried) == 1:
            raise TokenRejected("401")

    await manager.authorized(send)

    assert caplog.text
    for secret in (SECRET, BASIC_VALUE, "tok-SECRET"):
        assert secret not in caplog.text


async def test_no_secret_or_token_in_logs_and_errors_of_a_failing_flow(
    session: aiohttp.ClientSession, http_mock: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed renewal, a refused client and a rejected fresh token reveal neither secret nor token."""
    caplog.set_level(logging.DEBUG)
    http_mock.post(TOKEN_URL, payload=grant("tok-SECRET-1", 200))
    http_mock.post(TOKEN_URL, status=503, repeat=4)
    refusal = {"error": "invalid_client", "error_description": "bad secret"}
    http_mock.post(TOKEN_URL, status=400, payload=refusal)
    http_mock.post(TOKEN_URL, payload=grant("tok-SECRET-2", 100))
    http_mock.post(TOKEN_URL, payload=grant("tok-SECRET-3", 100))
    clock = FakeClock()
    manager = make_manager(session, clock=clock)
    await manager.token()
    clock.now = 175
    await manager.token()  # renewal fails, the valid token is kept
    clock.now = 200
    with pytest.raises(AuthError) as refused:
        await manager.token()

    async def send(token: Token) -> None:
        raise TokenRejected("401")

    with pytest.raises(AuthError) as rejected:
        await manager.authorized(send)

    texts = [caplog.text, str(refused.value), repr(refused.value), str(rejected.value), repr(rejected.value)]
    assert "keeping the current" in caplog.text
    for text in texts:
        for secret in (SECRET, BASIC_VALUE, "tok-SECRET"):
            assert secret not in text


async def test_token_and_manager_reprs_hide_the_values(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """repr() and str() of a Token show only its remaining life; the manager's show no secret."""
    http_mock.post(TOKEN_URL, payload=grant("tok-SECRET-1", 3600))
    clock = FakeClock()
    manager = make_manager(session, clock=clock)
    token = await manager.token()
    clock.now = 1

    assert repr(token) == str(token) == f"{token}" == "Token(expires in 3599s)"
    for text in (repr(manager), str(manager)):
        assert SECRET not in text and BASIC_VALUE not in text and "tok-SECRET" not in text
        assert TOKEN_URL in text


@pytest.mark.parametrize(
    ("lifetime", "margin", "expected"),
    [(3600, 60, 3540), (300, 60, 240), (120, 60, 60), (2, 60, 1.9), (2, 0, 2)],
)
def test_refresh_point_honours_margin_and_never_precedes_half_life(lifetime: float, margin: float, expected: float) -> None:
    """The margin is honoured when it fits in half the lifetime; otherwise renewal is at 95%, never before half."""
    assert refresh_after(lifetime, margin) == pytest.approx(expected)
    assert refresh_after(lifetime, margin) >= lifetime / 2


async def test_a_secret_echoed_across_the_excerpts_cut_is_masked_whole(
    session: aiohttp.ClientSession, http_mock: aioresponses
) -> None:
    """The answer was cut to 200 characters before the secret was masked: one echoed across the cut kept its start."""
    http_mock.post(TOKEN_URL, status=400, body="x" * 180 + f" secret {SECRET} is not valid")
    manager = make_manager(session, client_auth="body")
    with pytest.raises(AuthError) as refused:
        await manager.token()
    assert SECRET[:8] not in refused.value.message and "***" in refused.value.message
