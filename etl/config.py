"""config.toml as typed, validated objects (SPEC.md, "config.toml").

Every model forbids unknown keys, so a typo is an error that names the key
instead of a setting silently ignored. `load_config` turns every problem into
a `ConfigError` whose message starts with the dotted key, e.g.
`resources[0].pagination.page_size: Input should be greater than 0`.
"""

from __future__ import annotations

import codecs
import difflib
import logging
import re
import stat
import tomllib
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import parse_qs, parse_qsl, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from etl.durations import parse_duration, parse_instant
from etl.errors import ConfigError

log = logging.getLogger(__name__)

SYSTEM_PREFIXES = {
    "sqlite_": "SQLite keeps names starting with sqlite_ for itself",
    "pg_": "PostgreSQL finds its own pg_ tables and views (pg_user, pg_settings) before any of that name",
}
POSTGRESQL_SYSTEM_COLUMNS = ("tableoid", "xmin", "cmin", "xmax", "cmax", "ctid")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # with fullmatch: `$` also matches before a final newline
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_FORM_FIELDS = ("grant_type", "scope", "client_id", "client_secret")
ColumnType = Literal[
    "string", "text", "integer", "bigint", "float", "decimal", "boolean", "date", "datetime", "json"
]
FULL_URL = re.compile(r"/?https?://", re.IGNORECASE)  # a path after _rooted put a slash before it
STRFTIME_DIRECTIVE = re.compile(r"%[-_0^#]?(.)")  # group 1 is the directive's letter; `%%` is a literal percent
STRFTIME_TOKEN = re.compile(r"%(?::z|[-_0^#]?.?)", re.DOTALL)  # a directive whole, a trailing lone % too
OWN_DIRECTIVES = ("%%", "%s", "%:z")  # etl.windows writes these itself, whatever the C library knows
# a filter pattern must write the year and the day of the year (else a day window asks for a month or nothing)
WHOLE_DATES = set("DFxcs")
YEARS, DAYS, WEEKS, WEEKDAYS = set("YyG"), set("dej"), set("UWV"), set("aAwu")
UNORDERED_CURSOR_TYPES = ("json", "boolean")  # json values do not compare (a TypeError every run); a boolean watermark is True


def _duration(value: Any) -> timedelta:
    return value if isinstance(value, timedelta) else parse_duration(value)


def _not_negative(duration: timedelta) -> timedelta:
    """A negative lag would load past now, a negative lookback skip time between syncs."""
    if duration < timedelta(0):
        raise ValueError("must not be negative")
    return duration


def _instant(value: Any) -> datetime:
    return parse_instant(value)


def _http_url(url: str) -> str:
    """An http(s) URL with a host and a usable port: `:99999` would otherwise crash the first request.

    Credentials in it (`user:pw@host`) are refused too: aiohttp will not send them beside the
    Authorization header every request carries, and failed at the first request with a traceback.
    The message never repeats the URL, which holds a password.
    """
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError("must be an http:// or https:// URL")
    parts = urlsplit(url)
    try:
        port = parts.port  # ValueError when out of range or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    if "@" in parts.netloc:
        raise ValueError(
            "must not carry credentials (user:password@host): the client id and secret belong in [auth], "
            "and API calls are authorized by the token endpoint's bearer token"
        )
    return url


def _header_name(name: str) -> str:
    """An HTTP token (RFC 9110): anything else aiohttp refused at the first request, with a traceback.

    Authorization, in any case, was replaced by the bearer token on every request without a word.
    """
    if not HEADER_NAME.fullmatch(name):
        raise ValueError("a header name must be one or more letters, digits or !#$%&'*+-.^_`|~, with no space, colon or line break")
    if name.lower() == "authorization":
        raise ValueError(
            "etl sends the token endpoint's bearer token as Authorization on every API request, "
            "so this header would never be sent: remove it"
        )
    return name


