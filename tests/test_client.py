"""etl.client and etl.transport: one GET, its retries, its verdict, its share of concurrency and rate.

Answers are scripted with aioresponses (`http_mock`); what needs a real socket
(refused connections, DNS, requests in flight) runs against a closed port or
the bundled simulator. Backoff is a millisecond, so retries cost no time.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, ContentLengthError, HttpProcessingError
from aioresponses import aioresponses
from loopback import serving
from multidict import CIMultiDict
from pydantic import SecretStr
from tenacity import RetryCallState
from yarl import URL

import etl
from etl.client import ApiClient, PageRequest, RequestCounters, rate_limiter, same_site
from etl.config import ApiConfig, AuthConfig
from etl.errors import (
    AuthError,
    ConnectionFailed,
    RetryableError,
    SourceError,
    TokenEndpointFailed,
    UnreachableError,
)
from etl.simulator import Faults, Simulator, SimulatorSettings
from etl.token import TokenManager
from etl.transport import RetryPolicy, display_url, open_session, retry_after_seconds, translate

BASE = "https://api.example.test/api/v1"
TOKEN_URL = "https://auth.example.test/oauth2/token"
PAGE = BASE + "/orders?page=1"
OK = {"data": [{"id": 1}]}
MakeClient = Callable[..., tuple[ApiClient, RequestCounters]]


@pytest.fixture
async def make_client(http_mock: aioresponses) -> AsyncIterator[MakeClient]:
    """`make_client(**api)`: the real client with a mocked token endpoint, and its counters."""
    http_mock.post(TOKEN_URL, payload={"access_token": "token-abcdef", "expires_in": 3600}, repeat=True)
    sessions: list[aiohttp.ClientSession] = []

    def make(**api: Any) -> tuple[ApiClient, RequestCounters]:
        config = ApiConfig(base_url=BASE, **{"retry_backoff_s": 0.001, "max_retries": 2, **api})
        session = open_session(config)
        sessions.append(session)
        return _client(config, session, TOKEN_URL)

    yield make
    for session in sessions:
        await session.close()


def _client(
    api: ApiConfig, session: aiohttp.ClientSession, token_url: str
) -> tuple[ApiClient, RequestCounters]:
    """The client as the pipeline builds it (the simulator's demo credentials), and its counters."""
    auth = AuthConfig(token_url=token_url, client_id="demo-client", scopes=["legacy-api/read"])
    tokens = TokenManager(auth, SecretStr("demo-secret"), session, RetryPolicy.from_api(api))
    counters = RequestCounters()
    return ApiClient(api, session, tokens, counters), counters


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cut_body(cause: HttpProcessingError) -> aiohttp.ClientPayloadError:
    """A ClientPayloadError as aiohttp raises it from its parser: the parser's error is the cause."""
    error = aiohttp.ClientPayloadError(f"Response payload is not completed: {cause!r}")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500},
        {"status": 502},
        {"status": 503},
        {"status": 504},
        {"status": 429, "headers": {"Retry-After": "0"}},
        {"exception": TimeoutError()},
        {"exception": aiohttp.ServerDisconnectedError()},
        {"exception": aiohttp.ClientOSError(104, "Connection reset by peer")},
        {"exception": aiohttp.ClientPayloadError("Response payload is not completed")},
        {"status": 200, "body": '{"data": [{"id": 1}, {"id"', "content_type": "application/json"},
        {"status": 200, "body": b'{"data": [{"name": "caf\xc3', "content_type": "application/json"},
    ],
    ids=[
        "500", "502", "503", "504", "429", "timeout", "disconnect", "reset", "cut-body", "truncated-json",
        "truncated-in-a-character",
    ],
)
async def test_transient_failures_are_retried(
    http_mock: aioresponses, make_client: MakeClient, failure: dict[str, Any]
) -> None:
    """5xx, 429, timeouts, resets and cut-off bodies get another attempt, which succeeds."""
    client, counters = make_client()
    http_mock.get(PAGE, **failure)
    http_mock.get(PAGE, payload=OK)
    response = await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert response.body == OK
    assert (counters.requests, counters.retries) == (2, 1)


