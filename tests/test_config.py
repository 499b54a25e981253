"""config.toml: every problem is exit 2 with a message that names the key; secrets come from the environment."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import etl
from etl.config import config_from_document, load_config
from etl.demo import demo_document
from etl.durations import parse_duration
from etl.errors import ConfigError

import tomlwriter


def _document() -> dict[str, Any]:
    return copy.deepcopy(demo_document({"url": "sqlite:///etl.db"}, "http://127.0.0.1:1/api/v1", "http://127.0.0.1:1/oauth2/token"))


def _error(document: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as excinfo:
        config_from_document(document)
    assert excinfo.value.exit_code == 2
    return str(excinfo.value)


def test_the_example_config_is_valid_and_matches_the_demo() -> None:
    """The repository's config.toml loads, and it is the demo's config (they must not drift apart)."""
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "config.toml")
    assert [r.name for r in config.resources] == ["orders", "customers", "events", "payments", "products"]
    assert (root / "config.toml").read_text() == (root / "etl" / "demo_config.toml").read_text()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("page_sise", 10, "resources[0].pagination.page_sise: unknown key"),
        ("page_size", "ten", "resources[0].pagination.page_size: Input should be a valid integer"),
        ("page_size", 0, "resources[0].pagination.page_size: Input should be greater than or equal to 1"),
    ],
    ids=["unknown key", "wrong type", "bad value"],
)
def test_a_bad_key_is_named_with_its_path(key: str, value: object, message: str) -> None:
    """A typo, a wrong type or a refused value in a nested key names resources[0].pagination.<key>."""
    document = _document()
    document["resources"][0]["pagination"][key] = value
    assert message in _error(document)


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ((), "synk", "synk: unknown key; did you mean 'sync'?"),
        (("api",), "concurency", "api.concurency: unknown key; did you mean 'concurrency'?"),
        (("resources", 0), "record_path", "resources[0].record_path: unknown key; did you mean 'records_path'?"),
        (("resources", 0, "pagination"), "page_parm", "resources[0].pagination.page_parm: unknown key; did you mean 'page_param'?"),
        (("resources", 2, "pagination"), "cursor_parm", "resources[2].pagination.cursor_parm: unknown key; did you mean 'cursor_param'?"),
        (("resources", 0, "columns", "customer_name"), "sorce", "resources[0].columns.customer_name.sorce: unknown key; did you mean 'source'?"),
        ((), "extra", "extra: unknown key (this table takes api, auth, database, sync, resources)"),
    ],
)
def test_an_unknown_key_is_answered_with_the_key_it_is_nearest(section: tuple[str | int, ...], key: str, message: str) -> None:
    """The message sent the user to SPEC.md, a file no clone of the repository has, to find the spelling."""
    document = _document()
    table: Any = document
    for part in section:
        table = table[part]
    table[key] = 1
    assert message in _error(document)


@pytest.mark.parametrize("fmt", ["%Y-%m", "%Y", "%m-%d", "%H:%M:%S", "%Y-%m 100%%d"])
def test_a_filter_pattern_that_names_no_single_day_is_refused(fmt: str) -> None:
    """`%Y-%m` was cut into day windows that each asked for `since=2024-01&until=2024-01`: a backfill of half a
    month loaded nothing, exit 0. A pattern has to write the year and the day."""
    document = _document()
    document["resources"][0]["filter"]["format"] = fmt
    assert "resources[0].filter.format: " in _error(document)


@pytest.mark.parametrize("fmt", ["%Y%m%d", "%d/%m/%y %H:%M", "%F", "%G-W%V-%u", "%Y.%j", "%s", "%Y-%m-%e"])
def test_a_filter_pattern_that_names_the_day_is_taken(fmt: str) -> None:
    document = _document()
    document["resources"][0]["filter"]["format"] = fmt
    assert config_from_document(document).resources[0].filter.format == fmt  # type: ignore[union-attr]


@pytest.mark.parametrize("value", [5, ["decimal"], True])
def test_a_column_that_is_neither_a_type_nor_a_table_says_what_it_should_be(value: object) -> None:
    document = _document()
    document["resources"][0]["columns"]["total"] = value
    message = _error(document)
    assert 'resources[0].columns.total: must be a type such as "decimal", or a table' in message
    assert "ColumnSpec" not in message



@pytest.mark.parametrize("source", ["customer..name", ".name", "customer."])
def test_a_source_path_with_an_empty_step_is_refused(source: str) -> None:
    """`source = "customer..name"` (a typo) matched no record's field: the column was NULL in every row, exit 0."""
    document = _document()
    document["resources"][0]["columns"]["customer_name"] = {"type": "string", "source": source}
    assert "resources[0].columns.customer_name.source: " in _error(document)

