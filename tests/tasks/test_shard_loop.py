"""The shard loop's order of work, with stand-in steps (no pool, model or database).

While shard N is scored, shard N+1 is already decoding and shard N-1 is being written; writes
commit in order; a failure lets the write in flight finish (and counts it) before it raises.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tasks.screening import ShardRows
from tasks.shard_loop import ShardLoop


class Steps:
    """Records what the loop asks for; a write blocks until the next shard has been scored,
    so the test sees that writing overlaps scoring."""

    def __init__(self, fail_scoring: int | None = None) -> None:
        self.events: list[str] = []
        self.fail_scoring = fail_scoring
        self.scored: dict[int, threading.Event] = {}
        self.writer = ThreadPoolExecutor(1)
        self.closed = False

    def plan(self, items):
        self.events.append(f"plan {items[0]}")
        return set()

    def start(self, items, skip):
        self.events.append(f"start {items[0]}")
        self.scored[items[0]] = threading.Event()
        return items[0]

    def score(self, shard):
        if shard == self.fail_scoring:
            self.scored[shard].set()  # the write waiting for this scoring may go on
            raise RuntimeError(f"scoring shard {shard} failed")
        self.events.append(f"score {shard}")
        self.scored[shard].set()
        rows = ShardRows(counts=Counter(predicted=1))
        rows.reasons["shard"] = shard
        return rows

    def persist(self, rows) -> Future:
        shard = rows.reasons["shard"]

        def write():
            # the next shard is scored while this one is written (unless it is the last)
            nxt = self.scored.get(shard + 1)
            if nxt is not None:
                assert nxt.wait(10), f"shard {shard + 1} was not scored while {shard} was written"
            self.events.append(f"committed {shard}")
            return Counter(predicted=1)

        self.events.append(f"write {shard}")
        return self.writer.submit(write)

    def close(self):
        self.closed = True
        self.writer.shutdown()


def test_decode_next_score_this_write_previous_in_order():
    steps = Steps()
    stored = []
    loop = ShardLoop(steps, on_stored=lambda rows, counts, tally: stored.append(tally.files))
    tally = loop.run([[1], [2], [3]])
    assert tally.files == 3 and tally.counts == Counter(predicted=3)
    assert stored == [1, 2, 3]  # after each commit, in order
    e = steps.events
    # shard 2 starts decoding before shard 1 is scored; 3 before 2 is scored
    assert e.index("start 2") < e.index("score 1") < e.index("start 3") < e.index("score 2")
    # shard 1 is written while shard 2 is scored; writes commit in order
    assert e.index("write 1") < e.index("score 2") < e.index("committed 1")
    assert e.index("committed 1") < e.index("write 2") < e.index("committed 2")
    assert [x for x in e if x.startswith("committed")] == [
        "committed 1",
        "committed 2",
        "committed 3",
    ]
    assert steps.closed


def test_a_failure_lets_the_write_in_flight_commit_and_counts_it():
    steps = Steps(fail_scoring=3)
    loop = ShardLoop(steps)
    with pytest.raises(RuntimeError, match="scoring shard 3 failed"):
        loop.run([[1], [2], [3], [4]])
    # shard 2 was being written when scoring shard 3 failed: it committed and is counted
    assert "committed 2" in steps.events
    assert loop.tally.files == 2
    assert steps.closed
