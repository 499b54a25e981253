"""Records that pass validation but that a database refuses, as an outside tester found them."""

from __future__ import annotations

from typing import Any


def nested(depth: int) -> Any:
    """{"a": {"a": ... 1}}: MariaDB's JSON_VALID check on a json column refuses 32 levels and more (error 4025)."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def cjk(seed: int) -> str:
    """255 CJK characters (765 bytes) that do not compress: four as a key make a PostgreSQL index row of 3096
    bytes, over btree's 2704 (SQLSTATE 54000)."""
    return "".join(chr(0x4E00 + (seed * 7919 + n * 104729) % 20000) for n in range(255))


# per database: the resource's columns and key, a valid record, and one it refuses (given the record number)
CASES: dict[str, dict[str, Any]] = {
    "mysql": {
        "columns": {"id": "integer", "doc": "json"},
        "primary_key": ["id"],
        "good": lambda n: {"id": n, "doc": {"n": n}},
        "refused": lambda n: {"id": n, "doc": nested(40)},
    },
    "postgresql": {
        "columns": {name: "string" for name in "abcd"},
        "primary_key": list("abcd"),
        "good": lambda n: {"a": f"a{n}", "b": "b", "c": "c", "d": "d"},
        "refused": lambda n: {name: cjk(n + i) for i, name in enumerate("abcd")},
    },
}
