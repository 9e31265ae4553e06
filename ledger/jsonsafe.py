"""Plain-JSON checks for everything the ledger stores from users.

The ledger compares payloads to classify duplicates, so what goes in must come back out
unchanged: only dicts with string keys, lists, strings, finite numbers, booleans and None.
"""

from __future__ import annotations

import math
from typing import Any

_MAX_DEPTH = 100


def json_problems(value: Any, path: str = "$") -> list[str]:
    """Every place in `value` that is not plain JSON, as "path: what is wrong"."""
    problems: list[str] = []
    _walk(value, path, problems, 0)
    return problems


def _walk(value: Any, path: str, problems: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        problems.append(f"{path}: nested deeper than {_MAX_DEPTH} levels")
        return
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            problems.append(f"{path}: {value!r} is not a JSON number (NaN and infinity are not)")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(
                    f"{path}: key {key!r} is a {type(key).__name__}; JSON object keys are strings"
                )
                continue
            _walk(item, f"{path}.{key}", problems, depth + 1)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", problems, depth + 1)
        return
    kind = type(value).__name__
    advice = {
        "tuple": "use a list",
        "set": "use a sorted list",
        "frozenset": "use a sorted list",
        "bytes": "decode it or base64-encode it to a string",
        "datetime": "use an ISO 8601 string",
        "date": "use an ISO 8601 string",
        "Decimal": "use a string or a float",
        "UUID": "use its string form",
    }.get(kind, "convert it to dicts, lists, strings, numbers, booleans or None")
    problems.append(f"{path}: a {kind} is not plain JSON ({advice})")
