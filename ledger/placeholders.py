"""`Workflow.result(step)` placeholders as they are stored in step args, and their resolution."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The single key of the JSON object that stands for "the stored result of this step".
RESULT_MARKER = "$streamflow.result"


def result_marker(step: str) -> dict[str, str]:
    return {RESULT_MARKER: step}


def marker_step(value: Any) -> str | None:
    """The step a stored placeholder names, or None if `value` is not a placeholder."""
    if isinstance(value, dict) and len(value) == 1 and RESULT_MARKER in value:
        step = value[RESULT_MARKER]
        return step if isinstance(step, str) else None
    return None


def referenced_steps(value: Any) -> list[str]:
    """Every step named by a placeholder inside `value`, in order of appearance."""
    found: list[str] = []

    def walk(v: Any) -> None:
        step = marker_step(v)
        if step is not None:
            found.append(step)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)

    walk(value)
    return found


def resolve(value: Any, results: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """Replace placeholders with stored results.

    Returns the resolved value and the steps whose result was not in `results`; those
    placeholders resolve to None (a dependency that ended without a result through a
    `continue` edge has nothing to pass on).
    """
    missing: list[str] = []

    def walk(v: Any) -> Any:
        step = marker_step(v)
        if step is not None:
            if step not in results:
                missing.append(step)
                return None
            return results[step]
        if isinstance(v, dict):
            return {k: walk(item) for k, item in v.items()}
        if isinstance(v, list):
            return [walk(item) for item in v]
        return v

    return walk(value), missing


def resolved_args(args: Any, results: Mapping[str, Any]) -> Any:
    """`args` with its placeholders replaced by `results` (itself if it has none)."""
    return resolve(args, results)[0] if referenced_steps(args) else args
