"""The HTTP boundary shared by the token manager and the API client.

It owns three things: the aiohttp session (TLS trust, proxies, timeouts),
the translation of aiohttp's exceptions into etl's (the only place that
knows aiohttp's exception tree), and the tenacity policy every HTTP call is
retried with.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from etl.config import ApiConfig
from etl.errors import ConfigError, ConnectionFailed, EtlError, RetryableError, UnreachableError

log = logging.getLogger(__name__)

SAVE_CERTS_HINT = (
    "run `python -m etl check --save-certs chain.pem`, review the certificates it saved, "
    "and point [api].ca_bundle at that file"
)


def build_ssl_context(api: ApiConfig) -> ssl.SSLContext | bool:
    """The system trust store plus `ca_bundle` (added, never replacing it)."""
    if not api.verify_tls:
        log.warning(
            "TLS verification is OFF ([api].verify_tls = false): anyone on the network path can read the "
            "client secret and the data. Use [api].ca_bundle instead."
        )
        return False
    context = ssl.create_default_context()
    if api.ca_bundle:
        try:
            context.load_verify_locations(cafile=api.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"api.ca_bundle: cannot load {api.ca_bundle}: {exc}") from None
    return context


def open_session(api: ApiConfig) -> aiohttp.ClientSession:
    """One session for the whole run: connection pooling across workers, proxies from the environment."""
    connector = aiohttp.TCPConnector(
        ssl=build_ssl_context(api), limit=api.concurrency + 2, ttl_dns_cache=300
    )
    timeout = aiohttp.ClientTimeout(total=api.timeout_s, sock_connect=min(api.timeout_s, 15))
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=True, raise_for_status=False
    )


def display_url(url: str | aiohttp.client.URL) -> str:
    """The URL without user info, safe for messages and logs."""
    parts = urlsplit(str(url))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def translate(exc: BaseException, url: str) -> EtlError:
    """aiohttp's and asyncio's exceptions as etl's, naming the host; never retried blindly."""
    host = urlsplit(url).hostname or url
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError | ssl.SSLError):
        reason = getattr(exc, "certificate_error", None) or exc
        return UnreachableError(f"TLS: the certificate of {host} is not trusted: {reason}", host=host, hint=SAVE_CERTS_HINT)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UnreachableError(
            f"DNS: the name {host} could not be resolved", host=host, hint="check the host name in the config and the machine's DNS"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectionFailed(
            f"cannot connect to {host}:{exc.port}: {exc.os_error.strerror or exc.os_error}",
            host=host,
            hint="check that the host is up, the port is right, and any firewall or HTTPS_PROXY in between",
        )
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return RetryableError(f"timed out waiting for {display_url(url)}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return RetryableError(f"the body from {display_url(url)} was cut short: {exc}")
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        return RetryableError(f"the connection to {host} was dropped: {type(exc).__name__} {exc}".rstrip())
    if isinstance(exc, EtlError):
        return exc
    return RetryableError(f"request to {display_url(url)} failed: {type(exc).__name__}: {exc}")


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RetryableError | ConnectionFailed)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one request is retried (from [api])."""

    max_retries: int = 6
    backoff_s: float = 0.5
    retry_after_max_s: float = 60.0

    @classmethod
    def from_api(cls, api: ApiConfig) -> RetryPolicy:
        return cls(api.max_retries, api.retry_backoff_s, api.retry_after_max_s)

    def retrying(self, on_retry: Callable[[RetryCallState], None] | None = None) -> AsyncRetrying:
        """Exponential backoff with jitter, or the server's Retry-After when it gave one (capped)."""
        backoff = wait_random_exponential(multiplier=self.backoff_s, max=max(self.backoff_s, 30))

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                return min(float(retry_after), self.retry_after_max_s)
            return backoff(state)

        return AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait,
            reraise=True,
            before_sleep=on_retry,
        )
