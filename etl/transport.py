"""The HTTP boundary shared by the token manager and the API client.

It owns three things: the aiohttp session (TLS trust, proxies, timeouts),
the translation of aiohttp's exceptions into etl's (the only place that
knows aiohttp's exception tree), and the tenacity policy every HTTP call is
retried with.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import os
import random
import re
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from yarl import URL

from etl import __version__
from etl.config import ApiConfig
from etl.errors import (
    ConfigError,
    ConnectionFailed,
    EtlError,
    Interrupted,
    RetryableError,
    SourceError,
    UnreachableError,
)
from etl.logs import register_secret

log = logging.getLogger(__name__)

# query parameters whose values are credentials: masked wherever a URL is shown
SECRET_PARAM = re.compile(
    r"secret|passw|api[-_]?key|(subscription|access|private|client)[-_]?key|(access|id|refresh)[-_]?token|auth|signature"
    r"|credential|^(key|token|sig|code)$",
    re.IGNORECASE,
)
MASK = "***"
SHOWN_VALUE = 200  # characters of a query value a message shows: a cursor can be 70 KB, and so was each line naming it

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
SAVE_CERTS_HINT = (
    "run `python -m etl check --save-certs chain.pem`, review the certificates it saved, "
    "and point [api].ca_bundle at that file"
)
# OpenSSL's X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code carries them
X509_CERT_NOT_YET_VALID, X509_CERT_HAS_EXPIRED, X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH = 9, 10, 62, 64
# a status or header line's longest: Python's http.client's (aiohttp's 8,190 refused a legacy API's 20 kB cookie)
MAX_HEADER_LINE = 65_536
# where aiohttp's parser messages start quoting the bytes they met (a header's value: a session cookie)
_QUOTED_BYTES = re.compile(r":?\s*b['\"]")
USER_AGENT = f"etl/{__version__}"  # every request's, token endpoint's too, unless [api].headers names another
CONNECT_HINT = "check that the host is up, the port is right, and any firewall or HTTPS_PROXY in between"


def build_ssl_context(api: ApiConfig) -> ssl.SSLContext:
    """The system trust store plus `ca_bundle` (added, never replacing it), for token and API host alike."""
    context = ssl.create_default_context()
    if api.ca_bundle:
        try:
            trust_bundle(context, cafile=api.ca_bundle)
        except ssl.SSLError:  # OpenSSL's words: "[X509: NO_CERTIFICATE_OR_CRL_FOUND] ... (_ssl.c:4154)"
            raise ConfigError(unreadable_bundle(Path(api.ca_bundle))) from None
        except OSError as exc:
            raise ConfigError(f"api.ca_bundle: cannot load {api.ca_bundle}: {exc}") from None
    return context


def unreadable_bundle(path: Path) -> str:
    """Why OpenSSL read no certificate from a bundle it could open: a DER export (Windows' .cer) is the usual case."""
    data = path.read_bytes()
    if PEM_CERTIFICATE in data:
        return f"api.ca_bundle: a certificate in {path} is not valid PEM (its base64 is damaged or cut short)"
    message = f"api.ca_bundle: {path} holds no PEM certificate ({PEM_CERTIFICATE.decode()} blocks)"
    from cryptography import x509  # here: a failed run's cost, not every run's import

    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        return message
    return f"{message}: it is one DER certificate; convert it with `openssl x509 -inform der -in {path} -out {path}.pem`"


def trust_bundle(context: ssl.SSLContext, cafile: str | None = None, cadata: str | None = None) -> None:
    """Add a bundle's certificates as trust anchors, an intermediate among them too (Python 3.13's default).

    Without it, before 3.13, a bundle of what a private CA's server presents (leaf and intermediate,
    rarely the root) trusted nothing: `check --save-certs` then `ca_bundle` failed as before.
    """
    context.load_verify_locations(cafile=cafile, cadata=cadata)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


def _session_trust(api: ApiConfig) -> ssl.SSLContext | bool:
    """What the session verifies servers with. `verify_tls = false` is warned about here, so on every run that
    opens a session. True is aiohttp's own context of the system store, made at its import, for a run that adds
    nothing to that store: building a second one cost ~20 ms on every run."""
    if not api.verify_tls:
        log.warning(
            "TLS verification is OFF ([api].verify_tls = false): anyone on the network path can read the "
            "client secret and the data. Use [api].ca_bundle instead."
        )
        return False
    return build_ssl_context(api) if api.ca_bundle else True


def require_ca_bundle(api: ApiConfig) -> None:
    """An unreadable `ca_bundle` is exit 2 before the run is recorded, as a missing secret is: found once the
    session opened, it left a failed run in etl_runs and every resource's sync windows pending in `status`."""
    if api.verify_tls and api.ca_bundle:
        build_ssl_context(api)


def open_session(api: ApiConfig) -> aiohttp.ClientSession:
    """One session for the whole run: connection pooling across workers.

    Not `trust_env`: besides proxies it makes aiohttp read ~/.netrc in a thread on every
    request. Every request passes `proxy=proxy_for(url)` instead.

    Requests name etl as their User-Agent (a User-Agent in [api].headers wins): aiohttp's
    `Python/3.11 aiohttp/3.x` is what WAFs that block HTTP libraries refuse, and it told the API's
    owners nothing of who was calling.
    """
    connector = aiohttp.TCPConnector(ssl=_session_trust(api), limit=api.concurrency + 2, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=api.timeout_s, sock_connect=min(api.timeout_s, 15))
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        raise_for_status=False,
        headers={"User-Agent": USER_AGENT},
        max_line_size=MAX_HEADER_LINE,
        max_field_size=MAX_HEADER_LINE,
    )


PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def proxy_for(url: str) -> str | None:
    """The proxy for this URL from $HTTPS_PROXY / $HTTP_PROXY, or None when there is none or $NO_PROXY excludes the host."""
    parts = urlsplit(url)
    return _proxy(parts.scheme, parts.hostname or "", tuple(os.environ.get(name) for name in PROXY_VARIABLES))


@functools.lru_cache(maxsize=256)
def _proxy(scheme: str, host: str, _environment: tuple[str | None, ...]) -> str | None:
    """Cached per host and per value of the proxy variables: urllib scans the whole environment."""
    proxy = urllib.request.getproxies_environment().get(scheme)
    if not proxy or urllib.request.proxy_bypass_environment(host):  # type: ignore[attr-defined]
        return None
    _register_proxy_credentials(proxy)
    return proxy


def _register_proxy_credentials(proxy: str) -> None:
    """Mask the proxy's password and the Proxy-Authorization aiohttp makes of it: a proxy that forwards that
    header to a server echoing its request put them in the error, on stdout and in etl_runs.error."""
    parts = urlsplit(proxy)
    if parts.password is None:
        return
    user, password = unquote(parts.username or ""), unquote(parts.password)
    register_secret(parts.password)
    register_secret(password)
    register_secret(aiohttp.BasicAuth(user, password).encode().removeprefix("Basic "))


def register_query_credentials(url: str, params: Mapping[str, str | list[str]]) -> None:
    """Mask the values of credential-named parameters in `url`'s query and in `params` wherever they would appear:
    display_url hid them in the URL, but an API answering 400 with the query string it was sent showed them."""
    pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    pairs += [(name, item) for name, value in params.items() for item in ([value] if isinstance(value, str) else value)]
    for name, value in pairs:
        if SECRET_PARAM.search(name):
            register_secret(value)
            register_secret(quote(value, safe=""))
            register_secret(URL.build(query={name: value}).raw_query_string.partition("=")[2])  # as it was sent


