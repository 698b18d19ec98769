"""Unit tests of sealed streams (storage/content/sealed_stream.py), sealed spool
entries (storage/content/spool.py format 2) and the plain/sealed dispatch of
part objects (storage/content/part_keys.py): round trips, and every way a
sealed thing must refuse to open (altered, truncated, reordered, moved,
wrong or missing master key), each naming what it refused.  Through the
real stack: tests/test_sealing_parts_stack.py, tests/test_spool_sealed_stack.py.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from postkeep.storage.content import part_keys, sealed_stream, sealing
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.content.spool import MAGIC_SEALED, Spool, SpoolFormatError, drain
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
SEG = 64  # small segments: many of them in a few bytes


def _seal(data: bytes, binding: bytes = b"b", chunk: int = 7) -> bytes:
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return b"".join(sealed_stream.seal(KEY, binding, chunks, segment=SEG))


def _open(sealed: bytes, binding: bytes = b"b", chunk: int = 5) -> bytes:
    chunks = [sealed[i:i + chunk] for i in range(0, len(sealed), chunk)]
    return b"".join(sealed_stream.open_stream(KEY, binding, chunks, "obj"))


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 3 * SEG + 5])
def test_a_stream_round_trips_at_every_segment_boundary(size: int) -> None:
    data = os.urandom(size)
    sealed = _seal(data)
    assert len(sealed) == sealed_stream.sealed_size(size, SEG)
    assert sealed_stream.is_sealed(sealed)
    assert _open(sealed) == data
    assert _open(sealed, chunk=len(sealed) or 1) == data  # one chunk or many


def test_sealed_bytes_hold_no_plaintext() -> None:
    secret = b"the quarterly figures are " + uuid.uuid4().hex.encode()
    assert secret not in _seal(secret * 10)


def _segments(sealed: bytes) -> list[bytes]:
    body = sealed[sealed_stream.HEADER_LEN:]
    full = SEG + sealed_stream.TAG
    return [body[i:i + full] for i in range(0, len(body), full)]


@pytest.mark.parametrize("damage", ["flip", "cut at a segment", "cut inside", "drop a segment",
                                    "swap segments", "repeat a segment", "another binding",
                                    "header edited"])
def test_an_altered_stream_does_not_open_and_says_which_segment(damage: str) -> None:
    sealed = _seal(os.urandom(4 * SEG + 10))
    head, segs = sealed[:sealed_stream.HEADER_LEN], _segments(sealed)
    binding = b"b"
    if damage == "flip":
        bad = bytearray(sealed)
        bad[sealed_stream.HEADER_LEN + SEG + 30] ^= 1
        sealed = bytes(bad)
    elif damage == "cut at a segment":  # what remains looks like whole segments
        sealed = head + b"".join(segs[:2])
    elif damage == "cut inside":
        sealed = sealed[:-3]
    elif damage == "drop a segment":
        sealed = head + segs[0] + b"".join(segs[2:])
    elif damage == "swap segments":
        sealed = head + segs[1] + segs[0] + b"".join(segs[2:])
    elif damage == "repeat a segment":
        sealed = head + segs[0] + segs[0] + b"".join(segs[1:])
    elif damage == "another binding":
        binding = b"another part"
    else:
        sealed = sealed[:8] + bytes([sealed[8] ^ 1]) + sealed[9:]  # the segment size
    with pytest.raises(sealing.SealError, match=r"obj: sealed (segment \d+ does not"
                                                r" authenticate|stream)"):
        _open(sealed, binding)


def test_not_a_stream_or_an_unknown_version_is_refused_by_name() -> None:
    with pytest.raises(sealing.SealError, match="obj: not a sealed stream"):
        _open(b"\x28\xb5\x2f\xfd plain zstd")
    sealed = bytearray(_seal(b"x"))
    sealed[4] = 9
    with pytest.raises(sealing.SealError, match="obj: sealed stream version 9"):
        _open(bytes(sealed))


# --- part objects: plain ones read as before, sealed ones need their key -------------


def test_a_plain_part_object_passes_through_and_a_sealed_one_needs_its_key() -> None:
    plain = [b"\x28\xb5\x2f\xfd", b"frames"]
    assert b"".join(part_keys.open_part(None, "parts/o/x/1.zst", iter(plain))) == b"".join(plain)
    sealed = iter([_seal(b"frames")])
    with pytest.raises(BackendError, match=r"parts/o/x/1\.zst is sealed: it is read with its key"):
        part_keys.open_part(None, "parts/o/x/1.zst", sealed)


# --- sealed spool entries --------------------------------------------------------------


def _message(n: int, size: int, subject: str) -> CapturedMessage:
    created = datetime.now(UTC) + timedelta(milliseconds=n)
    mid = uuid.UUID(int=(n + 1) << 64 | uuid.uuid4().int & ((1 << 64) - 1))
    return CapturedMessage(
        id=mid, org_id=uuid.uuid4(), domain="d.example", queue_id=f"Q{n:05d}",
        envelope_from="secret.sender@d.example", recipients=("r1@x.example",),
        size=size, sha256=bytes(range(32)), object_key=f"messages/o/{mid}.eml.zst",
        compressed_size=size, created_at=created,
        content_expires_at=created + timedelta(days=7),
        metadata_expires_at=created + timedelta(days=30),
        message_id_header=f"<{n}@d.example>", header_from="a@d.example", subject=subject)


@pytest.fixture
def master() -> Iterator[bytes]:
    key = os.urandom(32)
    with sealing.using(key):
        yield key


def _spool(spool: Spool, n: int, blob: bytes, sealed: bool | None = None
           ) -> tuple[CapturedMessage, Path]:
    token = uuid.uuid4().hex
    m = _message(n, len(blob), f"subject {token}")
    return m, spool.write(m, io.BytesIO(blob), "postgres: down", sealed=sealed)


@pytest.mark.parametrize("size", [0, 10, 200_000])  # empty, small, several segments
def test_a_sealed_entry_holds_no_plaintext_and_reads_back_exactly(
        spool: Spool, master: bytes, size: int) -> None:
    blob = (b"plain body line " + uuid.uuid4().hex.encode()) * (size // 48 + 1)
    blob = blob[:size]
    m, path = _spool(spool, 0, blob)
    raw = path.read_bytes()
    assert raw.startswith(MAGIC_SEALED)
    assert m.subject is not None and m.subject.encode() not in raw
    assert b"secret.sender" not in raw and (not blob or blob[:40] not in raw)
    entry = spool.open_entry(path)
    assert entry.message == m and entry.object_length == size
    with spool.object_stream(entry) as stream:
        assert stream.read() == blob
    assert "key" not in repr(entry).replace("object_key", "")  # the data key never shown


def test_sealed_and_unsealed_entries_drain_alike(spool: Spool, master: bytes) -> None:
    blobs = {}
    for n in range(6):
        blob = os.urandom(100 + n)
        m, _ = _spool(spool, n, blob, sealed=n % 2 == 0)  # format 1 written before the key
        blobs[m.id] = blob
    store, rows = MemoryObjectStore(), list[CapturedMessage]()
    result = drain(spool, store, rows.extend, batch_size=4)
    assert (result.drained, result.quarantined, result.stopped) == (6, 0, None)
    assert {m.id: store.objects[m.object_key] for m in rows} == blobs


@pytest.mark.parametrize("damage", ["segment", "wrapped key", "truncate", "renamed"])
def test_a_damaged_sealed_entry_is_quarantined_the_rest_drained(
        spool: Spool, master: bytes, damage: str) -> None:
    _spool(spool, 0, os.urandom(300))
    victim_m, victim = _spool(spool, 1, os.urandom(300))
    data = bytearray(victim.read_bytes())
    if damage == "segment":
        data[-40] ^= 1
    elif damage == "wrapped key":
        data[len(MAGIC_SEALED) + 20] ^= 1
    elif damage == "truncate":
        del data[-17:]
    victim.write_bytes(bytes(data))
    if damage == "renamed":  # another message's name: its key and stream are bound to the id
        other = spool.dir / f"{uuid.UUID(int=victim_m.id.int + 1)}.spool"
        victim.rename(other)
        victim = other
    store, rows = MemoryObjectStore(), list[CapturedMessage]()
    result = drain(spool, store, rows.extend)
    assert (result.drained, result.quarantined) == (1, 1)
    assert (spool.quarantine_dir / victim.name).read_bytes() == bytes(data)
    with pytest.raises(SpoolFormatError):
        spool.open_entry(spool.quarantine_dir / victim.name)


@pytest.mark.parametrize("key", ["none", "another"])
def test_a_sealed_entry_without_its_master_key_stops_the_pass_and_stays(
        spool: Spool, master: bytes, key: str) -> None:
    _, path = _spool(spool, 0, os.urandom(50))
    data = path.read_bytes()
    store, rows = MemoryObjectStore(), list[CapturedMessage]()
    with sealing.using(None if key == "none" else os.urandom(32)):
        result = drain(spool, store, rows.extend)
    assert result.stopped is not None and result.stopped.backend == "sealing"
    assert "storage.master_key_file" in str(result.stopped)
    assert (result.drained, result.quarantined) == (0, 0)
    assert spool.entries() == [path] and path.read_bytes() == data  # not damaged: kept
    assert drain(spool, store, rows.extend).drained == 1  # the right key back: drained
