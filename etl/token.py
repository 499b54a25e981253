"""The OAuth2 client-credentials token every API request carries (SPEC.md, "The token").

One TokenManager per (token URL, client id, scopes) serves every worker of a
run. It asks the token endpoint (RFC 6749 §4.4) once per lifetime, renews
`refresh_margin_s` before expiry, or at 95% of a lifetime too short for that
margin (never before half the lifetime, so it cannot renew in a loop), and makes one request however
many workers need a token at once. A 401 from the API drops exactly the token
that request carried and sends it once more with a new one (`authorized`: one asked
for after the 401, as another worker's may have been revoked with it); a new
token refused too is kept, and fails only that request's resource. The endpoint's explicit refusals are
AuthError (exit 3); its transient failures are retried with the shared
RetryPolicy and end as `transport.translate` says. Neither the secret nor a
token ever reaches a message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote_plus, urljoin, urlsplit

import aiohttp
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from etl.config import AuthConfig
from etl.errors import (
    AuthError,
    EtlError,
    RetryableError,
    TokenEndpointFailed,
    TokenRefusedByApi,
    TokenRejected,
)
from etl.logs import MASK, redact, register_secret
from etl.transport import CONNECT_HINT, RetryPolicy, display_url, proxy_for, retry_after_seconds, translate

log = logging.getLogger(__name__)

T = TypeVar("T")

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
DEFAULT_LIFETIME_S = 3600.0  # Cognito's default, for an answer without expires_in (RFC 6749 §5.1)
MIN_RENEWAL_PAUSE_S = 1.0  # after a failed renewal, at least this long before the next try
EXCERPT_CHARS = 200
# a token in an answer etl cannot parse: `"access_token": "..."` or `access_token=...`, and a JWT anywhere
_TOKEN_FIELD = re.compile(r"""(token["']?\s*[:=]\s*["']?)[^"'&\s,;}]+""", re.IGNORECASE)
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
OTHER_CAUSES_AT_401 = ("invalid_scope", "unsupported_grant_type")
API_TOKEN_ATTEMPTS = 3  # a 401 sends a request once more, with a new token; twice if that token predates the 401
SHORT_TOKEN_MARGIN = 0.05  # of the lifetime, when refresh_margin_s does not fit in half of it

# etl sends what RFC 6749 asks for (a form POST): an answer like this one means another address, not another request
METHOD_HINT = (
    "etl POSTs the form (application/x-www-form-urlencoded) a token endpoint takes, so this address may be "
    "no token endpoint: check that auth.token_url is the token endpoint itself (Cognito's ends in /oauth2/token)"
)
FAILING_HINT = (
    "the token endpoint failed on its side on every attempt (or kept asking to slow down): run again later; if it "
    "lasts, check the identity provider's status, and that auth.token_url is the token endpoint itself"
)
REFUSED_HINT = (
    "the token endpoint refused this app client for the reason it gives: check the client's settings there "
    "(the grants, APIs and scopes it is allowed) and auth.scopes"
)
REDIRECT_HINT = (
    "set auth.token_url to the address it redirects to (often http:// to https://): etl does not "
    "send the client's credentials on to another address"
)
LOGIN_REDIRECT_HINT = (
    "the address it redirects to is no token endpoint (a login page, or a proxy's): check that auth.token_url is "
    "the token endpoint itself (Cognito's ends in /oauth2/token) and that no proxy in between wants a sign-in"
)
EXPIRES_IN_HINT = "this is not a standard OAuth2 token answer: check that auth.token_url is the token endpoint"
FRESH_TOKEN_HINT = (
    "the token endpoint issues tokens this API does not accept: check that auth.token_url is the user pool "
    "the API trusts (audience), that auth.scopes are the ones the API requires, and that auth.client_id is "
    "the app client the API expects"
)


@dataclass(frozen=True, eq=False, repr=False)
class Token:
    """One access token. Compared by identity, so `invalidate` drops exactly the one a request carried."""

    _value: str
    expires_at: float  # on the manager's (monotonic) clock
    refresh_at: float
    _clock: Callable[[], float] = field(default=time.monotonic)
    requested_at: float = -math.inf  # when its request went to the token endpoint

    def authorization(self) -> str:
        """The Authorization header value; the only way the token leaves this object."""
        return f"Bearer {self._value}"

    def is_fresh(self, now: float) -> bool:
        return now < self.refresh_at

    def is_valid(self, now: float) -> bool:
        return now < self.expires_at

    def is_sendable_while_renewing(self, now: float) -> bool:
        """Before the middle of the renewal margin: sent meanwhile, it keeps half the margin against the API's clock."""
        return now < (self.refresh_at + self.expires_at) / 2

    def __repr__(self) -> str:
        return f"Token(expires in {self.expires_at - self._clock():.0f}s)"