def test_unknown_pagination_style_lists_the_known_ones() -> None:
    document = _document()
    document["resources"][1]["pagination"]["style"] = "pages"
    message = _error(document)
    assert "resources[1].pagination" in message and "'page', 'offset', 'cursor', 'link_header', 'none'" in message


def test_an_error_in_a_resource_names_the_resource_beside_its_index() -> None:
    """With five resources, `resources[3]` is one to count: the line says which resource by name too."""
    document = _document()
    document["resources"][3]["pagination"]["page_size"] = 0
    document["resources"][2]["pagniation"] = {}
    message = _error(document)
    assert "resources[3].pagination.page_size: Input should be greater than or equal to 1 (resource 'payments')" in message
    assert "resources[2].pagniation: unknown key; did you mean 'pagination'? (resource 'events')" in message


@pytest.mark.parametrize("name", ['x"; DROP TABLE y; --', "1abc", "with space", "etl_runs", "orders\n"])
def test_unsafe_or_reserved_table_names_are_refused(name: str) -> None:
    """Table names are identifiers, never SQL: anything else is exit 2 before a connection is made."""
    document = _document()
    document["resources"][0]["name"] = name
    assert "resources[0].name:" in _error(document)


@pytest.mark.parametrize(("key", "name"), [("name", "pg_user"), ("table", "PG_settings"), ("name", "sqlite_orders"), ("table", "SQLite_x")])
def test_table_names_in_a_databases_own_prefix_are_refused(key: str, name: str) -> None:
    """`sqlite_orders` failed every run on SQLite ("object name reserved for internal use"), exit 1; `pg_user` was
    created but PostgreSQL's catalog view of that name took every insert, failing the batch of every resource."""
    document = _document()
    document["resources"][0][key] = name
    message = _error(document)
    assert f"resources[0]: {key} {name!r} is the table's name" in message and "set table" in message


@pytest.mark.parametrize(("key", "name"), [("name", "excluded"), ("table", "Excluded")])
def test_a_table_named_excluded_is_refused(key: str, name: str) -> None:
    """The upsert's `excluded.status` named the table itself: on SQLite a record's new version set each column to its
    old value, exit 0 and nothing updated; PostgreSQL failed every batch, "table reference "excluded" is ambiguous"."""
    document = _document()
    document["resources"][0][key] = name
    message = _error(document)
    assert f"resources[0]: {key} {name!r} is the table's name" in message and "set table" in message


def test_a_resource_named_in_a_databases_prefix_may_set_another_table() -> None:
    document = _document()
    document["resources"][0] |= {"name": "pg_orders", "table": "orders"}
    assert config_from_document(document).resources[0].table_name == "orders"


@pytest.mark.parametrize("name", ['a"; DROP TABLE orders; --', "note\n"])
def test_unsafe_column_names_are_refused(name: str) -> None:
    """A final newline passed too (`$` matches before it): a column "note\\n" that no record field would ever fill."""
    document = _document()
    document["resources"][0]["columns"][name] = "string"
    assert "resources[0].columns:" in _error(document)


