"""The per-partition commit point under out-of-order completion."""

from __future__ import annotations

from aiokafka import TopicPartition

from semroute_stream._service.delivery import CommitTracker

A = TopicPartition("t", 0)
B = TopicPartition("t", 1)


def test_commits_only_the_finished_prefix() -> None:
    t = CommitTracker()
    for off in (10, 11, 12, 13):
        t.start(A, off)
    t.finish(A, 12)
    t.finish(A, 11)
    assert t.committable() == {}  # 10 is still running
    t.finish(A, 10)
    assert t.committable() == {A: 13}
    assert t.in_flight(A) == 1
    t.finish(A, 13)
    assert t.committable() == {A: 14}
    assert t.in_flight() == 0


def test_gaps_in_offsets_are_fine() -> None:
    t = CommitTracker()
    for off in (5, 9, 30):  # compacted topic or transaction markers
        t.start(A, off)
    t.finish(A, 9)
    t.finish(A, 5)
    assert t.committable() == {A: 10}


def test_partitions_are_independent_and_marked_commits_not_repeated() -> None:
    t = CommitTracker()
    t.start(A, 0)
    t.start(B, 0)
    t.start(B, 1)
    t.finish(B, 1)
    t.finish(A, 0)
    assert t.committable() == {A: 1}
    t.mark_committed({A: 1})
    assert t.committable() == {}
    t.finish(B, 0)
    assert t.committable() == {B: 2}


def test_forgotten_partition_ignores_late_completions() -> None:
    t = CommitTracker()
    t.start(A, 0)
    t.forget({A})
    t.finish(A, 0)
    assert t.committable() == {}
    assert t.in_flight() == 0
