"""HTTP as legacy APIs write it, from a raw socket: `sync` as a subprocess, then the table.

Each answer is bytes on the wire (status line, headers, body) so that a test can send what
aiohttp.web would refuse to: a wrong Content-Length, a Content-Encoding etl did not ask for,
JSON labelled as HTML. Either every record is loaded once with exit 0, or the run fails
(exit 1) with a message that says the API is at fault, and is not retried when another
attempt would bring the same bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

import tomlwriter
from dbquery import sqlite_rows
from etlproc import Finished, etl_env, run_etl

RECORDS, PAGE_SIZE = 25, 10
TOKEN = json.dumps({"access_token": "wire-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
Answer = Callable[[int], bytes]  # page number -> the whole HTTP response


def page_body(page: int, **fields: object) -> bytes:
    """Page `page` of RECORDS records, `{"data": [...]}`, with non-ASCII text in each."""
    first = (page - 1) * PAGE_SIZE + 1
    records = [
        {"id": i, "updated_at": f"2024-01-01T00:00:{i:02}Z", "name": f"Café {i}", **fields}
        for i in range(first, min(first + PAGE_SIZE, RECORDS + 1))
    ]
    return json.dumps({"data": records}, ensure_ascii=False).encode()


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    """An HTTP/1.1 response with the given header lines and a Content-Length, unless one is among them."""
    lines = [f"HTTP/1.1 {status}", *headers]
    if not any(line.lower().startswith(("content-length:", "transfer-encoding:")) for line in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


TOKEN_ANSWER = response(TOKEN, "Content-Type: application/json")


async def _read_request(reader: asyncio.StreamReader) -> str | None:
    """The request target of the next request on the connection, its headers and body read; None at its end."""
    line = await reader.readline()
    if not line:
        return None
    length = 0
    while (header := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = header.decode().partition(":")
        length = int(value) if name.strip().lower() == "content-length" else length
    await reader.readexactly(length)
    return line.decode().split(" ")[1]


@asynccontextmanager
async def raw_api(answer: Answer, token: bytes = TOKEN_ANSWER) -> AsyncIterator[tuple[str, list[int]]]:
    """A token endpoint (answering `token`) and /api/items on one loopback port; yields the origin and the pages asked for."""
    asked: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (target := await _read_request(reader)) is not None:
                parts = urlsplit(target)
                if parts.path.endswith("/token"):
                    writer.write(token)
                else:
                    asked.append(int(parse_qs(parts.query).get("page", ["1"])[0]))
                    writer.write(answer(asked[-1]))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", asked
    finally:
        server.close()


def write_config(directory: Path, origin: str, **api: object) -> Path:
    """One resource, `items`, in pages of PAGE_SIZE, full refresh, into SQLite; few and quick retries."""
    return tomlwriter.write(directory / "config.toml", {
        "api": {"base_url": f"{origin}/api", "max_retries": 2, "retry_backoff_s": 0.01, "timeout_s": 10, **api},
        "auth": {"token_url": f"{origin}/oauth2/token", "client_id": "wire"},
        "database": {"url": f"sqlite:///{directory / 'etl.db'}"},
        "resources": [{
            "name": "items", "path": "/items", "records_path": "data", "primary_key": ["id"], "cursor_field": "updated_at",
            "pagination": {"style": "page", "page_param": "page", "size_param": "page_size", "page_size": PAGE_SIZE},
            "columns": {"id": "integer", "updated_at": "datetime", "name": "string", "blob": {"type": "json", "nullable": True}},
        }],
    })


async def sync(tmp_path: Path, answer: Answer) -> tuple[Finished, list[int]]:
    async with raw_api(answer) as (origin, asked):
        finished = await run_etl("--config", str(write_config(tmp_path, origin)), "sync", env=etl_env())
    return finished, asked


def loaded(tmp_path: Path) -> list[tuple[int, str]]:
    return sqlite_rows(f"sqlite:///{tmp_path / 'etl.db'}", "SELECT id, name FROM items ORDER BY id")


def assert_all_loaded_once(tmp_path: Path, finished: Finished) -> None:
    assert finished.returncode == 0, finished.stderr
    assert loaded(tmp_path) == [(i, f"Café {i}") for i in range(1, RECORDS + 1)]


def assert_failed_unretried(finished: Finished, asked: list[int], *said: str) -> None:
    """Exit 1 on the first page after one request, saying each of `said`, with no traceback."""
    assert finished.returncode == 1, finished.stderr
    assert asked == [1], finished.stderr
    assert "Traceback" not in finished.stderr and "internal error" not in finished.stderr, finished.stderr
    for words in said:
        assert words in finished.stderr, finished.stderr


@pytest.mark.parametrize("content_type", ["text/html", "text/html; charset=UTF-8"])
async def test_json_labelled_as_html_is_read_as_json(tmp_path: Path, content_type: str) -> None:
    """PHP answers `Content-Type: text/html` unless told otherwise, and many legacy APIs are PHP: their JSON
    was refused as "HTML, not JSON (a login page or a proxy?)", exit 1, and nothing loaded."""
    finished, _ = await sync(tmp_path, lambda page: response(page_body(page), f"Content-Type: {content_type}"))
    assert_all_loaded_once(tmp_path, finished)


async def test_json_nested_too_deep_fails_the_page_without_a_traceback(tmp_path: Path) -> None:
    """orjson refuses nesting past 1,024 levels and the standard library, asked why, hit Python's recursion
    limit: a traceback and "internal error". It is the API's page at fault, said so, and not retried."""
    deep = b"[" * 100_000 + b"]" * 100_000
    finished, asked = await sync(tmp_path, lambda page: response(
        page_body(page).replace(b'"name": "Caf', b'"blob": ' + deep + b', "name": "Caf', 1), "Content-Type: application/json"
    ))
    assert_failed_unretried(finished, asked, "nested too deep")


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"id": 1}\n{"id": 2}\n', "more than one JSON value"),
        (page_body(1) + b"\n<!-- served in 3 ms -->", "more than one JSON value"),
    ],
    ids=["ndjson", "trailing-comment"],
)
async def test_text_after_a_whole_json_value_is_not_retried_as_a_cut_body(tmp_path: Path, body: bytes, said: str) -> None:
    """NDJSON, or a debug comment after the JSON: the body came whole, and every attempt brings the same.
    It was "the JSON body is cut short or broken", retried max_retries times."""
    finished, asked = await sync(tmp_path, lambda _page: response(body, "Content-Type: application/json"))
    assert_failed_unretried(finished, asked, said, "the API")