@pytest.mark.parametrize(("key", "name", "said"), [
    ("columns", "c" * 64, "64 characters, at most 63"),
    ("name", "o" * 64, "64 characters, at most 63"),
    ("columns", "order-id", "'-' is not allowed"),
    ("table", "sales.orders", "'.' is not allowed"),
    ("columns", "größe", "'ö' is not allowed"),
    ("name", "2024_orders", "must start with a letter or _"),
])
def test_a_name_that_is_no_identifier_says_what_in_it_is_wrong(key: str, name: str, said: str) -> None:
    """A 64-letter column was told "must be a letter or _ followed by letters, digits or _", which it was."""
    document = _document()
    if key == "columns":
        document["resources"][0]["columns"][name] = "string"
    else:
        document["resources"][0][key] = name
    assert said in _error(document)


@pytest.mark.parametrize("name", ["xmin", "xmax", "cmin", "cmax", "ctid", "tableoid", "XMin"])
def test_column_names_postgresql_keeps_for_its_system_columns_are_refused(name: str) -> None:
    """A bounding box's `xmin` loaded on SQLite and MariaDB but failed every run on PostgreSQL ("conflicts with a
    system column name"), exit 1: refused on every database, with the source that reads the field anyway."""
    document = _document()
    document["resources"][0]["columns"][name] = "float"
    message = _error(document)
    assert f"resources[0].columns: column {name!r}: PostgreSQL" in message and f'source = "{name}"' in message


@pytest.mark.parametrize("name", ["_etl_loaded_at", "_ETL_run_id", "_Etl_note"])
def test_column_names_in_etls_own_prefix_are_refused_whatever_their_case(name: str) -> None:
    """Each table has _etl_loaded_at and _etl_run_id; `_ETL_run_id` is the same column to SQLite and MySQL."""
    document = _document()
    document["resources"][0]["columns"][name] = "string"
    assert f"resources[0].columns: column {name!r}: names starting with _etl_ are reserved" in _error(document)


def test_columns_that_differ_only_in_case_are_refused_naming_both() -> None:
    """`v` and `V` passed the config and failed at the first load: "duplicate column name: V" on SQLite, as on MySQL."""
    document = _document()
    document["resources"][0]["columns"] |= {"v": "string", "V": "integer"}
    assert "resources[0].columns: columns 'v' and 'V' differ only in case" in _error(document)


@pytest.mark.parametrize(("attr", "value", "said"), [
    ("table", "Orders", "resources.customers.table: 'Orders' (as 'orders': one name to SQLite and MySQL) is also the table of resource 'orders'"),
    ("name", "orders", "resources[1].name: 'orders' is also the name of resources[0]"),
])
def test_two_resources_on_one_table_or_name_are_refused_naming_both_and_the_fix(attr: str, value: str, said: str) -> None:
    """"two resources share the table 'orders'" named neither resource nor what to change."""
    document = _document()
    document["resources"][1][attr] = value
    message = _error(document)
    assert said in message, message
    assert ("give one of them its own table" if attr == "table" else "give each resource its own name") in message


def test_primary_key_must_be_a_declared_column() -> None:
    document = _document()
    document["resources"][0]["primary_key"] = ["order_id"]
    assert "resources[0]: Value error" not in (message := _error(document))
    assert "primary_key ['order_id'] must be declared" in message


def test_a_primary_key_that_repeats_a_column_is_refused() -> None:
    """["id", "id"] passed the config and failed at the first load with "ON CONFLICT clause does not match"."""
    document = _document()
    document["resources"][0]["primary_key"] = ["id", "id"]
    assert "resources[0].primary_key: lists 'id' more than once" in _error(document)


@pytest.mark.parametrize("column_type", ["json", "boolean"])
def test_a_cursor_field_column_without_an_order_is_refused(column_type: str) -> None:
    """A json cursor failed every run with a TypeError in max(); a boolean one made the watermark True."""
    document = _document()
    document["resources"][0]["columns"]["marker"] = column_type
    document["resources"][0]["cursor_field"] = "marker"
    assert f"resources[0]: cursor_field 'marker' is a {column_type} column, which cannot be a watermark" in _error(document)


def test_a_cursor_field_that_is_no_column_is_still_read_from_the_record() -> None:
    document = _document()
    document["resources"][0]["cursor_field"] = "meta.modified"
    assert config_from_document(document).resources[0].cursor_field == "meta.modified"


