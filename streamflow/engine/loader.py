"""Turning a step's stored worker path ("package.module:Class") into the class."""

from __future__ import annotations

import importlib
import os
import sys
from functools import lru_cache

from streamflow.worker import Worker


class WorkerNotFoundError(LookupError):
    """The step names a worker this process cannot import."""


@lru_cache(maxsize=1024)
def load_worker(path: str) -> type[Worker]:
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise WorkerNotFoundError(f"worker path {path!r} is not 'module:Class'")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkerNotFoundError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise WorkerNotFoundError(f"module {module_name!r} has no {qualname!r}")
    if not (isinstance(target, type) and issubclass(target, Worker)):
        raise WorkerNotFoundError(f"{path!r} is not a streamflow.Worker subclass")
    return target


def import_apps(modules: list[str]) -> None:
    """Import the user's worker modules at start, so a typo fails fast and loudly.

    The current directory is importable, as with `python -m`: `streamflow run --app
    myapp` finds ./myapp.py without PYTHONPATH.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        importlib.import_module(name)
