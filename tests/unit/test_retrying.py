"""Infrastructure retries: transient connection errors are retried, everything else is not."""

from __future__ import annotations

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