class TokenManager:
    """The token of one (token URL, client id, scopes), shared by every worker of a run."""

    def __init__(
        self,
        auth: AuthConfig,
        secret: SecretStr,
        session: aiohttp.ClientSession,
        retry: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = auth
        self._secret = secret
        self._session = session
        self._retry = retry
        self._clock = clock
        self._url = display_url(auth.token_url)
        self._host = urlsplit(auth.token_url).hostname or self._url
        self._current: Token | None = None
        self._renewal: asyncio.Task[Token] | None = None
        self._keep_stale_until = float("-inf")
        self._kept: Token | None = None  # the current token, kept after a failed renewal
        self._other_token_type: str | None = None  # a token_type other than Bearer the endpoint answered
        self.token_requests = 0
        self.retried_after_401 = 0  # requests the API answered 401 and that went again with a new token

    def __repr__(self) -> str:
        return (
            f"TokenManager({self._url}, client_id={self._auth.client_id!r}, "
            f"scopes={self._auth.scopes!r}, token_requests={self.token_requests})"
        )

    async def token(self) -> Token:
        """A token fresh enough to send. Renewal is single-flight: every caller waits on the same request.

        While a renewal is under way, the current token is still sent until the middle of its margin: every
        worker waited on the renewal, and a slow or failing token endpoint stalled the run for its whole retry
        cycle, though the token had the margin to live.
        """
        current, now = self._current, self._clock()
        if current is not None and current.is_fresh(now):
            return current
        if current is not None and current.is_valid(now) and now < self._keep_stale_until:
            return current
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.create_task(self._renew())
            self._renewal.add_done_callback(_seen)
        if current is not None and self._sendable_while_renewing(current, now):
            return current
        # shielded: a worker cancelled while waiting must not cancel the request the others wait on
        return await asyncio.shield(self._renewal)

    def _sendable_while_renewing(self, current: Token, now: float) -> bool:
        """Until the middle of its margin; to its end once a renewal failed and kept it, as the keeping is for."""
        return current.is_sendable_while_renewing(now) or (current is self._kept and current.is_valid(now))

    async def close(self) -> None:
        """Cancel a renewal no worker waits on any more (begun in a token's margin as the run ended)."""
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)

    async def invalidate(self, token: Token) -> None:
        """Drop `token` if it is still the current one; a newer token another worker obtained stays."""
        if self._current is token:
            self._current = None
            log.info("token dropped; the next request gets a new one from %s", self._host)

    async def authorized(
        self, send: Callable[[Token], Awaitable[T]], before: Callable[[], Awaitable[None]] | None = None
    ) -> T:
        """`send(token)`; after a TokenRejected (401), once more with a new token.

        The new token must have been asked for after the 401: one another worker obtained while the refused
        request was in flight may have been revoked with the old one (a key rotation), and its refusal says
        nothing of the tokens the endpoint issues now, so it is dropped too and the request goes once more.
        `before` is awaited before each token is taken (the client's rate limit): what waits,
        waits without a token in hand. Other exceptions pass through untouched: the API client
        retries 429 and 5xx itself.
        """
        refusal = _Refusal()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(API_TOKEN_ATTEMPTS),
            retry=retry_if_exception(refusal.retry_follows),
            reraise=True,
            before_sleep=_log_rejected,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    last = attempt.retry_state.attempt_number == API_TOKEN_ATTEMPTS
                    return await self._send_once(send, before, refusal, last)
        except TokenRejected as exc:
            raise TokenRefusedByApi(
                f"the API rejected a freshly issued token from {self._url}: {exc.message}",
                hint=FRESH_TOKEN_HINT + self._token_type_note(),
            ) from exc
        raise AssertionError("tenacity ends with a result or re-raises the last error")

    async def _send_once(
        self, send: Callable[[Token], Awaitable[T]], before: Callable[[], Awaitable[None]] | None, refusal: _Refusal, last: bool
    ) -> T:
        """A refused token is dropped when a retry follows. The last refusal's token is kept: a fresh token the API
        refuses may be one resource's lack of scope, and the other resources go on with it."""
        if before is not None:
            await before()
        token = await self.token()
        try:
            return await send(token)
        except TokenRejected as exc:
            if refusal.note(exc, token, self._clock(), last):  # the last 401 ends the request, and is no retry
                self.retried_after_401 += 1
                await self.invalidate(token)
            raise

    async def _renew(self) -> Token:
        """Fetch a new token; when that fails, keep serving the current one while it is valid."""
        try:
            token: Token = await self._retry.retrying(on_retry=self._log_retry)(self._request_token)
        except EtlError as exc:
            kept = self._keep_current()
            if kept is None:
                raise self._gave_up(exc) from exc
            log.warning("token renewal failed, keeping the current %r: %s", kept, exc.message)
            return kept
        else:
            self._current, self._keep_stale_until = token, float("-inf")
            return token
        finally:
            self._renewal = None

    def _gave_up(self, exc: EtlError) -> EtlError:
        """A transient failure that outlasted its retries is final for the run: every worker needs this token."""
        if type(exc) is not RetryableError:
            return exc
        return TokenEndpointFailed(self._retry.gave_up(exc.message), hint=exc.hint)

    def _keep_current(self) -> Token | None:
        """The current token if still valid, then served a while without renewing, to spare the endpoint."""
        current, now = self._current, self._clock()
        if current is None or not current.is_valid(now):
            return None
        self._keep_stale_until = now + max((current.expires_at - now) / 2, MIN_RENEWAL_PAUSE_S)
        self._kept = current
        return current

    async def _request_token(self) -> Token:
        """One POST to the token endpoint; counted before it is sent, so retries count too."""
        headers, body = token_request(self._auth, self._secret, self._auth.client_auth)
        issued = self._clock()
        self.token_requests += 1
        try:
            async with self._session.post(
                self._auth.token_url, data=body, headers=headers, allow_redirects=False, proxy=proxy_for(self._auth.token_url)
            ) as response:
                status, answer = response.status, await response.read()
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                location = response.headers.get("Location")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _at_token_endpoint(exc, self._url, self._session.timeout.total) from exc
        if 200 <= status < 300:
            return self._issued_token(status, answer, issued)
        if transient(status):
            said = f": {answer_excerpt(answer)!r}" if answer.strip() else ""
            raise RetryableError(f"the token endpoint {self._url} answered {status}{said}", retry_after=retry_after, hint=FAILING_HINT)
        raise self._refusal(status, answer, location)

    def _issued_token(self, status: int, answer: bytes, issued: float) -> Token:
        fields = json_object(answer)
        if fields is None:
            raise AuthError(
                f"the token endpoint {self._url} answered {status} with something that is not a JSON object: "
                f"{answer_excerpt(answer)!r}",
                hint=METHOD_HINT,
            )
        value = fields.get("access_token")
        if (not isinstance(value, str) or not value) and isinstance(fields.get("error"), str):
            raise self._error_answer(status, fields)  # a gateway's 200 that carries the endpoint's refusal
        if not isinstance(value, str) or not value:
            # the field names only: the body may hold a token under another name
            raise AuthError(
                f"the token endpoint {self._url} answered {status} without an access_token "
                f"(fields: {', '.join(sorted(fields)) or 'none'})"
            )
        register_secret(value)
        refuse_unsendable(value, self._url, status)
        self._note_token_type(fields.get("token_type"))
        lifetime = self._lifetime(fields.get("expires_in"))
        log.info("token obtained from %s, lifetime %.0fs", self._host, lifetime)
        refresh_at = issued + refresh_after(lifetime, self._auth.refresh_margin_s)
        return Token(value, issued + lifetime, refresh_at, self._clock, requested_at=issued)

    def _note_token_type(self, token_type: Any) -> None:
        """etl sends every token as Bearer (SPEC): another type (mac, DPoP) is warned about once a run, and named
        if the API refuses the token. Absent, or bearer in any case (RFC 6749 §5.1), it is no news."""
        if self._other_token_type is not None or (other := other_token_type(token_type)) is None:
            return
        self._other_token_type = other
        log.warning(
            'the token endpoint %s answered token_type "%s", not Bearer; etl sends the token as a Bearer token, '
            "which the API may refuse",
            self._url,
            self._other_token_type,
        )

    def _token_type_note(self) -> str:
        if self._other_token_type is None:
            return ""
        return (
            f'; the token endpoint answered token_type "{self._other_token_type}" and etl sends tokens as Bearer: '
            "the API may want another kind of token than this app client is issued"
        )

    def _lifetime(self, expires_in: Any) -> float:
        lifetime = lifetime_of(expires_in)
        if lifetime is None:
            raise AuthError(
                f"the token endpoint {self._url} answered expires_in={expires_in!r}, not a positive number of seconds",
                hint=EXPIRES_IN_HINT,
            )
        return lifetime

    def _refusal(self, status: int, answer: bytes, location: str | None = None) -> AuthError:
        """The endpoint's own refusal as AuthError: its error and error_description verbatim, plus a hint."""
        if 300 <= status < 400:
            return AuthError(
                f"the token endpoint {self._url} answered {status}, {redirect_text(location)}",
                hint=redirect_hint(self._auth.token_url, location),
            )
        fields = json_object(answer) or {}
        hint = METHOD_HINT if status in (404, 405) else self._refusal_hint("invalid_client") if status == 401 else None
        if isinstance(fields.get("error"), str):  # any 4xx: an unknown error (access_denied) was cut at 200 characters
            return self._error_answer(status, fields, hint)
        return AuthError(f"the token endpoint {self._url} answered {status}: {answer_excerpt(answer)!r}", hint=hint)

    def _error_answer(self, status: int, fields: Mapping[str, Any], hint: str | None = None) -> AuthError:
        """An RFC 6749 §5.2 error answer: its error and error_description verbatim, and what to check for that error
        (`hint` for an error etl has no advice of its own for)."""
        error, description = fields["error"], fields.get("error_description")
        quoted = f'error "{error}"' + (f', error_description "{description}"' if description else "")
        return AuthError(
            f"the token endpoint {self._url} refused the request ({status}): {quoted}",
            hint=self._refusal_hint(refused_error(status, error)) or hint or REFUSED_HINT,
        )

    def _refusal_hint(self, error: str) -> str | None:
        other_auth = other_client_auth(self._auth.client_auth)
        return {
            "invalid_client": (
                f"check auth.client_id and the client secret; if both are right, try auth.client_auth = "
                f'"{other_auth}" (the endpoint may expect the client credentials the other way)'
                + quoted_secret_note(self._secret)
            ),
            "invalid_scope": (
                f"scopes are `resource-server-id/scope-name` as enabled on the app client; "
                f"auth.scopes is {self._auth.scopes!r}"
            ),
            "unauthorized_client": (
                "this app client may not use the client credentials grant: enable it on the app client "
                "(it needs a client secret and at least one custom scope)"
            ),
            "invalid_grant": (
                "the endpoint refused the client credentials grant: check the app client's allowed flows"
            ),
            "unsupported_grant_type": (
                "the endpoint does not offer grant_type=client_credentials: check that auth.token_url is the "
                "user pool domain's /oauth2/token and that the app client allows the client credentials flow"
            ),
            "invalid_request": (
                f"{METHOD_HINT}; if it says the client_id or client_secret is missing, try auth.client_auth = "
                f'"{other_auth}" (an endpoint that reads the client from one place only answers so)'
            ),
        }.get(error)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(  # as the API's retries: -q, cron's setting, must still show a token endpoint that struggles
            "token request %d to %s failed: %s; retrying in %.2fs",
            state.attempt_number,
            self._host,
            exc.message if isinstance(exc, EtlError) else exc,  # the hint is the last attempt's ("on every attempt")
            wait,
        )


