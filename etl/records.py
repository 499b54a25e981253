"""Records from the API validated into typed rows, and the rejects that fail.

The validator is a pydantic TypeAdapter over a TypedDict generated from
`[resources.columns]`: a whole page is validated in one call into plain dicts
ready for the database (pydantic-core does the per-record work). Only a page
that fails is looked at record by record, so that one bad record is rejected
with its raw payload and the rest of the page is loaded.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, NotRequired, cast

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasPath,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import core_schema
from typing_extensions import TypedDict

from etl import jsonnumbers
from etl.client import snippet
from etl.config import ColumnSpec, ResourceConfig
from etl.errors import SourceError
from etl.paginators import dig, holds_path
from etl.sqltypes import DECIMAL_DIGITS, DECIMAL_PLACES, json_text, to_utc

log = logging.getLogger(__name__)

STRING_MAX = 255
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
NO_NUL = r"^[^\x00]*$"
NUL_MESSAGE = "contains the character U+0000 (NUL), which PostgreSQL cannot store"
SURROGATE_MESSAGE = (
    "holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair), which is not text, or a byte that "
    "is not UTF-8 (shown as \\udce9 for 0xE9: the API sent another character set without declaring it as "
    "Content-Type: application/json; charset=...)"
)
NUMBER_TYPES = frozenset({"integer", "bigint", "float", "decimal"})
BLANKABLE_TYPES = NUMBER_TYPES | {"boolean", "date", "datetime"}  # the types "" is no value of
COMPACT_LENGTHS = (len("20240301"), len("20240301103000"))  # digit strings that are a date, or a date and time
ZERO_DATE = re.compile(r"0000-00-00(?:[ T]00:00:00(?:\.0*)?)?(?:Z|[+-]00:?00)?\Z")
ZERO_DATE_MESSAGE = (
    "is MySQL's zero date, which means no date: it is loaded as NULL, but this column is a primary key or nullable = false"
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_S = 86400
CALENDAR_ENDS = ((-62135596800, -62135596800 + DAY_S), (253402300800 - DAY_S, 253402300800))  # 0001-01-01, 9999-12-31 in epoch s
MILLISECONDS_FROM = 2e10  # pydantic reads an epoch number beyond this as milliseconds
ENDS_LENGTH = len("253402300799")  # and of "-62135596800": the digit strings that can be one of those seconds


def _to_utc(moment: datetime) -> datetime:
    """In UTC; a moment that leaves the calendar there (9999-12-31T23:00-05:00) is a reject, not a crash."""
    try:
        return to_utc(moment)
    except OverflowError:
        raise ValueError("is outside the years 1 to 9999 once converted to UTC") from None


def _as_meant(value: Any) -> Any:
    """A date or datetime as pydantic should read it, where its reading is not what the API means; the
    tests are cheap, as every value of such a column passes here before pydantic.

    A string of eight digits is the ISO-8601 date it is (`20240301`), of fourteen that date and time
    (yyyyMMddHHmmss): pydantic reads eight digits as epoch seconds, a moment of 1970 that no API means,
    and fourteen as epoch milliseconds, a moment after 2286. An epoch number (or string) on the last day
    of 9999 or the first of year 1 as seconds is seconds: pydantic reads anything beyond 2e10 as
    milliseconds, and these are the calendar's ends (.NET's DateTime.MaxValue and MinValue, "valid until
    forever"), where milliseconds would be an hour of 1978-01-11 or a moment of 1968-01-12.
    """
    kind = type(value)
    if kind is str:
        length = len(value)
        if length in COMPACT_LENGTHS and value.isdigit():
            return f"{value[:4]}-{value[4:6]}-{value[6:8]}" + (f"T{value[8:10]}:{value[10:12]}:{value[12:]}" if length > 8 else "")
        if length != ENDS_LENGTH or not value.lstrip("-").isdigit():
            return value
        number: Any = int(value)
    elif kind is int or kind is float or kind is Decimal:
        number = value
    else:
        return value
    if -MILLISECONDS_FROM <= number <= MILLISECONDS_FROM or not any(first <= number < last for first, last in CALENDAR_ENDS):
        return value
    return EPOCH + timedelta(seconds=float(number))


def _null_zero_date(value: Any, nullable: bool) -> bool:
    """Whether a value pydantic refused is MySQL's zero date (`0000-00-00 00:00:00`), which a PHP or MySQL-backed
    API sends for "no date", in a column that may be NULL: the NULL it means. Elsewhere it is a reject that says so."""
    if type(value) is not str or not ZERO_DATE.match(value):
        return False
    if not nullable:
        raise ValueError(ZERO_DATE_MESSAGE)
    return True


def _iso_8601(value: Any, handler: ValidatorFunctionWrapHandler, nullable: bool = False) -> datetime | None:
    """pydantic's datetime, and the ISO-8601 forms it refuses, read by the standard library: an offset of
    hours alone (`+00`, PostgreSQL's text output) and the basic format (`20240301T100000Z`, `20240301`).
    Anything else keeps pydantic's reason."""
    value = _as_meant(value)
    try:
        moment = cast(datetime, handler(value))
    except ValidationError:
        if _null_zero_date(value, nullable):
            return None
        fallback = _fromisoformat(value) if isinstance(value, str) else None
        if fallback is None:
            raise
        moment = fallback
    return _to_utc(moment)


def _nullable_iso_8601(value: Any, handler: ValidatorFunctionWrapHandler) -> datetime | None:
    return _iso_8601(value, handler, nullable=True)


def _date(value: Any, handler: ValidatorFunctionWrapHandler, nullable: bool = False) -> date | None:
    """pydantic's date, of the value as the API means it (`20240301`), or NULL for MySQL's zero date."""
    value = _as_meant(value)
    try:
        return cast(date, handler(value))
    except ValidationError:
        if _null_zero_date(value, nullable):
            return None
        raise


def _nullable_date(value: Any, handler: ValidatorFunctionWrapHandler) -> date | None:
    return _date(value, handler, nullable=True)


NULLABLE_MOMENTS = {
    "date": Annotated[date, WrapValidator(_nullable_date)],
    "datetime": Annotated[datetime, WrapValidator(_nullable_iso_8601)],
}


def _fromisoformat(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _storable_json(value: Any) -> Any:
    """JSON every database stores as it came, else a reject on every database (same config, same result).

    Refused: U+0000 (PostgreSQL cannot store it), a lone UTF-16 surrogate (not text: no driver sends it),
    and NaN or Infinity (JSON has neither: they would be stored as null). The last two reach here only
    from a page the standard library parsed. The text tests are the fast filters; the walks confirm.
    """
    if value is None:
        return value
    try:
        text = json_text(value)
    except TypeError:
        raise ValueError(SURROGATE_MESSAGE) from None
    if "\\u0000" in text and _any_leaf(value, _has_nul):
        raise ValueError(NUL_MESSAGE)
    if "null" in text and _any_leaf(value, _not_finite):
        raise ValueError("holds NaN or Infinity, which JSON has no value for (it would be stored as null)")
    return value


def _not_a_boolean(value: Any) -> Any:
    """A key of true would validate as 1 (pydantic's lax mode) and overwrite record 1: a reject instead."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _not_null(value: Any) -> Any:
    """A json column with `nullable = false` takes any JSON value but null, as every other type refuses it."""
    if value is None:
        raise ValueError("Input should not be null: the column is nullable = false")
    return value


def _any_leaf(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether `test` holds for a key or a value anywhere in a JSON value."""
    if isinstance(value, dict):
        return any(test(key) or _any_leaf(item, test) for key, item in value.items())
    if isinstance(value, list):
        return any(_any_leaf(item, test) for item in value)
    return test(value)


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _python_type(column_type: str) -> Any:
    """The pydantic type for a column type, with the coercions a legacy API needs.

    The limits are those every supported database stores exactly: a value
    beyond them is a reject with a reason, never a failed transaction or a
    silently rounded number (MySQL's DECIMAL(38,10) would round a 12th decimal).
    """
    return {
        "string": Annotated[str, Field(max_length=STRING_MAX, pattern=NO_NUL, coerce_numbers_to_str=True)],
        "text": Annotated[str, Field(pattern=NO_NUL, coerce_numbers_to_str=True)],
        "integer": Annotated[int, Field(ge=INT32[0], le=INT32[1])],
        "bigint": Annotated[int, Field(ge=INT64[0], le=INT64[1])],
        "float": Annotated[float, Field(allow_inf_nan=False)],
        "decimal": Annotated[Decimal, Field(allow_inf_nan=False, max_digits=DECIMAL_DIGITS, decimal_places=DECIMAL_PLACES)],
        "boolean": bool,
        "date": Annotated[date, WrapValidator(_date)],
        "datetime": Annotated[datetime, WrapValidator(_iso_8601)],
        "json": Annotated[Any, AfterValidator(_storable_json)],
    }[column_type]


def _field(name: str, spec: ColumnSpec, required: bool, key: bool) -> Any:
    """One TypedDict field; nullable columns default to None when the record lacks them.

    Only a numeric key refuses booleans: the check costs a Python call per record, and
    elsewhere a boolean read as 0 or 1 overwrites nothing.
    """
    alias = _source_alias(spec.source) if spec.source else None
    python_type = _python_type(spec.type)
    if key and spec.type in NUMBER_TYPES:
        python_type = Annotated[python_type, BeforeValidator(_not_a_boolean)]
    if required and spec.type == "json":  # the one type whose values include null
        python_type = Annotated[python_type, AfterValidator(_not_null)]
    if required:
        return Annotated[python_type, Field(validation_alias=alias)]
    if spec.type in NULLABLE_MOMENTS:  # MySQL's zero date is NULL here
        python_type = NULLABLE_MOMENTS[spec.type]
    return NotRequired[Annotated[python_type | None, Field(default=None, validation_alias=alias)]]


def _source_alias(source: str) -> AliasPath | AliasChoices:
    """A dotted source path as pydantic follows it: a number steps into a list (`lines.0.sku`), as `dig` does
    for records_path, else it is an object's key (`totals.2024`). pydantic reads a step "0" as a key only."""
    first, *rest = source.split(".")  # the first step is a key: a record is an object
    if not any(step.isdigit() for step in rest):
        return AliasPath(first, *rest)
    return AliasChoices(AliasPath(first, *(int(step) if step.isdigit() else step for step in rest)), AliasPath(first, *rest))


class _Invalid:
    """A record that failed its row type, kept as it came: the page's other records still validate in one pass."""

    __slots__ = ("record",)

    def __init__(self, record: Any) -> None:
        self.record = record

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(cls)


@dataclass(frozen=True)
class Reject:
    """A record that failed validation, kept with the payload exactly as it was parsed."""

    key: str | None
    raw: str
    error: str


@dataclass(frozen=True)
class ValidatedPage:
    rows: list[dict[str, Any]]
    rejects: list[Reject]
    max_cursor: Any


class RecordValidator:
    """Validates the records of one resource against its declared columns."""

    def __init__(self, resource: ResourceConfig) -> None:
        self.resource = resource
        fields = {
            name: _field(name, spec, self._required(name, spec), name in resource.primary_key)
            for name, spec in resource.columns.items()
        }
        row_type = TypedDict(f"{resource.name}_row", fields)  # type: ignore[misc]
        row_or_invalid = Annotated[row_type | _Invalid, Field(union_mode="left_to_right")]  # type: ignore[valid-type]
        self._page_adapter: TypeAdapter[list[Any]] = TypeAdapter(list[row_or_invalid])
        self._strict_adapter: TypeAdapter[list[Any]] = TypeAdapter(list[row_type])  # type: ignore[valid-type]
        self._cursor_column = resource.cursor_field if resource.cursor_field in resource.columns else None
        self._cursor_adapter = TypeAdapter(_python_type("datetime"))
        self._columns_by_source = {
            tuple(spec.source.split(".")): name for name, spec in resource.columns.items() if spec.source
        }
        # columns no valid record has carried yet (present as null counts): a typo is NULL in every row.
        # `nullable = true` said out loud is a field the API may leave out: not looked for.
        paths = {name: tuple((spec.source or name).split(".")) for name, spec in resource.columns.items()}
        self._unseen = {
            name: paths[name] for name, spec in resource.columns.items() if spec.nullable is None and name not in resource.primary_key
        }
        self.fields: list[str] = []  # the first valid record's top-level fields, to name the ones no column takes
        # columns where "" is NULL: they may be NULL, and their type has no empty value
        self._blankable = {
            name: paths[name] for name, spec in resource.columns.items() if spec.type in BLANKABLE_TYPES and not self._required(name, spec)
        }
        self._blank_said: set[str] = set()

    def _required(self, name: str, spec: ColumnSpec) -> bool:
        if name in self.resource.primary_key:
            return True
        return spec.nullable is False

    def validate(self, records: list[Any]) -> ValidatedPage:
        """Rows for every valid record, a Reject for every other; never raises for a bad record.

        One pass over the page: a record that fails comes out as _Invalid, so a page with one bad
        record is not validated twice. Only the failed records are validated again, for the reasons.
        """
        validated = self._validated(records)
        failed = [item.record for item in validated if type(item) is _Invalid]
        if failed and self._blankable:
            failed = self._blanks_as_null(validated)
        if not failed:
            self._look_for_unseen(records)
            return ValidatedPage(validated, [], self._max_cursor(validated, records))
        rows = [item for item in validated if type(item) is not _Invalid]
        good = [record for item, record in zip(validated, records, strict=True) if type(item) is not _Invalid]
        self._look_for_unseen(good)
        try:
            self._strict_adapter.validate_python(failed)
            reasons: dict[int, list[str]] = {}
        except ValidationError as exc:
            reasons = _errors_by_index(exc, self._columns_by_source)
        rejects = [self._reject(record, reasons.get(index, ["record: refused"])) for index, record in enumerate(failed)]
        return ValidatedPage(rows, rejects, self._max_cursor(rows, good))

    def _blanks_as_null(self, validated: list[Any]) -> list[Any]:
        """The failed records validated again with "" as null in the columns that may be NULL and whose type has no
        empty value (a number, a boolean, a date): PHP and CSV-born APIs send "" for "no value", and each such record
        was a reject. Each item that passes so replaces its _Invalid in place; returns the records still failing.
        Only failed records pay for it; each column is named once a run."""
        failed = []
        for index, item in enumerate(validated):
            if type(item) is not _Invalid:
                continue
            blanked, columns = self._blanked(item.record)
            if columns:
                [again] = self._page_adapter.validate_python([blanked])
                if type(again) is not _Invalid:
                    validated[index] = again
                    self._say_blank(columns)
                    continue
            failed.append(item.record)
        return failed

    def _blanked(self, record: Any) -> tuple[Any, list[str]]:
        """The record with "" as None where a blankable column reads it, and those columns' names."""
        if not isinstance(record, dict):
            return record, []
        copy, columns = dict(record), []
        for name, steps in self._blankable.items():
            parent = copy
            for step in steps[:-1]:  # copied along the path, so the record as received stays as it came
                child = parent.get(step)
                if not isinstance(child, dict):
                    break
                parent[step] = parent = dict(child)
            else:
                if parent.get(steps[-1]) == "":
                    parent[steps[-1]] = None
                    columns.append(name)
        return copy, columns

    def _say_blank(self, columns: list[str]) -> None:
        for name in columns:
            if name not in self._blank_said:
                self._blank_said.add(name)
                log.warning('%s: column %r held "" (an empty string), read as NULL: its type has no empty value and '
                            "it may be NULL; said once a run", self.resource.name, name)

    def unseen_warnings(self, loaded: int) -> list[str]:
        """One message per unseen column, with the record fields no column takes: the name the user meant."""
        resource = self.resource
        taken = {(spec.source or name).split(".")[0] for name, spec in resource.columns.items()}
        spare = [field for field in self.fields if field not in taken]
        return [
            f"column {column!r} was in none of the {loaded} records read (NULL in each of their rows); check "
            f"resources.{resource.name}.columns.{column} (its name, or source) against the API's records, or set "
            "nullable = true on it if the API leaves the field out when it is empty"
            + (f"; their fields no column takes: {', '.join(spare)}" if spare else "")
            for column in self._unseen
        ]

    def _look_for_unseen(self, records: list[Any]) -> None:
        """Strike the columns these valid records carry; once all are seen a page costs nothing more."""
        if not self.fields and records:
            self.fields = list(records[0])
        for name, steps in list(self._unseen.items()):
            if any(holds_path(record, steps) for record in records):
                del self._unseen[name]

    def _validated(self, records: list[Any]) -> list[Any]:
        """Each record as its row or as _Invalid; a body that is not a list of records is the API's fault (SourceError)."""
        try:
            return self._page_adapter.validate_python(records)
        except ValidationError as exc:
            _errors_by_index(exc, self._columns_by_source)
            raise

    def _reject(self, record: Any, messages: list[str]) -> Reject:
        return Reject(key=self._key_of(record), raw=raw_json(record), error="; ".join(messages))

    def _key_of(self, record: Any) -> str | None:
        """The primary key as text (`1|2` for composite keys), when the record has all of it."""
        if not isinstance(record, dict):
            return None
        parts = [dig(record, self.resource.columns[name].source or name) for name in self.resource.primary_key]
        if any(part is None for part in parts):
            return None
        return key_text(parts)

    def _max_cursor(self, rows: list[dict[str, Any]], records: list[Any]) -> Any:
        """The highest cursor value of the page: the column's typed value, or the raw field parsed as a datetime."""
        field = self.resource.cursor_field
        if field is None:
            return None
        if self._cursor_column is not None:
            values = [row[self._cursor_column] for row in rows if row.get(self._cursor_column) is not None]
        else:
            values = []
            for record in records:
                raw = dig(record, field)
                if raw is not None:
                    try:
                        values.append(self._cursor_adapter.validate_python(raw))
                    except ValidationError:
                        continue
        return max(values, default=None)


# pydantic's words where etl's say more: the pattern is the NUL test, "unable to parse raw data as a unicode string"
# is a lone surrogate, and a value too long or too precise for its column type names the type that holds it
_REASONS = {
    "string_pattern_mismatch": NUL_MESSAGE,
    "string_unicode": SURROGATE_MESSAGE,
    "string_too_long": f'is longer than {STRING_MAX} characters, the most a "string" column holds: declare the column '
    '"text" to load longer values (a primary key column cannot be "text")',
    "date_from_datetime_inexact": 'is a date and a time of day, which a "date" column does not hold without losing the '
    'time: declare the column "datetime" to load it',
}


def _errors_by_index(exc: ValidationError, columns_by_source: dict[tuple[str, ...], str]) -> dict[int, list[str]]:
    """Readable messages per record index: `column (source path): what is wrong (got value)`."""
    failed: dict[int, list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        index = loc[0] if loc and isinstance(loc[0], int) else -1
        path = tuple(str(part) for part in loc[1:])
        where = ".".join(path) or "record"
        if path in columns_by_source:
            where = f"{columns_by_source[path]} ({where})"
        reason = _REASONS.get(error["type"]) or error["msg"].removeprefix("Value error, ")
        got = error.get("input")
        shown = repr(got)[:60] if not isinstance(got, dict) else "an object"
        message = f"{where}: {reason}" + (f" (got {shown})" if error["type"] != "missing" else "")
        failed.setdefault(index, []).append(message)
    if -1 in failed:
        raise SourceError(f"the page is not a list of records: {failed[-1][0]}")
    return failed


def records_at(body: Any, records_path: str, url: str, key: str = "records_path") -> list[Any]:
    """The record list of a page body; anything else is an error naming what the body holds.

    `key` is the config key the errors name (`resources.orders.records_path`): the one a user edits.

    No body (a 204), a record list that is null (Go encodes an empty slice so), an object
    that holds no list at all (`{"total": 0}`: the key left out of an empty page, Go's omitempty)
    and a bare `[]` where records are wrapped in an object (an empty window answered so) are a
    page without records: a records_path that was wrong would meet the first page with records.
    A records_path that is not in a body that does hold a list stays an error: the records would
    be there, under another key. So is a body that is no object at all, or one that carries an
    error or a message instead of records (`{"message": "search backend warming up"}` with a 200):
    taken as empty, its window would end and its records be lost.
    """
    if body is None or body == []:
        return []
    records = dig(body, records_path) if records_path else body
    if isinstance(records, list):
        return records
    if isinstance(body, list):
        raise SourceError(
            f"{url}: the body is a list of records, not an object holding {records_path!r}; "
            f'set {key} = "" to read the body as the record list'
        )
    if records is None and _holds_null(body, records_path):
        return []
    if records is None and not _holds_a_list(body):
        if not isinstance(body, dict):
            raise SourceError(f"{url}: the body is a JSON {type(body).__name__}, not records: {snippet(raw_json(body).encode())}")
        if explanation := [key for key in body if str(key).lower() in _EXPLANATION_KEYS]:
            raise SourceError(
                f"{url}: answered with {explanation[0]!r} and no records: {snippet(raw_json(body).encode())}",
                hint="the API says why it sent no records; the window is left unfinished and the next run reads it again",
            )
        return []
    if isinstance(records, dict) and not records_path:
        keys = ", ".join(list(records)[:12])
        raise SourceError(
            f"{url}: the body is an object, not a list of records; set {key} to one of its keys: {keys}"
        )
    if records is None:
        parent_path = records_path.rpartition(".")[0]
        parent = dig(body, parent_path) if parent_path else None
        if isinstance(parent, dict):  # `result.row` for `result.rows`: the keys where the path broke show the one meant
            keys = ", ".join(map(str, list(parent)[:12]))
            raise SourceError(f"{url}: {key} {records_path!r} is not in the body; the keys at {parent_path!r} are: {keys}")
        keys = ", ".join(list(body)[:12]) if isinstance(body, dict) else type(body).__name__
        raise SourceError(f"{url}: {key} {records_path!r} is not in the body; its top-level keys are: {keys}")
    raise SourceError(f"{url}: {key} {records_path!r} holds a {type(records).__name__}, not a list of records")


# keys with which an API explains a body without records: an error passed off with a 200
_EXPLANATION_KEYS = frozenset({"error", "errors", "error_description", "errormessage", "fault", "message", "detail", "msg"})


def _holds_a_list(body: Any) -> bool:
    """Whether a list is anywhere in the body: where records could be (a walk, not recursion: any depth)."""
    objects = [body]
    while objects:
        value = objects.pop()
        if isinstance(value, list):
            return True
        if isinstance(value, dict):
            objects.extend(value.values())
    return False


def _holds_null(body: Any, dotted: str) -> bool:
    """Whether the path's last key is in the body, for a path where `dig` found None: null, not missing."""
    parent_path, _, key = dotted.rpartition(".")
    parent = dig(body, parent_path) if parent_path else body
    return isinstance(parent, dict) and key in parent


def key_text(parts: Iterable[Any]) -> str:
    """A primary key as etl_rejects shows it: `1|2` for a composite key."""
    return "|".join(str(part) for part in parts)


def raw_json(record: Any) -> str:
    """The record as JSON text, as it was parsed from the page.

    NaN and Infinity (a page's NaN or 1e400) are written as such, not as the null JSON would make of
    them: the value that got the record rejected stays in its raw payload.
    """
    return jsonnumbers.dumps(record, as_read=True).decode()
