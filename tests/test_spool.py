"""Unit tests of the outage spool: entry format, drain, the milter's spooler.

Real files in a temporary directory, an in-memory object store, and for the
rows a plain list the drain's row writer appends to: each test checks what
the drain handed over, never what a database would have made of it.  That a
drain killed anywhere and run again stores each message exactly once rests
on the real `record_captures` and is proven against it on the stack
(tests/test_spool_drain_pg.py), as is a row PostgreSQL refuses.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
from support.wait import finishes, until

from postkeep.cli.spool import format_status
from postkeep.config import MilterConfig
from postkeep.milter.capture import MessageCapture, StoredContent, restore
from postkeep.milter.directory import Directory
from postkeep.milter.service import CaptureService
from postkeep.milter.spool import OutageSpooler, over_fill_level
from postkeep.storage.content import spool as spool_mod
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.content.spool import (
    Spool,
    SpoolBusy,
    SpoolFormatError,
    decode_metadata,
    drain,
    encode_metadata,
    fill_percent,
)
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.directory import Organisation
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit


class FakeRows:
    """A row writer that fails with FAIL while it is set, else lists what it is given.

    Only for a fault the real database gives only when it is stopped
    (PostgreSQL down, `BackendError`): stopping it is for the outage tests
    (tests/test_spool_stack.py).  It does not imitate `record_captures`.
    """

    def __init__(self) -> None:
        self.recorded: list[CapturedMessage] = []
        self.fail: BaseException | None = None

    def __call__(self, batch: Sequence[CapturedMessage]) -> None:
        if self.fail is not None:
            raise self.fail
        self.recorded.extend(batch)


def _ids(recorded: list[CapturedMessage]) -> list[uuid.UUID]:
    """The ids handed to the row writer, in order, repeats kept."""
    return [m.id for m in recorded]


class CrashingStore(MemoryObjectStore):
    """Goes down while DOWN is set; BATCH: whether it takes put_many."""

    def __init__(self, batch: bool = True) -> None:
        super().__init__()
        self.puts = 0
        self.down = False
        self.batch = batch

    def _check(self) -> None:
        if self.down:
            raise BackendError("s3", "connection refused")
        self.puts += 1

    def put(self, key: str, data: io.BufferedIOBase, length: int) -> None:  # type: ignore[override]
        self._check()
        super().put(key, data, length)  # type: ignore[arg-type]

    def can_batch(self) -> bool:
        return self.batch

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        for key, data in items:
            self._check()
            self.objects[key] = data


def _content(text: bytes) -> tuple[bytes, StoredContent]:
    """A finished capture of TEXT (header + body), as the milter makes it."""
    cap = MessageCapture(dkim_body_hash=False)
    cap.add_header("Subject", b" spool test")
    cap.add_body(text)
    content = cap.finish()
    blob = content.stream.read()
    content.close()
    cap2 = MessageCapture(dkim_body_hash=False)
    cap2.add_header("Subject", b" spool test")
    cap2.add_body(text)
    return blob, cap2.finish()


def _message(n: int = 0, *, size: int = 10, created: datetime | None = None,
             subject: str | None = "s") -> CapturedMessage:
    created = created or datetime.now(UTC) + timedelta(milliseconds=n)
    mid = uuid.UUID(int=(n + 1) << 64 | uuid.uuid4().int & ((1 << 64) - 1))
    return CapturedMessage(
        id=mid, org_id=uuid.uuid4(), domain="d.example", queue_id=f"Q{n:05d}",
        envelope_from="a@d.example", recipients=("r1@x.example", "r2@x.example"),
        size=size, sha256=bytes(range(32)), object_key=f"messages/o/{mid}.eml.zst",
        compressed_size=size, created_at=created,
        content_expires_at=created + timedelta(days=7),
        metadata_expires_at=created + timedelta(days=30),
        message_id_header=f"<{n}@d.example>", header_from="a@d.example", subject=subject)


def _spool_some(spool: Spool, count: int) -> dict[uuid.UUID, bytes]:
    blobs = {}
    for n in range(count):
        blob = os.urandom(50 + n)
        m = _message(n, size=len(blob))
        spool.write(m, io.BytesIO(blob), "s3: down")
        blobs[m.id] = blob
    return blobs


def test_metadata_round_trips_every_field_including_undecodable_headers() -> None:
    m = replace(_message(3), subject="caf\udce9 \x00", header_from=None,
                extra={"k": "v"}, recipients=("x@y", "\udcff@z"),
                return_path="pk-1@bounce.example", notify=("SUCCESS,FAILURE", None))
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    back, spooled_at, reason = decode_metadata(encode_metadata(m, spooled_at=at, reason="why"))
    assert back == m and spooled_at == at and reason == "why"


def test_an_entry_older_than_a_new_field_keeps_its_default() -> None:
    m = _message(4)
    doc = json.loads(encode_metadata(m, spooled_at=datetime.now(UTC), reason="r"))
    del doc["notify"], doc["return_path"]
    back, _, _ = decode_metadata(json.dumps(doc).encode())
    assert back == m


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"_spooled_at":"x","_reason":"r"}',
                                 b"\xff\xfe", b'{"_spooled_at":"2026-01-01T00:00:00+00:00",'
                                 b'"_reason":"r","id":"nope"}'])
def test_bad_metadata_is_a_format_error(raw: bytes) -> None:
    with pytest.raises(SpoolFormatError):
        decode_metadata(raw)


def test_write_then_read_back_exactly(spool: Spool) -> None:
    blob = os.urandom(300_000)
    m = _message(1, size=len(blob))
    path = spool.write(m, io.BytesIO(blob), "postgres: down")
    assert path == spool.dir / f"{m.id}.spool"
    assert list(spool.tmp.iterdir()) == []
    entry = spool.open_entry(path)
    assert entry.message == m and entry.reason == "postgres: down"
    with spool.object_stream(entry) as stream:
        assert stream.read() == blob


def test_short_content_is_refused_and_leaves_nothing(spool: Spool) -> None:
    m = _message(1, size=100)
    with pytest.raises(OSError):
        spool.write(m, io.BytesIO(b"x" * 99), "s3: down")
    assert spool.entries() == [] and list(spool.tmp.iterdir()) == []


def test_entries_come_oldest_first(spool: Spool) -> None:
    _spool_some(spool, 5)
    ids = [spool.open_entry(p).message.id for p in spool.entries()]
    assert ids == sorted(ids)


def test_drain_stores_everything_and_empties_the_spool(spool: Spool) -> None:
    blobs = _spool_some(spool, 150)
    store, rows = MemoryObjectStore(), list[CapturedMessage]()
    seen: list[int] = []
    result = drain(spool, store, rows.extend, batch_size=16,
                   progress=lambda r: seen.append(r.drained))
    assert result.drained == 150 and result.remaining == 0 and result.stopped is None
    assert spool.entries() == []
    assert _ids(rows) == sorted(blobs)  # each handed over once, oldest first
    for m in rows:
        assert store.objects[m.object_key] == blobs[m.id]
    assert seen == sorted(seen) and seen[-1] == 150


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "padded"])
def test_damaged_entry_is_quarantined_named_and_the_rest_drained(
        spool: Spool, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    blobs = _spool_some(spool, 6)
    victim = spool.entries()[2]
    data = victim.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data = data[:200] + bytes([data[200] ^ 1]) + data[201:]
    elif damage == "garbage":
        data = b"GET / HTTP/1.0\r\n" + os.urandom(100)
    elif damage == "empty":
        data = b""
    else:
        data += b"\0"
    victim.write_bytes(data)
    store, rows = MemoryObjectStore(), list[CapturedMessage]()
    victim_id = uuid.UUID(victim.name.removesuffix(".spool"))
    with caplog.at_level(logging.ERROR, logger="postkeep.spool"):
        result = drain(spool, store, rows.extend)
    assert result.quarantined == 1 and result.drained == 5 and result.remaining == 0
    kept = spool.quarantine_dir / victim.name
    assert kept.read_bytes() == data  # set aside untouched, never deleted
    assert any(str(victim) in r.getMessage() and "quarantined" in r.getMessage()
               for r in caplog.records)
    assert _ids(rows) == sorted(set(blobs) - {victim_id})
    assert spool.status().quarantined == 1


def test_backend_down_stops_the_pass_and_keeps_every_entry(spool: Spool) -> None:
    blobs = _spool_some(spool, 10)
    store, rows = CrashingStore(), FakeRows()
    store.down = True
    result = drain(spool, store, rows)
    assert result.stopped is not None and result.stopped.backend == "s3"
    assert len(spool.entries()) == 10 and result.remaining == 10
    store.down = False
    rows.fail = BackendError("postgres", "no connection within 3s")
    result = drain(spool, store, rows)
    assert result.stopped is not None and result.stopped.backend == "postgres"
    assert len(spool.entries()) == 10
    rows.fail = None
    assert drain(spool, store, rows).drained == 10
    assert _ids(rows.recorded) == sorted(blobs)


def test_one_drain_at_a_time(spool: Spool) -> None:
    with spool.drain_lock(), pytest.raises(SpoolBusy), spool.drain_lock():
        pass
    with spool.drain_lock():
        pass  # released


def test_stale_temp_files_go_fresh_ones_stay(spool: Spool) -> None:
    old, new = spool.tmp / "a.tmp", spool.tmp / "b.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (1, 1))
    assert spool.remove_stale_tmp() == 1
    assert not old.exists() and new.exists()


def test_status_counts_depth_and_oldest_age(spool: Spool) -> None:
    _spool_some(spool, 3)
    first = spool.entries()[0]
    os.utime(first, (1000.0, 1000.0))
    st = spool.status(now=1060.0)
    assert st.entries == 3 and st.oldest_age_seconds == 60.0
    text = format_status(st, MilterConfig(outage_spool_directory=str(spool.dir)))
    assert "entries      3" in text and "60 s ago" in text and "on" in text


def test_fill_percent_counts_what_is_not_available() -> None:
    class St:
        f_blocks, f_bavail, f_frsize = 1000, 250, 4096

    assert fill_percent("/", statvfs=lambda _: St()) == 75.0  # type: ignore[arg-type,return-value]
    assert fill_percent("/", 4096 * 100, statvfs=lambda _: St()) == 85.0  # type: ignore[arg-type,return-value]
    assert not over_fill_level(90.0, 90.0)
    assert over_fill_level(90.01, 90.0)
    assert over_fill_level(float("nan"), 90.0)


# --- the milter's side -----------------------------------------------------


def test_spooler_writes_the_whole_object_even_after_a_failed_upload_read_it(
        spool: Spool) -> None:
    blob, content = _content(b"line\r\n" * 5000)
    content.stream.read(1000)  # the failed upload consumed some
    m = replace(_message(1), compressed_size=content.compressed_size)
    spooler = OutageSpooler(spool, 90.0, fill=lambda path, extra: 10.0)
    assert spooler.store(m, content, BackendError("s3", "down")) is None
    entry = spool.open_entry(spool.entries()[0])
    with spool.object_stream(entry) as s:
        assert s.read() == blob
    assert restore([blob]).endswith(b"line\r\n" * 5000)


def test_spooler_refuses_past_the_fill_level(spool: Spool) -> None:
    _, content = _content(b"x\r\n")
    m = replace(_message(1), compressed_size=content.compressed_size)
    spooler = OutageSpooler(spool, 80.0, fill=lambda path, extra: 80.5)
    reply = spooler.store(m, content, BackendError("postgres", "down"))
    assert reply is not None and reply.code == "451" and reply.enhanced == "4.3.0"
    assert "postgres" in reply.text and "outage_spool_max_fill_percent" in reply.text
    assert spool.entries() == []


def test_spooler_refuses_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "gone"
    spool = Spool(target)
    spool.ensure()
    os.rename(target, tmp_path / "moved")
    target.write_bytes(b"a file where the spool directory was")
    _, content = _content(b"x\r\n")
    m = replace(_message(1), compressed_size=content.compressed_size)
    reply = OutageSpooler(spool, 99.0, fill=lambda p, e: 1.0).store(
        m, content, BackendError("s3", "down"))
    assert reply is not None and reply.code == "451" and "spool write failed" in reply.text


class _FailingCommitter:
    def __init__(self, backend: str) -> None:
        self.backend = backend

    def commit(self, message: CapturedMessage, content: StoredContent) -> None:
        content.stream.read(7)
        raise BackendError(self.backend, "connection refused")


class _Directory:
    def __init__(self, org: Organisation | None, error: BackendError | None = None) -> None:
        self.org, self.error = org, error

    def by_submitter(self, name: str) -> Organisation | None:
        return None

    def by_domain(self, domain: str) -> Organisation | None:
        if self.error is not None:
            raise self.error
        return self.org

    def by_inbound_domain(self, domain: str) -> Organisation | None:
        return None  # no domain here takes inbound mail


def _service(spool: Spool | None, backend: str = "s3",
             directory: _Directory | None = None) -> CaptureService:
    org = Organisation(uuid.uuid4(), "acme", "basic", 30, 90, "unsigned")
    spooler = OutageSpooler(spool, 95.0, fill=lambda p, e: 5.0) if spool else None
    return CaptureService(MilterConfig(), _FailingCommitter(backend),  # type: ignore[arg-type]
                          directory or _Directory(org), spooler=spooler)  # type: ignore[arg-type]


def _eom(service: CaptureService) -> tuple[object, bytes]:
    tx = service.begin("<a@acme.example>", None, "192.0.2.1")
    tx.recipients.append("r@x.example")
    service.header(tx, "From", b" a@acme.example")
    service.header(tx, "Subject", b" hi")
    tx.capture.add_body(b"hello\r\n")
    expected = (b"From: a@acme.example\r\nSubject: hi\r\n"
                + f"X-Postkeep-Id: {tx.id}\r\n\r\n".encode() + b"hello\r\n")
    return service.end_of_message(tx, "QID1"), expected


def _accepted_exactly(spool: Spool, verdict: object, expected: bytes) -> spool_mod.SpoolEntry:
    """VERDICT accepted the message, and the spool's one entry holds EXPECTED exactly."""
    assert verdict.reply is None  # type: ignore[attr-defined]
    entry = spool.open_entry(spool.entries()[0])
    with spool.object_stream(entry) as s:
        stored = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(s.read()), read_across_frames=True).read()
    assert stored == expected
    return entry