def other_token_type(token_type: Any) -> str | None:
    """The token_type, cut short, when it is not Bearer (in any case, RFC 6749 §5.1); None when absent or Bearer."""
    if token_type is None or str(token_type).lower() == "bearer":
        return None
    return str(token_type)[:40]


def quoted_secret_note(secret: SecretStr) -> str:
    """A note for a refused secret in quotes: docker's --env-file and kubectl's --from-env-file keep the quotes of
    ETL_CLIENT_SECRET="..." as part of the value (systemd's EnvironmentFile drops them)."""
    value = secret.get_secret_value()
    if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
        return (
            "; the client secret starts and ends with a quote, which is sent as part of it: docker's --env-file "
            "keeps the quotes of ETL_CLIENT_SECRET=\"...\", remove them there"
        )
    return ""


def other_client_auth(client_auth: str) -> str:
    """The way of sending the client's credentials that is not configured: `check` tries it, hints name it."""
    return "body" if client_auth == "basic" else "basic"


def transient(status: int) -> bool:
    """An answer to try again: 429, 5xx, and a load balancer's 408 Request Timeout (the API retries it too)."""
    return status in (408, 429) or status >= 500


def refused_error(status: int, error: T) -> T | str:
    """The error to advise on. A 401 is a client that failed to authenticate (RFC 6749 §5.2) unless its error
    names another cause: Keycloak says unauthorized_client for a wrong secret, Auth0 access_denied."""
    return "invalid_client" if status == 401 and error not in OTHER_CAUSES_AT_401 else error


