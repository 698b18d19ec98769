"""Adaptive group-commit linger (milter/linger.py): the decision, the counts,
and the committer asking them (an in-memory store and a fake database)."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import REGISTRY
from support.wait import finishes, until
from test_committer import FakeDb, _message

from postkeep.config import ConfigError, parse
from postkeep.milter.committer import GroupCommitter
from postkeep.milter.linger import InFlight, linger_seconds, more_may_join
from postkeep.storage.content.objects import MemoryObjectStore

pytestmark = pytest.mark.unit

# Long enough that a batch which lingered when it should not have (or did not
# stop when nobody else could come) makes `finishes` fail, not the test slow.
FOREVER = 3600.0


def _lingered(decision: str) -> float:
    return REGISTRY.get_sample_value("postkeep_milter_commit_linger_total",
                                     {"decision": decision}) or 0.0


@pytest.mark.parametrize(("others", "siblings", "linger", "expected"), [
    (0, 4, 0.01, 0.0),    # a lone session: no added latency
    (3, 4, 0.01, 0.0),    # fewer siblings than asked for
    (4, 4, 0.01, 0.01),   # enough company coming: wait
    (19, 4, 0.01, 0.01),
    (19, 4, 0.0, 0.0),    # linger off
    (0, 0, 0.01, 0.01),   # siblings 0: the plain linger of before
])
def test_linger_seconds_waits_only_with_enough_siblings(
        others: int, siblings: int, linger: float, expected: float) -> None:
    assert linger_seconds(others, linger=linger, siblings=siblings) == expected


def test_more_may_join_while_a_capture_in_flight_is_not_in_the_batch() -> None:
    assert more_may_join(captures_in_flight=5, in_batch=3)
    # 19 in an earlier batch still being stored, 1 here: they come back soon
    assert more_may_join(captures_in_flight=20, in_batch=1)
    assert not more_may_join(captures_in_flight=3, in_batch=3)
    assert not more_may_join(captures_in_flight=0, in_batch=1)


def test_in_flight_counts_captures_and_commits() -> None:
    f = InFlight()
    f.commit_started()
    assert f.others() == 0 and f.more_may_join(1)  # no capture counted: plain linger
    for _ in range(3):
        f.capture_started()
    assert f.others() == 2 and f.more_may_join(1)
    f.commit_started()
    f.commit_started()
    assert f.more_may_join(2) and not f.more_may_join(3)
    f.capture_ended()
    f.capture_ended()
    f.capture_ended()
    f.capture_ended()  # more ends than starts never go below zero
    assert f.others() == 2  # three commits pending


def test_a_lone_capture_is_not_lingered() -> None:
    db = FakeDb()
    gc = GroupCommitter(db, MemoryObjectStore(), workers=1, linger=FOREVER,  # type: ignore[arg-type]
                        siblings=1)
    waited, skipped = _lingered("waited"), _lingered("skipped")
    try:
        gc.in_flight.capture_started()
        finishes(lambda: gc.commit(*_message()), "a lone commit")
        gc.in_flight.capture_ended()
    finally:
        gc.close()
    assert (_lingered("skipped") - skipped, _lingered("waited") - waited) == (1, 0)
    assert len(db.batches) == 1


def test_concurrent_captures_share_one_batch_which_ends_when_all_have_come() -> None:
    """Six captures in flight: the first commit waits for the others (siblings
    met), and the batch closes once all six have reached the committer, long
    before the linger would end it."""
    db = FakeDb()
    gc = GroupCommitter(db, MemoryObjectStore(), workers=1, linger=FOREVER,  # type: ignore[arg-type]
                        siblings=4)
    items = [_message() for _ in range(6)]
    waited = _lingered("waited")
    for _ in items:
        gc.in_flight.capture_started()
    threads = [threading.Thread(target=gc.commit, args=item) for item in items]
    try:
        for t in threads:
            t.start()
        for t in threads:
            finishes(lambda t=t: t.join(), "a commit of the lingering batch")  # type: ignore[misc]
    finally:
        gc.close()
    assert [sorted(b) for b in db.batches] == [sorted(m.id for m, _ in items)]
    assert _lingered("waited") - waited == 1


def test_a_capture_that_ends_without_committing_releases_the_linger() -> None:
    """Three captures in flight, one refused at end of message: the two that
    commit are not held for the linger's full length."""
    db = FakeDb()
    gc = GroupCommitter(db, MemoryObjectStore(), workers=1, linger=FOREVER,  # type: ignore[arg-type]
                        siblings=1)
    items = [_message() for _ in range(2)]
    for _ in range(3):
        gc.in_flight.capture_started()
    threads = [threading.Thread(target=gc.commit, args=item) for item in items]
    try:
        for t in threads:
            t.start()
        until(lambda: not threads[0].is_alive() or gc.in_flight.others() >= 2,
              "both commits handed over")
        gc.in_flight.capture_ended()  # the refused one
        for t in threads:
            finishes(lambda t=t: t.join(), "a commit once nobody else can come")  # type: ignore[misc]
    finally:
        gc.close()
    assert sum(len(b) for b in db.batches) == 2


def test_commit_siblings_is_validated_naming_the_key() -> None:
    assert parse({"milter": {"commit_siblings": 8}}).milter.commit_siblings == 8
    with pytest.raises(ConfigError, match=r"milter\.commit_siblings"):
        parse({"milter": {"commit_siblings": -1}})
    with pytest.raises(ConfigError, match=r"milter\.commit_siblings"):
        parse({"milter": {"commit_siblings": "many"}})
