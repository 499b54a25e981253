"""etl.records: the coercions a legacy API needs, and rejects that keep the raw record and say why."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

import etl.records
from etl.config import ResourceConfig
from etl.errors import SourceError
from etl.records import RecordValidator, Reject, records_at


def _validator(columns: dict[str, Any], primary_key: list[str] | None = None, cursor: str | None = None) -> RecordValidator:
    resource = ResourceConfig.model_validate(
        {"name": "things", "path": "/things", "primary_key": primary_key or ["id"], "cursor_field": cursor,
         "columns": {"id": "integer", **columns}}
    )
    return RecordValidator(resource)


def _one(columns: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    page = _validator(columns).validate([record])
    assert page.rejects == [], page.rejects
    return page.rows[0]


def _reject(columns: dict[str, Any], record: Any) -> Reject:
    page = _validator(columns).validate([record])
    assert page.rows == []
    return page.rejects[0]


def test_decimal_from_a_string_keeps_every_digit() -> None:
    """"123.40" becomes Decimal('123.40'), trailing zero included, never a float."""
    value = _one({"total": "decimal"}, {"id": 1, "total": "123.40"})["total"]
    assert isinstance(value, Decimal)
    assert str(value) == "123.40"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1700000000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (1700000000123, datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)),
        ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("2024-03-01T10:00:00+02:00", datetime(2024, 3, 1, 8, 0, tzinfo=UTC)),
        ("2024-03-01T10:00:00-05:30", datetime(2024, 3, 1, 15, 30, tzinfo=UTC)),
        ("2024-03-01T10:00:00Z", datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        ("2024-03-01 10:00:00.250", datetime(2024, 3, 1, 10, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_datetimes_from_epoch_and_iso_become_aware_utc(raw: Any, expected: datetime) -> None:
    """Epoch seconds and milliseconds, ISO with any offset, and naive ISO (meaning UTC) all come out aware in UTC."""
    value = _one({"at": "datetime"}, {"id": 1, "at": raw})["at"]
    assert value == expected
    assert value.utcoffset() == timedelta(0)



@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-03-01 10:00:00+00", datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        ("2024-03-01T10:00:00.5-05", datetime(2024, 3, 1, 15, 0, 0, 500000, tzinfo=UTC)),
        ("20240301T100000Z", datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        ("20240301T100000+0100", datetime(2024, 3, 1, 9, 0, tzinfo=UTC)),
    ],
)
def test_iso_8601_forms_pydantic_refuses_are_datetimes(raw: str, expected: datetime) -> None:
    """An offset of hours alone (`+00`: PostgreSQL's text output, which an API serving its rows as strings
    sends) and the basic format are ISO-8601, which SPEC.md says datetime columns accept: every such
    record was a reject."""
    assert _one({"at": "datetime"}, {"id": 1, "at": raw})["at"] == expected


@pytest.mark.parametrize(("raw", "expected"), [("20240301", datetime(2024, 3, 1, tzinfo=UTC)), ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC))])
def test_eight_digits_are_an_iso_8601_date_not_a_day_of_1970(raw: str, expected: datetime) -> None:
    """"20240301" (ISO-8601's basic date, common in legacy systems) was read as epoch seconds and stored as
    1970-08-23T06:18:21Z, exit 0. An epoch of eight digits is a moment of 1970-1973: no API's timestamp."""
    assert _one({"at": "datetime"}, {"id": 1, "at": raw})["at"] == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("20240301103000", datetime(2024, 3, 1, 10, 30, tzinfo=UTC)), ("1700000000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC))],
)
def test_fourteen_digits_are_a_compact_date_and_time_not_a_year_after_2286(raw: str, expected: datetime) -> None:
    """"20240301103000" (yyyyMMddHHmmss, as many legacy systems write a timestamp) was read as epoch
    milliseconds: the year 2611, exit 0. Epoch milliseconds of fourteen digits begin in 2286."""
    assert _one({"at": "datetime"}, {"id": 1, "at": raw})["at"] == expected


@pytest.mark.parametrize(("raw", "expected"), [("20240301", date(2024, 3, 1)), ("2024-03-01", date(2024, 3, 1)), (1709251200, date(2024, 3, 1))])
def test_eight_digits_are_a_date_in_a_date_column_too(raw: Any, expected: date) -> None:
    """"20240301" (SAP and many legacy systems write dates so) is a datetime's date, but a `date` column
    read it as epoch seconds and rejected it, saying the value had a time of day: no date of that form loaded."""
    assert _one({"day": "date"}, {"id": 1, "day": raw})["day"] == expected
    assert "day: " in _reject({"day": "date"}, {"id": 1, "day": "20240231"}).error


@pytest.mark.parametrize(("raw", "expected"), [
    (253402300799, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ("253402214400", datetime(9999, 12, 31, tzinfo=UTC)),
    (-62135596800, datetime(1, 1, 1, tzinfo=UTC)),
    (168480000000, datetime(1975, 5, 5, tzinfo=UTC)),
    (253402300799999, datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
])
def test_epoch_seconds_at_either_end_of_the_calendar_are_not_read_as_milliseconds(raw: Any, expected: datetime) -> None:
    """pydantic reads a number beyond 2e10 as milliseconds, so 253402300799 (.NET's DateTime.MaxValue in epoch
    seconds, the "valid until forever" of a slowly changing dimension) was stored as 1978-01-11, exit 0. On the
    last day of 9999 or the first of year 1 as seconds, it is seconds; other such numbers stay milliseconds."""
    assert _one({"at": "datetime"}, {"id": 1, "at": raw})["at"] == expected
    if expected.time() == datetime.min.time():
        assert _one({"day": "date"}, {"id": 1, "day": raw})["day"] == expected.date()


@pytest.mark.parametrize("column", ["date", "datetime"])
@pytest.mark.parametrize("raw", ["0000-00-00 00:00:00", "0000-00-00", "0000-00-00T00:00:00.000000Z"])
def test_mysqls_zero_date_is_null_where_the_column_may_be_null_and_a_reject_that_says_so_elsewhere(column: str, raw: str) -> None:
    """A PHP or MySQL-backed API sends "0000-00-00 00:00:00" for "no date": every such record was a reject
    saying "month value is outside expected range of 1-12", and nothing in config.toml loaded it."""
    assert _one({"at": column}, {"id": 1, "at": raw})["at"] is None
    reject = _reject({"at": {"type": column, "nullable": False}}, {"id": 1, "at": raw})
    assert reject.error.startswith("at: is MySQL's zero date") and "nullable = false" in reject.error


def test_a_datetime_that_is_not_iso_8601_keeps_pydantics_reason() -> None:
    reject = _reject({"at": "datetime"}, {"id": 1, "at": "2024-02-30T10:00:00+00"})
    assert reject.error.startswith("at: Input should be a valid datetime")


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("1", True), (1, True), ("false", False), ("0", False), (0, False)])
def test_booleans_from_the_usual_spellings(raw: Any, expected: bool) -> None:
    """"true"/"1"/1 and their opposites are booleans."""
    assert _one({"flag": "boolean"}, {"id": 1, "flag": raw})["flag"] is expected


def test_dates_from_strings() -> None:
    """"2024-02-29" is a date."""
    assert _one({"day": "date"}, {"id": 1, "day": "2024-02-29"})["day"] == date(2024, 2, 29)


def test_numbers_become_strings_for_string_columns() -> None:
    """A legacy API that sends a code as 42 one day and "42" the next loads the same text."""
    assert _one({"code": "string"}, {"id": 1, "code": 42})["code"] == "42"


def test_nested_source_paths_are_followed() -> None:
    """`source = "customer.address.city"` reads the nested field; a missing branch is NULL."""
    columns = {"city": {"type": "string", "source": "customer.address.city"}}
    assert _one(columns, {"id": 1, "customer": {"address": {"city": "Zürich"}}})["city"] == "Zürich"
    assert _one(columns, {"id": 2, "customer": {}})["city"] is None



def test_a_number_in_a_source_path_indexes_a_list_as_well_as_a_key() -> None:
    """`source = "lines.0.sku"` reads the first line's sku, as records_path and next_cursor_path read such a path.

    It was NULL in every row, with exit 0: the step was looked up as the key "0" only. An object keyed by
    numbers (`totals.2024`) is still read by its key, and an index past the end is NULL.
    """
    columns = {"sku": {"type": "string", "source": "lines.0.sku"}, "total": {"type": "integer", "source": "totals.2024"}}
    assert _one(columns, {"id": 1, "lines": [{"sku": "A1"}, {"sku": "B2"}], "totals": {"2024": 7}}) == {"id": 1, "sku": "A1", "total": 7}
    assert _one(columns, {"id": 2, "lines": {"0": {"sku": "C3"}}})["sku"] == "C3"
    assert _one(columns, {"id": 3, "lines": []})["sku"] is None
    reject = _reject({"qty": {"type": "integer", "source": "lines.1.qty"}}, {"id": 4, "lines": [{}, {"qty": "many"}]})
    assert reject.error.startswith("qty (lines.1.qty): ")

def test_a_bad_value_is_rejected_with_the_raw_record_and_the_field() -> None:
    """The reject keeps the record exactly as received, its key, and an error naming the field and the value."""
    record = {"id": 7, "total": "12,50", "note": "Ünïcødé 😀"}
    reject = _reject({"total": "decimal", "note": "text"}, record)
    assert orjson.loads(reject.raw) == record
    assert reject.raw == orjson.dumps(record).decode()
    assert reject.key == "7"
    assert reject.error.startswith("total: ")
    assert "12,50" in reject.error


def test_one_bad_record_does_not_reject_its_page() -> None:
    """The valid records of a page with a bad one are loaded; only the bad one is rejected."""
    page = _validator({"total": "decimal"}).validate([{"id": 1, "total": "1"}, {"id": 2, "total": "x"}, {"id": 3}])
    assert [row["id"] for row in page.rows] == [1, 3]
    assert [reject.key for reject in page.rejects] == ["2"]


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1])
def test_integer_outside_32_bits_is_a_reject(value: int) -> None:
    """`integer` is 32-bit on every database: a bigger value is a reject, not an error from the database."""
    reject = _reject({"count": "integer"}, {"id": 1, "count": value})
    assert reject.error.startswith("count: ")