@pytest.mark.parametrize("backend", ["s3", "postgres"])
def test_outage_with_spool_on_accepts_and_spools_the_exact_object(spool: Spool,
                                                                  backend: str) -> None:
    entry = _accepted_exactly(spool, *_eom(_service(spool, backend)))
    assert entry.message.queue_id == "QID1" and entry.message.recipients == ("r@x.example",)
    assert entry.reason.startswith(backend)


def test_outage_with_spool_off_tempfails_as_before() -> None:
    verdict, _ = _eom(_service(None, "postgres"))
    reply = verdict.reply  # type: ignore[attr-defined]
    assert reply is not None and reply.code == "451" and "postgres" in reply.text


def test_internal_errors_are_not_spooled(spool: Spool) -> None:
    verdict, _ = _eom(_service(spool, "postkeep"))
    assert verdict.reply is not None and spool.entries() == []  # type: ignore[attr-defined]


def test_unresolvable_organisation_tempfails_even_with_spool(spool: Spool) -> None:
    service = _service(spool, directory=_Directory(None, BackendError("postgres", "down")))
    verdict, _ = _eom(service)
    reply = verdict.reply  # type: ignore[attr-defined]
    assert reply is not None and reply.code == "451" and "postgres" in reply.text
    assert spool.entries() == []


