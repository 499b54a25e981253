"""etl.jsonnumbers: numbers orjson would round are read and written with every digit."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from etl import jsonnumbers


def test_a_number_of_more_than_15_digits_is_read_exactly() -> None:
    """orjson reads 12345678901234.567 as ...566 and 2**70 as a float; a decimal column would store them rounded."""
    body = b'{"data": [{"total": 12345678901234.567, "big": 1180591620717411303424, "price": 19.99, "n": 3}]}'
    record = jsonnumbers.loads(body)["data"][0]
    assert record["total"] == Decimal("12345678901234.567") and isinstance(record["total"], Decimal)
    assert record["big"] == 2**70 and isinstance(record["big"], int)
    assert type(record["price"]) is float and record["n"] == 3  # short numbers stay as orjson gives them


@pytest.mark.parametrize("token", ["0.000000000000001234", "1e-20", "123456789012345", "-0.5"])
def test_numbers_a_double_holds_exactly_stay_floats_or_ints(token: str) -> None:
    value = jsonnumbers.loads(b'{"padding": "1234567890123456", "x": ' + token.encode() + b"}")["x"]
    assert type(value) in (float, int) and value == orjson.loads(token.encode())


def test_a_long_digit_string_is_left_a_string() -> None:
    """The scan may take a 16-digit string for a number; the value is still the string it was."""
    assert jsonnumbers.loads(b'{"phone": "00412345678901234"}') == {"phone": "00412345678901234"}


def test_decimals_and_big_integers_are_written_with_every_digit() -> None:
    assert jsonnumbers.dumps({"total": Decimal("12345678901234.567")}) == b'{"total":12345678901234.567}'
    assert jsonnumbers.dumps([2**70]) == b"[1180591620717411303424]"
    assert jsonnumbers.dumps({"n": [2**70], "x": Decimal("0.1234567890123456789")}) == b'{"n":[1180591620717411303424],"x":0.1234567890123456789}'


def test_what_is_not_json_is_a_value_error() -> None:
    for body in (b"<html>", b'{"total": 12345678901234.567', b""):
        with pytest.raises(ValueError):
            jsonnumbers.loads(body)