def test_durations_and_dates_in_every_form() -> None:
    """Durations as 30s/5m/1h/1d or ISO-8601; start as a date (midnight UTC) or a datetime."""
    document = _document()
    document["sync"]["lag"] = "PT10M"
    document["resources"][0]["lookback"] = "90s"
    document["resources"][0]["start"] = "2024-02-01T06:00:00+02:00"
    config = config_from_document(document)
    assert config.sync.lag == timedelta(minutes=10)
    assert config.resources[0].lookback == timedelta(seconds=90)
    assert config.resources[0].start == datetime(2024, 2, 1, 4, tzinfo=UTC)


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [("sync", "lag", "sync.lag: must not be negative"), ("resource", "lookback", "resources[0].lookback: must not be negative")],
)
def test_negative_lag_or_lookback_is_refused_and_zero_is_fine(section: str, key: str, message: str) -> None:
    """lag = -300 would load past now and lookback = -3600 would skip an hour per sync: both are exit 2."""
    document = _document()
    table = document["sync"] if section == "sync" else document["resources"][0]
    table[key] = -300
    assert message in _error(document)
    table[key] = "0s"
    config_from_document(document)


@pytest.mark.parametrize(("text", "expected"), [
    ("1h30m", timedelta(minutes=90)), ("1d12h", timedelta(hours=36)), ("2m 30s", timedelta(seconds=150)), ("1s500ms", timedelta(seconds=1.5)),
])
def test_a_duration_of_several_units_is_their_sum(text: str, expected: timedelta) -> None:
    """`--window 1h30m` (Go's and Prometheus's form, what users type for PT1H30M) was exit 2, not a duration."""
    assert parse_duration(text) == expected


def test_bad_duration_is_named() -> None:
    document = _document()
    document["resources"][2]["window"] = "a while"
    assert "resources[2].window:" in _error(document)


def test_database_url_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETL_DATABASE_URL", "postgresql://u@h/db")
    assert config_from_document(_document()).database.url == "postgresql://u@h/db"


