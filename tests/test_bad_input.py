"""Bad input, property-based: never a traceback, never a lost or silently changed value.

- any TOML document is either a valid config or a ConfigError (exit 2) that names a key;
- any JSON value for any column type is either loaded exactly or rejected with its raw payload;
- malformed pages end with a clear error and lose nothing already committed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import tomllib
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from etl import runs
from etl.config import Config, config_from_document
from etl.db import create_engine
from etl.demo import demo_document
from etl.errors import ConfigError
from etl.progress import NoProgress
from etl.records import BLANKABLE_TYPES, RecordValidator, raw_json
from etl.schema import resource_table
from etl.simulator import Faults, Simulator, SimulatorSettings
from etl.store import LoadBatch, Store

import tomlwriter
from dbquery import scalar

COLUMN_TYPES = ["string", "text", "integer", "bigint", "float", "decimal", "boolean", "date", "datetime", "json"]
TRIED = {"configs": 0, "values": 0}

toml_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=20),
    st.dates(), st.datetimes(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=3),
    max_leaves=8,
)


def _base() -> dict[str, Any]:
    return demo_document({"url": "sqlite:///etl.db"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token")


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in the document, so that mutations can reach any depth."""
    found = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    """The demo config with a few values replaced, keys deleted or keys added anywhere."""
    document = _base()
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        parent: Any = document
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(toml_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(toml_values)
    return document


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_any_config_document_is_valid_or_a_config_error_naming_a_key(document: dict[str, Any]) -> None:
    """Mutated configs (replaced, deleted, added keys at any depth) never raise anything but ConfigError."""
    TRIED["configs"] += 1
    try:
        text = tomlwriter.dumps(document)
        parsed = tomllib.loads(text)
    except (TypeError, tomllib.TOMLDecodeError):
        return  # not representable as TOML: nothing a user could write
    try:
        config_from_document(parsed)
    except ConfigError as exc:
        first = str(exc).splitlines()[0]
        assert ":" in first and first.split(":")[0].strip(), first


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_text_as_a_config_file_is_valid_or_exit_2(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """Arbitrary text in config.toml is a ConfigError, never a crash."""
    from etl.config import load_config

    path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.exit_code == 2


json_values = st.recursive(  # what parse_json can produce: the standard library's fallback gives NaN, Infinity and lone surrogates
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
    | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=4)
    | st.sampled_from(["123.40", "1e400", "NaN", "2024-02-30", "2024-01-01T10:00:00+05:00", "1704067200", "true", "0", "", " 1 "]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


def _resource(column_type: str) -> Any:
    document = _base()
    document["resources"] = [{
        "name": "probe", "path": "/probe", "primary_key": ["id"],
        "columns": {"id": "integer", "value": column_type},
    }]
    return config_from_document(document).resources[0]


VALIDATORS = {column_type: RecordValidator(_resource(column_type)) for column_type in COLUMN_TYPES}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COLUMN_TYPES), json_values)
def test_any_json_value_for_any_column_type_is_a_row_or_a_reject(column_type: str, value: Any) -> None:
    """Validation never raises: a value becomes a typed row or a reject carrying the record exactly as parsed."""
    TRIED["values"] += 1
    record = {"id": 1, "value": value}
    page = VALIDATORS[column_type].validate([record])
    assert len(page.rows) + len(page.rejects) == 1
    if page.rejects:
        assert json.loads(page.rejects[0].raw) == json.loads(raw_json(record))
        assert "value" in page.rejects[0].error
    else:
        _assert_faithful(column_type, value, page.rows[0]["value"])


def _assert_faithful(column_type: str, raw: Any, loaded: Any) -> None:
    """A value that is accepted means the same thing after validation ("" is no value of a type that has no empty one)."""
    if raw is None or (raw == "" and column_type in BLANKABLE_TYPES):
        assert loaded is None
    elif column_type in ("integer", "bigint") and not isinstance(raw, str):
        assert loaded == raw
    elif column_type == "decimal" and isinstance(raw, str):
        assert loaded == Decimal(raw.strip())
    elif column_type == "float" and isinstance(raw, float):
        assert loaded == raw and math.isfinite(loaded)
    elif column_type == "json":
        assert loaded == raw
    elif column_type == "datetime":
        assert isinstance(loaded, datetime) and loaded.utcoffset().total_seconds() == 0
    elif column_type == "date":
        assert isinstance(loaded, date)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(COLUMN_TYPES), json_values)
def test_accepted_values_read_back_unchanged_from_the_database(tmp_path: Path, column_type: str, value: Any) -> None:
    """What validation accepts, SQLite stores and returns unchanged (PostgreSQL and MariaDB: tests/test_store.py)."""
    page = VALIDATORS[column_type].validate([{"id": 1, "value": value}])
    if not page.rows:
        return
    asyncio.run(_roundtrip(tmp_path / f"{column_type}.db", column_type, page.rows[0]["value"]))