def test_bigint_takes_64_bits_and_no_more() -> None:
    """`bigint` holds 2**63-1; 2**63 is a reject."""
    assert _one({"big": "bigint"}, {"id": 1, "big": 2**63 - 1})["big"] == 2**63 - 1
    assert _reject({"big": "bigint"}, {"id": 1, "big": str(2**63)}).error.startswith("big: ")


def test_string_longer_than_255_is_a_reject_and_text_is_not() -> None:
    """`string` is VARCHAR(255) everywhere; a longer value is rejected rather than truncated; `text` takes it."""
    long = "é" * 256
    assert _reject({"name": "string"}, {"id": 1, "name": long}).error.startswith("name: ")
    assert _one({"body": "text"}, {"id": 1, "body": long})["body"] == long


@pytest.mark.parametrize(("column", "value", "hint"), [
    ("string", "x" * 256, 'declare the column "text"'),
    ("date", "2024-03-01T10:30:00Z", 'declare the column "datetime"'),
    ("date", 1709289000, 'declare the column "datetime"'),
])
def test_a_value_the_column_type_cannot_hold_is_a_reject_naming_the_type_that_can(column: str, value: Any, hint: str) -> None:
    """A reason says what to change: pydantic's "String should have at most 255 characters" and "Datetimes
    provided to dates should have zero time" named neither `text` nor `datetime`, the type that loads the value."""
    assert hint in _reject({"x": column}, {"id": 1, "x": value}).error


