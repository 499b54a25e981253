"""A new user's first mistakes against an API of their own: each ends with a message that says what to change."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from loopback import Handler, serving

import tomlwriter
from etlproc import Finished, run_etl

WIDGETS = [
    {"widget_id": n, "name": f"w{n}", "qty": n, "modified": f"2025-01-{n:02d}T12:00:00Z"} for n in range(1, 21)
]


def _widget_api(records: list[dict[str, Any]]) -> dict[tuple[str, str], Handler]:
    """A token endpoint and /api/v2/widgets serving `records` on one page, as {"result": {"rows": [...]}}."""

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "newcomer-token", "expires_in": 3600, "token_type": "Bearer"})

    async def widgets(_request: web.Request) -> web.Response:
        return web.json_response({"result": {"rows": records}})

    return {("POST", "/oauth2/token"): token, ("GET", "/api/v2/widgets"): widgets}


def _widgets_config(directory: Path, origin: str, database_url: str, **resource: Any) -> Path:
    """The config a newcomer writes for the widget API, with `resource` keys changed."""
    document: dict[str, Any] = {
        "api": {"base_url": f"{origin}/api/v2"},
        "auth": {"token_url": f"{origin}/oauth2/token", "client_id": "newcomer"},
        "database": {"url": database_url},
        "resources": [{
            "name": "widgets",
            "path": "/widgets",
            "records_path": "result.rows",
            "primary_key": ["widget_id"],
            "cursor_field": "modified",
            "columns": {"widget_id": "integer", "name": "string", "qty": "integer", "modified": "datetime"},
            **resource,
        }],
    }
    return tomlwriter.write(directory / "config.toml", document)


async def _sync(tmp_path: Path, fresh_database: Callable[[str], Any], **resource: Any) -> Finished:
    url = await fresh_database("sqlite")
    async with serving(_widget_api(WIDGETS)) as origin:
        return await run_etl("sync", "--config", str(_widgets_config(tmp_path, origin, url, **resource)))


async def test_rejects_over_max_rejects_say_why(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """`name = "integer"` rejected all 20 records with exit 1 and "they are in etl_rejects": the reason, the one
    thing to change, was only in the database."""
    columns = {"widget_id": "integer", "name": "integer", "qty": "integer", "modified": "datetime"}
    result = await _sync(tmp_path, fresh_database, columns=columns)
    assert result.returncode == 1, result.stderr
    error = next(line for line in result.stderr.splitlines() if " ERROR " in line)
    assert "20 records were rejected (widgets: 20)" in error
    assert "name: Input should be a valid integer" in error and "(got 'w1')" in error, error


async def test_a_404_on_every_window_names_base_url_and_path(tmp_path: Path, fresh_database: Callable[[str], Any]) -> None:
    """base_url `/api/v3` for `/api/v2`: every sync said "404 from URL: 404: Not Found", while check said which keys
    make that URL. Cron's log is where the user reads it."""
    url = await fresh_database("sqlite")
    async with serving(_widget_api(WIDGETS)) as origin:
        config = _widgets_config(tmp_path, origin, url)
        config.write_text(config.read_text().replace("/api/v2", "/api/v3", 1))
        result = await run_etl("sync", "--config", str(config))
    assert result.returncode == 1, result.stderr
    error = result.stderr[result.stderr.index(" ERROR "):]
    assert "404 from" in error and f"[api].base_url ({origin}/api/v3) + the path of 'widgets' ('/widgets')" in error, error


async def test_a_column_no_record_carries_is_a_warning_naming_the_fields_left(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """`nmae = "string"` loaded 20 rows with nmae NULL in each, exit 0 and not a word. A field sent as null is no typo,
    nor is one declared `nullable = true`, which an API may leave out when it is empty."""
    records = [{**record, "note": None} for record in WIDGETS]
    url = await fresh_database("sqlite")
    async with serving(_widget_api(records)) as origin:
        columns = {
            "widget_id": "integer", "nmae": "string", "qty": "integer", "modified": "datetime", "note": "text",
            "cancelled_at": {"type": "datetime", "nullable": True},
        }
        result = await run_etl("sync", "--config", str(_widgets_config(tmp_path, origin, url, columns=columns)))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, result.stderr
    assert "column 'nmae' was in none of the 20 records read" in warnings[0]
    assert "resources.widgets.columns.nmae" in warnings[0] and "fields no column takes: name" in warnings[0], warnings[0]


async def test_check_warns_of_a_column_no_record_on_the_page_carries(
    tmp_path: Path, fresh_database: Callable[[str], Any]
) -> None:
    """check passed `nmae = "string"` with a tick: the first place a newcomer looks said nothing of the typo."""
    url = await fresh_database("sqlite")
    async with serving(_widget_api(WIDGETS)) as origin:
        columns = {"widget_id": "integer", "nmae": "string", "qty": "integer", "modified": "datetime"}
        result = await run_etl("check", "--config", str(_widgets_config(tmp_path, origin, url, columns=columns)))
    step = next(line for line in result.stdout.splitlines() if "resource widgets" in line)
    assert step.startswith("!"), result.stdout
    assert "column 'nmae' was in none of the 20 records" in result.stdout and "fields no column takes: name" in result.stdout


@pytest.mark.parametrize("command", ["sync", "backfill", "check", "migrate", "status", "demo"])
async def test_every_option_in_help_says_what_it_does(command: str) -> None:
    """`check --help` listed `--format {text,json}` with nothing after it."""
    result = await run_etl(command, "--help")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", options.strip("\n"))
    described = {entry: [word for word in re.sub(r"\{[^}]*\}", "", entry).split() if word[0] != "-" and not word.isupper()]
                 for entry in entries}
    bare = [entry for entry, words in described.items() if not words]
    assert not bare, bare