async def test_after_max_retries_the_last_error_is_raised(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """503 every time: max_retries + 1 attempts, then the last answer as a RetryableError (exit 1)."""
    client, counters = make_client(max_retries=3)
    http_mock.get(PAGE, status=503, body="down for now", repeat=True)
    with pytest.raises(
        RetryableError, match="503 from https://api.example.test/api/v1/orders.*down for now"
    ) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert counters.requests == 4
    assert raised.value.exit_code == 1
    # the final error alone (etl_runs.error, the summary) read as if the request had been tried once
    assert raised.value.message.endswith("(gave up after 4 attempts, [api].max_retries = 3)")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"body": "<html><body>Maintenance</body></html>", "content_type": "text/html"}, "is HTML, not JSON"),
        ({"body": "  <!DOCTYPE html><html></html>", "content_type": "application/json"}, "is HTML, not JSON"),
        ({"body": "Service OK", "content_type": "text/plain"}, "is not JSON: Service OK"),
        ({"body": "", "content_type": "application/json"}, r"is not JSON: \(empty body\)"),
        (
            {"body": '{"data": [é]}'.encode("latin-1"), "content_type": "application/json"},  # in a string, a reject
            r"is not UTF-8 \(invalid continuation byte at byte 10\): .* must declare it",
        ),
        (
            {"body": b'{"data": []}', "content_type": "application/json; charset=x-klingon"},
            "declares charset=x-klingon, which is not a known character set",
        ),
    ],
    ids=["html", "html-labelled-json", "text", "empty", "not-utf-8", "unknown-charset"],
)
async def test_a_200_that_is_not_json_is_an_error_not_an_empty_page(
    http_mock: aioresponses, make_client: MakeClient, answer: dict[str, Any], message: str
) -> None:
    """HTML or other non-JSON with status 200 fails at once, naming what came back; it is not retried."""
    client, counters = make_client()
    http_mock.get(PAGE, status=200, **answer)
    with pytest.raises(SourceError, match=message) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert not isinstance(raised.value, RetryableError)
    assert counters.requests == 1


@pytest.mark.parametrize(
    ("headers", "accept"),
    [({}, "application/json"), ({"accept": "application/vnd.api+json"}, "application/vnd.api+json"), ({"X-Tenant": "7"}, "application/json")],
    ids=["default", "configured", "other-header"],
)
async def test_an_accept_header_in_the_config_is_the_one_sent(
    http_mock: aioresponses, make_client: MakeClient, headers: dict[str, str], accept: str
) -> None:
    """etl asks for JSON unless [api].headers names its own Accept, which it used to replace without a word."""
    http_mock.get(PAGE, payload=OK)
    client, _ = make_client(headers=headers)
    await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    sent = next(call for (method, _url), calls in http_mock.requests.items() if method == "GET" for call in calls)
    assert [value for name, value in sent.kwargs["headers"].items() if name.lower() == "accept"] == [accept]
    assert all(sent.kwargs["headers"].get(name) == value for name, value in headers.items())


async def test_a_204_is_a_page_without_a_body(http_mock: aioresponses, make_client: MakeClient) -> None:
    """204 No Content is how some APIs say "no records": body None, not "is not JSON: (empty body)"."""
    client, counters = make_client()
    http_mock.get(PAGE, status=204, body="")
    response = await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert (response.status, response.body) == (204, None)
    assert counters.requests == 1