@pytest.mark.parametrize(("column", "value"), [("float", "NaN"), ("float", float("inf")), ("decimal", "NaN"), ("decimal", "-Infinity")])
def test_nan_and_infinity_are_rejected(column: str, value: Any) -> None:
    """No database stores NaN or infinity the same way: they are rejects."""
    assert _reject({"x": column}, {"id": 1, "x": value}).error.startswith("x: ")


@pytest.mark.parametrize("value", ["0.00000000001", "12345678901234567890123456789"])
def test_decimal_beyond_what_every_database_stores_exactly_is_a_reject(value: str) -> None:
    """More than 10 decimal places or 28 integer digits would be rounded by MySQL's DECIMAL(38,10): rejected."""
    assert _reject({"x": "decimal"}, {"id": 1, "x": value}).error.startswith("x: ")


@pytest.mark.parametrize(("column", "value"), [("string", "a\x00b"), ("text", "\x00"), ("json", {"a": ["b\x00"]})])
def test_nul_characters_are_rejected(column: str, value: Any) -> None:
    """PostgreSQL cannot store U+0000 in text or JSON: such a record is a reject, not a failed transaction."""
    assert "x: " in _reject({"x": column}, {"id": 1, "x": value}).error


def test_datetime_beyond_year_9999_in_utc_is_a_reject() -> None:
    """9999-12-31T23:00-05:00 is past the end of time in UTC: a reject, not a crash."""
    assert _reject({"at": "datetime"}, {"id": 1, "at": "9999-12-31T23:00:00-05:00"}).error.startswith("at: ")


