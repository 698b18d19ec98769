"""The sealed single-object format without services (storage/content/sealed_objects.py).

Round trips across segment boundaries, streaming in both directions, and
each way the bytes can be wrong (truncated, reordered, another message's,
header altered, appended to) failing with a SealError that says so.  The
data key comes from a stand-in for the keyring (the real key rows are
tests/test_sealed_singles_stack.py's).
"""

from __future__ import annotations

import io
import os
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import pytest
import zstandard
from test_packs import KeyringConn

from postkeep.milter.capture import StoredContent
from postkeep.milter.committer import GroupCommitter, _Pending
from postkeep.storage.content import sealed_objects, sealed_stream, sealing
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.content.restore import restore, restore_object
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.unit

EXPIRES = datetime(2027, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
CONN = cast(psycopg.Connection, object())  # the stand-in keyring needs no database


class FakeRing:
    """Keyring.data_key from a dict (any header expiry accepted, as the real
    one accepts 'infinity' for a held key: the AAD must catch an edit)."""

    def __init__(self) -> None:
        self.keys: dict[uuid.UUID, sealing.DataKey] = {}

    def key(self, message_id: uuid.UUID | None = None, org_id: uuid.UUID | None = None,
            secret: bytes | None = None) -> sealing.DataKey:
        k = sealing.DataKey(message_id or uuid.uuid4(), org_id or uuid.uuid4(), EXPIRES,
                            secret or os.urandom(32), b"")
        self.keys[k.message_id] = k
        return k

    def data_key(self, _conn: Any, message_id: uuid.UUID,
                 _expires: datetime) -> tuple[uuid.UUID, bytes]:
        k = self.keys.get(message_id)
        if k is None:
            raise sealing.ContentErased(message_id)
        return k.org_id, k.key


@pytest.fixture
def ring(monkeypatch: pytest.MonkeyPatch) -> FakeRing:
    fake = FakeRing()
    monkeypatch.setattr(sealing, "_ring", fake)
    return fake


H = sealed_objects.HEADER_LEN + sealed_stream.HEADER_LEN  # both headers: 29 bytes
SEG = 16  # small segments: many of them in a few bytes
C = SEG + sealed_stream.TAG  # one sealed segment


def _seal(key: sealing.DataKey, data: bytes, segment: int = SEG) -> bytes:
    stream, length = sealed_objects.sealing_reader(key, io.BytesIO(data), len(data), segment)
    out = b""
    while piece := stream.read(7):  # read in odd sizes, as an upload would
        out += piece
    assert len(out) == length == sealed_objects.sealed_length(len(data), segment)
    return out


def _pieces(data: bytes, seed: int = 1) -> Iterator[bytes]:
    """DATA in pieces of random sizes (as S3 hands a body over)."""
    rnd = random.Random(seed)
    i = 0
    while i < len(data):
        n = rnd.randint(1, 40)
        yield data[i:i + n]
        i += n


def _open(message_id: uuid.UUID, sealed: bytes) -> bytes:
    return b"".join(sealed_objects.open_object(CONN, message_id, _pieces(sealed), "obj"))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 47, 48, 49, 1000])
def test_round_trip_across_segment_boundaries(ring: FakeRing, n: int) -> None:
    key = ring.key()
    data = os.urandom(n)
    sealed = _seal(key, data)
    assert sealed_objects.is_sealed_object(sealed) and not sealing.is_sealed(sealed)
    assert not sealed_stream.is_sealed(sealed)  # not taken for a part or a spool file
    assert n < 4 or data not in sealed[H:]
    assert _open(key.message_id, sealed) == data


def test_the_default_segments_round_trip_and_stream_bounded(ring: FakeRing) -> None:
    key = ring.key()
    data = os.urandom(3 * sealed_stream.SEGMENT + 123)
    source = io.BytesIO(data)
    stream, length = sealed_objects.sealing_reader(key, source, len(data))
    first = stream.read(100)
    # Sealing reads its source a segment or two at a time, never the whole message.
    assert source.tell() <= 2 * sealed_stream.SEGMENT
    sealed = first + stream.read()
    assert len(sealed) == length
    opened = sealed_objects.open_object(CONN, key.message_id, iter([sealed]), "obj")
    assert len(next(opened)) == sealed_stream.SEGMENT  # one segment out at a time
    small = sealed_objects.seal_bytes(key, data[:100])
    assert _open(key.message_id, small) == data[:100]


