"""Riding out infrastructure restarts: retries for PostgreSQL and Redis calls.

Only connection-level failures are retried; a constraint violation or a bug is not
transient and surfaces at once. Every ledger operation the engine retries is idempotent
(a repeated outcome is a duplicate, a repeated claim finds the step executing), so a
commit whose acknowledgement was lost is safe to send again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions
from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from streamflow.logs import log_event

T = TypeVar("T")


#: Redis Cluster's "not now": a shard down or failing over, slots moving. They pass once
#: the cluster settles, like a standalone server coming back.
_CLUSTER_TRANSIENT = (
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if isinstance(exc, _CLUSTER_TRANSIENT):
        return True
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _log_failure(attempt: int, exc: BaseException | None) -> None:
    log_event(
        "infra.retry",
        logging.WARNING,
        attempt=attempt,
        error=type(exc).__name__ if exc else None,
        detail=str(exc)[:200],
    )


#: Exponential from 50 ms to 5 s, plus jitter so restarted services are not stampeded by
#: every process at once.
_FIRST_WAIT, _JITTER = 0.05, 0.1
_BACKOFF = wait_exponential(multiplier=_FIRST_WAIT, max=5.0) + wait_random(0, _JITTER)


def _failure(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


def retrying(call: Callable[[], T], *, max_seconds: float = 120.0) -> T:
    """Run `call`, retrying transient infrastructure errors with jittered backoff."""
    started = time.monotonic()
    # Almost every call succeeds at once: the first try runs before any of tenacity's
    # machinery is built (that machinery was a tenth of the consume process's
    # interpreter time, most of it for calls that never failed).
    try:
        return call()
    except Exception as exc:
        if not is_transient(exc):
            raise
        _log_failure(1, exc)
    time.sleep(_FIRST_WAIT + random.uniform(0, _JITTER))
    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        wait=_BACKOFF,
        stop=stop_after_delay(max(0.0, max_seconds - (time.monotonic() - started))),
        # Numbered after the first try's failure.
        before_sleep=lambda state: _log_failure(state.attempt_number + 1, _failure(state)),
        reraise=True,
    ):
        with attempt:
            return call()
    raise AssertionError("unreachable")
