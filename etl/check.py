"""`python -m etl check`: every step from the config file to the database, one at a time, with a hint per failure.

A failing integration usually fails at one step and shows up at a later one:
a certificate missing from the keystore looks like "connection failed", a
scope sent the wrong way looks like a 401 from the API. So each step runs on
its own, is timed and judged (✔ ok, ! warning, ✘ failed, – skipped because a
step it needs did not pass), and says what to do. The exit code is that of
the first failed step (SPEC.md): 2 configuration, 5 DNS/TCP/TLS, 3 token
refused, 1 resource page or database; 0 when every step passed, warnings
included. A database that answers but is not migrated yet is a warning when
`auto_migrate` is on (the next sync migrates it), a failure when it is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from etl import certs
from etl.client import ApiClient, PageRequest, PageResponse, RequestCounters, not_found_hint
from etl.config import (
    Config,
    EnvSettings,
    OffsetPagination,
    PagePagination,
    ResourceConfig,
    database_url_key,
    load_config,
)
from etl.db import (
    DRIVER_ERRORS,
    HEAD_REVISION,
    create_engine,
    database_error,
    missing_tables_error,
    newer_schema_error,
    safe_url,
    schema_state,
    sqlite_file,
)
from etl.errors import (
    ConfigError,
    ConnectionFailed,
    EtlError,
    LoadError,
    RefusedRequest,
    RetryableError,
    SourceError,
    UnreachableError,
)
from etl.logs import redact, register_secret, takes_utf8
from etl.paginators import Paginator, window_paginator
from etl.records import RecordValidator, records_at
from etl.token import (
    EXPIRES_IN_HINT,
    METHOD_HINT,
    REFUSED_HINT,
    Token,
    TokenManager,
    answer_excerpt,
    json_object,
    lifetime_of,
    other_client_auth,
    other_token_type,
    quoted_secret_note,
    redirect_hint,
    redirect_text,
    refuse_unsendable,
    refused_error,
    token_request,
    transient,
)
from etl.transport import RetryPolicy, build_ssl_context, display_url, open_session, proxy_for, translate
from etl.windows import FULL_REFRESH, Window, ceil_to, floor_to, granularity

Status = Literal["ok", "warning", "failed", "skipped"]
MARKS: dict[Status, str] = {"ok": "✔", "warning": "!", "failed": "✘", "skipped": "–"}
CHECK_MAX_RETRIES = 1  # a check reports what happens; it does not wait out a bad minute
DATABASE_TIMEOUT_S = 15.0
TLS_PROBE_TIMEOUT_S = 5.0
NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")
EXPIRY_WARNING_DAYS = 14
SHOWN_REJECTS = 3
EXCERPT_CHARS = 200
CONFIG_KEYS = {"token": "auth.token_url", "api": "api.base_url"}
TOKEN_PATH = "/oauth2/token"
REQUEST_HINT = (
    "compare the request above with the API's documentation: [api].base_url + path, params, and the parameter "
    "names in [resources.filter] and [resources.pagination]"
)  # a 403 has a hint of its own (client.forbidden_hint)
CONFIG_HINT = (
    "fix what the error above names: a key and what it must be, or a TOML line and column; "
    "config.toml in the repository is a working example of every section"
)
MISSING_CONFIG_HINT = "pass --config PATH or set $ETL_CONFIG (config.toml in the repository is a working example)"
SECRET_HINT = "export ETL_CLIENT_SECRET=..., or set auth.client_secret_file to a file holding only the secret (mode 600)"
DATABASE_URL_HINT = "write [database].url like sqlite:///etl.db, postgresql://user@host/db or mysql://user:pass@host/db"
TRUST_HINT = "point [api].ca_bundle at a readable PEM file of CA certificates (check --save-certs writes one)"
TIMEOUT_HINT = "check again; if the host is slow rather than down, raise [api].timeout_s"
DATABASE_RIGHTS_HINT = "the database user needs to read etl's tables and to create tables and insert (sync does both)"
SERVER_HINT = (
    "the API failed on its side on every attempt: check again later, and if it lasts tell the API's owners what the "
    "request above got; when only this resource fails, its params or [resources.filter] may be what the API trips on"
)
RATE_LIMITED_HINT = (
    "the API answered 429 Too Many Requests on every attempt: another client may be using this client's quota; "
    "check again later, and set [api].requests_per_second below the API's limit for sync"
)
RECORDS_PATH_HINT = 'set records_path to the dotted key that holds the list of records ("" when the body is the list)'


@dataclass
class Verdict:
    """What a probe found; `exit_code` is SPEC.md's code for this failure."""

    summary: str
    status: Status = "ok"
    details: list[str] = field(default_factory=list)
    hint: str | None = None
    exit_code: int = 0


@dataclass
class Step:
    """One line of the report, as printed and as JSON."""

    step: str
    target: str
    status: Status
    seconds: float
    summary: str
    details: list[str]
    hint: str | None
    exit_code: int

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "warning")

    @property
    def label(self) -> str:
        return f"{self.step} {self.target}".strip()

    def text_lines(self) -> list[str]:
        lines = [f"{MARKS[self.status]} {self.label:<36} {self.seconds:5.2f}s  {self.summary}"]
        lines += [f"    {detail}" for detail in self.details]
        return lines + ([f"    hint: {self.hint}"] if self.hint else [])


@dataclass(frozen=True)
class Endpoint:
    """A scheme, host and port the token endpoint and/or the API live on."""

    scheme: str
    host: str
    port: int
    roles: tuple[str, ...]

    @property
    def target(self) -> str:
        return f"{'+'.join(self.roles)} {self.host}:{self.port}"

    @property
    def keys(self) -> str:
        return " / ".join(CONFIG_KEYS[role] for role in self.roles)