def _header_value(value: str) -> str:
    """CR or LF would start a header of their own (header injection); aiohttp refused them, with a traceback."""
    if HEADER_VALUE_FORBIDDEN.search(value):
        raise ValueError("must not contain CR, LF, NUL or another control character (a tab is fine)")
    return value


def _token_param_name(name: str) -> str:
    """An extra form field of the token request may not replace one of RFC 6749 §4.4.2's, which etl sends."""
    if name in TOKEN_FORM_FIELDS:
        raise ValueError(f"etl sends {name} itself: set it with the other keys of [auth]")
    return name


Duration = Annotated[timedelta, BeforeValidator(_duration)]
NonNegativeDuration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_not_negative)]
Instant = Annotated[datetime, BeforeValidator(_instant)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]
TokenParamName = Annotated[str, AfterValidator(_token_param_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(_Section):
    base_url: str
    concurrency: int = Field(8, ge=1, le=1024)
    requests_per_second: float = Field(0, ge=0)
    timeout_s: float = Field(30, gt=0)
    max_retries: int = Field(6, ge=0, le=100)
    ca_bundle: str = ""
    verify_tls: bool = True
    headers: dict[HeaderName, HeaderValue] = {}
    retry_backoff_s: float = Field(0.5, ge=0, description="first backoff; doubles per retry, with jitter")
    retry_after_max_s: float = Field(60, ge=0, description="a longer Retry-After is cut to this")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, url: str) -> str:
        _http_url(url)
        if "?" in url or "#" in url:  # each resource's path is appended to it: the query would swallow the path
            names = ", ".join(repr(name) for name in dict(parse_qsl(urlsplit(url).query, keep_blank_values=True)))
            moved = f"put {names} in the params of each [[resources]]" if names else "remove it"
            raise ValueError(f"must not carry a query string or fragment, as each path is appended to it: {moved}")
        return url.rstrip("/")


class AuthConfig(_Section):
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
    client_secret_file: str = ""
    scopes: list[str] = []
    client_auth: Literal["basic", "body"] = "basic"
    refresh_margin_s: float = Field(60, ge=0)
    params: dict[TokenParamName, str] = Field({}, description="extra form fields: Auth0's audience, Azure AD v1's resource")

    @field_validator("token_url")
    @classmethod
    def _token_url(cls, url: str) -> str:
        return _http_url(url)

    @field_validator("scopes", mode="before")
    @classmethod
    def _scope_list(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value


class DatabaseConfig(_Section):
    url: str = "sqlite:///etl.db"
    auto_migrate: bool = True


class SyncConfig(_Section):
    lag: NonNegativeDuration = timedelta(minutes=5)
    max_rejects: int = Field(0, ge=0)


class ColumnSpec(_Section):
    type: ColumnType
    source: str | None = None
    nullable: bool | None = None

    @field_validator("source")
    @classmethod
    def _dotted_path(cls, source: str | None) -> str | None:
        """`customer..name` (a typo) matches no record's field: the column would be NULL in every row (`""` is no source)."""
        if source and "" in source.split("."):
            raise ValueError(f"{source!r} has an empty step: write a dotted path such as customer.address.city")
        return source


def _column_spec(value: Any) -> Any:
    """`id = "integer"` or a table; anything else was refused as "not a valid dictionary or instance of ColumnSpec"."""
    if isinstance(value, str):
        return {"type": value}
    if not isinstance(value, dict):
        raise ValueError('must be a type such as "decimal", or a table such as { type = "string", source = "a.b" }')
    return value


class FilterConfig(_Section):
    from_param: str = Field(min_length=1)
    to_param: str = Field(min_length=1)
    format: str = "iso"
    from_inclusive: bool = True  # extension: false for an API whose start is exclusive (`updated_after`, `[gt]`)
    to_inclusive: bool = False
    timezone: str = ""  # extension: the IANA zone whose wall clock a date or strftime bound is written in

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        if name:
            try:
                ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                raise ValueError(f"{name!r} is no IANA time zone: write one such as 'America/New_York' or 'UTC'") from None
        return name

    @model_validator(mode="after")
    def _zone_for_wall_clocks(self) -> FilterConfig:
        """An iso or epoch bound names an instant already: a zone there would change nothing the API reads."""
        if self.timezone and self.format in ("iso", "epoch", "epoch_ms"):
            raise ValueError(
                f"timezone: format {self.format!r} names an instant whatever the zone; timezone is for format = "
                "\"date\" or a strftime pattern such as '%Y-%m-%d %H:%M:%S' read by the API in its local time"
            )
        return self

    @property
    def zone(self) -> tzinfo:
        """The zone whose wall clock the API reads its bounds in (UTC unless `timezone` names one)."""
        return ZoneInfo(self.timezone) if self.timezone else UTC

    @field_validator("format")
    @classmethod
    def _known_format(cls, fmt: str) -> str:
        if fmt in ("iso", "date", "epoch", "epoch_ms"):
            return fmt
        if "%" not in fmt:
            raise ValueError("must be iso, date, epoch, epoch_ms or a strftime pattern such as '%Y-%m-%d %H:%M'")
        letters = {match.group(1) for match in STRFTIME_DIRECTIVE.finditer(fmt)}
        if not (letters & WHOLE_DATES or letters & YEARS and (letters & DAYS or letters & WEEKS and letters & WEEKDAYS)):
            raise ValueError(
                f"{fmt!r} does not name a single day (it needs a year and a day, as %Y-%m-%d has): "
                "each window would ask the API for a whole month, a year or nothing"
            )
        if unknown := _unknown_directives(fmt):
            raise ValueError(
                f"{', '.join(map(repr, unknown))} is no strftime directive, and would reach the API as written: "
                "see the strftime directives in Python's datetime documentation (%:z writes +01:00)"
            )
        return fmt


def _unknown_directives(fmt: str) -> list[str]:
    """The directives of a pattern that strftime leaves as written (the C library's way with one it does not know):
    `%Q`, or Python 3.12's `%:z` on 3.11 had they not been etl's own, went to the API literally."""
    sample = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    unknown = []
    for token in STRFTIME_TOKEN.findall(fmt):
        try:
            known = token in OWN_DIRECTIVES or sample.strftime(token) != token
        except ValueError:  # a platform whose strftime refuses it outright
            known = False
        if not known:
            unknown.append(token)
    return unknown


class _Pagination(_Section):
    total_path: str | None = None
    total_header: str | None = None


class PagePagination(_Pagination):
    style: Literal["page"]
    page_param: str = "page"
    size_param: str = "page_size"
    page_size: int = Field(100, ge=1)
    first_page: int = 1


class OffsetPagination(_Pagination):
    style: Literal["offset"]
    offset_param: str = "offset"
    limit_param: str = "limit"
    page_size: int = Field(100, ge=1)


class CursorPagination(_Pagination):
    style: Literal["cursor"]
    cursor_param: str = "cursor"
    next_cursor_path: str = Field(min_length=1)
    size_param: str = ""
    page_size: int = Field(100, ge=1)


class LinkHeaderPagination(_Pagination):
    style: Literal["link_header"]
    size_param: str = ""
    page_size: int = Field(100, ge=1)


class NoPagination(_Pagination):
    style: Literal["none"]


Pagination = Annotated[
    PagePagination | OffsetPagination | CursorPagination | LinkHeaderPagination | NoPagination,
    Field(discriminator="style"),
]


ParamScalar = str | int | float | bool


def _param_value(value: Any) -> Any:
    """A value or a list of values, else one message: pydantic's was four lines, one per scalar type."""
    values = value if isinstance(value, list) else [value]
    if all(isinstance(item, str | int | float | bool) for item in values):
        return value
    raise ValueError("must be a string, a number, a boolean or a list of them (a list sends the parameter once per value)")


def identifier_problem(name: str) -> str | None:
    """What keeps `name` from being a table or column name on every database, None if nothing: "must be a letter
    or _ followed by letters, digits or _" was all a 64-letter name, or one with an `ö`, was told."""
    if IDENTIFIER.fullmatch(name):
        return None
    wrong = next((char for char in name if not (char.isascii() and (char.isalnum() or char == "_"))), None)
    if wrong is not None:
        return f"{wrong!r} is not allowed: a name is ASCII letters, digits and _"
    if not name or name[0].isdigit():
        return "must start with a letter or _"
    return f"{len(name)} characters, at most 63 (PostgreSQL cuts a longer name short, MySQL refuses one over 64)"


class ResourceConfig(_Section):
    name: str
    table: str | None = None
    path: str
    records_path: str = ""
    primary_key: list[str] = Field(min_length=1)
    cursor_field: str | None = None
    start: Instant | None = None
    lookback: NonNegativeDuration = timedelta(hours=1)
    window: Duration = timedelta(days=1)
    params: dict[str, Annotated[ParamScalar | list[ParamScalar], BeforeValidator(_param_value)]] = {}
    filter: FilterConfig | None = None
    pagination: Pagination = NoPagination(style="none")
    columns: dict[str, Annotated[ColumnSpec, BeforeValidator(_column_spec)]] = Field(min_length=1)

    @field_validator("name", "table")
    @classmethod
    def _identifier(cls, name: str | None) -> str | None:
        if name is not None and (problem := identifier_problem(name)) is not None:
            raise ValueError(problem)
        if name is not None and name.lower().startswith("etl_"):
            raise ValueError("names starting with etl_ are reserved for etl's own tables")
        return name

    @field_validator("path")
    @classmethod
    def _rooted(cls, path: str) -> str:
        """`path = "orders"` means /orders: appended as written it asked for .../v1orders, a 404."""
        return path if path.startswith("/") else f"/{path}"

    @field_validator("primary_key", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("primary_key")
    @classmethod
    def _distinct_keys(cls, keys: list[str]) -> list[str]:
        """["id", "id"] failed only at the first load, in the database ("ON CONFLICT clause does not match")."""
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(map(repr, repeated))} more than once")
        return keys

    @field_validator("window")
    @classmethod
    def _positive_window(cls, window: timedelta) -> timedelta:
        if window <= timedelta(0):
            raise ValueError("must be longer than zero")
        return window

    @field_validator("columns")
    @classmethod
    def _column_names(cls, columns: dict[str, ColumnSpec]) -> dict[str, ColumnSpec]:
        """Identifiers, and distinct without case: SQLite and MySQL took `v` and `V` for one column at the first load.

        `_ETL_run_id` is etl's own `_etl_run_id` to them, so the reserved prefix is matched without case too.
        """
        seen: dict[str, str] = {}
        for name in columns:
            if (problem := identifier_problem(name)) is not None:
                raise ValueError(f"column {name!r}: {problem}; to read an API field of that name, give the column "
                                 'another and a source: order_id = { type = "string", source = "order-id" }')
            if name.lower() in POSTGRESQL_SYSTEM_COLUMNS:
                raise ValueError(
                    f"column {name!r}: PostgreSQL has a system column of that name in every table and refuses one more; "
                    f'read the field into a column named otherwise: {name}_ = {{ type = "{columns[name].type}", source = "{name}" }}'
                )
            if name.lower().startswith("_etl_"):
                raise ValueError(f"column {name!r}: names starting with _etl_ are reserved for etl's own _etl_loaded_at and _etl_run_id")
            if name.lower() in seen:
                raise ValueError(
                    f"columns {seen[name.lower()]!r} and {name!r} differ only in case: SQLite and MySQL take them for one column"
                )
            seen[name.lower()] = name
        return columns

    @model_validator(mode="after")
    def _consistent(self) -> ResourceConfig:
        missing = [key for key in self.primary_key if key not in self.columns]
        if missing:
            raise ValueError(f"primary_key {missing} must be declared in [resources.columns]")
        cursor = self.columns.get(self.cursor_field) if self.cursor_field is not None else None
        if cursor is not None and cursor.type in UNORDERED_CURSOR_TYPES:
            raise ValueError(
                f"cursor_field {self.cursor_field!r} is a {cursor.type} column, which cannot be a watermark: "
                "name a datetime, date or number column"
            )
        if self.filter is not None and self.start is None:
            raise ValueError("start is required when [resources.filter] is set: it is where the first sync begins")
        return self

    @model_validator(mode="after")
    def _table_outside_system_names(self) -> ResourceConfig:
        """`sqlite_orders` failed every run on SQLite, exit 1; PostgreSQL searches its catalog first, so `pg_user` was
        created and every insert went to the catalog's view of that name, failing the batch of every resource. The
        upsert's `excluded.status` is the table itself when it is named excluded: on SQLite nothing was updated, exit 0."""
        name = self.table_name.lower()
        prefix = next((prefix for prefix in SYSTEM_PREFIXES if name.startswith(prefix)), None)
        if prefix is not None or name == "excluded":
            key = "table" if self.table else "name"
            raise ValueError(
                f"{key} {self.table_name!r} is the table's name, and "
                + (f"{SYSTEM_PREFIXES[prefix]}: set table to a name that does not start with {prefix}" if prefix else
                   "PostgreSQL and SQLite call the row an upsert brings `excluded`: set table to another name")
            )
        return self

    @model_validator(mode="after")
    def _path_query_leaves_etls_parameters(self) -> ResourceConfig:
        """`path = "/orders?page=1"` went out as page=1&page=2: an API that reads the first value served page 1 for ever."""
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
        taken = sorted(set(query) & self.parameters_sent())
        if taken:
            raise ValueError(
                f"path {self.path!r} sets {', '.join(map(repr, taken))}, which etl sends itself for each page or window: "
                "remove it from path (static parameters go in params)"
            )
        return self

    @model_validator(mode="after")
    def _params_set_each_parameter_once(self) -> ResourceConfig:
        """`params = { page_size = 500 }` went out as page_size=100 without a word: etl's own value replaced it;
        a parameter also in path's query went out twice. cursor_param is the exception: etl sends it from the second
        page on, so a value here is the first page's cursor (Solr's `cursorMark = "*"`)."""
        twice = sorted(set(self.params) & set(parse_qs(urlsplit(self.path).query, keep_blank_values=True)))
        if twice:  # both went out (type=a&type=b), and which one counts is the API's choice
            raise ValueError(f"path {self.path!r} and params both set {', '.join(map(repr, twice))}: keep it in params only")
        taken = sorted(set(self.params) & (self.parameters_sent() - {getattr(self.pagination, "cursor_param", "")}))
        if taken:
            instead = "; ".join(f"{name!r} comes from {self._source_of(name)}" for name in taken)
            raise ValueError(
                f"params sets {', '.join(map(repr, taken))}, which etl sends itself for each page or window, "
                f"so the value here would never be sent: remove it from params ({instead})"
            )
        return self

    def _source_of(self, name: str) -> str:
        """The key that sets a parameter etl sends itself, for the message that refuses it in params."""
        pagination = self.pagination
        if name in (getattr(pagination, "size_param", ""), getattr(pagination, "limit_param", "")):
            return "pagination.page_size"
        if name == getattr(pagination, "page_param", ""):
            return "pagination.first_page, then counts up"
        if self.filter is not None and name in (self.filter.from_param, self.filter.to_param):
            return "the window: start, lookback and window for sync, --from and --to for backfill"
        return "each page the API answers"  # offset_param

    def parameters_sent(self) -> set[str]:
        """The query parameters etl sets on every request: the filter's bounds and the paging ones."""
        pagination = self.pagination
        names = {getattr(pagination, key, "") for key in ("page_param", "size_param", "offset_param", "limit_param", "cursor_param")}
        if self.filter is not None:
            names |= {self.filter.from_param, self.filter.to_param}
        return names - {""}

    @property
    def table_name(self) -> str:
        return self.table or self.name


def _names(first: str, second: str) -> str:
    """A name, and how the other spells it when that differs in case (one name to SQLite and MySQL)."""
    return repr(first) if first == second else f"{first!r} (as {second!r}: one name to SQLite and MySQL)"


class Config(_Section):
    api: ApiConfig
    auth: AuthConfig
    database: DatabaseConfig = DatabaseConfig()
    sync: SyncConfig = SyncConfig()
    resources: list[ResourceConfig] = Field(min_length=1)
    source_path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        """Each resource its own name (its watermark, windows and lock) and table: "two resources share the
        table 'orders'" named neither of them nor what to change."""
        names: dict[str, int] = {}
        for index, resource in enumerate(self.resources):
            if (first := names.setdefault(resource.name.lower(), index)) != index:
                raise ValueError(f"resources[{index}].name: {_names(resource.name, self.resources[first].name)} is also the "
                                 f"name of resources[{first}]: give each resource its own name")
        tables: dict[str, ResourceConfig] = {}
        for resource in self.resources:
            owner = tables.setdefault(resource.table_name.lower(), resource)
            if owner is not resource:
                raise ValueError(f"resources.{resource.name}.table: {_names(resource.table_name, owner.table_name)} is also "
                                 f"the table of resource {owner.name!r}: give one of them its own table = \"...\"")
        return self

    @model_validator(mode="after")
    def _paths_below_base_url(self) -> Config:
        """A full URL as a path was appended to base_url as SPEC says (.../api/v1/http://other.example/x): a 404 at run time."""
        for resource in self.resources:
            if FULL_URL.match(resource.path):
                path = resource.path.removeprefix("/")
                raise ValueError(
                    f"resources.{resource.name}.path: {path!r} is a full URL, but path is appended to "
                    f"api.base_url ({self.api.base_url}); put the scheme and host in api.base_url and the rest in path"
                )
        return self

    def resource(self, name: str) -> ResourceConfig:
        for resource in self.resources:
            if resource.name == name:
                return resource
        owner = next((r.name for r in self.resources if r.table_name.lower() == name.lower()), None)
        if owner is not None:  # the name the database shows, when `table` renames the resource
            raise ConfigError(f"--resource {name}: {name} is the table of resource {owner!r}: pass --resource {owner}")
        known = ", ".join(r.name for r in self.resources)
        raise ConfigError(f"--resource {name}: no such resource in the config (known: {known})")

    def client_secret(self) -> SecretStr:
        """The client secret from $ETL_CLIENT_SECRET, client_secret_file, or the file itself."""
        return resolve_client_secret(self.auth, self.source_path)


class EnvSettings(BaseSettings):
    """The environment variables of SPEC.md; they win over config.toml."""

    model_config = SettingsConfigDict(env_prefix="ETL_", extra="ignore")

    config: str | None = None
    client_secret: SecretStr | None = None
    database_url: str | None = None


def database_url_key() -> str:
    """The setting a database URL came from, for errors about it: $ETL_DATABASE_URL wins over the file."""
    return "$ETL_DATABASE_URL" if EnvSettings().database_url else "database.url"


def config_path(explicit: str | None) -> Path:
    """--config, else $ETL_CONFIG, else ./config.toml."""
    return Path(explicit or EnvSettings().config or "config.toml")


def config_named_by(explicit: str | None) -> str | None:
    """"--config" or "$ETL_CONFIG", whichever names the config file; None when ./config.toml is taken by default."""
    if explicit:
        return "--config"
    return "$ETL_CONFIG" if EnvSettings().config else None


def load_config(path: Path, named_by: str | None = None) -> Config:
    """Read, validate and normalise a config file; every failure is a ConfigError."""
    return config_from_document(read_document(path, named_by), path)


def read_document(path: Path, named_by: str | None = None) -> dict[str, Any]:
    """A config file's TOML document, not yet validated; every failure is a ConfigError.

    `named_by` (config_named_by) is said when the file is missing: "pass --config PATH" to whoever had passed
    one sent them looking elsewhere, and a stale $ETL_CONFIG in a crontab is not where they would look.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Notepad's byte-order mark is no TOML statement
    except FileNotFoundError:
        shown = str(path) if path.is_absolute() else f"{path} ({path.absolute()})"  # cron's working directory is not yours
        raise ConfigError(f"config file {shown} not found{_MISSING_CONFIG_ADVICE[named_by]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


_MISSING_CONFIG_ADVICE = {
    None: ": pass --config PATH or set $ETL_CONFIG",
    "--config": " (the path given to --config)",
    "$ETL_CONFIG": " (the path in $ETL_CONFIG: correct or unset it, or pass --config PATH)",
}


def config_from_document(document: dict[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document; $ETL_DATABASE_URL overrides [database].url."""
    env = EnvSettings()
    if env.database_url:
        database = document.get("database")
        document = {**document, "database": {**(database if isinstance(database, dict) else {}), "url": env.database_url}}
    try:
        config = Config.model_validate({**document, "source_path": path})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path, document)) from None
    if config.auth.client_secret is not None and path is not None:
        _warn_secret_in_file(path, "auth.client_secret", ", or move the secret to $ETL_CLIENT_SECRET")
    if path is None:
        return config
    config = _bundle_beside(config, path)
    return config if env.database_url else _sqlite_file_beside(config, path)