async def _roundtrip(path: Path, column_type: str, expected: Any) -> None:
    path.unlink(missing_ok=True)
    resource = _resource(column_type)
    engine = create_engine(f"sqlite:///{path}")
    try:
        store = Store(engine)
        await store.prepare([resource], auto_migrate=True)
        batch = LoadBatch(rows={"probe": [{"id": 1, "value": expected}]})
        await store.commit(batch, run_id=1)
        async with engine.connect() as connection:
            stored = (await connection.execute(select(resource_table(resource).c.value))).scalar()
    finally:
        await engine.dispose()
    if isinstance(expected, float) and not isinstance(stored, float):
        stored = float(stored)
    assert stored == expected


# -- malformed pages --------------------------------------------------------------------------------


async def _sync_orders(make_config: Callable[..., Config], sim: Simulator, url: str, **api: Any) -> runs.RunOutcome:
    config = make_config(sim, url, resources=["orders"], api={"max_retries": 2, "retry_backoff_s": 0.01, **api})
    return await runs.sync(config, None, asyncio.Event(), NoProgress())




@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"rate_html": 1.0}, "is HTML, not JSON"),
        ({"rate_truncated": 1.0}, "cut short"),
        ({"repeat_cursor": True}, "seems to ignore the 'page' parameter"),
    ],
)
async def test_malformed_pages_end_with_a_clear_error_and_keep_what_was_committed(
    make_config: Callable[..., Config], fresh_database: Callable[[str], Any], fault: dict[str, Any], message: str
) -> None:
    """A first sync commits; then the API turns bad: exit 1 with the reason, and the rows already loaded remain."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(counts={"orders": 500})) as sim:
        first = await _sync_orders(make_config, sim, url)
        loaded = await scalar(url, "SELECT COUNT(*) FROM orders")
        sim.faults.update(fault)
        sim.touch("orders", list(range(1, 401)), at=datetime.now().astimezone() - __import__("datetime").timedelta(minutes=30))
        second = await _sync_orders(make_config, sim, url)

    assert first.exit_code == 0 and loaded > 0
    assert second.exit_code == 1
    assert message in str(second.error)
    assert await scalar(url, "SELECT COUNT(*) FROM orders") == loaded


async def test_a_cursor_that_never_ends_is_stopped(make_config: Callable[..., Config], fresh_database: Callable[[str], Any]) -> None:
    """The events API returning the same next_cursor forever ends the window with an error, not a loop."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(faults=Faults(repeat_cursor=True))) as sim:
        config = make_config(sim, url, resources=["events"])
        outcome = await runs.sync(config, None, asyncio.Event(), NoProgress())
    assert outcome.exit_code == 1 and "a second time" in str(outcome.error)


async def test_a_body_of_the_wrong_shape_names_records_path(make_config: Callable[..., Config], fresh_database: Callable[[str], Any]) -> None:
    """records_path pointing nowhere says so and lists the keys the body has."""
    url = await fresh_database("sqlite")
    async with Simulator() as sim:
        document = make_config(sim, url, resources=["orders"]).model_dump(mode="json", exclude={"source_path"})
        bad = copy.deepcopy(document)
        bad["resources"][0]["records_path"] = "items"
        outcome = await runs.sync(config_from_document(_undump(bad)), None, asyncio.Event(), NoProgress())
    assert outcome.exit_code == 1
    assert "records_path 'items' is not in the body; its top-level keys are: data" in str(outcome.error)


def _undump(document: dict[str, Any]) -> dict[str, Any]:
    """A model_dump(mode='json') made loadable again (durations are dumped as ISO-8601 strings already)."""
    return document


async def test_an_enormous_page_is_loaded_without_trouble(make_config: Callable[..., Config], fresh_database: Callable[[str], Any]) -> None:
    """One page of 1,000 records (the simulator's maximum) of orders loads whole."""
    url = await fresh_database("sqlite")
    async with Simulator(SimulatorSettings(counts={"orders": 5000})) as sim:
        document = make_config(sim, url, resources=["orders"]).model_dump(mode="json", exclude={"source_path"})
        document["resources"][0]["pagination"]["page_size"] = 1000
        outcome = await runs.sync(config_from_document(document), None, asyncio.Event(), NoProgress())
    assert outcome.exit_code == 0, outcome.error
    stats = outcome.resources["orders"]
    assert stats.loaded + stats.rejected == 5000
    assert stats.pages <= stats.windows + 5  # every window asked once, the full one in pages of 1,000


def test_zz_report_how_many_inputs_were_tried() -> None:
    """Printed for the closing note (pytest -s): how many generated inputs the properties above checked."""
    print(f"bad-input properties: {TRIED['configs']} config documents, {TRIED['values']} JSON values tried")