def test_restore_opens_a_sealed_single_object_and_decompresses_it(ring: FakeRing) -> None:
    key = ring.key()
    raw = b"From: a@example.org\r\n\r\n" + os.urandom(200_000).hex().encode()
    store = MemoryObjectStore()
    blob = sealed_objects.seal_bytes(key, zstandard.ZstdCompressor().compress(raw))
    name = f"messages/7d/x/2027/01/01/{key.message_id}.eml.zst"
    store.put(name, io.BytesIO(blob), len(blob))
    got = b"".join(restore(store, name, conn=CONN, message_id=key.message_id))
    assert got == raw
    # By key alone (an unmatched report names it so): the id is in the name.
    assert b"".join(restore_object(CONN, store, name)) == raw
    with pytest.raises(BackendError, match="read with its message's key"):
        restore(store, name)


def test_truncation_at_a_segment_boundary_does_not_authenticate(ring: FakeRing) -> None:
    key = ring.key()
    sealed = _seal(key, os.urandom(64))  # four segments of 16
    with pytest.raises(sealing.SealError, match=f"obj: the sealed object of message"
                       f" {key.message_id}: sealed segment 1 does not authenticate"
                       r" \(altered, truncated"):
        _open(key.message_id, sealed[:H + 2 * C])
    with pytest.raises(sealing.SealError, match="truncated in its header"):
        _open(key.message_id, sealed[:10])
    with pytest.raises(sealing.SealError, match="segment 1 does not authenticate"):
        _open(key.message_id, sealed[:H + C + 20])  # mid-segment


def test_swapped_or_dropped_segments_do_not_authenticate(ring: FakeRing) -> None:
    key = ring.key()
    sealed = _seal(key, os.urandom(64))
    seg = [sealed[H + i * C:H + (i + 1) * C] for i in range(4)]
    with pytest.raises(sealing.SealError, match="segment 0 does not authenticate"):
        _open(key.message_id, sealed[:H] + seg[1] + seg[0] + seg[2] + seg[3])
    with pytest.raises(sealing.SealError, match="segment 2 does not authenticate"):
        _open(key.message_id, sealed[:H] + seg[0] + seg[1] + seg[3])


def test_another_messages_object_or_segment_does_not_authenticate(ring: FakeRing) -> None:
    a = ring.key()
    # Same organisation, same key bytes even: the message id in the binding differs.
    b = ring.key(org_id=a.org_id, secret=a.key)
    other = ring.key()
    sealed_a = _seal(a, os.urandom(40))
    with pytest.raises(sealing.SealError, match=f"message {b.message_id}: sealed segment 0"
                       " does not authenticate"):
        _open(b.message_id, sealed_a)
    # Another tenant's message, same id and key bytes: the organisation differs.
    ring.keys[a.message_id] = sealing.DataKey(a.message_id, uuid.uuid4(), EXPIRES, a.key, b"")
    with pytest.raises(sealing.SealError, match="segment 0 does not authenticate"):
        _open(a.message_id, sealed_a)
    ring.keys[a.message_id] = a
    # A segment of another message (its own key) spliced into this one.
    sealed_o = _seal(other, os.urandom(40))
    mixed = sealed_a[:H + C] + sealed_o[H + C:H + 2 * C] + sealed_a[H + 2 * C:]
    with pytest.raises(sealing.SealError, match="segment 1 does not authenticate"):
        _open(a.message_id, mixed)


@pytest.mark.parametrize("field,offset", [("expiry", 9), ("stream version", 17),
                                          ("segment size", 21), ("nonce prefix", 25)])
def test_an_altered_header_is_refused(ring: FakeRing, field: str, offset: int) -> None:
    key = ring.key()
    sealed = bytearray(_seal(key, os.urandom(40)))
    sealed[offset] ^= 0x01
    with pytest.raises(sealing.SealError, match=r"does not authenticate|not supported"):
        _open(key.message_id, bytes(sealed))
    sealed[0:5] = b"\x89PKO\x07"
    with pytest.raises(sealing.SealError, match="format version 7 is not supported"):
        _open(key.message_id, bytes(sealed))