def _beside(config_file: Path, name: str) -> Path:
    """A file the config names: a relative name is beside config.toml, whatever the working directory (cron's is anywhere)."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else config_file.parent.resolve() / path


def _bundle_beside(config: Config, path: Path) -> Config:
    if not config.api.ca_bundle:
        return config
    return config.model_copy(update={"api": config.api.model_copy(update={"ca_bundle": str(_beside(path, config.api.ca_bundle))})})


def _sqlite_file_beside(config: Config, path: Path) -> Config:
    """`sqlite:///etl.db` in config.toml is the file beside it: from cron's cwd it was a new, empty database
    that the nightly run filled from `start` again while the operator looked at the old one.

    $ETL_DATABASE_URL has no file to be beside, and keeps SQLAlchemy's meaning (the working directory).
    """
    try:
        url = make_url(config.database.url)
    except (ArgumentError, ValueError):
        return config  # db.py names the key when it opens the database
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return config
    beside = url.set(database=str(_beside(path, database)))
    return config.model_copy(update={"database": config.database.model_copy(update={"url": beside.render_as_string(hide_password=False)})})


def describe_validation_error(exc: ValidationError, path: Path | None, document: dict[str, Any] | None = None) -> str:
    """One line per problem, each starting with the dotted key it is about; a resource's by its name too."""
    where = f"{path}: " if path else ""
    lines = []
    for error in exc.errors(include_url=False):
        key = _dotted(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = _unknown_key(error["loc"])
        message += _resource_named(document or {}, error["loc"])
        lines.append(f"{where}{key}: {message}" if key else f"{where}{message}")
    return "\n".join(lines)


def _resource_named(document: dict[str, Any], loc: tuple[int | str, ...]) -> str:
    """` (resource 'events')` for an error at resources[3]: with many resources, an index is one to count."""
    resources = document.get("resources")
    if len(loc) < 2 or loc[0] != "resources" or not isinstance(loc[1], int) or not isinstance(resources, list):
        return ""
    table = resources[loc[1]] if loc[1] < len(resources) else None
    name = table.get("name") if isinstance(table, dict) else None
    return f" (resource {name!r})" if isinstance(name, str) and name else ""


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """The nearest key its table takes, else all of them: "check against SPEC.md" named a file no clone has."""
    try:
        known = [name for name in _model_at(loc[:-1]).model_fields if name != "source_path"]
    except (KeyError, IndexError, StopIteration):  # a location this walk does not know: the key is still named
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key (this table takes {', '.join(known)})"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The model of the table at a validation error's location, e.g. PagePagination at resources.0.pagination.page."""
    parts = [part for part in loc if isinstance(part, str)]
    model: type[BaseModel] = Config
    while parts:
        annotation = model.model_fields[parts.pop(0)].annotation
        models = _models_in(annotation)
        if len(models) > 1:  # pagination: pydantic names the member by its style
            style = parts.pop(0)
            model = next(m for m in models if style in get_args(m.model_fields["style"].annotation))
        else:
            model = models[0]
            if get_origin(annotation) is dict:  # columns: the next part is a column's name
                parts.pop(0)
    return model


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models_in(argument)]