def test_a_record_that_is_not_an_object_is_rejected() -> None:
    """A bare value in the record list is kept as it came, without a key."""
    reject = _reject({}, [1, 2])
    assert reject.raw == "[1,2]"
    assert reject.key is None
    assert reject.error.startswith("record: ")


def test_a_missing_primary_key_is_rejected_without_a_key() -> None:
    """A record without its key cannot be upserted: rejected, with an error naming the key column."""
    reject = _reject({"name": "string"}, {"name": "x"})
    assert reject.key is None
    assert reject.error.startswith("id: ")


@pytest.mark.parametrize("record", [{"id": 2, "doc": None}, {"id": 2}, {"id": 2, "a": {"b": None}}, {"id": 2, "a": None}])
def test_a_null_json_value_of_a_column_not_nullable_is_a_reject(record: dict[str, Any]) -> None:
    """`nullable = false` on a json column refuses null as on any other: pydantic's Any took it, and the row
    was loaded with NULL there, exit 0."""
    columns = {"doc": {"type": "json", "source": "a.b" if "a" in record else "doc", "nullable": False}}
    page = _validator(columns).validate([{"id": 1, "doc": [], "a": {"b": {}}}, record])
    assert [row["id"] for row in page.rows] == [1]
    assert [reject.key for reject in page.rejects] == ["2"]
    assert page.rejects[0].error.startswith("doc")
    assert _one({"doc": "json"}, {"id": 3, "doc": None})["doc"] is None


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("column", ["integer", "bigint", "float", "decimal"])
def test_a_boolean_key_is_a_reject_not_record_1(column: str, value: bool) -> None:
    """pydantic reads true as 1: as a key it would overwrite record 1 without a word, so it is a reject that says why."""
    page = _validator({"id": column}).validate([{"id": 1}, {"id": value}])
    assert [row["id"] for row in page.rows] == [1]
    assert [reject.error for reject in page.rejects] == [f"id: a boolean is not a number (got {value})"]


def test_composite_key_of_a_reject_joins_its_parts() -> None:
    """The key of a reject with a composite key is `1|2`, taken from the source paths."""
    validator = _validator({"line": {"type": "integer", "source": "pos.line"}, "qty": "integer"}, primary_key=["id", "line"])
    page = validator.validate([{"id": 1, "pos": {"line": 2}, "qty": "many"}])
    assert page.rejects[0].key == "1|2"


def test_nested_field_errors_name_the_column_and_its_source() -> None:
    """An error in a nested source names the column it feeds, so the message matches the config."""
    reject = _reject({"city": {"type": "integer", "source": "customer.city"}}, {"id": 1, "customer": {"city": "x"}})
    assert reject.error.startswith("city (customer.city): ")


