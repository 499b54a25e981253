"""JSON in and out without losing a digit of a number.

orjson is fast, but it reads a number of more than 15 significant digits as a
float (12345678901234.567 becomes 12345678901234.566) and an integer beyond 64
bits too: a `decimal` column fed such a JSON number would store it rounded,
without a word. So a body is first scanned for a run of 16 digits (dots
included: a cheap, conservative test, ~0.4 us a record), and only a body that
has one is read by the standard library, which keeps integers exact and gives
such long numbers as Decimal; every shorter number stays a float, as orjson
gives it. Writing JSON (a `json` column, a reject's raw record) gives a Decimal
and a big integer back as the same digits.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import orjson

_DIGITS_AS_ZERO = bytes(48 if chr(byte) in "0123456789." else 32 for byte in range(256))
_LONG_NUMBER = b"0" * 16
_FLOAT_DIGITS = 15  # every decimal of 15 significant digits survives a trip through a double


def loads(body: bytes) -> Any:
    """The body parsed; raises ValueError (orjson.JSONDecodeError is one) when it is not JSON."""
    if _LONG_NUMBER in body.translate(_DIGITS_AS_ZERO):
        return json.loads(body, parse_float=_exact_float)
    return orjson.loads(body)


def loads_lenient(body: bytes) -> Any:
    """The standard library's reading of what orjson refuses: NaN and Infinity, a lone surrogate, and a number
    beyond a double (`1e400`, valid JSON), given as a Decimal of its digits rather than as Infinity."""
    return json.loads(body, parse_float=_exact_float)


def loads_with_bad_bytes(body: bytes) -> Any:
    """The body parsed with each byte that is not UTF-8 kept as a lone surrogate (0xE9 as \\udce9), as
    Python's surrogateescape reads it: a string holding one is a reject once validated, with the byte
    visible in its raw record, where failing the page would fail every run after it at the same page."""
    return json.loads(body.decode("utf-8", "surrogateescape"), parse_float=_exact_float)


def dumps(value: Any, *, as_read: bool = False) -> bytes:
    """JSON text with every digit: a Decimal as its digits, an integer beyond 64 bits (which orjson refuses) too.

    `as_read` writes what JSON cannot hold as the page had it, for a reject's raw record, whose value
    that got it rejected must stay visible: NaN and Infinity as such (orjson writes null), and a lone
    UTF-16 surrogate as its escape, \\ud800 (orjson refuses it). Without it, such a string raises TypeError.
    """
    if not as_read:
        try:
            return orjson.dumps(value, default=_decimal_digits)
        except TypeError:
            pass
    return orjson.dumps(_as_written(value, as_read), default=_decimal_digits)


def _as_written(value: Any, as_read: bool) -> Any:
    """The value with what orjson would refuse or change as Fragments of its text."""
    if type(value) is int and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value))
    if as_read and type(value) is float and not math.isfinite(value):
        return orjson.Fragment("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity")
    if as_read and type(value) is str and not _is_utf8(value):
        return orjson.Fragment(json.dumps(value))
    if isinstance(value, dict):
        return {_utf8_key(key) if as_read else key: _as_written(item, as_read) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_written(item, as_read) for item in value]
    return value


def _is_utf8(text: str) -> bool:
    """False for a string holding a lone surrogate, which the standard library's parser lets through."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _utf8_key(key: Any) -> Any:
    """A key holding a lone surrogate as the text of its escape (a key cannot be a Fragment)."""
    return key if type(key) is not str or _is_utf8(key) else json.dumps(key)[1:-1]


def _exact_float(token: str) -> float | Decimal:
    mantissa = token.lstrip("-").split("e")[0].split("E")[0].replace(".", "").lstrip("0")
    if len(mantissa) > _FLOAT_DIGITS:
        return Decimal(token)
    number = float(token)
    return Decimal(token) if math.isinf(number) else number


def _decimal_digits(value: Any) -> orjson.Fragment:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