_UNION_TAGS = {"page", "offset", "cursor", "link_header", "none"}


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _unwritten(loc, index):
            name = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else repr(part)
            text += f".{name}" if text else name
    return text


def _unwritten(loc: tuple[int | str, ...], index: int) -> bool:
    """Parts of pydantic's location that are no key in the file: a union's tag, the `[key]` mark of a dict key's error."""
    part = loc[index]
    if part == "source_path" or (index > 0 and loc[index - 1] == "pagination" and part in _UNION_TAGS):
        return True
    return part == "[key]" and index == len(loc) - 1


def resolve_client_secret(auth: AuthConfig, config_file: Path | None) -> SecretStr:
    env_secret, file_secret = _trimmed(EnvSettings().client_secret), _trimmed(auth.client_secret)
    if file_secret is not None:  # a secret in the config file is worth a warning whether or not it is the one used
        log.warning(
            "auth.client_secret is set in the config file; prefer $ETL_CLIENT_SECRET or auth.client_secret_file"
            + ("; $ETL_CLIENT_SECRET is set and is the one used" if env_secret is not None else "")
        )
    _warn_cleartext(auth.token_url)
    if env_secret is not None:
        return env_secret
    if auth.client_secret_file:
        secret_path = _beside(config_file, auth.client_secret_file) if config_file else Path(auth.client_secret_file).expanduser()
        secret = _read_secret_file(secret_path)
        if not secret:
            raise ConfigError(f"auth.client_secret_file: {secret_path} is empty")
        _warn_secret_in_file(secret_path, "the client secret (auth.client_secret_file)")
        return SecretStr(secret)
    if file_secret is not None:
        return file_secret
    raise ConfigError(
        "auth.client_secret_file: no client secret found: set $ETL_CLIENT_SECRET or auth.client_secret_file"
    )