class _Db:
    def __init__(self) -> None:
        self.down = False
        self.org: Organisation | None = Organisation(uuid.uuid4(), "acme", "basic", 30, 90)

    def run(self, work: object) -> Organisation | None:
        if self.down:
            raise BackendError("postgres", "connection refused")
        return self.org


def test_directory_keeps_a_known_organisation_through_an_outage() -> None:
    db, now = _Db(), [0.0]
    d = Directory(db, ttl=30, clock=lambda: now[0])  # type: ignore[arg-type]
    known = d.by_domain("acme.example")
    db.org = None
    assert d.by_domain("other.example") is None  # a miss, cached
    db.down = True
    now[0] = 1000.0  # everything stale
    assert d.by_domain("acme.example") == known
    with pytest.raises(BackendError):
        d.by_domain("other.example")  # never guess "no organisation": tempfail
    with pytest.raises(BackendError):
        d.by_domain("never-seen.example")


def test_gauges_read_the_directory_at_scrape_time(spool: Spool) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(spool_mod.SpoolCollector(spool))
    _spool_some(spool, 4)
    text = generate_latest(registry).decode()
    assert "postkeep_spool_entries 4.0" in text
    assert "postkeep_spool_oldest_entry_age_seconds" in text
    drain(spool, MemoryObjectStore(), list[CapturedMessage]().extend)
    assert "postkeep_spool_entries 0.0" in generate_latest(registry).decode()


