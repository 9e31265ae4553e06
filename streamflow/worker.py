"""The Worker base class and the job spec `Worker.new` returns."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

_OVERRIDABLE = ("queue", "max_attempts", "priority")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What to run for a step: the worker's import path, its args and how to run it."""

    #: "package.module:ClassName"
    worker: str
    args: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    max_attempts: int = 3
    priority: int = 0


class Worker:
    """Subclass and implement `perform`. Class attributes set the defaults for its jobs.

    ```python
    class FetchCustomer(Worker):
        queue = "default"
        max_attempts = 3

        def perform(self, args, ctx):
            return {"customer_id": args["account_id"]}
    ```
    """

    queue: ClassVar[str] = "default"
    max_attempts: ClassVar[int] = 3
    priority: ClassVar[int] = 0

    def perform(self, args: dict[str, Any], ctx: Any) -> object:
        raise NotImplementedError(f"{type(self).__name__}.perform is not implemented")

    @classmethod
    def import_path(cls) -> str:
        return f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def new(cls, args: dict[str, Any] | None = None, **overrides: Any) -> JobSpec:
        """A job spec for this worker. `queue`, `max_attempts` and `priority` may be overridden.

        `args` is copied, so changing the dict afterwards does not change the job.
        """
        unknown = sorted(set(overrides) - set(_OVERRIDABLE))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.new() got unknown option(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(_OVERRIDABLE)}"
            )
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise TypeError(f"{cls.__name__}.new() args must be a dict, got {type(args).__name__}")
        queue = overrides.get("queue", cls.queue)
        max_attempts = overrides.get("max_attempts", cls.max_attempts)
        priority = overrides.get("priority", cls.priority)
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue must be a non-empty string, got {queue!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        try:
            args = copy.deepcopy(args)
        except Exception:  # an uncopyable value cannot be stored; validation reports it
            args = dict(args)
        return JobSpec(cls.import_path(), args, queue, max_attempts, priority)
