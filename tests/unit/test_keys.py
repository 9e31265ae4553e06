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


# -- partitions --------------------------------------------------------------------------


def test_one_partition_keeps_the_unpartitioned_names() -> None:
    keys = StreamKeys(partitions=1)
    assert keys.completions_for("any") == "{streamflow}:completions" == keys.completions
    assert keys.ready_for("emails", "any") == "{streamflow}:ready:emails"
    assert keys.epoch_key(0) == "{streamflow}:epoch" == keys.epoch
    assert keys.all_completions() == ["{streamflow}:completions"]
    assert keys.ready_streams(["a"]) == ["{streamflow}:ready:a"]


def test_partitions_go_inside_the_tag_and_each_is_one_slot() -> None:
    keys = StreamKeys("acme", partitions=4)
    assert keys.all_completions() == [f"{{acme:{p}}}:completions" for p in range(4)]
    for p in range(4):
        together = [
            keys.completion_stream(p),
            keys.ready_stream("a", p),
            keys.ready_stream("emails:bulk", p),
            keys.dead_letter_stream(p),
            keys.epoch_key(p),
        ]
        assert len({_slot(k) for k in together}) == 1
    assert keys.dead_letter_for(keys.ready_stream("a", 3)) == "{acme:3}:dead"
    assert keys.ready_streams(["a", "b"]) == [
        *(keys.ready_stream("a", p) for p in range(4)),
        *(keys.ready_stream("b", p) for p in range(4)),
    ]


def test_a_workflow_always_maps_to_the_same_partition() -> None:
    from streamflow.streams.keys import partition_for

    # CRC-32 of the id: fixed values, the same in every process and Python version.
    assert partition_for("0123456789abcdef0123456789abcdef", 8) == 6
    assert partition_for("wf-1", 8) == partition_for("wf-1", 8)
    assert partition_for("anything", 1) == 0
    ids = [f"{i:032x}" for i in range(2000)]
    spread = {p: sum(partition_for(i, 4) == p for i in ids) for p in range(4)}
    assert min(spread.values()) > 400  # roughly even, no partition starved
    keys = StreamKeys(partitions=8)
    wid = "0123456789abcdef0123456789abcdef"
    assert keys.completions_for(wid) == "{streamflow:6}:completions"
    assert keys.ready_for("q", wid) == "{streamflow:6}:ready:q"


def test_single_stream_names_refuse_a_partitioned_layout() -> None:
    keys = StreamKeys(partitions=2)
    with pytest.raises(ValueError, match="per-partition"):
        _ = keys.completions
    with pytest.raises(ValueError, match="per-partition"):
        keys.ready("default")


@pytest.mark.parametrize("bad", [0, -1, 1025, True, "4"])
def test_partition_count_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="partitions"):
        StreamKeys(partitions=bad)  # type: ignore[arg-type]


def test_partition_setting_is_parsed_with_a_clear_error() -> None:
    from streamflow.streams.keys import parse_partitions

    assert parse_partitions(None) == 1
    assert parse_partitions(" ") == 1
    assert parse_partitions(" 8 ") == 8
    with pytest.raises(ValueError, match="whole number"):
        parse_partitions("eight")
    with pytest.raises(ValueError, match="between 1 and"):
        parse_partitions("0")


def test_a_prefix_that_reads_as_a_partition_is_refused() -> None:
    with pytest.raises(ValueError, match="partition"):
        StreamKeys("app:3")
    assert StreamKeys("app:v3").prefix == "app:v3"


def test_patterns_find_every_layout() -> None:
    keys = StreamKeys("a*b", partitions=4)
    assert keys.patterns == [r"{a\*b}:*", r"{a\*b:[0-9]*}:*"]
