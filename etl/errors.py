"""The errors etl raises, one class per exit code of SPEC.md.

    EtlError                      exit 1  the run failed or stopped early
    ├── ConfigError               exit 2  usage or configuration, names the key or flag
    ├── AuthError                 exit 3  the token endpoint refused us
    │   └── TokenRefusedByApi             the API refused a fresh token: that resource fails, the others go on
    ├── LockHeld                  exit 4  another run holds the lock
    ├── UnreachableError          exit 5  DNS, TCP or TLS: the host could not be reached or trusted
    │   └── ConnectionFailed              refused or dropped connect: retried, then exit 5
    ├── SourceError               exit 1  the API answered, but not with usable pages
    │   └── RetryableError                a transient answer (429, 5xx, reset, timeout): retried
    │       └── TokenRejected             the API answered 401 to a token: renew and retry once
    └── LoadError                 exit 1  the database refused a write

aiohttp and SQLAlchemy errors are translated into these where they enter etl
(`etl.client`, `etl.token`, `etl.store`), so retry conditions and the CLI only
ever test etl's own classes. No message may contain a secret or a token: every
registered one (etl.logs.register_secret) is masked when an error is made.
"""

from __future__ import annotations

from etl.logs import redact


class EtlError(Exception):
    """Base of every error etl reports to its user; `exit_code` is SPEC.md's."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # A server may echo what it was sent: masked here, the message is safe on stdout and in etl_runs too.
        message, hint = redact(message), redact(hint) if hint else hint
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(EtlError):
    """A bad flag, key or value; the message starts with its dotted name."""

    exit_code = 2


class AuthError(EtlError):
    """The token endpoint refused the client, secret, grant or scope."""

    exit_code = 3


class TokenRefusedByApi(AuthError):
    """The API answered 401 to a freshly issued token too. Of one resource, not the run: API Gateway answers a
    token without one method's scope so, and the resources the token may read were stopped with it."""


class LockHeld(EtlError):
    """Another run holds the lock for the same database and resource."""

    exit_code = 4


class UnreachableError(EtlError):
    """A host could not be resolved, connected to, or trusted (TLS)."""

    exit_code = 5

    def __init__(self, message: str, *, host: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.host = host


class ConnectionFailed(UnreachableError):
    """The TCP connection was refused or timed out; worth retrying, unlike DNS or TLS."""


class SourceError(EtlError):
    """The API answered with something that is not a usable page."""

    exit_code = 1


class RefusedRequest(SourceError):
    """The API refused a request with a 4xx other than 401 and 429: final, and the status says why."""

    def __init__(self, message: str, *, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class RetryableError(SourceError):
    """A transient failure worth another attempt; `retry_after` in seconds when the server said;
    `throttled` when it said the client is too fast (429), which concerns every request, not only this one;
    `asked` the Retry-After header as it came, for the log line of the retry."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, throttled: bool = False, asked: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.throttled = throttled
        self.asked = asked


class TokenEndpointFailed(SourceError):
    """The token endpoint failed every retry (5xx, timeouts) with no valid token left: no worker of the run can
    send a request, so the run stops rather than retry the endpoint again for each resource."""


class TokenRejected(RetryableError):
    """The API answered 401 to the token a request carried."""


class LoadError(EtlError):
    """The database refused a write or the schema does not match."""

    exit_code = 1


class Interrupted(EtlError):
    """The run was stopped by SIGTERM or SIGINT after committing what was in flight."""

    exit_code = 1
