"""Fixtures for tests against a real Redis.

Redis comes from STREAMFLOW_TEST_REDIS_URL (default: the local server, database 0). Tests
share that server with others, so each one works under its own key prefix and deletes its
keys afterwards; nothing here may FLUSH it. Without a reachable server the Redis tests
skip — except under CI=true, where they fail: a green CI must mean real Redis was used.
"""

from __future__ import annotations

import os

import pytest
import redis

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("STREAMFLOW_TEST_REDIS_URL", DEFAULT_REDIS)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"Redis not reachable at {url}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return url
