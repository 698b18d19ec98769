"""The journaling milter's writer: entries appended to a segment, group-fsync'd.

With `[milter] accept_after = "journal"` every message is made durable on the
host's disk before end of message is answered.  One file per message
(`Spool.write`: a temporary file, fsync, rename, fsync of the directory, and
the drain's unlink later) costs the kernel more than the rest of the
message's capture at a few hundred messages a second: ext4 allocates an
inode per file and scans past every recently deleted one, and every file
takes two journal commits.  So a `JournalWriter` appends each entry (the
same bytes an entry file would hold) as one record to the segment it alone
writes, and the sessions waiting for their records share fdatasyncs: a
session whose record is not yet covered either starts one (covering every
record written so far) or waits for the one in progress (group commit).

A segment is created in `tmp/`, locked (flock) and only then renamed into
the spool directory as `<uuid7>.jopen`, and that rename made durable before
the first record's answer: a drain never sees a segment that is not locked
by its writer until the writer closes it or dies.  The writer closes it,
renamed `<uuid7>.journal`, once it is ROTATE_SECONDS old (so the drain sees
a message within about that time plus its own interval), RECORD_BYTES big,
after a write error, or when the milter stops.  A write that fails part way
is cut off again (ftruncate) before the segment is closed, so every record
answered is whole.  The format and the drain are in storage/content/spool.py.

Messages whose compressed object is larger than RECORD_MAX_BYTES are written
as entry files as before: a record is built in memory, and their cost per
byte makes the per-file cost small.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from prometheus_client import Counter

from postkeep.ids import uuid7
from postkeep.storage.content.spool import (
    OPEN_SUFFIX,
    SEGMENT_MAGIC,
    SEGMENT_SUFFIX,
    Spool,
    encode_record,
)
from postkeep.storage.metadata.messages import CapturedMessage

log = logging.getLogger("postkeep.spool")

RECORDS = Counter("postkeep_journal_records_total",
                  "Messages appended to journal segments (accept_after = journal).")
SYNCS = Counter("postkeep_journal_fdatasyncs_total",
                "fdatasync calls on journal segments; records per call is the group"
                " commit's sharing.")
SEGMENTS = Counter("postkeep_journal_segments_total",
                   "Journal segments closed and handed to the drain.")

ROTATE_SECONDS = 0.5
SEGMENT_MAX_BYTES = 8 << 20
RECORD_MAX_BYTES = 1 << 20


class _Segment:
    """One open segment: its descriptor, how much is written, how much is durable."""

    def __init__(self, path: Path, fd: int, created: float) -> None:
        self.path = path
        self.fd = fd
        self.created = created
        self.written = len(SEGMENT_MAGIC)  # bytes whole in the file
        self.durable = 0  # bytes an fdatasync covered
        self.failed: OSError | None = None
        self._syncing = False
        self._cv = threading.Condition()

    def wait_durable(self, end: int) -> None:
        """Return once the first END bytes are on disk; OSError if they cannot be."""
        with self._cv:
            while self.durable < end:
                if self.failed is not None:
                    raise OSError(self.failed.errno, f"journal fdatasync failed: {self.failed}")
                if self._syncing:
                    self._cv.wait()
                    continue
                self._syncing = True
                target = self.written
                self._cv.release()
                try:
                    SYNCS.inc()
                    os.fdatasync(self.fd)
                except OSError as exc:
                    failed: OSError | None = exc
                else:
                    failed = None
                finally:
                    self._cv.acquire()
                    self._syncing = False
                    self._cv.notify_all()
                if failed is not None:
                    self.failed = failed
                else:
                    self.durable = max(self.durable, target)

    def sync_all(self) -> None:
        """Everything written made durable (no fdatasync may be running after)."""
        with self._cv:
            while self._syncing:
                self._cv.wait()
            if self.failed is None:
                try:
                    SYNCS.inc()
                    os.fdatasync(self.fd)
                    self.durable = self.written
                except OSError as exc:
                    self.failed = exc
            self._cv.notify_all()


class JournalWriter:
    """Appends entries to this process's open segment (thread-safe)."""

    def __init__(self, spool: Spool, *, rotate_seconds: float = ROTATE_SECONDS,
                 segment_max_bytes: int = SEGMENT_MAX_BYTES,
                 record_max_bytes: int = RECORD_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.rotate_seconds = rotate_seconds
        self.segment_max_bytes = segment_max_bytes
        self.record_max_bytes = record_max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._segment: _Segment | None = None
        self._stop = threading.Event()
        self._rotator: threading.Thread | None = None

    # -- life -----------------------------------------------------------------
    def start(self) -> None:
        """Close segments once they are ROTATE_SECONDS old, even with no new mail."""
        if self._rotator is None:
            self._rotator = threading.Thread(target=self._rotate_forever,
                                             name="journal-rotate", daemon=True)
            self._rotator.start()

    def close(self) -> None:
        """Stop rotating and close the open segment (the milter is stopping)."""
        self._stop.set()
        if self._rotator is not None:
            self._rotator.join(timeout=5)
        with self._lock:
            self._close_segment()

    def _rotate_forever(self) -> None:
        while not self._stop.wait(min(self.rotate_seconds, 1.0) / 2):
            with self._lock:
                seg = self._segment
                if seg is not None and self._old(seg):
                    try:
                        self._close_segment()
                    except OSError as exc:
                        log.error("journal segment %s could not be closed: %s", seg.path, exc)

    # -- writing --------------------------------------------------------------
    def append(self, message: CapturedMessage, content: BinaryIO, reason: str, *,
               now: datetime | None = None, sealed: bool | None = None) -> Path:
        """MESSAGE (its object: message.compressed_size bytes of CONTENT) made
        durable in a segment, or in an entry file when it is large; where.
        OSError if it could not be (the message must not be accepted)."""
        if message.compressed_size > self.record_max_bytes:
            return self.spool.write(message, content, reason, now=now, sealed=sealed)
        record = encode_record(message, content, reason, now=now, sealed=sealed)
        with self._lock:
            seg = self._writable(len(record))
            try:
                _write_all(seg.fd, record)
            except OSError:
                # A part written would hide every later record from the drain:
                # cut it off, and never append to this segment again.
                with contextlib.suppress(OSError):
                    os.ftruncate(seg.fd, seg.written)
                with contextlib.suppress(OSError):
                    self._close_segment()
                raise
            seg.written += len(record)
            RECORDS.inc()
            end = seg.written
        seg.wait_durable(end)
        return seg.path

    def _writable(self, size: int) -> _Segment:
        """The open segment, a new one if there is none or it is full, old or broken."""
        seg = self._segment
        if seg is not None and (seg.failed is not None
                                or seg.written + size > self.segment_max_bytes
                                or self._old(seg)):
            self._close_segment()
            seg = None
        if seg is None:
            seg = self._segment = self._open_segment()
        return seg

    def _old(self, seg: _Segment) -> bool:
        """Is SEG due to be handed to the drain (ROTATE_SECONDS old)?"""
        return self._clock() - seg.created >= self.rotate_seconds

    def _open_segment(self) -> _Segment:
        """A new segment: made and locked in tmp/, then renamed in, durably."""
        name = str(uuid7())
        tmp = self.spool.tmp / f"{name}{OPEN_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, SEGMENT_MAGIC)
            final = self.spool.dir / f"{name}{OPEN_SUFFIX}"
            os.rename(tmp, final)
            self.spool.sync()
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return _Segment(final, fd, self._clock())

    def _close_segment(self) -> None:
        """Make the open segment whole on disk and hand it to the drain (.journal).

        An empty one is removed.  After an fdatasync that failed it is cut
        back to what the last good one covered: every record past that was
        refused (451) to its session, and Postfix sends those messages again;
        left in, the drain would store them twice."""
        seg, self._segment = self._segment, None
        if seg is None:
            return
        try:
            if seg.written == len(SEGMENT_MAGIC):  # no record in it
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
                return
            seg.sync_all()
            if seg.failed is not None:
                os.ftruncate(seg.fd, max(seg.durable, len(SEGMENT_MAGIC)))
                with contextlib.suppress(OSError):
                    os.fdatasync(seg.fd)
            os.rename(seg.path, seg.path.with_name(
                seg.path.name.removesuffix(OPEN_SUFFIX) + SEGMENT_SUFFIX))
            SEGMENTS.inc()
        finally:
            os.close(seg.fd)  # releases the flock: a .jopen left is drained as one


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
