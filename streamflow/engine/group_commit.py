"""Group commit: many threads' ledger operations share one transaction and one commit.

A worker runs its steps on many threads, and each step needs two ledger writes of its
own (the claim, then the outcome). Committed one by one that is two PostgreSQL commits
per step, and a commit (a WAL flush) is the dearest thing the ledger does. Here the
threads that want to write at the same moment queue up; the first of them becomes the
leader and runs everything queued in ONE transaction, while the others wait for its
commit; whoever arrives during that commit forms the next group. A lone thread pays
nothing extra — it leads a group of one — and under load the commits per step fall with
the group size.

Correctness, operation by operation, is what it was alone:

- Each operation still runs in full inside the transaction (the same locks, the same
  checks) and its result is handed back only after the commit succeeded. Nothing a
  caller learns can be rolled back afterwards.
- Operations lock their workflow row first. A group runs its operations sorted by
  workflow id (stable, so one workflow's operations keep their order), the same order the
  completion consumer uses, so two groups cannot deadlock on each other's workflows.
- An operation that raises (a caller's mistake, such as an unknown step) must not undo
  its neighbours: the group is rolled back and every operation runs again in a
  transaction of its own, so each one gets its own result or its own exception. That
  costs a few commits, only when something failed.
- A transient failure (PostgreSQL restarting, a connection cut, a deadlock) retries the
  whole group with backoff, as `in_transaction` does for one operation: every ledger
  operation the engine runs is idempotent (a repeated outcome is a duplicate, a repeated
  claim finds its step executing).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

from ledger.db import transaction
from streamflow.engine.common import in_transaction
from streamflow.engine.retrying import is_transient, retrying

T = TypeVar("T")

#: Opened in a group's transaction before its operations run, with their order keys and
#: hints in the order they run (the worker's locks every workflow of the group and reads
#: ahead what their outcomes will read, in one round trip), closed before the commit.
GroupScope = Callable[[Connection, list[str], list[Any]], AbstractContextManager[None]]

#: At most this many operations share a commit: a bound on how long the group's locks
#: are held and on how much one failed operation makes the others redo.
DEFAULT_MAX_GROUP = 64


@dataclass
class _Request(Generic[T]):
    work: Callable[[Connection], T]
    order_key: str
    hint: Any = None
    done: bool = False
    result: Any = None
    error: BaseException | None = None


@dataclass
class GroupCommitStats:
    """How well grouping worked: operations per commit is `operations / commits`."""

    operations: int = 0
    commits: int = 0
    #: Groups that had to fall back to one transaction per operation.
    split_groups: int = 0
    largest_group: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class GroupCommitter:
    """Runs ledger operations from many threads in shared transactions."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_group: int = DEFAULT_MAX_GROUP,
        scope: GroupScope | None = None,
    ) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, got {max_group}")
        self.engine = engine
        self.max_group = max_group
        self.scope = scope
        self.stats = GroupCommitStats()
        self._queue: list[_Request[Any]] = []
        self._leading = False
        self._changed = threading.Condition()

    def run(self, work: Callable[[Connection], T], *, order_key: str, hint: Any = None) -> T:
        """Run `work(conn)` in a ledger transaction shared with other callers; return its
        result once that transaction committed, or raise what `work` raised.

        `order_key` is the workflow id `work` locks: operations in one transaction run in
        its order. `hint` goes to the scope (for the worker: the statement `work` starts
        with, to send with the group's lock; see `ledger.db.locked_with_reads`).
        """
        request: _Request[T] = _Request(work, order_key, hint)
        with self._changed:
            self._queue.append(request)
        while True:
            with self._changed:
                while not request.done and self._leading:
                    self._changed.wait()
                if request.done:
                    return self._outcome(request)
                # Nobody is committing: lead a group of the oldest queued operations. If
                # more than `max_group` are queued ours may not be among them; then we
                # lead again once this group is done, until it is.
                self._leading = True
                group = self._queue[: self.max_group]
                del self._queue[: self.max_group]
            try:
                self._commit(group)
            except BaseException as exc:
                # Infrastructure trouble that outlasted the retries: every member learns it.
                for member in group:
                    if not member.done:
                        member.error, member.done = exc, True
            finally:
                with self._changed:
                    self._leading = False
                    self._changed.notify_all()

    @staticmethod
    def _outcome(request: _Request[T]) -> T:
        if request.error is not None:
            raise request.error
        result: T = request.result
        return result

    def _commit(self, group: list[_Request[Any]]) -> None:
        ordered = sorted(group, key=lambda r: r.order_key)
        try:
            results = retrying(lambda: self._together(ordered))
        except Exception as exc:
            if is_transient(exc):
                raise
            self._one_by_one(ordered)
            return
        for member, result in zip(ordered, results, strict=True):
            member.result, member.done = result, True
        self._count(len(ordered), commits=1, split=False)

    def _together(self, ordered: list[_Request[Any]]) -> list[Any]:
        with transaction(self.engine) as conn:
            if self.scope is None:
                return [member.work(conn) for member in ordered]
            keys = [member.order_key for member in ordered]
            with self.scope(conn, keys, [member.hint for member in ordered]):
                return [member.work(conn) for member in ordered]

    def _one_by_one(self, ordered: list[_Request[Any]]) -> None:
        """Something in the group raised: give every operation its own transaction, so
        each gets its own answer and no failure undoes a neighbour's write. Alone, an
        operation needs no scope."""
        for member in ordered:
            try:
                member.result = in_transaction(self.engine, member.work)
            except Exception as exc:
                member.error = exc
            member.done = True
        self._count(len(ordered), commits=len(ordered), split=True)

    def _count(self, operations: int, *, commits: int, split: bool) -> None:
        stats = self.stats
        with stats._lock:
            stats.operations += operations
            stats.commits += commits
            stats.split_groups += int(split)
            stats.largest_group = max(stats.largest_group, operations)