def display_url(url: str | aiohttp.client.URL) -> str:
    """The URL without user info and with credential-like query values masked, safe for messages and logs.

    A query value longer than SHOWN_VALUE is cut, with its length said: a page's URL holding a cursor of 70 KB made
    each message naming it as long, and on MySQL the run's error no longer fitted `etl_runs.error` (TEXT, 64 KB).
    """
    parts = urlsplit(str(url))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(_shown(name, MASK if SECRET_PARAM.search(name) else value) for name, value in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _shown(name: str, value: str) -> str:
    """One query parameter as a message shows it: its value whole, or the value's start and how long it is."""
    if len(value) <= SHOWN_VALUE:
        return urlencode([(name, value)], safe="*/:")
    return urlencode([(name, value[:40])], safe="*/:") + f"...({len(value):,} characters)"


def translate(exc: BaseException, url: str, timeout_s: float | None = None) -> EtlError:
    """aiohttp's and asyncio's exceptions as etl's, naming the host.

    Only what may heal by itself is retryable: timeouts, resets, cut bodies, and a
    refused or timed-out connection (ConnectionFailed, exit 5 once retries run out).
    DNS and TLS failures will not heal within a run, so they end it at once (exit 5).
    `url` is what was requested, a page's query included, so that a message names the page; `timeout_s` the
    limit a timeout met, named in its message (the user raises it from there).
    """
    host = urlsplit(url).hostname or url
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        reason = getattr(exc, "certificate_error", None) or exc
        return UnreachableError(
            f"TLS: the certificate of {host} is not trusted: {reason}", host=host, hint=_certificate_hint(reason, host)
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return UnreachableError(
            f"TLS: the handshake with {host} failed: {exc}",
            host=host,
            hint="check that the URL's port speaks https, and that no proxy intercepts the connection",
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UnreachableError(
            f"DNS: the name {host} could not be resolved",
            host=host,
            hint="check the host name in the config and the machine's DNS",
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # CONNECT answered with other than 200
        refused = ConnectionFailed if exc.status >= 500 else UnreachableError  # a gateway error may heal; a refusal not
        return refused(
            f"the proxy {display_url(exc.request_info.real_url)} refused the tunnel to {_host_port(url)}: "
            f"{exc.status} {exc.message}",
            host=host,
            hint="check the proxy's address and credentials in $HTTPS_PROXY (http://user:password@proxy:port) and "
            f"that it allows {host}; or exclude the host with $NO_PROXY",
        )
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return _proxy_down(exc, url)
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return ConnectionFailed(
            f"cannot connect to {_host_port(url)}: {_connect_reason(exc)}", host=host, hint=CONNECT_HINT
        )
    if isinstance(exc, asyncio.TimeoutError):
        within = f"no complete answer within {timeout_s:g} s " if timeout_s else ""
        return RetryableError(
            f"timed out waiting for {display_url(url)}: {within}([api].timeout_s, the limit for the whole response); "
            "raise it if pages are large or the API is slow"
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return _payload_error(exc, url)
    if isinstance(exc, aiohttp.ClientResponseError) and isinstance(exc.__cause__, HttpProcessingError):
        return _malformed_answer(exc.__cause__, url)
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        return RetryableError(f"the connection to {host} was dropped: {type(exc).__name__} {exc}".rstrip())
    if isinstance(exc, EtlError):
        return exc
    return RetryableError(f"request to {display_url(url)} failed: {type(exc).__name__}: {exc}")


def _proxy_down(exc: aiohttp.ClientProxyConnectionError, url: str) -> ConnectionFailed:
    """The proxy, not the host behind it: "cannot connect to <the API>" sent a reader to a host that was up."""
    variable, host = f"${urlsplit(url).scheme.upper()}_PROXY", urlsplit(url).hostname or url
    return ConnectionFailed(
        f"cannot connect to the proxy {exc.host}:{exc.port} ({variable}) on the way to {_host_port(url)}: {_connect_reason(exc)}",
        host=host,
        hint=f"check that the proxy is up and that {variable} names it; or exclude {host} with $NO_PROXY",
    )


def _payload_error(exc: aiohttp.ClientPayloadError, url: str) -> EtlError:
    """A body cut short may come whole on another attempt; one that does not decode as its Content-Encoding says will not.

    The reason is the message of aiohttp's parser error (the cause): its str() reads "400, message: ..."
    although the server answered 200.
    """
    reason = getattr(exc.__cause__, "message", None) or str(exc)
    if isinstance(exc.__cause__, ContentEncodingError):
        return SourceError(
            f"the body from {display_url(url)} could not be decoded as its Content-Encoding said: {reason}: the API is at fault"
        )
    return RetryableError(f"the body from {display_url(url)} was cut short: {reason}")


def _malformed_answer(cause: HttpProcessingError, url: str) -> EtlError:
    """An answer aiohttp's parser refused before its body: its "ClientResponseError: 400" is no status the API sent,
    and the parser's message quotes the bytes it met (a page's records, a header's cookie): they are left out.

    An encoding etl cannot decode (`br` without the Brotli package) comes back on every attempt; other broken
    HTTP may be a connection left in a bad state, and is retried.
    """
    cause = cause.__cause__ if isinstance(cause.__cause__, HttpProcessingError) else cause  # the parser's own, under the protocol's copy
    line = cause.message.strip().splitlines()[0] if cause.message.strip() else type(cause).__name__
    reason = _QUOTED_BYTES.split(line)[0].rstrip(":")[:100]
    if isinstance(cause, ContentEncodingError):
        return SourceError(
            f"the answer from {display_url(url)} has a Content-Encoding etl did not ask for and cannot decode "
            f"({reason}): the API is at fault"
        )
    return RetryableError(f"the answer from {display_url(url)} is not valid HTTP ({reason}): the API is at fault")


def _certificate_hint(reason: BaseException, host: str) -> str:
    """What fixes it: a ca_bundle fixes an unknown issuer, never an expired certificate or one for another name."""
    code = getattr(reason, "verify_code", None)
    if code in (X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH):
        return (f"the certificate is not issued for {host}: use the host name it names in the config "
                "(`python -m etl check` shows the certificate); a ca_bundle cannot fix this")
    if code in (X509_CERT_HAS_EXPIRED, X509_CERT_NOT_YET_VALID):
        return ("the certificate is outside its validity dates: its owner must renew it (or this machine's clock "
                "is wrong); a ca_bundle cannot fix this")
    return SAVE_CERTS_HINT


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _connect_reason(exc: BaseException) -> str:
    """`Connection refused` rather than the socket's sentence that repeats the address."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        return os.strerror(errno) if errno else str(exc.os_error)
    return "the connection timed out"


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date (RFC 9110 §10.2.3); None when absent, unreadable, or nothing to
    wait for (0, negative, NaN, a date already past): the backoff applies then. Taken as 0, they were retried at
    once every time, max_retries + 1 requests within milliseconds at an API that had said it was overloaded."""
    if not value:
        return None
    value = value.strip()
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until(value)
    return seconds if seconds is not None and seconds > 0 else None  # NaN > 0 is False; inf is capped by the caller


def _seconds_until(http_date: str) -> float | None:
    """Seconds from now to an HTTP date; None when it is no date."""
    try:
        moment = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000" or no zone: HTTP dates are GMT
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() - time.time()


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RetryableError | ConnectionFailed)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one request is retried (from [api]).

    `stop` is the run's stop event (SIGINT, SIGTERM): once set, a wait before a retry ends
    at once with Interrupted. Without it a 429 with Retry-After: 60 kept a stopped run
    waiting and retrying for minutes, long past the moment a service manager kills it.
    """

    max_retries: int = 6
    backoff_s: float = 0.5
    retry_after_max_s: float = 60.0
    stop: asyncio.Event | None = None

    @classmethod
    def from_api(cls, api: ApiConfig, stop: asyncio.Event | None = None) -> RetryPolicy:
        return cls(api.max_retries, api.retry_backoff_s, api.retry_after_max_s, stop)

    @property
    def stopping(self) -> bool:
        """Whether the run was asked to stop: no retry follows then (the wait before it ends with Interrupted)."""
        return self.stop is not None and self.stop.is_set()

    def retrying(self, on_retry: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
        """Exponential backoff with jitter, or the server's Retry-After when it gave one (capped).

        `on_retry` counts and announces a retry; it is not called once the run stops, as no retry follows then."""
        def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None and not self.stopping:
                on_retry(state)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                return min(float(retry_after), self.retry_after_max_s)
            return self.backoff(state.attempt_number)

        return AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait,
            sleep=self.sleep,
            reraise=True,
            before_sleep=before_sleep,
        )

    def gave_up(self, message: str) -> str:
        """The last attempt's message, saying how many attempts there were and the key that sets them."""
        return f"{message} (gave up after {self.max_retries + 1} attempts, [api].max_retries = {self.max_retries})"

    def backoff(self, attempt: int) -> float:
        """The wait after the `attempt`-th attempt: `backoff_s` doubled per attempt (at most 30 s), its upper half at random.

        Jitter spreads the retries of many workers; drawn from the upper half only, the wait still grows per attempt.
        Drawn from zero up (full jitter), a fourth attempt could follow the third at once ("retrying in 0.0s"), and a
        short outage used up every retry.
        """
        ceiling = min(self.backoff_s * 2 ** (attempt - 1), max(self.backoff_s, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def sleep(self, seconds: float) -> None:
        """Sleep, or end at once with Interrupted when the run is stopped meanwhile."""
        if self.stop is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            return
        raise Interrupted("the run was stopped while a request waited to be retried; the next run fetches it again")
