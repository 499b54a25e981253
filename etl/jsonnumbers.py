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


def dumps(value: Any, *, non_finite_as_read: bool = False) -> bytes:
    """JSON text with every digit: a Decimal as its digits, an integer beyond 64 bits (which orjson refuses) too.

    `non_finite_as_read` writes NaN and Infinity as such (not JSON, but what the page said), where orjson
    writes null: for a reject's raw record, whose value that got it rejected must stay visible.
    """
    if not non_finite_as_read:
        try:
            return orjson.dumps(value, default=_decimal_digits)
        except TypeError:
            pass
    return orjson.dumps(_as_written(value, non_finite_as_read), default=_decimal_digits)


def _as_written(value: Any, non_finite: bool) -> Any:
    """The value with what orjson would refuse or change as Fragments of its text."""
    if type(value) is int and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value))
    if non_finite and type(value) is float and not math.isfinite(value):
        return orjson.Fragment("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _as_written(item, non_finite) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_written(item, non_finite) for item in value]
    return value


def _exact_float(token: str) -> float | Decimal:
    mantissa = token.lstrip("-").split("e")[0].split("E")[0].replace(".", "").lstrip("0")
    return Decimal(token) if len(mantissa) > _FLOAT_DIGITS else float(token)


def _decimal_digits(value: Any) -> orjson.Fragment:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