def test_refusal_text_carries_no_percent_sign() -> None:
    from postkeep.milter.spool import spool_refused_reply

    reply = spool_refused_reply("s3", "spool filesystem 91.0% full; path /a%b")
    assert "%" not in reply.text and "91.0 percent full" in reply.text


def test_large_objects_go_one_put_each_small_ones_together(spool: Spool) -> None:
    blobs = _spool_some(spool, 5)
    big = os.urandom(spool_mod.SMALL_OBJECT_BYTES + 1)
    m = _message(99, size=len(big))
    spool.write(m, io.BytesIO(big), "s3: down")
    blobs[m.id] = big
    store, rows = CrashingStore(batch=True), list[CapturedMessage]()
    assert drain(spool, store, rows.extend).drained == 6
    assert _ids(rows) == sorted(blobs)
    assert store.objects[m.object_key] == big


def test_batched_uploads_are_bounded_in_bytes(spool: Spool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "BATCH_UPLOAD_BYTES", 1000)
    _spool_some(spool, 30)  # 50..79 bytes each
    sizes: list[int] = []

    class Store(CrashingStore):
        def put_many(self, items: list[tuple[str, bytes]]) -> None:
            sizes.append(sum(len(b) for _, b in items))
            super().put_many(items)

    rows = list[CapturedMessage]()
    assert drain(spool, Store(), rows.extend).drained == 30
    assert len(sizes) > 1 and max(sizes) <= 1000 and sum(sizes) == sum(50 + n for n in range(30))


