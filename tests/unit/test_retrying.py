"""Infrastructure retries: transient connection errors are retried, everything else is not."""

from __future__ import annotations

import logging

import pytest
import redis.exceptions
from sqlalchemy.exc import IntegrityError, OperationalError

from streamflow.engine.retrying import is_transient, retrying


def test_transient_errors_are_retried_until_success() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.exceptions.ConnectionError("connection refused")
        return "ok"

    assert retrying(flaky, max_seconds=10) == "ok"
    assert len(calls) == 3


def test_other_errors_surface_at_once() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise IntegrityError("insert", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):
        retrying(broken, max_seconds=10)
    assert len(calls) == 1


def test_classification() -> None:
    assert is_transient(OperationalError("select 1", {}, Exception("server closed")))
    assert is_transient(redis.exceptions.TimeoutError())
    assert not is_transient(ValueError("bug"))


def test_every_transient_failure_is_logged_with_its_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first try runs outside the retry machinery (almost every call succeeds at
    once); its failure must still be logged and retried after a backoff."""
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("select 1", {}, Exception("server closed"))
        return "ok"

    with caplog.at_level(logging.WARNING, logger="streamflow"):
        assert retrying(flaky, max_seconds=10) == "ok"
    retries = [r for r in caplog.records if r.getMessage() == "infra.retry"]
    assert [r.sf_fields["attempt"] for r in retries] == [1, 2]  # type: ignore[attr-defined]
    assert len(calls) == 3


def test_a_call_that_succeeds_runs_once() -> None:
    calls = []
    assert retrying(lambda: calls.append(1) or "ok") == "ok"
    assert calls == [1]
