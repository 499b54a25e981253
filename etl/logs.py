"""Logging on stderr as text or one JSON object per line, with run, resource and window on every line.

The context comes from contextvars set per asyncio task, so a line logged deep
in the client still says which window it was working on. Every registered
secret (the client secret, every token) is masked in every line, as a last
line of defence behind the code that never logs them.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import sys
import warnings
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

import orjson

run_id_var: ContextVar[int | None] = ContextVar("run_id", default=None)
resource_var: ContextVar[str | None] = ContextVar("resource", default=None)
window_var: ContextVar[str | None] = ContextVar("window", default=None)

MASK = "***"
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Mask this value wherever it would appear in a log line (values shorter than 6 chars are ignored)."""
    if len(value) >= 6:
        _secrets.add(value)


def redact(text: str) -> str:
    """Text safe to show and to store: every registered secret masked, and a lone surrogate as its escape.

    aiohttp reads a header byte that is not UTF-8 (WWW-Authenticate: Bearer realm="caf\\xe9") as a lone
    surrogate; an error quoting it could not be written to etl_runs, and the run ended as an internal error."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return escape_lone_surrogates(text)


def escape_lone_surrogates(text: str) -> str:
    """The text with a lone UTF-16 surrogate (`\udce9`, what Python makes of a byte that is not UTF-8) as its
    escape: no encoder, database or JSON writer takes one. Other text comes back as it is."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.update(run_id=run_id_var.get(), resource=resource_var.get(), window=window_var.get())
        message = redact(record.getMessage())
        if record.exc_info:
            message += "\n" + redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        record.msg, record.args = message, None
        return True


_CONTEXT = (("run", "run_id"), ("resource", "resource"), ("window", "window"))


_UNINDENTED_LINE = re.compile(r"\n(?=\S)")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        """One event per line that starts with its time; its further lines (several config errors, a traceback) are
        indented: at column 0, with no time or level, a reader took them for events of their own."""
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        where = " ".join(f"{label}={value}" for label, attr in _CONTEXT if (value := getattr(record, attr, None)))
        message = _UNINDENTED_LINE.sub("\n  ", record.getMessage())
        return f"{stamp} {record.levelname:<7} {message}" + (f"  [{where}]" if where else "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", None),
            "resource": getattr(record, "resource", None),
            "window": getattr(record, "window", None),
        }
        try:
            text = orjson.dumps(document).decode()
        except TypeError:  # orjson refused the line: the formatter raised and logging printed its traceback instead
            document = {key: _no_lone_surrogate(value) for key, value in document.items()}
            text = orjson.dumps(document).decode()
        return text if text.isascii() or takes_utf8(sys.stderr) else _ascii_json(document)


def _no_lone_surrogate(value: object) -> object:
    """A lone surrogate (a file name that is not UTF-8, as Python reads it) as the text `\\udce9`, as text logs show it."""
    return escape_lone_surrogates(value) if isinstance(value, str) else value


def _ascii_json(document: dict[str, object]) -> str:
    """JSON in ASCII, anything else as JSON's own \\u escapes: on a stderr that is not UTF-8, `backslashreplace`
    wrote é as `\\xe9` and 😀 as `\\U0001f600`, escapes JSON does not have, and the line did not parse."""
    return json.dumps(document, separators=(",", ":"))


def takes_utf8(stream: object) -> bool:
    """Whether text written to `stream` reaches it as UTF-8; if not, JSON is better written in ASCII."""
    encoding = getattr(stream, "encoding", None)
    try:
        return encoding is not None and codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stderr as it is at each line, not as it was at start-up.

    While progress bars are drawn, sys.stderr is rich's proxy, which prints a line above the bars.
    A handler holding the real stderr wrote into the bars instead: the next redraw erased the warning
    and left a torn bar behind.
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None, line: str | None = None
) -> None:
    """A library's warning as one event: its category and text, and where it was raised for a bug report.

    logging.captureWarnings logged warnings.formatwarning's text: the file, the warning, a line of source code and
    an empty line, three lines of a text log of which only one meant anything to the reader.
    """
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def setup_logging(log_format: str, verbosity: int) -> None:
    """`verbosity`: -1 quiet (warnings and errors), 0 normal, 1 debug for etl's own loggers.

    Other libraries stay at INFO under -v: aiosqlite alone logs every statement at DEBUG.
    """
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    warnings.showwarning = _log_warning  # a library's warnings.warn went to stderr as two bare lines, JSON or not
    root.setLevel(logging.WARNING if verbosity < 0 else logging.INFO)
    logging.getLogger("etl").setLevel(logging.DEBUG if verbosity > 0 else logging.NOTSET)
    for noisy in ("aiohttp.access", "asyncio", "alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def option_given(argv: list[str], option: str, value: str) -> bool:
    """Whether the command line holds `option value` or `option=value`, read before (or without) argparse."""
    for token, following in zip(argv, [*argv[1:], None], strict=False):  # [] has no token and one None
        name, equals, attached = token.partition("=")
        if _abbreviates(name, option) and (attached if equals else following) == value:
            return True
    return False


def _abbreviates(token: str, option: str) -> bool:
    """`--log` for `--log-format`, as argparse takes it (no other option of etl starts so): a run given `--log json`
    logged JSON, but a refused command line was reported in text."""
    return len(token) >= 3 and token.startswith("--") and option.startswith(token)


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for JSON logs."""
    return option_given(argv, "--log-format", "json")


def interrupted_while_starting(argv: list[str]) -> int:
    """Ctrl-C in the half second etl's modules take to load was a KeyboardInterrupt traceback (exit 130),
    its lines no JSON: it is one line in the format asked for, and exit 1 as for any stopped run."""
    setup_logging("json" if wants_json(argv) else "text", 0)
    logging.getLogger("etl").error("interrupted while starting; nothing was done")
    return 1