def endpoints(config: Config) -> dict[str, Endpoint]:
    """{"token": ..., "api": ...}; the same Endpoint when both share scheme, host and port, so it is tested once."""
    found: dict[tuple[str, str, int], list[str]] = {}
    for role, url in (("token", config.auth.token_url), ("api", config.api.base_url)):
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        found.setdefault(key, []).append(role)
    return {role: Endpoint(*key, tuple(roles)) for key, roles in found.items() for role in roles}


def describe_proxy(endpoint: Endpoint) -> tuple[str | None, str]:
    """The proxy etl uses for this endpoint ($HTTP(S)_PROXY, $NO_PROXY), and that in words."""
    variable = f"${endpoint.scheme.upper()}_PROXY"
    proxy = proxy_for(f"{endpoint.scheme}://{endpoint.host}:{endpoint.port}/")
    if proxy:
        return proxy, f"through the proxy {display_url(proxy)} ({variable})"
    if urllib.request.getproxies_environment().get(endpoint.scheme):
        return None, f"direct, $NO_PROXY excludes {endpoint.host}"
    return None, f"direct, no {variable}"


def probe_windows(resource: ResourceConfig, lag: timedelta, now: datetime) -> list[Window]:
    """The latest window a sync would load, then the first one from `start` (read when the latest is empty)."""
    if resource.filter is None or resource.start is None:
        return [FULL_REFRESH]
    step, zone = granularity(resource.filter.format), resource.filter.zone
    end = now - lag
    begin = max(resource.start, end - resource.window)
    if begin >= end:
        begin = end - resource.window
    latest = Window(floor_to(begin, step, zone), ceil_to(end, step, zone))
    first_start = floor_to(resource.start, step, zone)
    first_end = ceil_to(min(resource.start + resource.window, end), step, zone)
    if first_start == latest.start or first_start >= first_end:
        return [latest]
    return [latest, Window(first_start, first_end)]


@dataclass(frozen=True)
class _Page:
    """The first page of a window, with the paginator that asked for it."""

    window: Window
    request: PageRequest
    paginator: Paginator
    response: PageResponse
    records: list[Any]


class _IssuedToken(TokenManager):
    """Serves the token the token step obtained, so the pages cost no second token request;
    once the API rejects it (401), a new one, as sync gets (SPEC: drop it, get a new one, retry once)."""

    def __init__(self, config: Config, secret: SecretStr, session: aiohttp.ClientSession, token: Token) -> None:
        super().__init__(config.auth, secret, session, RetryPolicy(max_retries=0))
        self._issued: Token | None = token

    async def token(self) -> Token:
        return self._issued if self._issued is not None else await super().token()

    async def invalidate(self, token: Token) -> None:
        if token is self._issued:
            self._issued = None
        await super().invalidate(token)