def lifetime_of(expires_in: Any) -> float | None:
    """expires_in in seconds, or None when it is no lifetime: true is not 1 second, and "inf" would never be renewed.

    Absent or null, it is Cognito's default hour: in sync and check alike (check failed a token null that sync used).
    """
    if expires_in is None:
        return DEFAULT_LIFETIME_S
    try:
        lifetime = float(expires_in) if not isinstance(expires_in, bool) else 0.0
    except (TypeError, ValueError):
        return None
    return lifetime if 0 < lifetime < math.inf else None


def refuse_unsendable(value: str, url: str, status: int) -> None:
    """A token with CR, LF or another control character is AuthError: aiohttp refuses it in a header
    (injection), which ended the first API request in a traceback."""
    if CONTROL_CHARACTER.search(value):
        raise AuthError(
            f"the token endpoint {url} answered {status} with an access_token that holds a control character "
            "(CR, LF, NUL, ...), which cannot be sent in an Authorization header",
            hint="check that auth.token_url is the token endpoint itself, not a proxy or page that rewrites its answer",
        )


def redirect_hint(token_url: str, location: str | None) -> str:
    """Follow it by hand only when it leads to another token endpoint (http to https, a trailing slash): one to a
    login page (an SSO proxy, a hosted UI) was hinted to become auth.token_url."""
    if location and _last_step(urljoin(token_url, location)) == _last_step(token_url):
        return REDIRECT_HINT
    return LOGIN_REDIRECT_HINT