async def test_a_json_number_with_more_digits_than_a_float_holds_comes_back_exact(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """orjson alone read 12345678901234.567 as 12345678901234.566, which a decimal column then stored."""
    client, _ = make_client()
    http_mock.get(PAGE, body=b'{"data": [{"id": 1, "total": 12345678901234.567}]}', content_type="application/json")
    response = await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert response.body["data"][0]["total"] == Decimal("12345678901234.567")


async def test_a_body_in_its_declared_charset_is_read_with_every_digit(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """charset=ISO-8859-1 with an é was retried as 'cut short' and failed; long numbers stay exact in it too."""
    client, counters = make_client()
    body = '{"data": [{"name": "Café", "total": 12345678901234.567}]}'.encode("latin-1")
    http_mock.get(PAGE, body=body, content_type="application/json; charset=ISO-8859-1")
    response = await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert response.body["data"][0] == {"name": "Café", "total": Decimal("12345678901234.567")}
    assert counters.requests == 1


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_a_client_error_fails_fast_with_the_url_and_the_first_bytes(
    http_mock: aioresponses, make_client: MakeClient, status: int
) -> None:
    """A 4xx is not retried; the message has the URL, credentials masked, and the body's first 200 bytes."""
    client, counters = make_client()
    body = "unknown field 'updated_since'" + "x" * 300
    http_mock.get(BASE + "/orders?api_key=K3y-v4lue-123&page=1", status=status, body=body, repeat=True)
    with pytest.raises(SourceError) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1", "api_key": "K3y-v4lue-123"}))
    message = raised.value.message
    assert f"{status} from https://api.example.test/api/v1/orders?api_key=***&page=1" in message
    assert "unknown field 'updated_since'" in message and message.endswith("x…")
    assert "K3y-v4lue-123" not in message and len(message) < 400
    assert counters.requests == 1


async def test_a_403_points_at_the_scopes_with_the_apis_challenge(http_mock: aioresponses, make_client: MakeClient) -> None:
    """A sync that met a 403 said only '403 from URL: {"message": "Forbidden"}': nothing about auth.scopes."""
    client, _ = make_client()
    challenge = 'Bearer error="insufficient_scope", scope="legacy-api/orders.read"'
    http_mock.get(PAGE, status=403, payload={"message": "Forbidden"}, headers={"WWW-Authenticate": challenge})
    with pytest.raises(SourceError) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert raised.value.hint is not None and "auth.scopes" in raised.value.hint
    assert f"WWW-Authenticate: {challenge}" in raised.value.hint


@pytest.mark.parametrize(
    ("status", "headers", "hinted"),
    [
        (405, {"Allow": "POST"}, ["GET", "Allow: POST", "path"]),
        (410, {}, ["[api].base_url", "version", "path"]),
        (414, {}, ["params", "list"]),
        (431, {}, ["[api].headers"]),
    ],
)
async def test_a_refusal_whose_cause_the_status_names_has_a_hint(
    http_mock: aioresponses, make_client: MakeClient, status: int, headers: dict[str, str], hinted: list[str]
) -> None:
    """A 405, 410, 414 or 431 in cron's log said only '<status> from URL: <body>', no word of what to change."""
    client, _ = make_client()
    http_mock.get(PAGE, status=status, payload={"message": "no"}, headers=headers)
    with pytest.raises(SourceError) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert raised.value.hint is not None and all(word in raised.value.hint for word in hinted), raised.value.hint


@pytest.mark.parametrize(
    ("headers", "sent"), [({}, "application/json"), ({"accept": "application/vnd.legacy.v2+json"}, "application/vnd.legacy.v2+json")]
)
async def test_a_406_names_the_accept_that_was_sent(
    http_mock: aioresponses, make_client: MakeClient, headers: dict[str, str], sent: str
) -> None:
    """With an Accept of its own in [api].headers, a 406's hint said etl had asked for application/json."""
    client, _ = make_client(headers=headers)
    http_mock.get(PAGE, status=406, payload={"message": "Not Acceptable"})
    with pytest.raises(SourceError) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert raised.value.hint is not None and f"(Accept: {sent})" in raised.value.hint, raised.value.hint


async def test_a_fresh_token_refused_twice_quotes_the_apis_challenge(http_mock: aioresponses, make_client: MakeClient) -> None:
    """The API's WWW-Authenticate says why it refuses a token (a wrong audience, an expired key); it was dropped."""
    client, _ = make_client()
    challenge = 'Bearer error="invalid_token", error_description="Invalid audience"'
    http_mock.get(PAGE, status=401, payload={"message": "Unauthorized"}, headers={"WWW-Authenticate": challenge}, repeat=True)
    with pytest.raises(AuthError) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert f"the API refused the token (WWW-Authenticate: {challenge})" in raised.value.message


async def test_a_renewal_after_a_401_that_fails_is_not_retried_again_per_request(http_mock: aioresponses) -> None:
    """The token endpoint down after the API refused a token: its retries ran twice, and counted as API retries."""
    http_mock.post(TOKEN_URL, payload={"access_token": "token-abcdef", "expires_in": 3600})
    http_mock.post(TOKEN_URL, status=503, repeat=True)
    http_mock.get(PAGE, status=401, repeat=True)
    config = ApiConfig(base_url=BASE, retry_backoff_s=0.001, max_retries=2)
    async with open_session(config) as session:
        client, counters = _client(config, session, TOKEN_URL)
        with pytest.raises(TokenEndpointFailed, match="answered 503"):
            await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert len(http_mock.requests[("POST", URL(TOKEN_URL))]) == 1 + 3  # the first token, then one renewal of 3 attempts
    assert counters.retries == 0


def test_display_url_drops_user_info_and_masks_credential_parameters() -> None:
    """Secrets in a URL never reach a message; pagination tokens stay readable for debugging."""
    url = (
        "https://user:pw@api.example.test/v1/x?api_key=A&access_token=B&client_secret=C&page=2&page_token=abc"
    )
    assert display_url(url) == (
        "https://api.example.test/v1/x?api_key=***&access_token=***&client_secret=***&page=2&page_token=abc"
    )


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    """Delta-seconds, an HTTP date 30 s ahead, a date in the past, and nonsense."""
    in_30s = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds("7") == 7.0
    assert 28 <= (retry_after_seconds(in_30s) or 0) <= 30
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") is None  # nothing to wait for: the backoff applies
    assert retry_after_seconds("soon") is None


def _wait_after(policy: RetryPolicy, error: BaseException) -> float:
    """The pause tenacity would take after `error` on a first attempt."""
    retrying = policy.retrying()
    state = RetryCallState(retrying, None, (), {})
    state.set_exception((type(error), error, None))
    return float(retrying.wait(state))


def test_retry_after_is_honoured_and_capped() -> None:
    """The server's Retry-After is the pause, cut to retry_after_max_s; without it, jittered backoff."""
    policy = RetryPolicy(max_retries=3, backoff_s=0.5, retry_after_max_s=20)
    in_30s = retry_after_seconds(format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True))
    assert _wait_after(policy, RetryableError("429", retry_after=5)) == 5
    assert _wait_after(policy, RetryableError("429", retry_after=in_30s)) == 20
    assert 0 <= _wait_after(policy, RetryableError("503")) <= 0.5


async def test_a_429_with_a_far_retry_after_date_waits_only_the_cap(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """Retry-After as an HTTP date an hour ahead, retry_after_max_s = 0.05: the request succeeds at once."""
    client, counters = make_client(retry_after_max_s=0.05)
    in_an_hour = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    http_mock.get(PAGE, status=429, headers={"Retry-After": in_an_hour})
    http_mock.get(PAGE, payload=OK)
    started = time.monotonic()
    await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert time.monotonic() - started < 1
    assert counters.retries == 1


async def test_a_retry_after_holds_new_requests_and_the_retry_owed_goes_first(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """concurrency = 1: a 429's Retry-After (capped at 0.4 s) holds a new request too, which waits without
    holding the only slot (else the retry could never be sent) and goes once the retry is answered."""
    client, _ = make_client(concurrency=1, retry_after_max_s=0.4)
    http_mock.get(BASE + "/slow", status=429, headers={"Retry-After": "5"})
    http_mock.get(BASE + "/slow", payload=OK)
    http_mock.get(BASE + "/fast", payload=OK)
    slow = asyncio.create_task(client.get(PageRequest(BASE + "/slow")))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await client.get(PageRequest(BASE + "/fast"))
    assert slow.done() and 0.3 < time.monotonic() - started < 1
    await slow


async def test_the_rate_limit_applies_to_every_attempt(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """requests_per_second = 20 and four 503s before a 200: five attempts take at least 0.2 s."""
    client, counters = make_client(requests_per_second=20, max_retries=5)
    for _ in range(4):
        http_mock.get(PAGE, status=503)
    http_mock.get(PAGE, payload=OK)
    started = time.monotonic()
    await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert time.monotonic() - started >= 0.19
    assert counters.requests == 5


async def test_the_rate_limit_spaces_requests_without_a_burst(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """11 concurrent requests at 20 per second span at least half a second, across all callers."""
    client, _ = make_client(requests_per_second=20, concurrency=16)
    http_mock.get(PAGE, payload=OK, repeat=True)
    started = time.monotonic()
    await asyncio.gather(*(client.get(PageRequest(BASE + "/orders", {"page": "1"})) for _ in range(11)))
    assert time.monotonic() - started >= 0.48


async def test_a_rate_below_one_per_second_is_accepted() -> None:
    """requests_per_second = 0.5 means one request every two seconds, and the first goes at once."""
    limiter = rate_limiter(0.5)
    assert limiter is not None
    await asyncio.wait_for(limiter.acquire(), 0.5)
    assert not limiter.has_capacity()
    assert rate_limiter(0) is None


async def test_a_failing_token_endpoint_is_not_retried_again_per_request(http_mock: aioresponses) -> None:
    """The token manager retries its endpoint; the client does not multiply those attempts."""
    http_mock.post(TOKEN_URL, status=503, repeat=True)
    api = ApiConfig(base_url=BASE, retry_backoff_s=0.001, max_retries=2)
    async with open_session(api) as session:
        client, counters = _client(api, session, TOKEN_URL)
        with pytest.raises(TokenEndpointFailed, match="the token endpoint .* answered 503"):
            await client.get(PageRequest(BASE + "/orders"))
    assert len(http_mock.requests[("POST", URL(TOKEN_URL))]) == 3
    assert counters.requests == 0


async def test_next_link_reads_rfc_8288_rel_lists_and_resolves_relative_urls(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """rel="next" among other links, as one of several rel types, any case; resolved against the page URL."""
    client, _ = make_client()
    link = '<https://api.example.test/api/v1/orders?page=0>; rel="prev", <?page=2>; REL="Next Last"; title'
    http_mock.get(PAGE, payload=[], headers={"Link": link})
    response = await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert response.next_link == BASE + "/orders?page=2"


@pytest.mark.parametrize(
    ("links", "expected"),
    [
        (['<?page=2>; title="next page, please"; rel="next"'], "?page=2"),
        (['<?page=0>; title="a; rel=next"; rel="prev", <?page=2>; rel=next'], "?page=2"),
        ([r'<?page=2>; title="say \"hi\", then; go"; rel="next"'], "?page=2"),
        (['<?page=0>; rel="prev"; title="see, <?page=9>; rel=next", <?page=2>; rel="next"'], "?page=2"),
        (['<?page=0>; rel="prev"', '<?page=2>; rel="next last"'], "?page=2"),
        (['junk; rel="next", <http://[::1/x>; rel="next", <?page=2>; rel="next"'], "?page=2"),
        (['<?page=0>; rel="prev"; title="rel=next"', '<?page=3>; rel="nextpage"'], None),
    ],
    ids=["comma-in-title", "semicolon-in-title", "escaped-quote", "link-in-title", "two-headers", "malformed", "no-next"],
)
async def test_next_link_is_not_fooled_by_quoted_parameters(
    http_mock: aioresponses, make_client: MakeClient, links: list[str], expected: str | None
) -> None:
    """A comma, a semicolon or a link inside a quoted value hid rel="next": a run stopped after one page, exit 0."""
    client, _ = make_client()
    http_mock.get(PAGE, payload=[], headers=CIMultiDict(("Link", link) for link in links))
    response = await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert response.next_link == (expected and BASE + "/orders" + expected)


async def test_a_refused_connection_is_retried_then_exit_5() -> None:
    """Nothing listens on the API port: every attempt is made, then ConnectionFailed naming host and port."""
    port = _free_port()
    async with Simulator() as sim:
        api = ApiConfig(base_url=f"http://127.0.0.1:{port}/api/v1", retry_backoff_s=0.001, max_retries=2)
        async with open_session(api) as session:
            client, counters = _client(api, session, sim.token_url)
            with pytest.raises(ConnectionFailed) as raised:
                await client.get(PageRequest(api.base_url + "/orders"))
    assert counters.requests == 3
    assert raised.value.exit_code == 5
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in str(raised.value)


async def test_a_dns_failure_is_not_retried_and_exits_5() -> None:
    """An unresolvable API host fails on the first attempt with exit 5 and the host's name."""
    async with Simulator() as sim:
        api = ApiConfig(base_url="http://no-such-host.invalid/api/v1", retry_backoff_s=0.001, max_retries=3)
        async with open_session(api) as session:
            client, counters = _client(api, session, sim.token_url)
            with pytest.raises(UnreachableError, match="DNS: the name no-such-host.invalid") as raised:
                await client.get(PageRequest(api.base_url + "/orders"))
    assert not isinstance(raised.value, ConnectionFailed)
    assert raised.value.exit_code == 5
    assert counters.requests == 1


async def test_requests_in_flight_never_exceed_concurrency() -> None:
    """30 simultaneous GETs with concurrency = 3 against the simulator: it sees 3 at a time, never more."""
    async with Simulator(SimulatorSettings(faults=Faults(delay_ms=20))) as sim:
        api = ApiConfig(base_url=sim.base_url, concurrency=3)
        async with open_session(api) as session:
            client, _ = _client(api, session, sim.token_url)
            requests = [PageRequest(sim.base_url + "/orders", {"page": str(n)}) for n in range(1, 31)]
            await asyncio.gather(*(client.get(request) for request in requests))
        assert sim.counters.max_in_flight == 3
        assert sim.counters.api_requests == 30


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (
            aiohttp.ConnectionTimeoutError("connect"),
            ConnectionFailed,
            "cannot connect to api.example.test:443: the connection timed out",
        ),
        (
            aiohttp.SocketTimeoutError("read"),
            RetryableError,
            "timed out waiting for https://api.example.test/v1: ([api].timeout_s, the limit for the whole response)",
        ),
        (
            _cut_body(ContentLengthError("Not enough data to satisfy content length header.")),
            RetryableError,
            "the body from https://api.example.test/v1 was cut short: Not enough data to satisfy content length header.",
        ),
        (
            _cut_body(ContentEncodingError("Can not decode content-encoding: gzip")),
            SourceError,
            "could not be decoded as its Content-Encoding said: Can not decode content-encoding: gzip",
        ),
        (
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
            UnreachableError,
            "TLS: the handshake with api.example.test failed",
        ),
    ],
    ids=["connect-timeout", "read-timeout", "cut-body", "bad-content-encoding", "handshake"],
)
def test_network_errors_are_translated_by_what_may_heal(
    error: BaseException, kind: type, message: str
) -> None:
    """Connect timeout: ConnectionFailed (retried, exit 5); read timeout and cut body: a retry; bad handshake or gzip: final.

    A body's reason is aiohttp's parser message alone: its "400, message:" read as if the server had answered 400.
    """
    translated = translate(error, "https://api.example.test/v1")
    assert type(translated) is kind
    assert message in str(translated)
    assert "400" not in str(translated)


async def test_a_timeout_names_the_page_and_the_setting_that_limits_it(
    http_mock: aioresponses, make_client: MakeClient
) -> None:
    """The message said only the resource's URL: which page was slow, and that timeout_s covers the whole body, were left out."""
    client, _ = make_client(max_retries=0)
    http_mock.get(BASE + "/orders?api_key=K3y-v4lue-123&page=7", exception=TimeoutError())
    with pytest.raises(RetryableError) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "7", "api_key": "K3y-v4lue-123"}))
    message = str(raised.value)
    assert "timed out waiting for https://api.example.test/api/v1/orders?page=7&api_key=***: " in message
    assert "raise it if pages are large or the API is slow" in message
    assert "K3y-v4lue-123" not in message


async def test_a_body_that_does_not_decode_as_its_content_encoding_says_is_not_retried() -> None:
    """Content-Encoding: gzip on bytes that are not gzip: the same bytes come back every time, so one attempt."""

    async def not_gzip(_: web.Request) -> web.Response:
        return web.Response(body=b'{"data": []}', content_type="application/json", headers={"Content-Encoding": "gzip"})

    async with Simulator() as sim, serving({("GET", "/api/v1/orders"): not_gzip}) as origin:
        api = ApiConfig(base_url=origin + "/api/v1", retry_backoff_s=0.001, max_retries=2)
        async with open_session(api) as session:
            client, counters = _client(api, session, sim.token_url)
            with pytest.raises(SourceError) as raised:
                await client.get(PageRequest(api.base_url + "/orders", {"page": "1"}))
    assert not isinstance(raised.value, RetryableError)
    assert counters.requests == 1
    assert str(raised.value) == (
        f"the body from {origin}/api/v1/orders?page=1 could not be decoded as its Content-Encoding said: "
        "Can not decode content-encoding: gzip: the API is at fault"
    )


async def test_a_long_token_echoed_in_an_error_body_is_masked_whole(http_mock: aioresponses) -> None:
    """A Cognito access token is a JWT of ~1,000 characters: an API that echoed it in a 400 had the first
    160 or so on stderr and in etl_runs, since the body was cut to 200 bytes before the token was masked."""
    token = "eyJraWQiOiJ" + "a" * 1000
    http_mock.post(TOKEN_URL, payload={"access_token": token, "expires_in": 3600})
    http_mock.get(PAGE, status=400, payload={"message": "bad request", "token": f"Bearer {token}"})
    config = ApiConfig(base_url=BASE, retry_backoff_s=0.001)
    async with open_session(config) as session:
        client, _ = _client(config, session, TOKEN_URL)
        with pytest.raises(SourceError) as raised:
            await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert '"token": "Bearer ***"' in raised.value.message
    assert "eyJraWQiOiJ" not in raised.value.message


def _redirecting(seen: list[tuple[str, str, str | None, str | None]], other_status: int = 200) -> dict[tuple[str, str], Any]:
    """An API whose /old/orders redirects to the URL in ?to= ({port} filled in), and its /orders,
    which records (host, path, Authorization, X-Api-Key) and answers `other_status` on any host but 127.0.0.1."""

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "token-abcdef", "expires_in": 3600})

    async def old(request: web.Request) -> web.Response:
        target = request.query["to"].replace("{port}", str(request.url.port))
        raise web.HTTPTemporaryRedirect(target)

    async def orders(request: web.Request) -> web.Response:
        seen.append((request.host.split(":")[0], request.path, request.headers.get("Authorization"), request.headers.get("X-Api-Key")))
        if request.host.startswith("127.0.0.1") or other_status == 200:
            return web.json_response(OK)
        return web.json_response({"message": "Unauthorized"}, status=other_status)

    return {("POST", "/oauth2/token"): token, ("GET", "/old/orders"): old, ("GET", "/orders"): orders}