@pytest.mark.parametrize("url", ["garbage", "oracle://x/y"])
def test_a_bad_database_url_from_the_environment_is_blamed_on_the_environment(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The file's database.url may be fine: the message must name $ETL_DATABASE_URL, where the bad URL came from."""
    from etl.db import create_engine

    monkeypatch.setenv("ETL_DATABASE_URL", url)
    with pytest.raises(ConfigError) as caught:
        create_engine(config_from_document(_document()).database.url)
    assert caught.value.message.startswith("$ETL_DATABASE_URL: ")


def test_a_path_without_its_leading_slash_is_still_under_base_url() -> None:
    document = _document()
    document["resources"][0]["path"] = "orders"
    assert config_from_document(document).resources[0].path == "/orders"


def test_a_param_that_is_no_value_or_list_of_values_is_one_message_naming_it() -> None:
    """A table as a param value was four lines of pydantic (params.status.str, .int, .float, .bool)."""
    document = _document()
    document["resources"][0]["params"] = {"status": {"in": "open"}}
    message = _error(document)
    assert "resources[0].params.status: must be a string, a number, a boolean or a list of them" in message
    assert ".str:" not in message


def test_a_base_url_with_a_query_string_is_refused() -> None:
    """base_url + path would put the path inside the query (…/api?tenant=7/orders), a 404 far from its cause."""
    document = _document()
    document["api"]["base_url"] = "https://legacy.example.com/api?tenant=7"
    assert "api.base_url:" in _error(document) and "params" in _error(document)


def test_a_base_url_with_a_query_string_names_the_parameters_to_move_not_their_values() -> None:
    """Azure's `?api-version=2024-01-01` (or a function key, `?code=...`) at 3 a.m.: which parameters go where, no secret shown."""
    document = _document()
    document["api"]["base_url"] = "https://legacy.example.com/api?api-version=2024-01-01&code=F4ncTi0nK3y"
    message = _error(document)
    assert "'api-version', 'code'" in message and "params of each [[resources]]" in message
    assert "F4ncTi0nK3y" not in message and "2024-01-01" not in message


@pytest.mark.parametrize(
    ("section", "key", "url"),
    [("api", "base_url", "http://legacy.example.com:99999/api"), ("auth", "token_url", "https://auth.example.com:x/oauth2/token")],
)
def test_a_url_with_an_impossible_port_is_refused_by_key(section: str, key: str, url: str) -> None:
    """`:99999` passed the config and then crashed the first request with a traceback; it is exit 2 naming the key."""
    document = _document()
    document[section][key] = url
    assert f"{section}.{key}:" in _error(document) and "port" in _error(document)


@pytest.mark.parametrize(
    ("url", "expected"),
    [("sqlite:///etl.db", "sqlite:///{dir}/etl.db"), ("sqlite:///data/etl.db", "sqlite:///{dir}/data/etl.db"),
     ("sqlite:////var/etl.db", "sqlite:////var/etl.db"), ("sqlite://", "sqlite://"), ("postgresql://u@h/db", "postgresql://u@h/db")],
)
def test_a_relative_sqlite_file_is_beside_the_config_file(tmp_path: Path, url: str, expected: str) -> None:
    """Under cron (cwd anywhere) sqlite:///etl.db made a new, empty database; it is the file beside config.toml,
    as client_secret_file and ca_bundle are."""
    document = _document()
    document["database"]["url"] = url
    config = config_from_document(document, tmp_path / "config.toml")
    assert config.database.url == expected.format(dir=tmp_path.resolve())


def test_a_relative_sqlite_file_from_the_environment_keeps_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETL_DATABASE_URL", "sqlite:///etl.db")
    assert config_from_document(_document(), tmp_path / "config.toml").database.url == "sqlite:///etl.db"


@pytest.mark.parametrize(
    ("section", "key", "url"),
    [
        ("api", "base_url", "http://user:pw-s3cr3t@127.0.0.1:8080/api"),
        ("auth", "token_url", "https://client:pw-s3cr3t@auth.example.com/oauth2/token"),
        ("auth", "token_url", "https://client@auth.example.com/oauth2/token"),
    ],
)
def test_credentials_in_a_url_are_refused_without_repeating_them(section: str, key: str, url: str) -> None:
    """aiohttp will not send URL credentials beside the bearer token: the first request died with a traceback."""
    document = _document()
    document[section][key] = url
    message = _error(document)
    assert f"{section}.{key}: must not carry credentials" in message and "[auth]" in message
    assert "s3cr3t" not in message and "client@" not in message


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-A": "a\r\nX-Injected: 1"}, "api.headers.X-A: must not contain CR, LF, NUL"),
        ({"X-Key": "k3y\x00"}, "api.headers.X-Key: must not contain CR, LF, NUL"),
        ({"X-A\n": "a"}, "api.headers.'X-A\\n': a header name must be"),
        ({"X A": "a"}, "api.headers.'X A': a header name must be"),
        ({"": "a"}, "api.headers.'': a header name must be"),
    ],
    ids=["CRLF in a value", "NUL in a value", "LF in a name", "space in a name", "empty name"],
)
def test_a_header_that_cannot_be_sent_is_refused_by_name(headers: dict[str, str], message: str) -> None:
    """aiohttp refused these at the first request with a traceback; a value is never repeated (it may be a key)."""
    document = _document()
    document["api"]["headers"] = headers
    assert message in (error := _error(document))
    assert "Injected" not in error and "k3y" not in error


@pytest.mark.parametrize("name", ["Authorization", "authorization"])
def test_an_authorization_header_is_refused_not_silently_replaced(name: str) -> None:
    """The bearer token replaced it on every request (whatever its case), so an API key set there was never sent."""
    document = _document()
    document["api"]["headers"] = {name: "ApiKey k3y"}
    error = _error(document)
    assert f"api.headers.{name}: etl sends the token endpoint's bearer token as Authorization" in error
    assert "k3y" not in error


