"""TLS trust and the network path: ca_bundle, verify_tls = false, HTTPS_PROXY and NO_PROXY.

The simulator serves https with a fresh self-signed certificate for both the
token endpoint and the API. Untrusted, a run ends with exit 5 and says how to
fix it; with the certificate as ca_bundle it loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from etl import runs
from etl.client import ApiClient, PageRequest, RequestCounters
from etl.config import ApiConfig, AuthConfig, Config, config_from_document
from etl.demo import demo_document
from etl.errors import UnreachableError
from etl.progress import NoProgress
from etl.simulator import Simulator, SimulatorSettings
from etl.simulator.tls import make_certificate
from etl.token import TokenManager
from etl.transport import RetryPolicy, build_ssl_context, open_session, translate

from etlproc import etl_env, run_etl, write_config

WARNING = "TLS verification is OFF"


@pytest.fixture
async def tls_sim() -> AsyncIterator[Simulator]:
    """The demo simulator over https with a self-signed certificate."""
    async with Simulator(SimulatorSettings(tls=True)) as sim:
        yield sim


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variables from the machine running the tests."""
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_self_signed_api_exits_5_until_its_certificate_is_the_ca_bundle(
    tls_sim: Simulator, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """`python -m etl sync`: exit 5 naming the host, --save-certs and ca_bundle; with ca_bundle, exit 0."""
    url = await fresh_database("sqlite")
    untrusted = await run_etl(
        "sync", "--config", str(write_config(tmp_path, tls_sim, url, resources=["products"]))
    )

    assert untrusted.returncode == 5, untrusted.stderr
    assert "certificate of 127.0.0.1 is not trusted" in untrusted.stderr
    assert "python -m etl check --save-certs" in untrusted.stderr and "ca_bundle" in untrusted.stderr

    config = write_config(
        tmp_path, tls_sim, url, resources=["products"], api={"ca_bundle": tls_sim.ca_pem_path}
    )
    trusted = await run_etl("sync", "--config", str(config))
    assert trusted.returncode == 0, trusted.stderr


async def test_an_untrusted_certificate_is_not_retried(tls_sim: Simulator) -> None:
    """TLS will not heal within a run: one attempt at the token host, then UnreachableError (exit 5)."""
    api = ApiConfig(base_url=tls_sim.base_url, max_retries=5, retry_backoff_s=1)
    auth = AuthConfig(token_url=tls_sim.token_url, client_id="demo-client")
    counters = RequestCounters()
    async with open_session(api) as session:
        tokens = TokenManager(auth, SecretStr("demo-secret"), session, RetryPolicy.from_api(api))
        client = ApiClient(api, session, tokens, counters)
        with pytest.raises(UnreachableError, match="not trusted") as raised:
            await asyncio.wait_for(client.get(PageRequest(tls_sim.base_url + "/products")), 2)
    assert raised.value.exit_code == 5 and raised.value.host == "127.0.0.1"
    assert tokens.token_requests == 1 and counters.requests == 0


async def test_a_session_with_the_system_store_alone_builds_no_context_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp made a verified context of the system store at its import: building another cost ~20 ms every run."""
    def refused() -> ssl.SSLContext:
        raise AssertionError("a second context of the system store")

    monkeypatch.setattr(ssl, "create_default_context", refused)
    async with open_session(ApiConfig(base_url="https://api.example.test")) as session:
        assert session.connector is not None


def test_ca_bundle_is_added_to_the_system_trust_store_not_substituted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With SSL_CERT_FILE standing in for the system store, both it and ca_bundle are trusted."""
    system, bundle = make_certificate("system-ca"), make_certificate("bundle-ca")
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(system.cert_path))
        context = build_ssl_context(
            ApiConfig(base_url="https://api.example.test", ca_bundle=str(bundle.cert_path))
        )
        assert not isinstance(context, bool)
        subjects = str([cert["subject"] for cert in context.get_ca_certs()])
        assert "system-ca" in subjects and "bundle-ca" in subjects
    finally:
        system.directory.cleanup()
        bundle.directory.cleanup()


def _config(sim: Simulator, database_url: str, **api: Any) -> Config:
    """The demo config's products resource, aimed at `sim`, with [api] overrides."""
    document = demo_document({"url": database_url}, sim.base_url, sim.token_url)
    document["api"] |= api
    document["resources"] = [r for r in document["resources"] if r["name"] == "products"]
    return config_from_document(document)


async def _sync(config: Config) -> runs.RunOutcome:
    """A sync in this process, with the simulator's client secret."""
    return await runs.sync(config, None, asyncio.Event(), NoProgress(), secret=SecretStr("demo-secret"))