async def _get_redirected(to: str, other_status: int = 200) -> tuple[Any, list[tuple[str, str, str | None, str | None]], int]:
    """GET /old/orders?to=<to> with an X-Api-Key in [api].headers: the page or error, what /orders saw, token requests."""
    seen: list[tuple[str, str, str | None, str | None]] = []
    async with serving(_redirecting(seen, other_status)) as origin:
        api = ApiConfig(base_url=origin, retry_backoff_s=0.001, max_retries=1, headers={"X-Api-Key": "key-123456"})
        async with open_session(api) as session:
            client, _ = _client(api, session, origin + "/oauth2/token")
            try:
                outcome: Any = await client.get(PageRequest(origin + "/old/orders", {"to": to}))
            except SourceError as exc:
                outcome = exc
            return outcome, seen, client._tokens.token_requests


async def test_a_redirect_on_the_same_host_is_followed_with_the_token() -> None:
    outcome, seen, _ = await _get_redirected("/orders?page=1")
    assert outcome.body == OK
    assert seen == [("127.0.0.1", "/orders", "Bearer token-abcdef", "key-123456")]


async def test_a_redirect_to_another_host_carries_neither_the_token_nor_the_configured_headers() -> None:
    """aiohttp drops Authorization on another origin, but the [api].headers (an X-Api-Key) went on to that host."""
    outcome, seen, _ = await _get_redirected("http://localhost:{port}/orders?page=1")
    assert outcome.body == OK  # a pre-signed download URL on another host needs no credentials
    assert seen == [("localhost", "/orders", None, None)]


