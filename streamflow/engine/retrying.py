"""Riding out infrastructure restarts: retries for PostgreSQL and Redis calls.

Only connection-level failures are retried; a constraint violation or a bug is not
transient and surfaces at once. Every ledger operation the engine retries is idempotent
(a repeated outcome is a duplicate, a repeated claim finds the step executing), so a
commit whose acknowledgement was lost is safe to send again.
"""

from __future__ import annotations

import logging
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


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log_event(
        "infra.retry",
        logging.WARNING,
        attempt=state.attempt_number,
        error=type(exc).__name__ if exc else None,
        detail=str(exc)[:200],
    )


def retrying(call: Callable[[], T], *, max_seconds: float = 120.0) -> T:
    """Run `call`, retrying transient infrastructure errors with jittered backoff."""
    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        # Exponential from 50 ms to 5 s, plus jitter so restarted services are not
        # stampeded by every process at once.
        wait=wait_exponential(multiplier=0.05, max=5.0) + wait_random(0, 0.1),
        stop=stop_after_delay(max_seconds),
        before_sleep=_log_retry,
        reraise=True,
    ):
        with attempt:
            return call()
    raise AssertionError("unreachable")