async def test_verify_tls_false_connects_and_warns_on_every_run(
    tls_sim: Simulator, fresh_database: Callable[[str], Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Two runs with verify_tls = false: both load the self-signed host, each logs the warning once."""
    config = _config(tls_sim, await fresh_database("sqlite"), verify_tls=False)
    with caplog.at_level(logging.WARNING, logger="etl.transport"):
        outcomes = [await _sync(config), await _sync(config)]
    assert [outcome.exit_code for outcome in outcomes] == [0, 0]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]
    assert len(warnings) == 2


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that records the tunnels it was asked for."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        head = await client_reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        self.tunnels.append(f"{method} {target}")
        host, port = target.rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        client_writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))

    def track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self.handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes one way until either side closes."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[ConnectProxy, str]]:
    """A CONNECT proxy and its URL."""
    recorder = ConnectProxy()
    server = await asyncio.start_server(recorder.track, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield recorder, f"http://127.0.0.1:{port}"
    server.close()
    await recorder.close()
    await server.wait_closed()


async def test_https_proxy_carries_the_token_and_api_requests(
    tls_sim: Simulator,
    fresh_database: Callable[[str], Any],
    proxy: tuple[ConnectProxy, str],
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY set: every connection to the https host is a CONNECT tunnel through the proxy."""
    recorder = await _sync_with_proxy(tls_sim, await fresh_database("sqlite"), proxy, no_proxy_env)
    target = tls_sim.origin.removeprefix("https://")
    assert recorder.tunnels and set(recorder.tunnels) == {f"CONNECT {target}"}


async def test_no_proxy_sends_the_host_around_the_proxy(
    tls_sim: Simulator,
    fresh_database: Callable[[str], Any],
    proxy: tuple[ConnectProxy, str],
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY set but the host in NO_PROXY: the run loads without a single tunnel."""
    no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    recorder = await _sync_with_proxy(tls_sim, await fresh_database("sqlite"), proxy, no_proxy_env)
    assert recorder.tunnels == []


async def _sync_with_proxy(
    tls_sim: Simulator, url: str, proxy: tuple[ConnectProxy, str], env: pytest.MonkeyPatch
) -> ConnectProxy:
    """A sync over https with HTTPS_PROXY set, which must succeed; the proxy's record of tunnels."""
    recorder, proxy_url = proxy
    env.setenv("HTTPS_PROXY", proxy_url)
    outcome = await _sync(_config(tls_sim, url, ca_bundle=tls_sim.ca_pem_path))
    assert outcome.exit_code == 0, outcome.error
    return recorder


@pytest.mark.parametrize(
    ("code", "message", "hint"),
    [
        (10, "certificate has expired", "renew it"),
        (62, "Hostname mismatch, certificate is not valid for '127.0.0.1'.", "not issued for api.example.com"),
        (64, "IP address mismatch, certificate is not valid for '127.0.0.1'.", "not issued for api.example.com"),
        (20, "unable to get local issuer certificate", "--save-certs"),
    ],
)
def test_the_tls_hint_fits_the_verification_failure(code: int, message: str, hint: str) -> None:
    """Only an unknown issuer is fixed by a ca_bundle: an expired certificate or one for another name is not."""
    failure = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    failure.verify_code, failure.verify_message = code, message
    error = translate(failure, "https://api.example.com/v1/orders")
    assert error.exit_code == 5 and message in error.message
    assert error.hint is not None and hint in error.hint
    assert ("cannot fix this" in error.hint) == (code != 20)


async def test_a_proxy_that_refuses_the_tunnel_exits_5_naming_it(
    tls_sim: Simulator, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """A proxy that wants credentials (407): sync said "request ... failed: ClientHttpProxyError", exit 1,
    where check's tcp step says exit 5 and names the proxy."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="corp"\r\n'
                     b"Content-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = write_config(
        tmp_path, tls_sim, await fresh_database("sqlite"), resources=["products"], api={"ca_bundle": tls_sim.ca_pem_path}
    )
    async with server:
        env = {k: v for k, v in etl_env().items() if "proxy" not in k.lower()} | {"HTTPS_PROXY": proxy_url}
        refused = await run_etl("sync", "--config", str(config), env=env)

    assert refused.returncode == 5, refused.stderr
    assert f"the proxy {proxy_url} refused the tunnel to 127.0.0.1:" in refused.stderr
    assert "407 Proxy Authentication Required" in refused.stderr
    assert "ClientHttpProxyError" not in refused.stderr
    assert "credentials" in refused.stderr and "$NO_PROXY" in refused.stderr


async def test_a_proxy_that_is_down_is_named_not_the_host_behind_it(
    tls_sim: Simulator, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """$HTTPS_PROXY at a port where nothing listens: sync said "cannot connect to <the token host>: Connection
    refused", a host that was up, and the hint did not name the proxy that was down."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
    config = write_config(
        tmp_path, tls_sim, await fresh_database("sqlite"), resources=["products"], api={"ca_bundle": tls_sim.ca_pem_path}
    )
    env = {k: v for k, v in etl_env().items() if "proxy" not in k.lower()} | {"HTTPS_PROXY": f"http://user:pw@{dead}"}
    result = await run_etl("sync", "--config", str(config), env=env)

    assert result.returncode == 5, result.stderr
    assert f"cannot connect to the proxy {dead} ($HTTPS_PROXY)" in result.stderr
    assert "$NO_PROXY" in result.stderr
