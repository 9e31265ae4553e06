"""Stream key names: one hash tag per deployment, validated prefixes and queue names."""

from __future__ import annotations

import binascii

import pytest

from streamflow.streams.keys import COMPLETION_GROUP, WORKERS_GROUP, StreamKeys


def _slot(key: str) -> int:
    """Redis Cluster's key slot (CRC16/XMODEM of the hash tag, mod 16384)."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key.encode(), 0) % 16384


def test_default_names() -> None:
    keys = StreamKeys()
    assert keys.completions == "{streamflow}:completions"
    assert keys.ready("emails") == "{streamflow}:ready:emails"
    assert keys.dead_letter == "{streamflow}:dead"
    assert keys.completion_group == COMPLETION_GROUP
    assert keys.workers_group == WORKERS_GROUP


def test_custom_prefix_changes_every_key() -> None:
    keys = StreamKeys("acme-prod")
    assert keys.completions == "{acme-prod}:completions"
    assert keys.ready("default") == "{acme-prod}:ready:default"
    assert keys.dead_letter == "{acme-prod}:dead"


def test_every_key_of_a_deployment_shares_one_cluster_slot() -> None:
    keys = StreamKeys("tenant-a")
    names = [keys.completions, keys.dead_letter, keys.ready("a"), keys.ready("emails:bulk")]
    assert len({_slot(name) for name in names}) == 1
    # The slot is the tag's: a different prefix is free to land elsewhere.
    assert _slot(keys.completions) == _slot("tenant-a")


@pytest.mark.parametrize("prefix", ["", " ", "a b", "tab\there", "new\nline", "{x", "x}", "{x}"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        StreamKeys(prefix)


def test_empty_queue_names_are_refused() -> None:
    with pytest.raises(ValueError, match="queue"):
        StreamKeys().ready("")


@pytest.mark.parametrize("queue", ["a b", "{q}", "q}", "emails:bulk"])
def test_any_queue_name_the_builder_accepts_stays_in_the_deployments_slot(queue: str) -> None:
    keys = StreamKeys()
    assert keys.ready(queue) == "{streamflow}:ready:" + queue
    assert _slot(keys.ready(queue)) == _slot(keys.completions)


def test_bad_group_names_are_refused() -> None:
    with pytest.raises(ValueError, match="group"):
        StreamKeys(workers_group="two words")


def test_ready_streams_deduplicates_in_order() -> None:
    keys = StreamKeys()
    assert keys.ready_streams(["b", "a", "b"]) == [keys.ready("b"), keys.ready("a")]


def test_scan_pattern_escapes_glob_specials() -> None:
    assert StreamKeys().pattern == "{streamflow}:*"
    assert StreamKeys("a*b?[c]").pattern == r"{a\*b\?\[c\]}:*"