async def test_a_401_from_another_host_after_a_redirect_is_no_refused_token() -> None:
    """It was 'the API rejected a freshly issued token' (exit 3) after a second token request: the token was never sent there."""
    outcome, seen, token_requests = await _get_redirected("http://localhost:{port}/orders?page=1", other_status=401)
    assert isinstance(outcome, SourceError) and outcome.exit_code == 1
    assert "401 from http://localhost:" in outcome.message and "redirected from http://127.0.0.1:" in outcome.message
    assert outcome.hint is not None and "base_url" in outcome.hint
    assert (len(seen), token_requests) == (1, 1)


@pytest.mark.parametrize(
    ("target", "trusted"),
    [
        ("http://api.example.test/v2/orders", True),
        ("https://API.example.test/v1/orders", True),  # the same host upgraded to https, as requests allows
        ("http://api.example.test:8080/v1/orders", False),
        ("https://api.example.test:8443/v1/orders", False),
        ("http://cdn.example.test/v1/orders", False),
    ],
)
def test_a_redirect_keeps_the_token_on_the_configured_origin_or_its_https_upgrade(target: str, trusted: bool) -> None:
    assert same_site(URL("http://api.example.test/v1/orders"), URL(target)) is trusted
    assert same_site(URL("https://api.example.test/v1/orders"), URL(target.replace("https:", "http:"))) is False