def test_headers_with_a_tab_or_non_ascii_text_are_fine() -> None:
    document = _document()
    document["api"]["headers"] = {"X-Tenant": "a\tb", "X-Name": "Zoë"}
    assert config_from_document(document).api.headers == {"X-Tenant": "a\tb", "X-Name": "Zoë"}


def test_secret_from_environment_then_file_then_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$ETL_CLIENT_SECRET wins over client_secret_file, which wins over client_secret in the file."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    document = _document()
    document["auth"]["client_secret_file"] = str(secret_file)
    document["auth"]["client_secret"] = "from-config"
    monkeypatch.setenv("ETL_CLIENT_SECRET", "from-env")
    assert config_from_document(document).client_secret().get_secret_value() == "from-env"
    monkeypatch.delenv("ETL_CLIENT_SECRET")
    assert config_from_document(document).client_secret().get_secret_value() == "from-file"
    del document["auth"]["client_secret_file"]
    assert config_from_document(document).client_secret().get_secret_value() == "from-config"


def test_a_secret_is_sent_without_the_newline_or_bom_around_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EnvironmentFile's trailing newline, a CRLF or a Windows BOM in the file: invalid_client for the right secret."""
    document = _document()
    monkeypatch.setenv("ETL_CLIENT_SECRET", "from-env\r\n")
    assert config_from_document(document).client_secret().get_secret_value() == "from-env"
    monkeypatch.delenv("ETL_CLIENT_SECRET")
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"\xef\xbb\xbffrom-file\r\n")
    document["auth"]["client_secret_file"] = str(secret_file)
    assert config_from_document(document).client_secret().get_secret_value() == "from-file"


def test_a_secret_file_in_utf16_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PowerShell 5's `"secret" > file` writes UTF-16 with a BOM: it ended the run in a UnicodeDecodeError traceback."""
    monkeypatch.delenv("ETL_CLIENT_SECRET", raising=False)
    document = _document()
    secret_file = tmp_path / "secret"
    secret_file.write_bytes("from-file\r\n".encode("utf-16"))
    document["auth"]["client_secret_file"] = str(secret_file)
    assert config_from_document(document).client_secret().get_secret_value() == "from-file"


@pytest.mark.parametrize("command", ["sync", "check"])
def test_cli_a_secret_file_that_is_not_text_exits_2_naming_the_key(tmp_path: Path, command: str) -> None:
    """A secret file in a legacy encoding (or a binary keystore named by mistake) was exit 1 with a traceback."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"s\xe9cret\xff\n")
    secret_file.chmod(0o600)
    document = _document()
    document["auth"]["client_secret_file"] = "secret"
    path = tomlwriter.write(tmp_path / "config.toml", document)
    result = _cli(command, "--config", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"auth.client_secret_file: {secret_file} is not UTF-8 text" in output
    assert "Traceback" not in output and "s\xe9cret" not in output


def test_a_secret_in_the_config_file_is_warned_about_even_when_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC: client_secret in the file is accepted with a warning; it used to pass silently when $ETL_CLIENT_SECRET was set."""
    document = _document()
    document["auth"]["client_secret"] = "from-config"
    monkeypatch.setenv("ETL_CLIENT_SECRET", "from-env")
    assert config_from_document(document).client_secret().get_secret_value() == "from-env"
    assert "auth.client_secret is set in the config file" in caplog.text
    assert "$ETL_CLIENT_SECRET is set and is the one used" in caplog.text


def test_missing_secret_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETL_CLIENT_SECRET", raising=False)
    config = config_from_document(_document())
    with pytest.raises(ConfigError) as excinfo:
        config.client_secret()
    assert "ETL_CLIENT_SECRET" in str(excinfo.value) and excinfo.value.exit_code == 2


def test_secret_is_never_in_the_config_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    document = _document()
    document["auth"]["client_secret"] = "s3cr3t-value"
    config = config_from_document(document)
    assert "s3cr3t-value" not in repr(config) and "s3cr3t-value" not in str(config.model_dump())


