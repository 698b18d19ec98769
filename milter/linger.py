"""Adaptive linger for the group commit (like PostgreSQL's commit_delay and
commit_siblings).

A pack holds what one group commit writes (storage/content/packs.py), so PUTs
per message fall only as batches grow.  Waiting `commit_linger_ms` for company
makes batches large on a busy host but adds that wait to every message of a
quiet one, where no company comes.  So the first message of a batch waits only
when at least `commit_siblings` other captures are in flight (between MAIL
FROM and the end of their end of message), and stops waiting as soon as every
capture in flight is in its batch: nobody else can join then.

The decisions are plain functions of counts; `InFlight` keeps the counts
(thread-safe) and the committer asks.
"""

from __future__ import annotations

import threading


def linger_seconds(others_in_flight: int, *, linger: float, siblings: int) -> float:
    """How long a batch's first message waits for company: LINGER when at least
    SIBLINGS other captures are in flight, else 0 (a lone session pays nothing)."""
    if linger <= 0 or others_in_flight < siblings:
        return 0.0
    return linger


def more_may_join(captures_in_flight: int, in_batch: int) -> bool:
    """Can another message still join the batch being formed (IN_BATCH messages)?

    Every capture in flight that is not in this batch may still join it: one
    receiving DATA, and one whose message is in an earlier batch still being
    stored (its session comes back with its next message as soon as that
    batch is done: stopping then split a cycle of 20 sessions into packs of
    19 and 1).  When every capture in flight is in this batch, waiting longer
    only adds latency: a new message needs a new MAIL FROM first.
    """
    return captures_in_flight > in_batch


class InFlight:
    """Captures in flight and commits pending, counted for the committer.

    Captures are counted by the milter (CaptureService) from MAIL FROM to the
    end of end of message; commits by GroupCommitter.commit from hand-over to
    its return.  An in-process user of the committer that counts no captures
    is seen through its commits alone (`others`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._captures = 0
        self._commits = 0
        self.counting_captures = False  # set by the first capture counted

    def capture_started(self) -> None:
        with self._lock:
            self._captures += 1
            self.counting_captures = True

    def capture_ended(self) -> None:
        with self._lock:
            self._captures = max(0, self._captures - 1)

    def commit_started(self) -> None:
        with self._lock:
            self._commits += 1

    def commit_ended(self) -> None:
        with self._lock:
            self._commits = max(0, self._commits - 1)

    def others(self) -> int:
        """Captures in flight besides the one asking (which is a pending commit)."""
        with self._lock:
            return max(self._captures, self._commits) - 1

    def more_may_join(self, in_batch: int) -> bool:
        """See `more_may_join`; always True when no capture is counted (in-process
        users: they get the plain linger)."""
        with self._lock:
            if not self.counting_captures:
                return True
            return more_may_join(self._captures, in_batch)