def test_a_forged_segment_size_is_refused_before_reading(ring: FakeRing) -> None:
    key = ring.key()
    sealed = bytearray(_seal(key, os.urandom(40)))
    sealed[18:22] = (2**31).to_bytes(4, "big")
    with pytest.raises(sealing.SealError, match="names a segment of 2147483648 bytes"):
        _open(key.message_id, bytes(sealed))


def test_bytes_appended_after_the_last_segment_are_refused(ring: FakeRing) -> None:
    key = ring.key()
    sealed = _seal(key, os.urandom(48))  # three full segments, the last one last
    with pytest.raises(sealing.SealError, match="segment 2 does not authenticate"):
        _open(key.message_id, sealed + os.urandom(C))


def test_a_destroyed_key_is_content_erased_before_any_byte(ring: FakeRing) -> None:
    key = ring.key()
    sealed = _seal(key, os.urandom(40))
    del ring.keys[key.message_id]
    with pytest.raises(sealing.ContentErased, match=f"message {key.message_id}: content"
                       " erased"):
        sealed_objects.open_object(CONN, key.message_id, iter([sealed]), "obj")


def test_a_source_shorter_than_its_length_is_refused(ring: FakeRing) -> None:
    key = ring.key()
    stream, _ = sealed_objects.sealing_reader(key, io.BytesIO(b"x" * 10), 20, SEG)
    with pytest.raises(sealing.SealError, match="ended 10 bytes short"):
        stream.read()


def test_the_header_carries_the_content_expiry(ring: FakeRing) -> None:
    key = ring.key()
    sealed = _seal(key, b"abc")
    micros = int.from_bytes(sealed[5:13], "big")
    assert datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros) == EXPIRES


# --- the group commit's own objects ----------------------------------------------


def _pending(org: uuid.UUID, size: int) -> _Pending:
    mid = uuid.uuid4()
    now = datetime.now(UTC)
    blob = zstandard.ZstdCompressor().compress(os.urandom(size))
    m = CapturedMessage(mid, org, "d.example", "Q", "a@d.example", ("r@x",), size,
                        b"\0" * 32, f"messages/{org}/{mid}.eml.zst", len(blob), now,
                        now + timedelta(days=7), now + timedelta(days=30))
    return _Pending(m, StoredContent(io.BytesIO(blob), len(blob), size, b"\0" * 32, size))


def test_the_group_commit_seals_own_objects_and_a_key_it_cannot_read_fails_its_org_only(
        ) -> None:
    """Under layout "objects" every object is its own (small ones in one batch
    upload, a large one streamed): each sealed under its own data key, which
    the item carries to the row's transaction; an organisation whose key
    cannot be read fails its own messages only (as packing.store_packs)."""
    good, bad = uuid.uuid4(), uuid.uuid4()
    rows: dict[uuid.UUID, bytes] = {}

    class Db:
        def run(self, work: Any) -> Any:
            return work(KeyringConn(rows, {bad}))

    class BatchingStore(MemoryObjectStore):
        def can_batch(self) -> bool:
            return True

    store = BatchingStore()
    gc = GroupCommitter(Db(), store, workers=1, linger=0, layout="objects")  # type: ignore[arg-type]
    try:
        items = [_pending(good, 100), _pending(bad, 100), _pending(good, 100),
                 _pending(good, 400_000)]  # random: above the 256 KiB threshold
        with sealing.using(b"k" * 32):
            ok = gc._upload(items)
    finally:
        gc.close()
    assert ok == [items[0], items[2], items[3]]
    assert items[1].error is not None and "server closed" in str(items[1].error)
    assert items[1].message.object_key not in store.objects
    for p in ok:
        assert p.key is not None and p.key.message_id == p.message.id
        stored = store.objects[p.message.object_key]
        assert sealed_objects.is_sealed_object(stored)
        assert len(stored) == sealed_objects.sealed_length(p.content.compressed_size)