def test_max_cursor_is_the_newest_valid_cursor() -> None:
    """The page's cursor is the highest typed value among loaded rows, for the watermark."""
    validator = _validator({"updated_at": "datetime"}, cursor="updated_at")
    page = validator.validate(
        [{"id": 1, "updated_at": "2024-01-02T00:00:00+01:00"}, {"id": 2, "updated_at": "2024-01-01T23:30:00Z"}]
    )
    assert page.max_cursor == datetime(2024, 1, 1, 23, 30, tzinfo=UTC)


def test_a_page_that_is_not_a_list_is_a_source_error() -> None:
    """A body whose record list is not a list is the API's fault, not a reject."""
    with pytest.raises(SourceError):
        _validator({}).validate({"id": 1})  # type: ignore[arg-type]


def test_a_page_with_a_bad_record_validates_each_good_record_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One bad record must not cost the whole page a second validation: with a reject in half the pages, it did."""
    converted: list[datetime] = []

    def counting_to_utc(moment: datetime) -> datetime:
        converted.append(moment)
        return moment.astimezone(UTC)

    monkeypatch.setattr(etl.records, "_to_utc", counting_to_utc)
    validator = _validator({"at": "datetime"})
    page = validator.validate([{"id": 1, "at": "2024-01-01T00:00:00Z"}, {"id": 2, "at": "not a date"}, {"id": 3, "at": "2024-01-03T00:00:00Z"}])
    assert [row["id"] for row in page.rows] == [1, 3]
    assert [reject.key for reject in page.rejects] == ["2"] and "at: " in page.rejects[0].error
    assert len(converted) == 2


@pytest.mark.parametrize(
    ("body", "records_path"),
    [({"data": None, "total": 0}, "data"), ({"meta": {"items": None}}, "meta.items"), (None, ""), (None, "data")],
    ids=["null-key", "null-nested-key", "null-body", "no-body"],
)
def test_a_null_record_list_or_no_body_is_a_page_without_records(body: Any, records_path: str) -> None:
    """Go encodes an empty slice as null, and a 204 has no body: both are an empty page, not an error."""
    assert records_at(body, records_path, "https://api.example.test/orders") == []


@pytest.mark.parametrize(
    ("body", "records_path"),
    [({"total": 0}, "data"), ({"page": 3, "meta": {"next": None}}, "data"), ({"result": {}}, "result.items")],
    ids=["total-only", "page-only", "nested"],
)
def test_an_empty_page_that_leaves_out_its_records_key_is_a_page_without_records(body: Any, records_path: str) -> None:
    """Go's omitempty drops the key of an empty list: a body with no list anywhere has no records to lose."""
    assert records_at(body, records_path, "https://api.example.test/orders") == []


@pytest.mark.parametrize("data", [[{"id": 1}], []], ids=["records", "empty-list"])
def test_a_records_path_missing_from_a_body_that_holds_a_list_is_still_an_error(data: list[Any]) -> None:
    """The list is there under another key: a wrong records_path names the keys there are, records or not."""
    with pytest.raises(SourceError, match="records_path 'items' is not in the body; its top-level keys are: data, total"):
        records_at({"data": data, "total": len(data)}, "items", "https://api.example.test/orders")


def test_a_dotted_records_path_missing_its_last_step_names_the_keys_where_it_broke() -> None:
    """`result.row` for `result.rows`: the body's top-level keys (result) do not show the key to write."""
    body = {"result": {"rows": [{"id": 1}], "total": 1}, "status": "ok"}
    with pytest.raises(SourceError, match="records_path 'result.row' is not in the body; the keys at 'result' are: rows, total"):
        records_at(body, "result.row", "https://api.example.test/orders")


def test_an_empty_list_body_is_a_page_without_records_whatever_the_records_path() -> None:
    """An API that wraps its records ({"data": [...]}) but answers an empty window with a bare [] failed that window every run."""
    assert records_at([], "data", "https://api.example.test/orders") == []


def test_a_list_body_where_records_path_expects_an_object_says_to_empty_records_path() -> None:
    """The records are there, as the body itself: the error says which setting reads them."""
    with pytest.raises(SourceError, match='the body is a list of records, not an object holding \'data\'; set records_path = ""'):
        records_at([{"id": 1}], "data", "https://api.example.test/orders")