async def test_a_content_encoding_etl_did_not_offer_fails_at_once_as_the_apis_fault(tmp_path: Path) -> None:
    """`Content-Encoding: br` without the Brotli package (etl then offers gzip and deflate only) was
    "request failed: ClientResponseError: 400, message='Can not decode...'": a 400 the API never sent,
    retried max_retries times though every attempt brings the same bytes."""
    finished, asked = await sync(tmp_path, lambda page: response(
        page_body(page), "Content-Type: application/json", "Content-Encoding: br"
    ))
    assert_failed_unretried(finished, asked, "Content-Encoding", "the API")
    assert "400" not in finished.stderr and "ClientResponseError" not in finished.stderr, finished.stderr


async def test_an_answer_that_is_not_http_is_named_so_without_the_body_it_carried(tmp_path: Path) -> None:
    """The body alone, without a status line (an HTTP/0.9-style server, or a Content-Length too short that leaves
    the body's end where the next status line should be). aiohttp's "400, message='Bad status line: ...'"
    quoted the page's records over several lines in the error, and in etl_runs."""
    finished, asked = await sync(tmp_path, page_body)
    assert finished.returncode == 1, finished.stderr
    error = sqlite_rows(f"sqlite:///{tmp_path / 'etl.db'}", "SELECT error FROM etl_runs")[0][0]
    assert "is not valid HTTP" in error and "the API is at fault" in error, error
    assert "400" not in error and "\n" not in error.split("hint:")[0].strip() and '"id": 5' not in error, error
    assert len(asked) == 3  # retried: a connection left in a bad state may heal


@pytest.mark.parametrize("encoding", [None, "gzip"], ids=["gzip-undeclared", "gzip-twice"])
async def test_a_gzipped_body_the_headers_do_not_account_for_is_read(tmp_path: Path, encoding: str | None) -> None:
    """A pre-compressed file served without `Content-Encoding: gzip`, or compressed again by a proxy that
    declares only its own layer: the bytes left start with gzip's magic number, which no JSON does. It was
    "is not UTF-8 ...: an API that sends another charset must declare it", which no charset fixes."""
    def gzipped(page: int) -> bytes:
        body = gzip.compress(page_body(page))
        headers = ["Content-Type: application/json"]
        if encoding:
            body, headers = gzip.compress(body), [*headers, f"Content-Encoding: {encoding}"]
        return response(body, *headers)

    finished, _ = await sync(tmp_path, gzipped)
    assert_all_loaded_once(tmp_path, finished)


async def test_a_header_line_longer_than_8_kb_is_read(tmp_path: Path) -> None:
    """A legacy API's 20 kB session cookie (or a Link with a long cursor): aiohttp's 8,190-byte default ended
    the run, where curl and Python's http.client (65,536) read it."""
    finished, _ = await sync(tmp_path, lambda page: response(
        page_body(page), "Content-Type: application/json", f"Set-Cookie: JSESSIONID={'s' * 20_000}; Path=/"
    ))
    assert_all_loaded_once(tmp_path, finished)