@pytest.mark.parametrize("name", ["X-Api-Key", "Ocp-Apim-Subscription-Key", "X-Auth-Token", "Cookie"])
async def test_a_credential_in_the_configured_headers_echoed_by_the_api_is_masked(
    http_mock: aioresponses, make_client: MakeClient, name: str
) -> None:
    """Only the token and the client secret were masked: an API key in [api].headers that a 403 echoed was printed."""
    client, _ = make_client(headers={name: "k3y-VALUE-0042", "X-Tenant": "tenant-0042"})
    http_mock.get(PAGE, status=403, payload={"message": "key k3y-VALUE-0042 is not allowed for tenant-0042"})
    with pytest.raises(SourceError) as raised:
        await client.get(PageRequest(BASE + "/orders", {"page": "1"}))
    assert "key *** is not allowed for tenant-0042" in raised.value.message


async def test_a_rate_limited_api_slows_every_worker_down_instead_of_failing_the_run() -> None:
    """An API that takes 3 requests per 0.2 s and answers 429 + Retry-After past that: each request waited out its
    own Retry-After while the other workers used up the API's budget, and requests ran out of retries (exit 1)."""
    accepted: list[float] = []

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "token-abcdef", "expires_in": 3600})

    async def orders(request: web.Request) -> web.Response:
        now = time.monotonic()
        accepted[:] = [moment for moment in accepted if now - moment < 0.2]
        if len(accepted) >= 3:
            return web.json_response({"message": "Too Many Requests"}, status=429, headers={"Retry-After": "0.2"})
        accepted.append(now)
        return web.json_response(OK)

    async with serving({("POST", "/oauth2/token"): token, ("GET", "/orders"): orders}) as origin:
        api = ApiConfig(base_url=origin, concurrency=6, max_retries=2, retry_backoff_s=0.001)
        async with open_session(api) as session:
            client, counters = _client(api, session, origin + "/oauth2/token")
            pages = await asyncio.gather(*(client.get(PageRequest(origin + "/orders", {"page": str(n)})) for n in range(30)))
    assert [page.body for page in pages] == [OK] * 30