def _last_step(url: str) -> str:
    return urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]


def redirect_text(location: str | None) -> str:
    return f"a redirect to {display_url(location)}" if location else "a redirect without a Location"


def refresh_after(lifetime: float, margin: float) -> float:
    """Seconds after issue at which a token is renewed.

    `margin` before expiry when that is in the second half of the lifetime;
    for a token too short for the margin, at 95% of its lifetime: never before
    half-life (no renewal loop) and one request per lifetime, which is what
    Cognito bills, rather than two.
    """
    if margin <= lifetime / 2:
        return lifetime - margin
    return lifetime * (1 - SHORT_TOKEN_MARGIN)


def _at_token_endpoint(exc: BaseException, url: str, timeout_s: float | None) -> EtlError:
    """The transport's error, saying it was the token endpoint: "cannot connect to host:port" alone reads as the API."""
    error = translate(exc, url)
    if type(error) is RetryableError and isinstance(exc, TimeoutError):  # translate's words are about pages
        within = f"{timeout_s:g}s ([api].timeout_s)" if timeout_s else "[api].timeout_s"
        return RetryableError(f"the token endpoint {url} did not answer within {within}")
    error.message = f"the token endpoint {url}: {error.message}"
    error.args = (error.message,)
    if error.hint == CONNECT_HINT:
        error.hint = f"check [auth].token_url; {CONNECT_HINT}"
    return error


