"""Unit tests of the journal segments (`accept_after = "journal"`).

Real files and real fdatasyncs in a temporary directory; the drain stores
into an in-memory object store and a list of rows, as in tests/test_spool.py.
The same path through real Postfix, PostgreSQL and S3, with kill -9, is
tests/test_journal_stack.py.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest
from test_spool import FakeRows, _ids, _message

from postkeep.storage.content import journal as journal_mod
from postkeep.storage.content.journal import JournalWriter
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.content.spool import (
    OPEN_SUFFIX,
    SEGMENT_SUFFIX,
    Spool,
    drain,
    read_segment,
    segment_ids,
    waiting,
)
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _append(writer: JournalWriter, n: int, size: int = 0) -> tuple[CapturedMessage, bytes]:
    blob = os.urandom(size or 60 + n)
    m = _message(n, size=len(blob))
    writer.append(m, io.BytesIO(blob), "journal: test")
    return m, blob


def _drained_exactly(spool: Spool, blobs: dict[uuid.UUID, bytes]) -> list[CapturedMessage]:
    store, rows = MemoryObjectStore(), list[CapturedMessage]()
    result = drain(spool, store, rows.extend)
    assert result.stopped is None and result.drained == len(blobs)
    assert sorted(_ids(rows)) == sorted(blobs)
    for m in rows:
        assert store.objects[m.object_key] == blobs[m.id]
    return rows


def test_records_share_one_segment_the_drain_takes_once_it_is_closed(spool: Spool) -> None:
    writer = JournalWriter(spool, clock=Clock())
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(5))}
    (live,) = spool.segments()
    assert live.name.endswith(OPEN_SUFFIX)
    assert segment_ids(live) == list(blobs)  # in the order appended
    assert spool.entries() == []  # its writer still appends: not the drain's yet
    assert spool.status().entries == 5
    assert all(spool.holds(mid) for mid in blobs) and not spool.holds(uuid.uuid4())
    assert [p.name for p in spool.dir.iterdir() if p.name.endswith(".spool")] == []
    writer.close()
    (closed,) = spool.entries()
    assert closed.name == live.name.replace(OPEN_SUFFIX, SEGMENT_SUFFIX)
    _drained_exactly(spool, blobs)
    assert spool.segments() == [] and spool.status().entries == 0
    assert not any(spool.holds(mid) for mid in blobs)


def test_a_segment_left_open_by_a_killed_milter_is_drained(spool: Spool) -> None:
    writer = JournalWriter(spool, clock=Clock())
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(3))}
    seg = writer._segment
    assert seg is not None
    os.close(seg.fd)  # what kill -9 leaves: the file, no lock, no rename
    (left,) = spool.entries()
    assert left.name.endswith(OPEN_SUFFIX)
    _drained_exactly(spool, blobs)
    assert spool.segments() == []


def test_segments_close_when_old_or_full_and_large_mail_gets_a_file(spool: Spool) -> None:
    clock = Clock()
    writer = JournalWriter(spool, clock=clock, segment_max_bytes=4096, record_max_bytes=2000)
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(2))}
    clock.now += journal_mod.ROTATE_SECONDS  # the next append opens a new one
    blobs.update({m.id: b for m, b in (_append(writer, n, size=1500) for n in range(2, 6))})
    big, big_blob = _append(writer, 6, size=3000)  # over record_max_bytes
    assert (spool.dir / f"{big.id}.spool").exists()
    blobs[big.id] = big_blob
    closed = [p for p in spool.segments() if p.name.endswith(SEGMENT_SUFFIX)]
    assert len(closed) >= 2  # by age, then by size
    assert all(p.stat().st_size <= 4096 for p in spool.segments())
    writer.close()
    _drained_exactly(spool, blobs)


def test_the_rotator_closes_an_idle_segment_for_the_drain(spool: Spool) -> None:
    writer = JournalWriter(spool, rotate_seconds=0.05)
    writer.start()
    try:
        _append(writer, 0)
        for _ in range(200):
            if spool.entries():
                break
            threading.Event().wait(0.01)
        (closed,) = spool.entries()
        assert closed.name.endswith(SEGMENT_SUFFIX)
    finally:
        writer.close()


def test_sessions_share_fdatasyncs(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = os.fdatasync

    def slow(fd: int) -> None:
        calls.append(fd)
        threading.Event().wait(0.02)
        real(fd)

    monkeypatch.setattr(journal_mod.os, "fdatasync", slow)
    writer = JournalWriter(spool, clock=Clock())
    blobs: dict[uuid.UUID, bytes] = {}
    start = threading.Barrier(20)

    def session(n: int) -> None:
        start.wait()
        m, b = _append(writer, n)
        blobs[m.id] = b

    threads = [threading.Thread(target=session, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(blobs) == 20
    assert len(calls) < 10, f"{len(calls)} fdatasyncs for 20 records: no group commit"
    writer.close()
    _drained_exactly(spool, blobs)


def test_a_failed_write_is_cut_off_and_later_records_go_to_a_new_segment(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = JournalWriter(spool, clock=Clock())
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(2))}
    real = os.write

    def half_then_fail(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 100:
            real(fd, bytes(data[:50]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(journal_mod.os, "write", half_then_fail)
    with pytest.raises(OSError):
        _append(writer, 2)
    monkeypatch.undo()
    blobs.update({m.id: b for m, b in (_append(writer, n) for n in range(3, 5))})
    writer.close()
    assert len(spool.entries()) == 2
    for seg in spool.entries():
        assert read_segment(seg).tail is None  # the half record was cut off
    _drained_exactly(spool, blobs)
    assert list(spool.quarantine_dir.iterdir()) == []


def test_a_record_cut_short_by_a_kill_is_dropped_from_a_segment_left_open(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    writer = JournalWriter(spool, clock=Clock())
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(3))}
    seg = writer._segment
    assert seg is not None
    os.write(seg.fd, seg.path.read_bytes()[9:9 + 500])  # an append the kill cut
    os.close(seg.fd)
    with caplog.at_level(logging.WARNING, logger="postkeep.spool"):
        _drained_exactly(spool, blobs)
    assert list(spool.quarantine_dir.iterdir()) == [] and spool.segments() == []
    assert any("never answered" in r.getMessage() and str(seg.path) in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("damage", ["torn tail", "flipped record"])
def test_damage_is_quarantined_and_every_whole_record_drained(
        spool: Spool, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    writer = JournalWriter(spool, clock=Clock())
    appended = [_append(writer, n) for n in range(4)]
    writer.close()
    (seg,) = spool.entries()
    data = seg.read_bytes()
    blobs = {m.id: b for m, b in appended}
    if damage == "torn tail":  # a crash in the middle of a write never answered
        data += data[9:9 + 40]
    else:
        victim = appended[1][0]
        at = data.index(victim.id.bytes) + 100
        data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
        del blobs[victim.id]
    seg.write_bytes(data)
    with caplog.at_level(logging.ERROR, logger="postkeep.spool"):
        store, rows = MemoryObjectStore(), list[CapturedMessage]()
        result = drain(spool, store, rows.extend)
    assert result.quarantined == 1 and result.drained == len(blobs)
    assert sorted(_ids(rows)) == sorted(blobs)
    (kept,) = spool.quarantine_dir.iterdir()
    assert kept.name.startswith(seg.name)
    assert any("quarantined" in r.getMessage() and str(seg) in r.getMessage()
               for r in caplog.records)
    assert spool.segments() == []


def test_records_postgres_refuses_are_kept_as_entry_files(spool: Spool) -> None:
    writer = JournalWriter(spool, clock=Clock())
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(3))}
    writer.close()
    refused = next(iter(blobs))

    def record(msgs: list[CapturedMessage]) -> None:
        if any(m.id == refused for m in msgs):
            raise ValueError("a row PostgreSQL refuses")
        rows.extend(msgs)

    rows: list[CapturedMessage] = []
    result = drain(spool, MemoryObjectStore(), record)
    assert result.drained == 2 and result.rejected == 1
    assert spool.segments() == []
    assert [p.name for p in spool.entries()] == [f"{refused}.spool"]
    assert spool.open_entry(spool.entries()[0]).message.id == refused


def test_a_backend_down_keeps_the_segment_whole(spool: Spool) -> None:
    writer = JournalWriter(spool, clock=Clock())
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(3))}
    writer.close()
    rows = FakeRows()
    rows.fail = BackendError("postgres", "connection refused")
    result = drain(spool, MemoryObjectStore(), rows)
    assert result.stopped is not None and result.remaining == 3
    assert len(spool.entries()) == 1
    _drained_exactly(spool, blobs)


def test_erase_sees_mail_in_live_and_closed_segments(spool: Spool) -> None:
    writer = JournalWriter(spool, clock=Clock())
    first, _ = _append(writer, 0)
    writer.close()
    second, _ = _append(writer, 1)  # a new, live segment
    assert {p.name.rsplit(".", 1)[1] for p in spool.segments()} == {"journal", "jopen"}
    found = waiting(spool, lambda m: m.queue_id in ("Q00000", "Q00001"))
    assert sorted(found) == sorted([first.id, second.id])
    writer.close()


def test_a_segment_is_never_seen_unlocked_before_its_writer_holds_it(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The drain must never take (and unlink) a segment its writer is about to
    # append to: it is created and locked in tmp/ and only then renamed in.
    seen: list[list[Path]] = []
    real = os.rename

    def spy(src: str | Path, dst: str | Path) -> None:
        seen.append(spool.entries())
        real(src, dst)

    monkeypatch.setattr(journal_mod.os, "rename", spy)
    writer = JournalWriter(spool, clock=Clock())
    _append(writer, 0)
    assert seen and seen[0] == []
    assert spool.entries() == []  # in place now, and locked
    writer.close()


def test_records_are_sealed_when_a_master_key_is_installed(spool: Spool) -> None:
    from postkeep.storage.content import sealing

    with sealing.using(os.urandom(32)):
        writer = JournalWriter(spool, clock=Clock())
        blob = b"the secret body " * 20
        m = _message(0, size=len(blob))
        writer.append(m, io.BytesIO(blob), "journal: test")
        writer.close()
        (seg,) = spool.entries()
        raw = seg.read_bytes()
        assert b"the secret body" not in raw and m.recipients[0].encode() not in raw
        (entry,) = read_segment(seg).entries
        assert entry.key is not None
        _drained_exactly(spool, {m.id: blob})
        assert list(spool.quarantine_dir.iterdir()) == []
    # Another installation's key cannot open it: the pass stops, nothing is lost.
    with sealing.using(os.urandom(32)):
        writer = JournalWriter(spool, clock=Clock())
        _append(writer, 1)
        writer.close()
    with sealing.using(os.urandom(32)):
        result = drain(spool, MemoryObjectStore(), list[CapturedMessage]().extend)
        assert result.stopped is not None and result.drained == 0
        assert len(spool.entries()) == 1


def test_records_a_failed_fdatasync_refused_are_cut_off_not_drained(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = JournalWriter(spool, clock=Clock())
    blobs = {m.id: b for m, b in (_append(writer, n) for n in range(2))}
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_mod.os, "fdatasync", failing)
    with pytest.raises(OSError, match="fdatasync failed"):
        _append(writer, 2)  # refused: Postfix will send it again
    monkeypatch.setattr(journal_mod.os, "fdatasync", real)
    blobs.update({m.id: b for m, b in (_append(writer, n) for n in range(3, 5))})
    writer.close()
    assert len(spool.entries()) == 2  # the failed segment was closed, a new one began
    _drained_exactly(spool, blobs)  # the refused message is not among them
    assert list(spool.quarantine_dir.iterdir()) == []
