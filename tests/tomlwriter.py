"""A minimal TOML writer for test configs (dicts, lists, str, int, float, bool): enough for config.toml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _table(lines: list[str], header: str, table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)}
    lines.append(header)
    lines.extend(f"{json.dumps(key)} = {_value(value)}" for key, value in scalars.items())
    prefix = header.strip("[]")
    for key, value in table.items():
        if isinstance(value, dict):
            _table(lines, f"[{prefix}.{json.dumps(key)}]", value)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def dumps(document: dict[str, Any]) -> str:
    lines: list[str] = []
    for key, value in document.items():
        if isinstance(value, dict):
            _table(lines, f"[{json.dumps(key)}]", value)
        elif _is_table_list(value):
            for item in value:
                _table(lines, f"[[{json.dumps(key)}]]", item)
        else:
            lines.insert(0, f"{json.dumps(key)} = {_value(value)}")
    return "\n".join(lines) + "\n"


def write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(dumps(document), encoding="utf-8")
    return path