class Checker:
    """Runs the steps in order; each finished step goes to `emit` at once."""

    def __init__(
        self, config_path: Path, save_certs: str | None, emit: Callable[[Step], None], named_by: str | None = None
    ) -> None:
        self.config_path = config_path
        self.named_by = named_by  # "--config" or "$ETL_CONFIG": a missing file is then theirs to correct
        # absolute: the hint's `ca_bundle = "..."` must work in config.toml, where a relative path is the config's directory
        self.save_certs = str(Path(save_certs).absolute()) if save_certs else None
        self.emit = emit
        self.steps: list[Step] = []
        self.tls_reports: list[certs.TlsReport] = []
        self.engine: AsyncEngine | None = None
        # set by the step that finds them; a step that needs them runs only after that step passed
        self.config: Config
        self.secret: SecretStr
        self.secret_source: str
        self.verify_context: ssl.SSLContext
        self.session: aiohttp.ClientSession
        self.token: Token

    @property
    def exit_code(self) -> int:
        return next((step.exit_code for step in self.steps if step.status == "failed"), 0)

    async def run(self) -> None:
        hint = CONFIG_HINT if self.config_path.is_file() else None if self.named_by else MISSING_CONFIG_HINT
        loaded = await self._step("config", str(self.config_path), self._load_config, hint=hint)
        if not loaded.passed:
            self._record(Step("remaining steps", "", "skipped", 0.0, "skipped: the configuration did not load", [], None, 0))
            return
        try:
            await self._run_loaded()
        finally:
            if self.engine is not None:
                await self.engine.dispose()

    async def _run_loaded(self) -> None:
        secret = await self._step("secret", "", self._find_secret, hint=SECRET_HINT)
        hint = DATABASE_URL_HINT if database_url_key() == "database.url" else f"correct or unset $ETL_DATABASE_URL; {DATABASE_URL_HINT}"
        database_url = await self._step("database url", "", self._parse_database_url, hint=hint)
        trust = await self._step("trust", self.config.api.ca_bundle or "system store", self._load_trust, hint=TRUST_HINT)
        by_role = endpoints(self.config)
        reached = {endpoint: await self._network(endpoint, trust) for endpoint in dict.fromkeys(by_role.values())}
        if self.save_certs is not None:
            hint = "give --save-certs a path in a directory you can write to"
            await self._step("save-certs", self.save_certs, self._write_certs, hint=hint)
        await self._api_steps([secret, trust, *reached[by_role["token"]]], reached[by_role["api"]], trust.passed)
        await self._database_steps(database_url)

    async def _step(
        self,
        name: str,
        target: str,
        probe: Callable[[], Awaitable[Verdict]],
        needs: Sequence[Step] = (),
        hint: str | None = None,
    ) -> Step:
        """Run `probe` unless a step it needs did not pass; `hint` is for an error that brings none."""
        blocked = next((step for step in needs if not step.passed), None)
        if blocked is not None:
            return self._record(Step(name, target, "skipped", 0.0, f"skipped: {blocked.label} did not pass", [], None, 0))
        started = time.perf_counter()
        try:
            verdict = await probe()
        except EtlError as exc:
            verdict = _failure(exc)
            verdict.hint = verdict.hint or hint
        seconds = time.perf_counter() - started
        return self._record(
            Step(name, target, verdict.status, seconds, verdict.summary, verdict.details, verdict.hint, verdict.exit_code)
        )

    def record_interruption(self) -> None:
        """A stop (SIGINT, SIGTERM) before every step ran: a failed step of its own, so the verdict is never a pass."""
        self._record(Step("interrupted", "", "failed", 0.0, "check was stopped (SIGINT or SIGTERM) before every step ran", [],
                          "the steps above ran; run check again for the rest", 1))

    def _record(self, step: Step) -> Step:
        """Keep and emit the step, any registered secret masked as a last line of defence."""
        step.summary = redact(step.summary)
        step.details = [redact(detail) for detail in step.details]
        step.hint = redact(step.hint) if step.hint else None
        self.steps.append(step)
        self.emit(step)
        return step

    # 1. configuration

    async def _load_config(self) -> Verdict:
        config = self.config = load_config(self.config_path, self.named_by)
        return Verdict(
            f"{len(config.resources)} resources; token {display_url(config.auth.token_url)}, "
            f"api {display_url(config.api.base_url)}"
        )

    async def _find_secret(self) -> Verdict:
        self.secret = self.config.client_secret()
        register_secret(self.secret.get_secret_value())
        env_secret = EnvSettings().client_secret
        if env_secret is not None and env_secret.get_secret_value().strip():
            self.secret_source = "$ETL_CLIENT_SECRET"
        elif self.config.auth.client_secret_file:
            self.secret_source = f"client_secret_file {self.config.auth.client_secret_file}"
        else:
            self.secret_source = "auth.client_secret in the config file"
            hint = "put the secret in $ETL_CLIENT_SECRET or in a file named by auth.client_secret_file (mode 600)"
            return Verdict(f"found in {self.secret_source} (warning: move it)", "warning", hint=hint)
        return Verdict(f"found in {self.secret_source}")

    async def _parse_database_url(self) -> Verdict:
        self.engine = create_engine(self.config.database.url, reading=True)
        return Verdict(f"{safe_url(self.engine.url)} (from {database_url_key()})")

    async def _load_trust(self) -> Verdict:
        api = self.config.api
        if not api.verify_tls:  # the session warns, once
            self.verify_context = ssl.create_default_context()  # still tells the user what verification would say
            hint = (
                "anyone on the network path can read the secret and the data: set verify_tls = true and trust the "
                "server with [api].ca_bundle (check --save-certs saves what it presents)"
            )
            return Verdict("TLS verification is OFF ([api].verify_tls = false)", "warning", hint=hint)
        self.verify_context = build_ssl_context(api)
        if not api.ca_bundle:
            return Verdict("the system trust store")
        try:
            bundle = x509.load_pem_x509_certificates(Path(api.ca_bundle).read_bytes())
        except ValueError:  # OpenSSL loaded it, so it is usable even where cryptography is stricter
            return Verdict(f"the system trust store + {api.ca_bundle}")
        return Verdict(
            f"the system trust store + {len(bundle)} certificate(s) from {api.ca_bundle}",
            details=[f"{certs.subject(cert)} (until {cert.not_valid_after_utc:%Y-%m-%d})" for cert in bundle],
        )

    # 2, 3. DNS, TCP and TLS of each host

    async def _network(self, endpoint: Endpoint, trust: Step) -> list[Step]:
        proxy, route = describe_proxy(endpoint)
        resolved = await self._step("dns", endpoint.target, partial(self._resolve, endpoint, proxy))
        connected = await self._step("tcp", endpoint.target, partial(self._connect, endpoint, proxy, route), [resolved])
        if endpoint.scheme != "https":
            return [resolved, connected]
        probe = partial(self._tls, endpoint, proxy)
        secured = await self._step("tls", endpoint.target, probe, [trust, connected], hint=TIMEOUT_HINT)
        return [resolved, connected, secured]

    async def _resolve(self, endpoint: Endpoint, proxy: str | None) -> Verdict:
        host, port = _proxy_address(proxy) if proxy else (endpoint.host, endpoint.port)
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), self.config.api.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no answer"
            where = f"the proxy host in ${endpoint.scheme.upper()}_PROXY" if proxy else f"the host name in {endpoint.keys}"
            raise UnreachableError(
                f"DNS: the name {host} could not be resolved: {reason}",
                host=host,
                hint=f"check {where} and this machine's DNS (try `getent hosts {host}`)",
            ) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        found = f"{host} (an address, no lookup)" if host in addresses else f"{host} is {', '.join(addresses[:4])}"
        return Verdict(found + (" (the proxy)" if proxy else ""))

    async def _connect(self, endpoint: Endpoint, proxy: str | None, route: str) -> Verdict:
        """TCP to the host, or to the proxy: tunnelled with CONNECT for https, as aiohttp does."""
        timeout = self.config.api.timeout_s
        host, port = _proxy_address(proxy) if proxy else (endpoint.host, endpoint.port)
        tunnel = proxy if endpoint.scheme == "https" else None
        if tunnel:
            host, port = endpoint.host, endpoint.port
        try:
            connection = await asyncio.to_thread(certs.open_connection, host, port, tunnel, timeout)
        except certs.ProxyRefused as exc:
            hint = (
                "check the proxy's address and credentials (http://user:password@proxy:port) and that it allows "
                f"{endpoint.host}:{endpoint.port}; or exclude the host with $NO_PROXY"
            )
            raise UnreachableError(str(exc), host=endpoint.host, hint=hint) from None
        except TimeoutError:
            hint = "a firewall drops the connection, or this network reaches outside only through a proxy ($HTTPS_PROXY)"
            raise UnreachableError(f"no answer within {timeout:g}s ({route})", host=endpoint.host, hint=hint) from None
        except OSError as exc:
            hint = f"check the port in {endpoint.keys}, that the service is up, and any firewall in between"
            if proxy:  # the connection that failed was the proxy's
                hint = (f"the proxy {display_url(proxy)} is not answering: check ${endpoint.scheme.upper()}_PROXY, "
                        f"or exclude {endpoint.host} with $NO_PROXY")
            raise UnreachableError(f"{exc.strerror or exc} ({route})", host=endpoint.host, hint=hint) from None
        connection.close()
        return Verdict(f"connected, {route}")

    async def _tls(self, endpoint: Endpoint, proxy: str | None) -> Verdict:
        try:
            report = await asyncio.to_thread(
                certs.inspect_tls, endpoint.host, endpoint.port, proxy, self.config.api.timeout_s, self.verify_context
            )
        except ssl.SSLError as exc:
            hint = f"check that {endpoint.keys} says https:// only where the server speaks TLS on that port"
            summary = f"TLS handshake failed: {exc.reason or exc}"
            if exc.reason in NOT_TLS_REASONS:
                summary += " (the server answered in plain text, not TLS: is it http:// on this port?)"
            raise UnreachableError(summary, host=endpoint.host, hint=hint) from None
        except TimeoutError:  # OpenSSL's words were "_ssl.c:989: The handshake operation timed out"
            raise UnreachableError(
                f"no answer to the TLS handshake within {self.config.api.timeout_s:g}s ([api].timeout_s)",
                host=endpoint.host,
                hint=f"the port accepts connections but does not answer TLS: check that {endpoint.keys} names the "
                "https port of the server; if the host is only slow, raise [api].timeout_s",
            ) from None
        except OSError as exc:
            closed = (
                f"the server, or a firewall or proxy in between, closed the connection before TLS was set up: check "
                f"that {endpoint.keys} names the https port, and whether this network intercepts TLS"
            )
            raise UnreachableError(f"the connection failed during TLS: {exc}", host=endpoint.host, hint=closed) from None
        self.tls_reports.append(report)
        if report.trusted:
            return _trusted(report.chain[0])
        status: Status = "failed" if self.config.api.verify_tls else "warning"
        bundle = self.config.api.ca_bundle if self.config.api.verify_tls else ""
        hint = certs.fix_hint(report, endpoint.keys, self.save_certs, bundle)
        return Verdict("certificate not trusted", status, certs.explain(report), hint, 5)

    async def _write_certs(self) -> Verdict:
        reports = [report for report in self.tls_reports if report.chain]
        if not reports:
            return Verdict("no https host presented a certificate: nothing written", "warning")
        bundle = self.config.api.ca_bundle
        if bundle and Path(bundle).expanduser().resolve() == Path(self.save_certs or "").resolve():
            raise ConfigError(
                f"--save-certs: {self.save_certs} is [api].ca_bundle: writing the presented chains there would "
                "replace the CAs it trusts (a root the servers do not send would be lost)",
                hint="save to another file, review it, and add what you trust to your bundle",
            )
        try:
            Path(self.save_certs or "").write_text(certs.saved_pem(reports), encoding="ascii")
        except OSError as exc:
            raise ConfigError(f"--save-certs: cannot write {self.save_certs}: {exc.strerror or exc}") from None
        count = sum(len(report.chain) for report in reports)
        hosts = ", ".join(f"{report.host}:{report.port}" for report in reports)
        return Verdict(
            f"wrote {count} certificate(s) presented by {hosts}",
            details=[f'review them, then add the ones you trust to [api].ca_bundle (or set it to "{self.save_certs}" if it has none)'],
        )

    # 4, 5. the token, then one page of each resource with it

    async def _api_steps(self, token_needs: list[Step], api_needs: list[Step], trusted: bool) -> None:
        if trusted:  # else nothing below runs: every step needs the trust step
            self.session = open_session(self.config.api)
        try:
            target = display_url(self.config.auth.token_url)
            token = await self._step("token", target, self._request_token, token_needs, hint=TIMEOUT_HINT)
            for resource in self.config.resources:
                await self._step("resource", resource.name, partial(self._fetch_page, resource), [token, *api_needs])
        finally:
            if trusted:
                await self.session.close()

    async def _post_token(self, client_auth: str) -> tuple[int, bytes, str | None]:
        """One POST as TokenManager sends it (RFC 6749 §4.4.2): the raw status, body and Location to report."""
        auth = self.config.auth
        headers, body = token_request(auth, self.secret, client_auth)
        try:
            async with self.session.post(
                auth.token_url, data=body, headers=headers, allow_redirects=False, proxy=proxy_for(auth.token_url)
            ) as response:
                return response.status, await response.read(), response.headers.get("Location")
        except TimeoutError:  # translate's words are about pages ("raise it if pages are large")
            raise RetryableError(f"no answer within {self.config.api.timeout_s:g}s ([api].timeout_s)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise await self._tls_on_plain_url(auth.token_url, "auth.token_url") or translate(exc, auth.token_url) from None

    async def _request_token(self) -> Verdict:
        status, body, location = await self._post_token(self.config.auth.client_auth)
        fields = json_object(body)
        value = fields.get("access_token") if fields else None
        if 200 <= status < 300 and fields and isinstance(value, str) and value:
            return self._issued(status, fields, value)
        if 300 <= status < 400:
            return Verdict(f"{status}, {redirect_text(location)}", "failed", [], redirect_hint(self.config.auth.token_url, location), 3)
        return await self._refused(status, fields, body)

    async def _tls_on_plain_url(self, url: str, key: str) -> UnreachableError | None:
        """An http:// URL aimed at a TLS port fails as a dropped connection: a handshake there tells it apart."""
        parts = urlsplit(url)
        if parts.scheme != "http" or proxy_for(url):
            return None
        host, port, timeout = parts.hostname or "", parts.port or 80, min(self.config.api.timeout_s, TLS_PROBE_TIMEOUT_S)
        try:
            await asyncio.to_thread(certs.presented_chain, host, port, None, timeout)
        except OSError:  # ssl.SSLError included: the port does not speak TLS, the failure was something else
            return None
        return UnreachableError(
            f"{host}:{port} speaks TLS (https), but {key} says http://", host=host, hint=f"write https:// in {key}"
        )

    def _issued(self, status: int, fields: Mapping[str, Any], value: str) -> Verdict:
        register_secret(value)
        refuse_unsendable(value, display_url(self.config.auth.token_url), status)
        expires_in = fields.get("expires_in")
        lifetime = lifetime_of(expires_in)
        if lifetime is None:
            return Verdict(f"{status}, but expires_in={expires_in!r} is not a positive number", "failed", [], EXPIRES_IN_HINT, 3)
        now = time.monotonic()
        self.token = Token(value, now + lifetime, now + lifetime)
        granted = fields.get("scope")
        said = f"lifetime {lifetime:g}s" if expires_in is not None else f"no expires_in, taken as {lifetime:g}s"
        verdict = Verdict(f"{status}, {said}" + (f", scope {granted}" if granted else ""))
        missing = set(self.config.auth.scopes) - set(str(granted).split()) if granted else set()
        if missing:
            verdict.status, verdict.hint = "warning", f"the endpoint did not grant {', '.join(sorted(missing))}"
        if (token_type := other_token_type(fields.get("token_type"))) is not None:
            verdict.details.append(f'warning: token_type "{token_type}", not Bearer: etl sends the token as a Bearer token')
        if not urlsplit(self.config.auth.token_url).path.endswith(TOKEN_PATH):
            verdict.details.append(f"warning: auth.token_url does not end in {TOKEN_PATH} (Cognito's token endpoint)")
        return verdict

    async def _refused(self, status: int, fields: Mapping[str, Any] | None, body: bytes) -> Verdict:
        error = fields.get("error") if fields else None
        if fields and isinstance(error, str):
            details = [f"{key}: {json.dumps(fields[key], ensure_ascii=False)}" for key in ("error", "error_description") if fields.get(key)]
            summary = f"{status} {error}"
        elif fields is not None and 200 <= status < 300:  # field names only: a token may hide under another name
            details, summary = [f"fields: {', '.join(sorted(fields)) or 'none'}"], f"{status}, but no access_token"
        else:
            details, summary = [f"body: {answer_excerpt(body)!r}"], f"{status}, not a token"
        if transient(status):
            return Verdict(summary, "failed", details, "the token endpoint is overloaded or down: check again later", 1)
        return Verdict(summary, "failed", details, await self._token_hint(error, status), 3)

    async def _token_hint(self, error: Any, status: int) -> str:
        auth = self.config.auth
        if refused_error(status, error) == "invalid_client":
            return await self._client_auth_hint()
        if error == "invalid_scope":
            return (
                f"auth.scopes is {auth.scopes!r}: each must be `resource-server-id/scope-name` exactly as enabled "
                "on the app client (Cognito: the app client's custom scopes)"
            )
        if error in ("unauthorized_client", "unsupported_grant_type", "invalid_grant"):
            return (
                "the app client may not use the client credentials grant: enable it on the app client "
                "(it needs a client secret and at least one custom scope)"
            )
        if isinstance(error, str) and error != "invalid_request" and status not in (404, 405):
            return REFUSED_HINT
        if error == "invalid_request" and (other := await self._other_client_auth_works()):
            return _set_client_auth(other)
        path = urlsplit(auth.token_url).path
        if path.endswith(TOKEN_PATH):
            return METHOD_HINT
        return f"{METHOD_HINT}; auth.token_url's path is {path or '/'!r}, Cognito's token endpoint is {TOKEN_PATH}"

    async def _client_auth_hint(self) -> str:
        """Try the other client_auth once: that tells a wrong secret from a wrong way of sending it."""
        auth = self.config.auth
        if other := await self._other_client_auth_works():
            return _set_client_auth(other)
        return (
            f"check auth.client_id ({auth.client_id!r}) and the client secret (from {self.secret_source}); "
            f'client_auth = "{other_client_auth(auth.client_auth)}" was tried too and refused as well'
            + quoted_secret_note(self.secret)
        )

    async def _other_client_auth_works(self) -> str | None:
        """The client_auth not configured, if the endpoint issues a token that way; an endpoint that reads the
        client from one place only says invalid_client or invalid_request ("Missing parameter: client_id")."""
        other = other_client_auth(self.config.auth.client_auth)
        try:
            status, body, _ = await self._post_token(other)
        except EtlError:
            return None
        return other if 200 <= status < 300 and (json_object(body) or {}).get("access_token") else None

    async def _fetch_page(self, resource: ResourceConfig) -> Verdict:
        """The first page of the latest window, or of the first window when the latest has no records."""
        api = self.config.api.model_copy(update={"max_retries": min(self.config.api.max_retries, CHECK_MAX_RETRIES)})
        tokens = _IssuedToken(self.config, self.secret, self.session, self.token)
        client = ApiClient(api, self.session, tokens, RequestCounters())
        tried: list[str] = []
        try:
            for window in probe_windows(resource, self.config.sync.lag, datetime.now(UTC)):
                page = await self._first_page(client, resource, window, tried)
                if page.records:
                    break
                tried[-1] += "  → 0 records"
        except EtlError as exc:
            if isinstance(exc, RetryableError | ConnectionFailed):
                exc = await self._tls_on_plain_url(self.config.api.base_url, "api.base_url") or exc
            return Verdict(_failure(exc).summary, "failed", tried, exc.hint or self._page_hint(exc, resource), exc.exit_code)
        verdict = self._judge_page(resource, page, tried)
        if verdict.status != "failed" and (capped := await self._page_size_cap(client, resource, page)) is not None:
            return capped
        if verdict.status != "failed":
            return await self._page_numbering(client, resource, page, verdict)
        return verdict

    def _page_hint(self, exc: EtlError, resource: ResourceConfig) -> str:
        """A 404 names the two keys its URL is made of; a timeout names timeout_s (not the request, which may be
        right: the answer was slow); a 5xx or a dropped connection is the API's; other failures are compared
        with the API's documentation."""
        if isinstance(exc, RefusedRequest) and exc.status == HTTPStatus.NOT_FOUND:
            return not_found_hint(self.config.api.base_url, resource.name, resource.path)
        if isinstance(exc.__cause__, TimeoutError):
            return TIMEOUT_HINT
        if isinstance(exc, RetryableError):  # a 429, a 5xx, a dropped connection, a broken answer: not the request's fault
            return RATE_LIMITED_HINT if exc.throttled else SERVER_HINT
        return REQUEST_HINT

    async def _page_size_cap(self, client: ApiClient, resource: ResourceConfig, page: _Page) -> Verdict | None:
        """A failure when the API serves fewer records a page than page_size asks for, and more after them.

        Without a total, a short page ends a window (SPEC): against an API that caps the page size
        below page_size, every sync would load the first page of each window and drop the rest with
        exit 0. The page after the first, asked at the size the API answered, tells the two apart.
        """
        pagination = resource.pagination
        served = len(page.records)
        if not isinstance(pagination, PagePagination | OffsetPagination) or not 0 < served < pagination.page_size:
            return None
        if page.paginator.known_total(page.response) is not None:
            return None  # with a total a short page does not end the window
        at_served = resource.model_copy(update={"pagination": pagination.model_copy(update={"page_size": served})})
        paginator = window_paginator(at_served, self.config.api.base_url, page.window)
        paginator.advance(page.response, page.records)
        following = paginator.request()
        if following is None:
            return None
        more = await _records_beside(client, resource, following)  # None: what it says is sync's to find out
        if not more or more == page.records:
            return None
        return Verdict(
            f"{page.response.status}, {served} records where page_size = {pagination.page_size} asked for more, "
            f"and the next page holds {len(more)} more: the API caps its pages at {served} records",
            "failed",
            [f"GET {_request_text(page.request)}  → {served} records", f"GET {_request_text(following)}  → {len(more)} records"],
            f"set [resources.pagination].page_size = {served} for {resource.name!r} (or lower): without a total, "
            "a short page ends a window, and sync would keep the first page of each window and skip the rest",
            1,
        )

    async def _page_numbering(self, client: ApiClient, resource: ResourceConfig, page: _Page, verdict: Verdict) -> Verdict:
        """The verdict, failed or warned when first_page is not where the API numbers its pages from, as the page
        beside it tells.

        first_page = 0 against an API that reads 0 as 1: page 1 repeats a full page 0, and sync stops each window
        there as an API that ignores page_param, whose hint comes second. Failed. first_page = 1 against an API that starts at
        0: page 0 holds other records, which each window skipped. Only warned: an API that computes page 0's
        records (ids -9 to 0) is as likely as one that numbers from 0. A page 0 of more records than page_size
        (every record: paging off) says nothing of the numbering.
        """
        pagination = resource.pagination
        if not isinstance(pagination, PagePagination) or pagination.first_page not in (0, 1) or not page.records:
            return verdict
        other = 1 - pagination.first_page
        if other == 1 and len(page.records) < pagination.page_size:
            return verdict  # a short page 0 ends the window whatever page 1 holds
        beside = resource.model_copy(update={"pagination": pagination.model_copy(update={"first_page": other})})
        request = window_paginator(beside, self.config.api.base_url, page.window).request()
        assert request is not None  # a new paginator always has a first page
        records = await _records_beside(client, resource, request)  # None: a 1-based API may refuse page 0, its numbering
        if not records or len(records) > pagination.page_size:
            return verdict
        hint = f"set [resources.pagination].first_page = {other} for {resource.name!r}"
        requests = [f"GET {_request_text(page.request)}  → {len(page.records)} records", f"GET {_request_text(request)}  → {len(records)} records"]
        if other == 1 and records == page.records:
            return Verdict(
                f"{page.response.status}, {len(page.records)} records; but page 1 repeats page 0: the API numbers its pages "
                "from 1 and reads 0 as 1, and sync would stop each window at its second page (\"the API seems to ignore "
                f"the {pagination.page_param!r} parameter\")",
                "failed", requests, hint, 1,
            )
        if other == 0 and not _shares_a_record(records, page.records):
            return Verdict(
                verdict.summary, "warning",
                [*verdict.details, *requests, f"page 0 holds {len(records)} other records: if the API numbers its pages from 0, "
                 "each window skips its first page"],
                f"{hint} if the API's documentation numbers pages from 0" + (f"; {verdict.hint}" if verdict.hint else ""),
            )
        return verdict

    async def _first_page(self, client: ApiClient, resource: ResourceConfig, window: Window, tried: list[str]) -> _Page:
        paginator = window_paginator(resource, self.config.api.base_url, window)
        request = paginator.request()
        assert request is not None  # a new paginator always has a first page
        tried.append(f"window {window}: GET {_request_text(request)}")
        response = await client.get(request)
        try:
            records = records_at(response.body, resource.records_path, response.url)
        except SourceError as exc:
            reason = exc.message.removeprefix(f"{response.url}: ")
            raise SourceError(f"{response.status}, but {reason}", hint=RECORDS_PATH_HINT) from None
        return _Page(window, request, paginator, response, records)

    def _judge_page(self, resource: ResourceConfig, page: _Page, tried: list[str]) -> Verdict:
        """Records, invalid ones, total and next page in one line; more rejects than [sync].max_rejects fail."""
        validator = RecordValidator(resource)
        try:
            rejects = validator.validate(page.records).rejects
        except SourceError as exc:  # not a list of objects
            return Verdict(f"{page.response.status}, but {exc.message}", "failed", tried, RECORDS_PATH_HINT, 1)
        total = page.paginator.known_total(page.response)
        page.paginator.advance(page.response, page.records)
        where = f"at {resource.records_path!r}" if resource.records_path else "(the body is the list)"
        summary = (
            f"{page.response.status}, {len(page.records)} records {where}"
            + (f" of {total}" if total is not None else "")
            + (f", {len(rejects)} invalid" if rejects else "")
            + f"; next page: {_next_page(page.request, page.paginator.request())}"
        )
        if not page.records:
            details = [*tried, _body_shape(page.response.body)]
            return Verdict(summary, "warning", details, "no records in these windows to check the columns against")
        details = [] if len(tried) == 1 else [f"no records in the latest window; this page is from the first, {page.window}"]
        if page.paginator.more_pages:  # style none: sync would load this page alone
            details.append(f'pagination.style is "none", but the API says that more pages follow: {page.paginator.more_pages}; '
                           "set [resources.pagination] to the way the API pages, or sync loads the first page alone")
        if not rejects:
            unseen = validator.unseen_warnings(len(page.records))
            return Verdict(summary, "warning" if unseen or page.paginator.more_pages else "ok", details + unseen)
        details += [f"invalid record {r.key or '(no key)'}: {_excerpt(r.error)}" for r in rejects[:SHOWN_REJECTS]]
        max_rejects = self.config.sync.max_rejects
        hint = (
            f"{len(rejects)} of {len(page.records)} records do not fit [resources.columns] "
            f"([sync].max_rejects = {max_rejects}): fix a column's type, source or nullable, or the API sends bad "
            "records (sync keeps them in etl_rejects)"
        )
        return Verdict(summary, "failed" if len(rejects) > max_rejects else "warning", details, hint, 1)

    # 6. the database

    async def _database_steps(self, database_url: Step) -> None:
        connected = await self._step("database connect", "", self._db_connect, [database_url])
        await self._step("database schema", "", self._db_schema, [connected], hint=DATABASE_RIGHTS_HINT)
        await self._step("database write", "", self._db_write, [connected], hint=DATABASE_RIGHTS_HINT)

    async def _with_database(self, work: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
        """`work(engine)` under a timeout, failures in the database's own words."""
        assert self.engine is not None  # the database url step made it
        try:
            async with asyncio.timeout(DATABASE_TIMEOUT_S):
                return await work(self.engine)
        except TimeoutError:
            raise LoadError(
                f"no answer from the database {safe_url(self.engine.url)} within {DATABASE_TIMEOUT_S:g}s",
                hint="check [database].url (or $ETL_DATABASE_URL), that the server is up, and any firewall",
            ) from None
        except DRIVER_ERRORS as exc:
            raise database_error(exc, self.engine.url) from None

    def _sqlite_file_to_be(self) -> Path | None:
        """A SQLite file that does not exist yet in a directory sync can create it in: connecting would create it,
        and a check of a mistyped path would leave an empty database there and pass."""
        assert self.engine is not None  # the database url step made it
        path = sqlite_file(self.engine.url)
        if path is None or path.exists() or not os.access(path.parent, os.W_OK | os.X_OK):
            return None  # a directory that is missing or not writable fails to connect, with its hint
        return path

    async def _db_connect(self) -> Verdict:
        if (path := self._sqlite_file_to_be()) is not None:
            hint = "if it should exist, [database].url (or $ETL_DATABASE_URL) names the wrong file"
            return Verdict(f"{path} does not exist yet: the first sync creates it", "warning", hint=hint)

        async def version(engine: AsyncEngine) -> str:
            async with engine.connect() as connection:
                info = await connection.run_sync(lambda sync: sync.dialect.server_version_info)
            return ".".join(str(part) for part in info or ())

        found = await self._with_database(version)
        return Verdict(f"connected, {self._server_name()} {found}".rstrip())

    def _server_name(self) -> str:
        """The server as its users know it: SQLAlchemy's dialect for MariaDB is "mysql", and says which it met."""
        dialect = self.engine.dialect if self.engine else None
        if dialect is None:
            return ""
        return "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name

    async def _db_schema(self) -> Verdict:
        head = HEAD_REVISION
        current, missing = (None, []) if self._sqlite_file_to_be() else await self._with_database(schema_state)
        if missing:
            gone = missing_tables_error(missing, self.config.database.url)
            if self.config.database.auto_migrate:
                hint = "the next sync creates them again, empty (auto_migrate = true), or run `python -m etl migrate` now"
                return Verdict(gone.message, "warning", hint=hint)
            return Verdict(gone.message, "failed", hint=gone.hint, exit_code=1)
        if current == head:
            return Verdict(f"etl's tables at revision {head} (current)")
        if (newer := newer_schema_error(current, self.config.database.url)) is not None:
            return Verdict(newer.message, "failed", hint=newer.hint, exit_code=1)
        state = "not created yet" if current is None else f"at revision {current}, this etl's is {head}"
        if self.config.database.auto_migrate:
            hint = "the next sync migrates it (auto_migrate = true), or run `python -m etl migrate` now"
            return Verdict(f"etl's tables {state}", "warning", hint=hint)
        hint = "run `python -m etl migrate` ([database].auto_migrate = false, so sync will not)"
        return Verdict(f"etl's tables {state}", "failed", hint=hint, exit_code=1)

    async def _db_write(self) -> Verdict:
        if (path := self._sqlite_file_to_be()) is not None:
            return Verdict(f"{path.parent} is writable: sync can create the file")
        table = f"etl_check_probe_{uuid.uuid4().hex[:8]}"

        async def probe(engine: AsyncEngine) -> None:
            async with engine.connect() as connection:
                transaction = await connection.begin()
                try:
                    await connection.execute(text(f"CREATE TABLE {table} (id INTEGER)"))
                    await connection.execute(text(f"INSERT INTO {table} (id) VALUES (1)"))
                    await connection.execute(text(f"DROP TABLE {table}"))
                except BaseException:
                    with contextlib.suppress(*DRIVER_ERRORS):  # its refusal ("DROP command denied") hid the real one
                        await transaction.rollback()
                        await _drop_probe_table(connection, table)
                    raise
                await transaction.rollback()
                await _drop_probe_table(connection, table)

        await self._with_database(probe)
        return Verdict("can create a table and insert (in a transaction, rolled back)")


async def _records_beside(client: ApiClient, resource: ResourceConfig, request: PageRequest) -> list[Any] | None:
    """The records of a page asked beside the first one (the next, or page 0), or None when asking failed: the
    first page passed, and what another says is a finding only when it answers."""
    try:
        response = await client.get(request)
        return records_at(response.body, resource.records_path, response.url)
    except EtlError:
        return None


async def _drop_probe_table(connection: AsyncConnection, table: str) -> None:
    """MySQL commits DDL on its own, pysqlite runs it outside the transaction: drop what may be left."""
    await connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
    await connection.commit()


def _excerpt(text: str, limit: int = 4 * EXCERPT_CHARS) -> str:
    """A record's schema errors, cut with a mark that says so (at 200 characters the third error was lost unseen)."""
    return text if len(text) <= limit else text[:limit] + "…"


def _failure(exc: EtlError) -> Verdict:
    first, *rest = exc.message.splitlines() or [""]
    return Verdict(first, "failed", rest, exc.hint, exc.exit_code)


def _trusted(leaf: x509.Certificate) -> Verdict:
    days = (leaf.not_valid_after_utc - datetime.now(UTC)).days
    summary = f"trusted: {certs.subject(leaf)}, issued by {certs.issuer(leaf)}, until {leaf.not_valid_after_utc:%Y-%m-%d}"
    if days < EXPIRY_WARNING_DAYS:
        return Verdict(f"{summary} (in {days} days)", "warning", hint="the API's owners should renew the certificate")
    return Verdict(summary)


def _proxy_address(proxy: str) -> tuple[str, int]:
    parts = urlsplit(proxy)
    return parts.hostname or "", parts.port or 80


def _request_text(request: PageRequest) -> str:
    """The request as sent: a path's own query and the params in one (`?` + params after it showed `%3F`)."""
    return display_url(request.page_url())


def _shares_a_record(records: list[Any], others: list[Any]) -> bool:
    """Whether a record of `records` is also one of `others`, as JSON with its keys sorted: one set lookup a record,
    where comparing each with each was page_size² comparisons (a minute of check at page_size = 20000)."""
    seen = {json.dumps(other, sort_keys=True, default=str) for other in others}
    return any(json.dumps(record, sort_keys=True, default=str) in seen for record in records)


def _next_page(first: PageRequest, following: PageRequest | None) -> str:
    """What the paginator found for the next page, as the parameters that changed."""
    if following is None:
        return "none"
    if following.url != first.url:
        return "a Link rel=next"
    changed = {key: value for key, value in following.params.items() if first.params.get(key) != value}
    return ", ".join(f"{key}={value[:24]}{'…' if len(value) > 24 else ''}" for key, value in changed.items()) or "yes"


def _body_shape(body: Any) -> str:
    """What an empty page's body held, for a records_path that may point at the wrong key."""
    if isinstance(body, dict):
        return f"top-level keys of the body: {', '.join(list(body)[:12])}"
    return "the body is empty (204 No Content) or null" if body is None else "the body is a list"


def _text_verdict(checker: Checker) -> str:
    counts = {status: sum(step.status == status for step in checker.steps) for status in MARKS}
    if checker.exit_code == 0:
        return f"check passed: {counts['ok']} ok, {counts['warning']} warning(s)"
    first = next(step for step in checker.steps if step.status == "failed")
    return (
        f"check failed: {counts['failed']} failed, {counts['skipped']} skipped; "
        f"exit {checker.exit_code} (first failure: {first.label})"
    )


def usage_error_document(error: ConfigError) -> str:
    """The JSON report of a check whose command line was refused: one failed `arguments` step, exit 2."""
    step = Step("arguments", "", "failed", 0.0, error.message, [], "python -m etl check --help lists the options", error.exit_code)
    return _json_report(error.exit_code, None, [step])


def _json_report(exit_code: int, config: str | None, steps: Sequence[Step]) -> str:
    """`check --format json`'s one document."""
    document = {"ok": exit_code == 0, "exit_code": exit_code, "config": config, "steps": [asdict(step) for step in steps]}
    # on a stdout that is not UTF-8, `backslashreplace` wrote é as `\xe9`, which no JSON reader takes
    return json.dumps(document, ensure_ascii=not takes_utf8(sys.stdout), indent=2)


async def _stopped_by_signal(steps: Awaitable[None]) -> bool:
    """Run the steps until they end or SIGINT/SIGTERM stops them; whether a signal did.

    The report of the steps that ran is printed either way: `timeout 60 etl check --format json | jq`
    otherwise got an empty stdout from a check stopped during a slow step.
    """
    running = asyncio.ensure_future(steps)
    loop = asyncio.get_running_loop()
    signalled: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        signalled.append(signum)
        running.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        await running
    except asyncio.CancelledError:
        if not signalled:
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return bool(signalled)


async def run_check(config_path: Path, save_certs: str | None, output_format: str, named_by: str | None = None) -> int:
    """Run every step, print the report (text as it goes, or one JSON document), return the exit code."""
    text_mode = output_format == "text"

    def emit(step: Step) -> None:
        if text_mode:
            print("\n".join(step.text_lines()), flush=True)

    if text_mode:
        print(f"etl check: {config_path}", flush=True)
    checker = Checker(config_path, save_certs, emit, named_by)
    if await _stopped_by_signal(checker.run()):
        checker.record_interruption()
    if text_mode:
        print(_text_verdict(checker), flush=True)
    else:
        print(_json_report(checker.exit_code, str(config_path), checker.steps), flush=True)
    return checker.exit_code


def _set_client_auth(other: str) -> str:
    return f'the token endpoint accepts client_auth = "{other}": set it in [auth]'