async def test_a_header_too_long_to_read_is_named_without_its_value(tmp_path: Path) -> None:
    """The parser's message quoted the header's start: a session cookie in the error and in etl_runs."""
    finished, _ = await sync(tmp_path, lambda page: response(
        page_body(page), "Content-Type: application/json", f"Set-Cookie: JSESSIONID=C00k1e{'s' * 100_000}"
    ))
    assert finished.returncode == 1, finished.stderr
    assert "is not valid HTTP" in finished.stderr and "C00k1e" not in finished.stderr, finished.stderr


async def test_a_number_beyond_a_double_is_stored_as_sent_not_rejected_as_infinity(tmp_path: Path) -> None:
    """`1e400` is valid JSON. orjson refuses it, the standard library read it as Infinity, and the record was
    rejected as "holds NaN or Infinity", its raw payload in etl_rejects showing Infinity, not what came."""
    def huge(page: int) -> bytes:
        return response(page_body(page).replace(b'"name": "Caf\xc3\xa9 1"', b'"name": "Caf\xc3\xa9 1", "blob": {"x": 1e400}'),
                        "Content-Type: application/json")

    finished, _ = await sync(tmp_path, huge)
    assert_all_loaded_once(tmp_path, finished)
    stored = sqlite_rows(f"sqlite:///{tmp_path / 'etl.db'}", "SELECT blob FROM items WHERE id = 1")[0][0]
    assert Decimal(json.loads(stored, parse_float=Decimal)["x"]) == Decimal("1e400"), stored


async def test_check_on_an_api_that_sends_headers_then_stalls_points_at_timeout_s(tmp_path: Path) -> None:
    """A page whose body trickles past [api].timeout_s: check's hint was "compare the request above with the
    API's documentation ... a 403 means the token's scopes", beside a message saying to raise timeout_s."""
    body = page_body(1)
    stalled = response(body, "Content-Type: application/json")[: -len(body) // 2]  # half the body, then nothing

    async with raw_api(lambda _page: stalled) as (origin, _):
        config = write_config(tmp_path, origin, timeout_s=0.5, max_retries=0)
        finished = await run_etl("--config", str(config), "check", env=etl_env())
    assert finished.returncode == 1, finished.stdout
    step = next(line for line in finished.stdout.splitlines() if "resource items" in line)
    hint = finished.stdout.split(step, 1)[1].split("hint:", 1)[1].splitlines()[0]
    assert "timed out" in step and "timeout_s" in hint and "403" not in hint, finished.stdout


@pytest.mark.parametrize(
    "answer",
    [
        b"access_token=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3aXJlIn0.c2lnbmF0dXJl&token_type=bearer&expires_in=3600",
        b'{"access_token": "Tok3n-value-of-the-endpoint", "expires_in": 3600}\n<!-- served by auth-7 -->',
    ],
    ids=["form-encoded", "json-and-a-comment"],
)
async def test_a_token_answer_etl_cannot_read_is_quoted_without_the_token(tmp_path: Path, answer: bytes) -> None:
    """A legacy endpoint's 200 in form encoding (GitHub's old default), or JSON with a comment after it, was
    quoted whole as "not a JSON object": the access token in stderr, the summary, etl_runs and check's report."""
    token_answer = response(answer, "Content-Type: application/x-www-form-urlencoded")
    async with raw_api(lambda page: response(page_body(page), "Content-Type: application/json"), token_answer) as (origin, _):
        config = str(write_config(tmp_path, origin))
        finished = await run_etl("--config", config, "sync", env=etl_env())
        checked = await run_etl("--config", config, "check", env=etl_env())
    stored = sqlite_rows(f"sqlite:///{tmp_path / 'etl.db'}", "SELECT error FROM etl_runs")[0][0]
    assert finished.returncode == 3 and checked.returncode == 3, finished.stderr + checked.stdout
    assert "not a JSON object" in finished.stderr + stored and "not a token" in checked.stdout, finished.stderr + checked.stdout
    for shown in (finished.stdout, finished.stderr, stored, checked.stdout, checked.stderr):
        assert "c2lnbmF0dXJl" not in shown and "Tok3n-value" not in shown, shown


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'<?xml version="1.0" encoding="utf-8"?><ArrayOfItem><Item><Id>1</Id></Item></ArrayOfItem>', "application/json"),
        (b"<ArrayOfItem><Item><Id>1</Id></Item></ArrayOfItem>", "text/xml; charset=utf-8"),
    ],
    ids=["xml-prolog", "xml-content-type"],
)
async def test_xml_is_named_xml_with_the_settings_that_ask_for_json(tmp_path: Path, body: bytes, content_type: str) -> None:
    """A WCF or JAX-RS service answers XML unless asked otherwise. It was "HTML, not JSON (a login page or a
    proxy?)", which sent the user looking for a proxy; the setting that helps is a format parameter or Accept."""
    finished, asked = await sync(tmp_path, lambda _page: response(body, f"Content-Type: {content_type}"))
    assert_failed_unretried(finished, asked, "is XML, not JSON", "params", "Accept")
    assert "HTML" not in finished.stderr, finished.stderr