def test_world_readable_config_with_a_secret_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    document = _document()
    document["auth"]["client_secret"] = "s3cr3t-value"
    path = tomlwriter.write(tmp_path / "config.toml", document)
    path.chmod(0o644)
    load_config(path)
    assert "readable by other users" in caplog.text and "s3cr3t-value" not in caplog.text


def test_world_readable_secret_file_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a secret in config.toml was; a client_secret_file any local user could read passed without a word."""
    monkeypatch.delenv("ETL_CLIENT_SECRET", raising=False)
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t-value\n")
    secret_file.chmod(0o644)
    document = _document()
    document["auth"]["client_secret_file"] = str(secret_file)
    config_from_document(document).client_secret()
    assert f"{secret_file} holds the client secret (auth.client_secret_file) and is readable by other users" in caplog.text
    caplog.clear()
    secret_file.chmod(0o600)
    config_from_document(document).client_secret()
    assert "readable by other users" not in caplog.text


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ETL_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "etl", *args], capture_output=True, text=True, env=environment, cwd=cwd, timeout=60
    )


def test_cli_bad_key_exits_2_naming_it_without_a_traceback(tmp_path: Path) -> None:
    document = _document()
    document["api"]["concurency"] = 4
    path = tomlwriter.write(tmp_path / "config.toml", document)
    result = _cli("sync", "--config", str(path), env={"ETL_CLIENT_SECRET": "x"})
    assert result.returncode == 2
    assert "api.concurency: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_broken_toml_exits_2_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[api]\nbase_url = \n")
    result = _cli("status", "--config", str(path))
    assert result.returncode == 2 and "line 2" in result.stderr and "Traceback" not in result.stderr


def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Notepad and PowerShell 5 write UTF-8 with a BOM: it was 'not valid TOML: Invalid statement (at line 1, column 1)'."""
    path = tomlwriter.write(tmp_path / "config.toml", _document())
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_config(path).api.base_url == "http://127.0.0.1:1/api/v1"


def test_cli_missing_secret_exits_2_before_any_request(tmp_path: Path) -> None:
    path = tomlwriter.write(tmp_path / "config.toml", _document())
    result = _cli("sync", "--config", str(path))
    assert result.returncode == 2 and "ETL_CLIENT_SECRET" in result.stderr


def test_cli_global_options_after_the_command_and_config_from_environment(tmp_path: Path) -> None:
    """`sync --config x --log-format json` works, and $ETL_CONFIG is the default config path."""
    path = tomlwriter.write(tmp_path / "elsewhere.toml", _document())
    result = _cli("sync", "--log-format", "json", env={"ETL_CONFIG": str(path)}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("{") and '"level":"error"' in result.stderr


@pytest.mark.parametrize("path", ["http://other.example/x", "https://API.example.com/v2/orders"])
def test_cli_a_full_url_as_a_path_exits_2_naming_the_key(tmp_path: Path, path: str) -> None:
    """SPEC appends path to base_url: a full URL there asked for .../api/v1/http://other.example/x, a 404 at run time."""
    document = _document()
    document["resources"][0]["path"] = path
    config = tomlwriter.write(tmp_path / "config.toml", document)
    result = _cli("sync", "--config", str(config), env={"ETL_CLIENT_SECRET": "x"})
    assert result.returncode == 2, result.stderr
    assert f"resources.orders.path: {path!r} is a full URL" in result.stderr
    assert "api.base_url" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["sync", "status", "check", "demo"])
def test_cli_a_missing_config_file_says_what_named_it(tmp_path: Path, command: str) -> None:
    """"not found: pass --config PATH or set $ETL_CONFIG" was said to whoever had done just that, and did not point
    at a stale $ETL_CONFIG; it is said only when ./config.toml was looked for by default."""
    missing = tmp_path / "etc" / "etl.toml"
    by_flag = _cli(command, "--config", str(missing), cwd=tmp_path)
    by_env = _cli(command, env={"ETL_CONFIG": str(missing)}, cwd=tmp_path)
    by_default = _cli("sync", cwd=tmp_path)
    assert by_flag.returncode == by_env.returncode == by_default.returncode == 2
    assert f"config file {missing} not found (the path given to --config)" in by_flag.stderr + by_flag.stdout
    assert f"config file {missing} not found (the path in $ETL_CONFIG" in by_env.stderr + by_env.stdout
    assert "set $ETL_CONFIG" not in by_flag.stderr + by_flag.stdout + by_env.stderr + by_env.stdout
    assert "not found: pass --config PATH or set $ETL_CONFIG" in by_default.stderr