def _warn_cleartext(token_url: str) -> None:
    """The secret goes to an http:// token_url unencrypted, on every run: worse than verify_tls = false, which is
    warned about on every run. Loopback (the simulator, an SSH tunnel) stays on this machine."""
    parts = urlsplit(token_url)
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        log.warning(
            "auth.token_url is http://: the client secret goes to %s unencrypted, readable by anyone on the network "
            "path; write https://", parts.hostname
        )


def _read_secret_file(path: Path) -> str:
    """The file's text without surrounding whitespace or a BOM: UTF-8 (a Windows editor's BOM is no part of
    it), or UTF-16 with its BOM, which PowerShell 5's `"secret" > file` writes. Anything else is exit 2."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.client_secret_file: cannot read {path}: {exc.strerror}") from None
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return raw.decode(encoding).strip()
    except UnicodeDecodeError:  # its bytes are not quoted: they are the secret, or near it
        raise ConfigError(
            f"auth.client_secret_file: {path} is not UTF-8 text: save it as UTF-8 holding only the secret"
        ) from None


def _trimmed(secret: SecretStr | None) -> SecretStr | None:
    """The secret without surrounding whitespace, None when nothing is left.

    An EnvironmentFile or a Kubernetes secret made from a file carries a trailing newline;
    sent as it was, the token endpoint answered invalid_client for the right secret.
    """
    value = secret.get_secret_value().strip() if secret is not None else ""
    return SecretStr(value) if value else None


def _warn_secret_in_file(path: Path, key: str, alternative: str = "") -> None:
    """A secret other users of the machine can read is warned about, in config.toml or in client_secret_file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s holds %s and is readable by other users: chmod 600 %s%s", path, key, path, alternative)