async def test_a_202_accepted_is_asked_again_not_taken_as_the_last_page(tmp_path: Path) -> None:
    """A legacy API answers `202 Accepted` ("processing") while it prepares a page. Its body holds no list,
    so it was an empty page: the window ended there, 10 of 25 records loaded, exit 0."""
    def preparing_page_2_once(page: int) -> bytes:
        if page == 2 and not seen:
            seen.append(page)
            return response(b'{"status": "processing"}', "Content-Type: application/json", "Retry-After: 0", status="202 Accepted")
        return response(page_body(page), "Content-Type: application/json")

    seen: list[int] = []
    finished, asked = await sync(tmp_path, preparing_page_2_once)
    assert_all_loaded_once(tmp_path, finished)
    assert asked == [1, 2, 2, 3], asked


async def test_an_api_that_stays_at_202_fails_the_run_saying_so(tmp_path: Path) -> None:
    finished, _ = await sync(tmp_path, lambda _page: response(b"", "Retry-After: 0", status="202 Accepted"))
    assert finished.returncode == 1, finished.stderr
    assert "202" in finished.stderr and "gave up after 3 attempts" in finished.stderr, finished.stderr


async def test_a_406_names_the_accept_header_to_set(tmp_path: Path) -> None:
    """A strict JSON:API server refuses `Accept: application/json` with 406; the message gave no lead to
    [api].headers, and check's hint spoke of the URL's parts and of 403 scopes."""
    refusal = response(b'{"errors": [{"status": "406", "title": "Not Acceptable"}]}',
                       "Content-Type: application/vnd.api+json", status="406 Not Acceptable")
    async with raw_api(lambda _page: refusal) as (origin, asked):
        config = str(write_config(tmp_path, origin))
        finished = await run_etl("--config", config, "sync", env=etl_env())
        checked = await run_etl("--config", config, "check", env=etl_env())
    assert finished.returncode == 1 and checked.returncode == 1, finished.stderr + checked.stdout
    for shown in (finished.stderr, checked.stdout):
        hint = shown.split("hint:", 1)[1].splitlines()[0]
        assert "[api].headers" in hint and "Accept" in hint and "403" not in hint, shown


async def test_json_encoded_twice_is_read(tmp_path: Path) -> None:
    """A .NET action returning a string it serialised itself, or a gateway mapping template, sends the page as
    one JSON string. It failed as "the body is a JSON str, not records", and check hinted at records_path."""
    finished, _ = await sync(tmp_path, lambda page: response(
        json.dumps(page_body(page).decode()).encode(), "Content-Type: application/json"
    ))
    assert_all_loaded_once(tmp_path, finished)


async def test_a_byte_that_is_not_utf8_rejects_its_record_not_the_page(tmp_path: Path) -> None:
    """One customer name stored in Latin-1 by a legacy API that declares no charset: the whole page failed,
    "is not UTF-8", and every nightly run after stopped at that page with nothing past it loaded and no
    setting to get by. The record goes to etl_rejects with the byte visible (\\udce9 for 0xE9); the rest loads."""
    def one_bad_byte(page: int) -> bytes:
        body = page_body(page)
        if page == 2:
            body = body.replace("Café 12".encode(), "Café 12".encode("latin-1"))
        return response(body, "Content-Type: application/json")

    finished, asked = await sync(tmp_path, one_bad_byte)

    assert finished.returncode == 1, finished.stderr  # max_rejects = 0
    assert "Traceback" not in finished.stderr and "internal error" not in finished.stderr, finished.stderr
    assert [row[0] for row in loaded(tmp_path)] == [i for i in range(1, RECORDS + 1) if i != 12]
    [(key, raw, error)] = sqlite_rows(f"sqlite:///{tmp_path / 'etl.db'}", "SELECT record_key, raw, error FROM etl_rejects")
    assert "12" in key and "Caf\\udce9 12" in raw, raw
    assert "not UTF-8" in error and "charset" in error, error
    assert "items: 24 loaded, 1 rejected" in finished.stdout, finished.stdout