def test_cli_unknown_flag_exits_2() -> None:
    result = _cli("sync", "--frm", "2024-01-01")
    assert result.returncode == 2 and "--frm" in result.stderr


def test_cli_version_prints_the_version_and_exits_0() -> None:
    """`--version` was refused as "the following arguments are required: COMMAND", exit 2."""
    result = _cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"python -m etl {etl.__version__}"


def test_cli_verbose_and_quiet_together_exit_2_naming_both() -> None:
    """SPEC writes [-v|-q]: given both (one before the command, one after), -q won without a word."""
    result = _cli("-v", "status", "-q")
    assert result.returncode == 2 and "-v" in result.stderr and "-q" in result.stderr


def test_a_relative_ca_bundle_is_beside_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under cron the working directory is anywhere: ca_bundle = "chain.pem" means the file next to config.toml."""
    document = _document()
    document["api"]["ca_bundle"] = "chain.pem"
    path = tomlwriter.write(tmp_path / "config.toml", document)
    monkeypatch.chdir("/")
    assert load_config(path).api.ca_bundle == str(tmp_path / "chain.pem")
    document["api"]["ca_bundle"] = "/etc/ssl/extra.pem"
    assert load_config(tomlwriter.write(tmp_path / "abs.toml", document)).api.ca_bundle == "/etc/ssl/extra.pem"


def test_a_missing_relative_config_file_is_named_with_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under cron the working directory is not what the user thinks: 'config.toml not found' alone said not where."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        load_config(Path("config.toml"))
    assert f"config file config.toml ({tmp_path / 'config.toml'}) not found" in raised.value.message


@pytest.mark.parametrize("query", ["page=1", "page_size=10", "updated_since=2020-01-01", "type=a&updated_until=2030-01-01"])
def test_a_path_whose_query_sets_a_parameter_etl_sends_itself_is_refused(query: str) -> None:
    """`path = "/orders?page=1"` went out as page=1&page=2: an API that reads the first value served page 1 for ever."""
    document = _document()
    document["resources"][0]["path"] = f"/orders?{query}"
    message = _error(document)
    assert "resources[0]: path" in message
    assert "sets " in message and "which etl sends itself" in message and "static parameters go in params" in message


@pytest.mark.parametrize(
    ("param", "instead"),
    [("page_size", "pagination.page_size"), ("page", "pagination.first_page"), ("updated_since", "start"), ("updated_until", "start")],
)
def test_a_static_param_that_etl_sends_itself_is_refused_naming_the_key_to_set(param: str, instead: str) -> None:
    """`params = { page_size = 500 }` went out as page_size=100 without a word: etl's own value replaced it."""
    document = _document()
    document["resources"][0]["params"] = {"status": "all", param: "500"}
    message = _error(document)
    assert f"resources[0]: params sets {param!r}, which etl sends itself" in message and instead in message


def test_a_parameter_set_both_in_path_and_in_params_is_refused() -> None:
    """`path = "/orders?type=a"` with `params = { type = "b" }` went out as type=a&type=b: which one the API reads is its choice."""
    document = _document()
    document["resources"][0]["path"] = "/orders?type=a"
    document["resources"][0]["params"] = {"type": "b"}
    assert "resources[0]: path '/orders?type=a' and params both set 'type'" in _error(document)


def test_a_path_with_a_query_of_other_parameters_is_taken() -> None:
    document = _document()
    document["resources"][0]["path"] = "/orders?type=a"
    assert config_from_document(document).resources[0].path == "/orders?type=a"
