"""Redis Cluster URLs: seed nodes, credentials, and clear errors for what a cluster lacks."""

from __future__ import annotations

import pytest

from streamflow.streams.cluster import ClusterUrl, is_cluster_url, parse_cluster_url
from streamflow.streams.transport import connect


def test_seed_nodes_and_credentials() -> None:
    assert parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001") == ClusterUrl(
        (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    )
    parsed = parse_cluster_url("rediss+cluster://app:s%40cret@[::1]:7000,redis-b/0")
    assert parsed == ClusterUrl((("::1", 7000), ("redis-b", 6379)), "app", "s@cret", ssl=True)
    assert parse_cluster_url("redis+cluster://secret@h:1").password == "secret"


def test_only_cluster_schemes_count() -> None:
    assert is_cluster_url("redis+cluster://h:1")
    assert not is_cluster_url("redis://h:1")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h:1?timeout=3", "no query options"),
        ("redis+cluster://", "at least one host"),
        ("redis+cluster://h:port", "not a port"),
        ("redis+cluster://h:70000", "out of range"),
    ],
)
def test_what_a_cluster_url_cannot_say(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_cluster_url(url)
    with pytest.raises(ValueError, match=problem):
        connect(url)


def test_unknown_schemes_name_the_cluster_one() -> None:
    with pytest.raises(ValueError, match=r"redis\+cluster://"):
        connect("http://h:1")