def token_request(auth: AuthConfig, secret: SecretStr, client_auth: str) -> tuple[dict[str, str], bytes]:
    """Headers and form body of RFC 6749 §4.4.2, the client authenticated one way only (§2.3.1).

    `client_auth` is a parameter so that `check` can try the method not configured.
    """
    form = {"grant_type": "client_credentials"}
    if auth.scopes:
        form["scope"] = " ".join(auth.scopes)
    form |= auth.params
    headers = {"Content-Type": FORM_CONTENT_TYPE, "Accept": "application/json"}
    register_secret(_form_encode(secret.get_secret_value()))  # as the form or a server's echo of it may show it
    if client_auth == "basic":
        headers["Authorization"] = basic_authorization(auth.client_id, secret.get_secret_value())
        register_secret(headers["Authorization"].removeprefix("Basic "))
    else:
        form |= {"client_id": auth.client_id, "client_secret": secret.get_secret_value()}
    return headers, form_body(form)


def basic_authorization(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: each part form-urlencoded (Appendix B), then Base64 of "id:secret"."""
    credentials = f"{_form_encode(client_id)}:{_form_encode(secret)}"
    return "Basic " + base64.b64encode(credentials.encode("ascii")).decode("ascii")


def _form_encode(value: str) -> str:
    # Appendix B leaves only ALPHA, DIGIT, "-", ".", "_" unencoded; quote_plus also spares "~"
    return quote_plus(value, safe="").replace("~", "%7E")


def form_body(form: Mapping[str, str]) -> bytes:
    """The form encoded as `_form_encode` does: the secret in the body is then the very text registered for
    masking (urlencode sends '~' as it is, and a server's echo of an Azure AD secret showed it)."""
    return "&".join(f"{_form_encode(name)}={_form_encode(value)}" for name, value in form.items()).encode("ascii")


def json_object(answer: bytes) -> Mapping[str, Any] | None:
    """The body as a JSON object, or None when it is not one (an endpoint's answer may be anything)."""
    try:
        parsed = json.loads(answer)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def answer_excerpt(answer: bytes) -> str:
    """The answer's start, secrets masked before the cut (a secret cut in two is no longer recognised).

    A token etl could not read from the answer was never registered as a secret: the value of a `*_token`
    field, JSON or form-encoded, and anything shaped like a JWT are masked too.
    """
    text = redact(answer.decode("utf-8", "replace"))
    text = _TOKEN_FIELD.sub(lambda field: field.group(1) + MASK, text)
    return _JWT.sub(MASK, text)[:EXCERPT_CHARS]


class _Refusal:
    """The 401s one request met: it goes once more after each, until a token asked for after the first is refused."""

    def __init__(self) -> None:
        self.first_at: float | None = None
        self._final: BaseException | None = None  # the TokenRejected that ends the request

    def note(self, exc: TokenRejected, token: Token, now: float, last: bool) -> bool:
        """Whether a retry follows this refusal of `token`."""
        fresh = self.first_at is not None and token.requested_at >= self.first_at
        if self.first_at is None:
            self.first_at = now
        if fresh or last:
            self._final = exc
            return False
        return True

    def retry_follows(self, exc: BaseException) -> bool:
        return isinstance(exc, TokenRejected) and exc is not self._final


def _seen(renewal: asyncio.Task[Token]) -> None:
    """Mark a renewal's failure as seen: when a stop cancelled every worker waiting on it, asyncio
    printed "Task exception was never retrieved" and a traceback. A waiter still gets the error."""
    if not renewal.cancelled():
        renewal.exception()


def _log_rejected(state: RetryCallState) -> None:
    log.info("the API rejected a token (401); retrying once with a new one")
