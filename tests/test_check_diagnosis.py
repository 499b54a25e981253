"""`python -m etl check` against broken setups etl did not build: the failing line names the cause and the key.

Each test runs check as a subprocess (as a user would) against a loopback server
of its own, and reads the report's failed step: its summary, its hint, the exit code.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loopback import Handler, serving
from sqlalchemy import make_url

from etl.db import create_engine
from etl.simulator import Simulator, SimulatorSettings
from etl.simulator.tls import make_certificate

from etlproc import Finished, run_etl, write_config


def failed_block(out: str, start: str) -> str:
    """The report's failed step that starts with `start` (`✘ tls`), with its detail and hint lines."""
    return next(block for block in re.split(r"\n(?=[✔!✘–] |check )", out) if block.startswith(start))


async def check_against_products(simulator: Simulator, tmp_path: Path, products: Handler) -> Finished:
    """`check` of the products resource, its API answered by `products` (the token from the simulator)."""
    async with serving({("GET", "/api/v1/products"): products}) as origin:
        config = write_config(
            tmp_path, simulator, f"sqlite:///{tmp_path / 'etl.db'}", ["products"], api={"base_url": f"{origin}/api/v1"}
        )
        return await run_check(config)


async def run_check(config: Path) -> Finished:
    return await run_etl("--config", str(config), "check", timeout=60)


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts TCP connections and never says a word: a TLS handshake there hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()


async def test_a_tls_handshake_that_hangs_says_so_with_the_timeout_key(
    simulator: Simulator, silent_port: int, tmp_path: Path
) -> None:
    """It said "the connection failed during TLS: _ssl.c:989: The handshake operation timed out"."""
    config = write_config(
        tmp_path, simulator, f"sqlite:///{tmp_path / 'etl.db'}", ["products"],
        auth={"token_url": f"https://127.0.0.1:{silent_port}/oauth2/token"}, api={"timeout_s": 1},
    )

    result = await run_check(config)

    block = failed_block(result.stdout, "✘ tls token")
    assert result.returncode == 5
    assert "no answer to the TLS handshake within 1s ([api].timeout_s)" in block
    assert "_ssl.c" not in result.stdout
    assert "auth.token_url" in block  # a port that does not speak TLS is the other cause


@pytest.mark.parametrize("content", ["der", "empty", "key"])
async def test_a_ca_bundle_without_a_pem_certificate_says_what_it_holds(
    simulator: Simulator, tmp_path: Path, content: str
) -> None:
    """It said "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4154)" or "[X509] PEM lib"."""
    certificate = make_certificate()
    bundle = tmp_path / "company-ca.cer"
    if content == "der":  # what Windows' certificate export writes by default
        bundle.write_bytes(ssl.PEM_cert_to_DER_cert(certificate.cert_path.read_text()))
    elif content == "key":
        bundle.write_bytes(certificate.key_path.read_bytes())
    else:
        bundle.write_text("")
    config = write_config(tmp_path, simulator, f"sqlite:///{tmp_path / 'etl.db'}", ["products"], api={"ca_bundle": str(bundle)})

    result = await run_check(config)

    block = failed_block(result.stdout, "✘ trust")
    assert result.returncode == 2
    assert f"api.ca_bundle: {bundle} holds no PEM certificate (-----BEGIN CERTIFICATE----- blocks)" in block
    assert "_ssl.c" not in result.stdout
    if content == "der":
        assert f"openssl x509 -inform der -in {bundle} -out" in block


@pytest.mark.parametrize("save_certs", [False, True])
async def test_a_ca_bundle_without_the_servers_issuer_is_added_to_not_replaced(
    tmp_path: Path, save_certs: bool
) -> None:
    """The hint said "point [api].ca_bundle at that file" to a user whose ca_bundle already trusts other
    hosts (another private CA's token endpoint): following it dropped those CAs."""
    bundle = tmp_path / "company-cas.pem"
    other_ca = make_certificate("other-ca")  # its directory goes with it
    bundle.write_bytes(other_ca.cert_path.read_bytes())
    saved = tmp_path / "chain.pem"
    async with Simulator(SimulatorSettings(tls=True)) as sim:
        config = write_config(tmp_path, sim, f"sqlite:///{tmp_path / 'etl.db'}", ["products"], api={"ca_bundle": str(bundle)})
        extra = ["--save-certs", str(saved)] if save_certs else []
        result = await run_etl("--config", str(config), "check", *extra, timeout=60)

    hint = failed_block(result.stdout, "✘ tls").split("hint: ", 1)[1]
    assert result.returncode == 5
    assert f"[api].ca_bundle ({bundle}) does not hold it" in hint
    assert f"add them to {bundle}" in hint
    assert "point [api].ca_bundle at" not in hint and "set [api].ca_bundle =" not in hint


@pytest.mark.parametrize(
    ("failure", "hint"),
    [
        ("500", "the API failed on its side on every attempt"),
        ("dropped", "the API failed on its side on every attempt"),
        ("429", "the API answered 429 Too Many Requests on every attempt"),
    ],
)
async def test_a_resource_the_api_fails_on_is_not_blamed_on_its_request(
    simulator: Simulator, tmp_path: Path, failure: str, hint: str
) -> None:
    """A 500 or a dropped connection, on every attempt, got "compare the request above with the API's
    documentation ... a 403 means the token's scopes do not cover this endpoint": neither fits."""

    async def broken(request: web.Request) -> web.Response:
        if failure == "dropped":
            assert request.transport is not None
            request.transport.close()
        return web.json_response({"message": "no"}, status=429 if failure == "429" else 500)

    result = await check_against_products(simulator, tmp_path, broken)

    block = failed_block(result.stdout, "✘ resource products")
    assert result.returncode == 1
    assert f"hint: {hint}" in block
    assert "a 403 means" not in block


async def test_a_mysql_user_who_may_not_create_tables_is_told_create_was_refused(
    simulator: Simulator, tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """The write step's clean-up (DROP TABLE IF EXISTS, after the CREATE was refused) was refused too on MySQL,
    and its error replaced the CREATE's: "DROP command denied", for a user who needs CREATE."""
    url = await fresh_database("mysql")
    user = f"etl_probe_{uuid.uuid4().hex[:8]}"
    database = make_url(url).database
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(f"CREATE USER '{user}'@'%%'")
        await connection.exec_driver_sql(f"GRANT SELECT, INSERT ON {database}.* TO '{user}'@'%%'")
    try:
        limited = make_url(url).set(username=user).render_as_string(hide_password=False)
        result = await run_check(write_config(tmp_path, simulator, limited, ["products"]))
    finally:
        async with engine.begin() as connection:
            await connection.exec_driver_sql(f"DROP USER '{user}'@'%%'")
        await engine.dispose()

    block = failed_block(result.stdout, "✘ database write")
    assert result.returncode == 1
    assert "CREATE command denied" in block and "DROP" not in block.split("hint:")[0]


async def test_a_400_is_compared_with_the_documentation_without_a_word_of_403(simulator: Simulator, tmp_path: Path) -> None:
    """REQUEST_HINT ended "a 403 means the token's scopes do not cover this endpoint" on every failure but a 403
    (which has a hint of its own): noise beside a 400 that names the parameter it refused."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "unknown parameter: page_size"}, status=400)

    result = await check_against_products(simulator, tmp_path, refuse)

    block = failed_block(result.stdout, "✘ resource products")
    assert result.returncode == 1
    assert "unknown parameter: page_size" in block and "hint: compare the request above" in block
    assert "403" not in block