def test_an_object_body_with_an_empty_records_path_names_the_keys_to_choose_from() -> None:
    """records_path = "" says the body is the list; an object body gets the hint to name its key, not "holds a dict"."""
    with pytest.raises(SourceError, match="the body is an object, not a list of records; set records_path to one of its keys: data, total"):
        records_at({"data": [], "total": 0}, "", "https://api.example.test/orders")


def test_a_reject_for_nan_or_infinity_keeps_the_value_in_its_raw_payload() -> None:
    """`"f": NaN` and `"f": 1e400` are rejects ("got inf"); their raw record showed "f": null, the reason gone."""
    validator = _validator({"f": "float"})
    page = validator.validate(json.loads('[{"id": 1, "f": NaN}, {"id": 2, "f": 1e400}, {"id": 3, "f": [-1e400]}]'))  # as parse_json reads NaN
    assert [reject.raw for reject in page.rejects] == ['{"id":1,"f":NaN}', '{"id":2,"f":Infinity}', '{"id":3,"f":[-Infinity]}']


@pytest.mark.parametrize(("body", "raw"), [
    ('{"x": NaN}', '{"x":NaN}'), ("[1, [Infinity]]", "[1,[Infinity]]"), ("-1e400", "-Infinity"),
    ('{"k": "a\\ud800"}', '{"k":"a\\ud800"}'), ('["\\udfff"]', '["\\udfff"]'), ('{"\\ud800": 1}', '{"\\\\ud800":1}'),
])
def test_json_that_no_database_stores_as_it_came_is_a_reject(body: str, raw: str) -> None:
    """NaN and 1e400 were stored as null, and a lone surrogate crashed the run with a traceback;
    the standard library (parse_json's fallback) reads all three. Each is a reject with its raw text."""
    validator = _validator({"doc": "json"})
    page = validator.validate([{"id": 1, "doc": json.loads(body)}, {"id": 2, "doc": {"x": None}}])
    assert [row["id"] for row in page.rows] == [2]
    assert "doc: holds " in page.rejects[0].error
    assert page.rejects[0].raw == '{"id":1,"doc":' + raw + "}"


def test_an_empty_string_in_a_nullable_typed_column_is_null_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """PHP and CSV-born APIs send "" for "no value": every such record was a reject in pydantic's words ("unable to
    parse string as a number"), and with max_rejects = 0 every nightly run failed on them. In a column that may be
    NULL it is NULL, said once a column; in a key or `nullable = false` column, and in a string column, "" stays what
    it is (a reject, or the empty string)."""
    validator = _validator(
        {"id": "integer", "total": "decimal", "paid": "boolean", "due": "date", "at": "datetime", "note": "string",
         "qty": {"type": "integer", "nullable": False}, "meta": {"type": "integer", "source": "m.count"}},
    )
    records = [
        {"id": 1, "total": "", "paid": "", "due": "", "at": "", "note": "", "qty": 1, "m": {"count": ""}},
        {"id": 2, "total": "1.50", "paid": True, "due": "2024-01-02", "at": "2024-01-02T00:00:00Z", "note": "x", "qty": 2},
        {"id": 3, "total": "", "qty": ""},
        {"id": 4, "total": "abc", "qty": 4},
    ]
    page = validator.validate(records)
    assert [row["id"] for row in page.rows] == [1, 2]
    assert page.rows[0] | {} == {"id": 1, "total": None, "paid": None, "due": None, "at": None, "note": "", "qty": 1, "meta": None}
    assert [reject.key for reject in page.rejects] == ["3", "4"]
    assert records[0]["total"] == "" and "\"total\":\"\"" in page.rejects[0].raw.replace(" ", "")  # the raw record as it came
    validator.validate([{"id": 5, "total": "", "qty": 5}])
    blanks = [r.getMessage() for r in caplog.records if '""' in r.getMessage()]
    assert len(blanks) == 5 and all("read as NULL" in message for message in blanks), blanks
