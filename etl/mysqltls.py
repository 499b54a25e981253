"""TLS to MySQL/MariaDB as a URL asks for it: MySQL's `ssl_mode`, and SQLAlchemy's `ssl_ca`, `ssl_cert`, ….

aiomysql takes an SSLContext, where SQLAlchemy hands it a dict built from the `ssl_*` parameters, and it
starts TLS only when the server offers it. A URL with `ssl_ca=` thus loaded in plain text, exit 0, from
a server without TLS. Here the parameters become a context, and a mode that requires TLS is checked on
every new connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import URL

from etl.errors import ConfigError

MODES = ("DISABLED", "PREFERRED", "REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY")
FILE_PARAMETERS = ("ssl_ca", "ssl_capath", "ssl_cert", "ssl_key")
PARAMETERS = frozenset({"ssl_mode", "ssl_cipher", "ssl_check_hostname", *FILE_PARAMETERS})
Result = TypeVar("Result")


@dataclass(frozen=True)
class MysqlTls:
    url: URL  # without the TLS parameters, which SQLAlchemy would pass on as a dict
    context: ssl.SSLContext | None
    required_by: str | None  # the parameter that asks for TLS, for the error when the server does not start it


def mysql_tls(url: URL, key: str) -> MysqlTls:
    """The URL's TLS parameters as a context; `key` names the setting in errors."""
    given = {name: value for name, value in url.query.items() if name in PARAMETERS}
    rest = url.set(query={name: value for name, value in url.query.items() if name not in PARAMETERS})
    mode = _mode(given, key)
    if mode == "DISABLED" or not given:
        return MysqlTls(rest, None, None)
    context = _context(given, mode, key)
    required_by = None if mode == "PREFERRED" else f"ssl_mode={given['ssl_mode']}" if "ssl_mode" in given else _first_file(given)
    return MysqlTls(rest, context, required_by)


def _mode(given: dict[str, Any], key: str) -> str:
    """MySQL's --ssl-mode; without one, pymysql's reading: a CA verifies, and the host name unless told not to."""
    if "ssl_mode" in given:
        mode = str(given["ssl_mode"]).upper()
        if mode not in MODES:
            raise ConfigError(f"{key}: ssl_mode={given['ssl_mode']} is not one of {', '.join(MODES)}")
        return mode
    if "ssl_ca" not in given and "ssl_capath" not in given:
        return "REQUIRED"
    return "VERIFY_CA" if str(given.get("ssl_check_hostname", "true")).lower() in ("false", "0", "no") else "VERIFY_IDENTITY"


def _context(given: dict[str, Any], mode: str, key: str) -> ssl.SSLContext:
    """VERIFY_* check the server's certificate (against ssl_ca, else the system's CAs); REQUIRED does so given a CA."""
    cas = "ssl_ca" if "ssl_ca" in given else "ssl_capath"
    context = _read(cas, given, key, lambda: ssl.create_default_context(cafile=given.get("ssl_ca"), capath=given.get("ssl_capath")))
    if "ssl_cert" in given:
        _read("ssl_cert", given, key, lambda: context.load_cert_chain(given["ssl_cert"], given.get("ssl_key")))
    if "ssl_cipher" in given:
        _read("ssl_cipher", given, key, lambda: context.set_ciphers(given["ssl_cipher"]))
    verify = mode.startswith("VERIFY") or (mode == "REQUIRED" and ("ssl_ca" in given or "ssl_capath" in given))
    context.check_hostname = verify and mode != "VERIFY_CA"
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


def _read(name: str, given: dict[str, Any], key: str, step: Callable[[], Result]) -> Result:
    """A step that reads a file the URL names (or applies its cipher list); failing, a ConfigError naming it."""
    try:
        return step()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: {name}: cannot read or use {given.get(name, 'the system CAs')}: {exc}") from None


def _first_file(given: dict[str, Any]) -> str:
    return next((name for name in FILE_PARAMETERS if name in given), next(iter(given)))


def tls_started(dbapi_connection: Any) -> bool:
    """Whether a new connection runs over TLS (its session's Ssl_cipher is set)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        row = cursor.fetchone()
    finally:
        cursor.close()
    return bool(row and row[1])