def test_drain_forever_drains_new_entries_and_yields_to_a_manual_drain(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    store, rows = MemoryObjectStore(), list[CapturedMessage]()
    stop = threading.Event()
    passes: list[int] = []
    t = threading.Thread(target=spool_mod.drain_forever, args=(spool, store, rows.extend),
                         kwargs={"interval": 0.05, "stop": stop,
                                 "on_pass": lambda r: passes.append(r.drained)})
    caplog.set_level(logging.DEBUG, logger="postkeep.spool")
    t.start()
    try:
        with spool.drain_lock():  # an operator's drain holds the lock: passes skip
            blobs = _spool_some(spool, 3)
            until(lambda: any("pass skipped" in r.getMessage() for r in caplog.records),
                  "a drain pass to find the lock taken")
            assert len(spool.entries()) == 3 and passes == []
        until(lambda: not spool.entries(), "the first entries drained")
        more = _spool_some(spool, 2)
        until(lambda: not spool.entries(), "the later entries drained")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive() and spool.entries() == []
    assert _ids(rows) == sorted(blobs) + sorted(more)
    assert sum(passes) == 5


def test_gate_lets_one_caller_probe_a_down_backend_and_fails_the_others_fast() -> None:
    import threading

    from postkeep.milter.gate import BackendGate

    gate = BackendGate()
    with pytest.raises(BackendError), gate.attempt():
        raise BackendError("postgres", "connection refused")
    assert gate.down is not None
    probing, release = threading.Event(), threading.Event()

    def probe() -> None:
        with gate.attempt():
            probing.set()
            release.wait(60)

    def meanwhile() -> None:
        with gate.attempt():
            pytest.fail("must not run while another caller probes")

    t = threading.Thread(target=probe)
    t.start()
    try:
        assert probing.wait(30)
        with pytest.raises(BackendError) as err:  # while the probe still hangs
            finishes(meanwhile, "an attempt while another caller probes")
    finally:
        release.set()
    assert err.value.backend == "postgres" and "still unavailable" in err.value.reason
    t.join(30)
    assert gate.down is None  # the probe succeeded: open again
    with gate.attempt():
        pass


def test_directory_does_not_wait_on_postgres_it_knows_is_down() -> None:
    import threading

    db, now = _Db(), [0.0]
    d = Directory(db, ttl=30, clock=lambda: now[0])  # type: ignore[arg-type]
    known = d.by_domain("acme.example")
    db.down = True
    now[0] = 1000.0
    assert d.by_domain("acme.example") == known  # this lookup learns it is down
    slow, release = threading.Event(), threading.Event()

    def run(work: object) -> Organisation | None:
        slow.set()
        release.wait(60)  # the probe hangs, as a connect timeout does
        raise BackendError("postgres", "no connection within 3s")

    db.run = run  # type: ignore[method-assign]
    t = threading.Thread(target=d.by_domain, args=("acme.example",))
    t.start()
    try:  # both answered while the probe still hangs
        assert slow.wait(30)
        assert finishes(lambda: d.by_domain("acme.example"), "a known domain") == known  # stale
        with pytest.raises(BackendError):
            finishes(lambda: d.by_domain("never-seen.example"), "an unknown domain")  # tempfail
    finally:
        release.set()
    t.join(30)


# --- accept_after = 'journal' ----------------------------------------------------


class _NoCommitter:
    """The group commit a journaling milter must never call."""

    def commit(self, message: CapturedMessage, content: StoredContent) -> None:
        raise AssertionError("accept_after = 'journal' called the group commit")


class _Committed:
    """A group commit that takes every message (and its parts) it is given."""

    def __init__(self) -> None:
        self.parts: list[int] = []

    def commit(self, message: CapturedMessage, content: StoredContent) -> None:
        self.parts.append(len(content.parts))


def _journaling(spool: Spool, fill: float = 5.0, committer: object = None) -> CaptureService:
    org = Organisation(uuid.uuid4(), "acme", "basic", 30, 90, "unsigned")
    return CaptureService(MilterConfig(accept_after="journal", part_split_bytes=1024),
                          committer or _NoCommitter(), _Directory(org),  # type: ignore[arg-type]
                          spooler=OutageSpooler(spool, 90.0, fill=lambda p, e: fill))


def test_journal_mode_writes_the_exact_object_to_the_spool_without_the_group_commit(
        spool: Spool) -> None:
    entry = _accepted_exactly(spool, *_eom(_journaling(spool)))
    assert entry.message.queue_id == "QID1" and entry.reason.startswith("journal")


def test_journal_mode_sends_mail_with_parts_cut_out_through_the_group_commit(
        spool: Spool) -> None:
    # An attachment over part_split_bytes is stored once per organisation:
    # that needs S3 and PostgreSQL, so such a message is not journaled.
    committed = _Committed()
    service = _journaling(spool, committer=committed)
    tx = service.begin("<a@acme.example>", None, "192.0.2.1")
    tx.recipients.append("r@x.example")
    service.header(tx, "From", b" a@acme.example")
    service.header(tx, "MIME-Version", b" 1.0")
    service.header(tx, "Content-Type", b' multipart/mixed; boundary="b"')
    pdf = b"JVBERi0xLjQK" * 400 + b"\r\n"
    tx.capture.add_body(b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
                        b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64"
                        b"\r\n\r\n" + pdf + b"--b--\r\n")
    verdict = service.end_of_message(tx, "QID2")
    assert verdict.reply is None  # type: ignore[attr-defined]
    assert committed.parts == [1] and spool.entries() == []


def test_journal_mode_tempfails_naming_the_key_when_the_spool_cannot_take_it(
        spool: Spool) -> None:
    verdict, _ = _eom(_journaling(spool, fill=95.0))
    reply = verdict.reply  # type: ignore[attr-defined]
    assert reply is not None and (reply.code, reply.enhanced) == ("451", "4.3.0")
    assert "journal" in reply.text and "outage_spool_max_fill_percent" in reply.text
    assert spool.entries() == []


def test_journal_mode_needs_the_outage_spool_on() -> None:
    from postkeep.config import ConfigError, parse

    with pytest.raises(ConfigError, match=r"milter\.accept_after = 'journal'.*"
                                          r"milter\.outage_spool = false"):
        parse({"milter": {"accept_after": "journal", "outage_spool": False}})
    with pytest.raises(ConfigError, match=r"milter\.accept_after.*'store', 'journal'"):
        parse({"milter": {"accept_after": "later"}})
    assert parse({"milter": {"accept_after": "journal"}}).milter.accept_after == "journal"


def test_a_woken_drain_runs_at_once_not_after_its_interval(spool: Spool) -> None:
    import threading

    passes: list[int] = []
    stop, wake = threading.Event(), threading.Event()
    spool.write(_message(1, size=1), io.BytesIO(b"x"), "journal")

    def count(result: object) -> None:
        passes.append(1)

    objects = MemoryObjectStore()
    rows = FakeRows()
    worker = threading.Thread(target=spool_mod.drain_forever, args=(spool, objects, rows),
                              kwargs={"interval": 3600, "stop": stop, "wake": wake,
                                      "on_pass": count})
    worker.start()
    try:
        until(lambda: passes, "the first pass", 10)
        spool.write(_message(2, size=1), io.BytesIO(b"y"), "journal")
        wake.set()  # an hour's interval: only the wake can drain it
        until(lambda: not spool.entries(), "the woken pass", 10)
    finally:
        stop.set()
        wake.set()
        worker.join(10)
    assert not worker.is_alive() and len(passes) == 2


def test_a_report_for_a_spooled_message_wakes_the_drain_and_waits_for_it() -> None:
    import asyncio

    from postkeep.storage.sidecar.lmtp import ReportHandler

    mid, woken = uuid.uuid4(), []
    looks = iter([True, True, True, False])  # drained on the fourth look
    handler = ReportHandler(None, None, None,  # type: ignore[arg-type]
                            spooled=lambda m: m == mid and next(looks),
                            drain_now=lambda: woken.append(1), spool_wait=5.0)
    assert asyncio.run(handler._drained(mid)) is True and woken == [1]
    assert asyncio.run(handler._drained(uuid.uuid4())) is True and woken == [1]
    # Still spooled when the wait ends (an outage): answered 451 by the caller.
    stuck = ReportHandler(None, None, None,  # type: ignore[arg-type]
                          spooled=lambda m: True, drain_now=lambda: woken.append(2),
                          spool_wait=0.2)
    assert asyncio.run(stuck._drained(mid)) is False and woken == [1, 2]