@pytest.mark.parametrize(("headers", "expected"), [({}, f"etl/{etl.__version__}"), ({"user-agent": "acme-nightly/2"}, "acme-nightly/2")])
async def test_requests_name_etl_as_their_user_agent_unless_headers_name_another(headers: dict[str, str], expected: str) -> None:
    """aiohttp's own `Python/3.11 aiohttp/3.x` went out: WAFs that block HTTP libraries (AWS WAF Bot Control)
    refused etl with them, and the API's owners could not tell etl's requests from any script's."""
    seen: list[str | None] = []

    async def api(request: web.Request) -> web.Response:
        seen.append(request.headers.get("User-Agent"))
        return web.json_response({"data": []})

    async def token_endpoint(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t", "expires_in": 3600, "token_type": "Bearer"})

    async with serving({("GET", "/api/v1/orders"): api, ("POST", "/oauth2/token"): token_endpoint}) as origin:
        api_config = ApiConfig(base_url=f"{origin}/api/v1", headers=headers)
        async with open_session(api_config) as session:
            auth = AuthConfig(token_url=f"{origin}/oauth2/token", client_id="c")
            client = ApiClient(api_config, session, TokenManager(auth, SecretStr("s"), session, RetryPolicy()), RequestCounters())
            await client.get(PageRequest(f"{origin}/api/v1/orders", {}))

    assert seen == [expected]
