"""The outage spool: messages accepted while a backend was down, and their drain.

When MinIO or PostgreSQL cannot make a message durable, the milter may still
accept it by writing it to a local directory first (milter/spool.py decides
when).  Each message is one file holding everything the capture path would
have stored: the object's exact bytes and the `CapturedMessage` (rows,
recipients, expiry dates already stamped).  `drain` finishes the job later,
oldest first, with the same three idempotent steps each time, so a crash or
`kill -9` anywhere only means repeating a step:

1. put the object under its key (same key, same bytes: a repeat overwrites
   nothing that differs);
2. insert the rows with `record_captures` (ON CONFLICT DO NOTHING: a repeat
   adds nothing);
3. unlink the entry (the directory is fsync'd once a pass ends; an unlink a
   power cut undoes only means draining that entry again).

An entry file is written whole to `tmp/`, fsync'd, renamed into place and
the directory fsync'd: a `*.spool` file is therefore complete unless the disk
corrupted it.  Version 1 of the format, all integers big-endian:

    b"PKSPOOL1\\n"
    u64 length, then the metadata as UTF-8 JSON
    u64 length, then the object bytes
    32 bytes: sha256 of everything above

Sealed entries (format 2).  With a master key configured ([storage]
master_key_file) the milter writes every entry sealed at rest, since a spool
file holds a whole message and its envelope in the clear otherwise.
PostgreSQL may be down when spooling (that is what the spool is for), so the
organisation's key cannot be read: each file gets its own random 256-bit
data key, wrapped (AES-256-GCM) directly by the master key and kept in the
file's header, and the rest of the file is a sealed stream
(storage/content/sealed_stream.py, bound to the message id) of what format
1 holds between its magic and its checksum:

    b"PKSPOOL2\n"
    16 bytes: the master key's id (which key wrapped the data key; not the key)
    60 bytes: nonce (12) || AES-256-GCM(master key, data key) || tag
    the sealed stream of: u64 length, metadata JSON, u64 length, object bytes

AES-GCM authenticates every segment and the stream's end, so no checksum is
added.  What this promises: a spool file copied off the disk, or the disk
itself, reveals nothing without the master key (never on that disk: it is
read from storage.master_key_file), and a damaged or truncated file is
quarantined as before.  What it does not: the milter holds the master key
in memory while it writes, so whoever controls the host while it runs can
read what it spools; a sealed entry is not crypto-shreddable by itself (its
key goes when the file does: the drain unlinks it, but the filesystem may
keep the freed blocks); and an entry drained is read back in the clear in
the drain's memory before it is sealed again under the message's own data
key.  Entries written unsealed (format 1, before a master key was
configured) drain as before; a sealed entry found without a master key, or
with another one, stops the pass (the error names storage.master_key_file)
and stays: it is not damaged.

The drain stores mail as the milter's group commit does (`Packing`):
small outbound messages go into sealed packs (storage/content/packing.py)
with their data keys, in the same transaction as their rows; messages whose
rows already exist (a drain killed after its commit) are only unlinked, so
a repeat never indexes a message twice.

Journal segments (`accept_after = "journal"`).  A journaling milter does not
make a file per message: creating and unlinking hundreds of files a second
costs the kernel more than the message's whole capture (ext4's inode
allocator scans past every recently deleted inode), and every file wants
its own fsync.  It appends each message's entry, exactly the bytes an entry
file would hold, as one record to a segment file it alone writes, and
answers once a group fdatasync covers the record (sessions share one
fdatasync).  A segment is `<uuid7>.jopen` while its milter appends to it
(flock held) and becomes `<uuid7>.journal` when the milter closes it (after
`storage/content/journal.py`'s rotation interval, a size limit, or at exit);
one left `.jopen` by a milter that was killed is drained like a closed one.
Format, integers big-endian:

    b"PKJOURN1\n"
    records: u64 length, 16 bytes message id, u32 crc32 of those 24 bytes,
             then LENGTH bytes: one entry, format 1 or 2 as above

The drain takes a segment's records as one batch; records whose rows
PostgreSQL refuses are written out as entry files (`<id>.spool`, the same
bytes), a record that does not open and anything after the last whole
record go to `quarantine/`, and then the segment is unlinked.  The one
exception: a segment left `.jopen` by a killed milter that ends in one
record cut short.  That record was never whole on disk, so no fdatasync
covered it and its session was never answered; it is dropped, logged.

A file that does not parse to its end with a matching checksum is moved to
`quarantine/` with an error line naming it; it is never deleted and never
stops the drain.  Entries are named `<message id>.spool`; message ids are
UUIDv7, so name order is capture order.  `.drain.lock` (flock) keeps two
drains from working the same directory at once; a second one would only
repeat idempotent steps, but it would waste the backends' time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from postkeep.config import Config
from postkeep.ids import uuid7_time
from postkeep.storage.content import packing as packing_mod
from postkeep.storage.content import packs as packs_mod
from postkeep.storage.content import sealed_objects, sealed_stream, sealing
from postkeep.storage.content.objects import ObjectStore, put_content
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.metadata.inbound import ParentClues
from postkeep.storage.metadata.messages import CapturedMessage, record_captures

log = logging.getLogger("postkeep.spool")

MAGIC = b"PKSPOOL1\n"
MAGIC_SEALED = b"PKSPOOL2\n"
_MASTER_ID_LEN = 16
_WRAPPED_LEN = 12 + 32 + 16
_SEALED_HEAD = len(MAGIC_SEALED) + _MASTER_ID_LEN + _WRAPPED_LEN
_AAD_SPOOL_KEY = b"postkeep-spool-key-v1\x00"
_BINDING = b"postkeep-spool-v1\x00"
SUFFIX = ".spool"
SEGMENT_SUFFIX = ".journal"  # a closed journal segment: every record in it fsync'd
OPEN_SUFFIX = ".jopen"  # a segment its milter still appends to (flock held)
SEGMENT_MAGIC = b"PKJOURN1\n"
_RECORD_HEAD = struct.Struct(">Q16s")
_RECORD_CRC = struct.Struct(">I")
RECORD_HEAD_BYTES = _RECORD_HEAD.size + _RECORD_CRC.size
_LEN = struct.Struct(">Q")
_DIGEST = 32
# The metadata of one message is about 1 KB; anything far larger is damage.
_MAX_METADATA = 16 << 20
# A temporary file older than this was left by a writer that died: the
# message it held was never accepted (the milter answers only after rename).
STALE_TMP_SECONDS = 3600.0
# Objects up to this size are uploaded together when the store can batch.
SMALL_OBJECT_BYTES = 256 * 1024
# ... in requests of at most this many bytes (held in memory while sent).
BATCH_UPLOAD_BYTES = 8 << 20

DRAINED = Counter("postkeep_spool_drained_total",
                  "Spooled messages made durable in the backends and removed from the spool.")
PACKS = Counter("postkeep_spool_packs_total",
                "Packs the drain wrote (one PUT each), drained messages sealed together.")
QUARANTINED = Counter("postkeep_spool_quarantined_total",
                      "Spool entries moved to quarantine/ because they are corrupt or truncated.")
DRAIN_FAILURES = Counter(
    "postkeep_spool_drain_failures_total",
    "Drain passes stopped or entries skipped, by reason (s3, postgres: backend down;"
    " rejected: PostgreSQL refused the entry's rows).",
    ["reason"],
)
for _reason in ("s3", "postgres", "rejected"):
    DRAIN_FAILURES.labels(_reason)


class SpoolFormatError(Exception):
    """A spool file that is not a complete, intact entry."""


class SpoolBusy(Exception):
    """Another drain holds the spool's lock."""


# --- the entry format (pure) -------------------------------------------------


# Fields newer than the format, written only when they differ from their
# default (decode_metadata gives a missing field its default), so entries
# without them stay byte for byte what they were: application tags and
# inbound mail's type and link clues (issue 17).
_WRITTEN_ONLY_IF_SET = frozenset({"tags", "message_type", "clues"})


def encode_metadata(m: CapturedMessage, *, spooled_at: datetime, reason: str) -> bytes:
    """The JSON metadata of an entry: every CapturedMessage field, plus why and when."""
    doc: dict[str, object] = {}
    for f in fields(CapturedMessage):
        value = getattr(m, f.name)
        unset = not value if f.name == "tags" else value == f.default  # tags: a factory
        if f.name in _WRITTEN_ONLY_IF_SET and unset:
            continue  # outbound entries stay byte for byte what they were
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, ParentClues):
            value = value.to_json()
        doc[f.name] = value
    doc["_spooled_at"] = spooled_at.isoformat()
    doc["_reason"] = reason
    # ensure_ascii keeps lone surrogates (undecodable header bytes) round-trippable.
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def decode_metadata(data: bytes) -> tuple[CapturedMessage, datetime, str]:
    """(message, spooled_at, reason) from an entry's metadata; SpoolFormatError if bad."""
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict):
            raise TypeError("metadata is not an object")
        spooled_at = datetime.fromisoformat(doc.pop("_spooled_at"))
        reason = str(doc.pop("_reason"))
        values: dict[str, object] = {}
        for f in fields(CapturedMessage):
            if f.name not in doc:
                if f.default is not MISSING or f.default_factory is not MISSING:
                    continue  # a field newer than the entry keeps its default
                raise KeyError(f.name)
            values[f.name] = _decode_field(str(f.type), doc[f.name])
        return CapturedMessage(**values), spooled_at, reason  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SpoolFormatError(f"bad metadata: {type(exc).__name__}: {exc}") from exc


def _decode_field(ftype: str, raw: object) -> object:
    """One CapturedMessage field back from JSON, by its declared type."""
    if ftype == "uuid.UUID":
        return uuid.UUID(str(raw))
    if ftype == "datetime":
        return datetime.fromisoformat(str(raw))
    if ftype == "bytes":
        return bytes.fromhex(str(raw))
    if ftype == "ParentClues | None":
        return None if raw is None else ParentClues.from_json(raw)
    if ftype == "int":
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise TypeError(f"{raw!r} is not an integer")
        return raw
    if ftype.startswith("tuple["):
        if not isinstance(raw, list) or not all(r is None or isinstance(r, str) for r in raw):
            raise TypeError(f"{raw!r} is not a list of strings")
        return tuple(raw)
    if ftype.startswith("dict["):
        if not isinstance(raw, dict):
            raise TypeError(f"{raw!r} is not an object")
        return raw
    if raw is not None and not isinstance(raw, str):
        raise TypeError(f"{raw!r} is not a string")
    return raw


@dataclass(frozen=True)
class SpoolEntry:
    """One verified entry: its message and where its object lies in the file."""

    path: Path
    message: CapturedMessage
    spooled_at: datetime
    reason: str
    object_offset: int  # in the file; in the sealed stream's plaintext if sealed
    object_length: int
    key: bytes | None = field(default=None, repr=False)  # a sealed entry's data key
    # A journal segment's record: the entry's bytes (PATH is the segment), and
    # its object's, read once (a record's object is at most 1 MiB).
    data: bytes | None = field(default=None, repr=False)
    plain: bytes | None = field(default=None, repr=False)


class _Slice(io.RawIOBase):
    """LENGTH bytes of a file from OFFSET, as a stream that ends there."""

    def __init__(self, fh: BinaryIO, offset: int, length: int) -> None:
        self._fh = fh
        self._left = length
        fh.seek(offset)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._left)
        if n <= 0:
            return 0
        data = self._fh.read(n)
        buf[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def close(self) -> None:
        self._fh.close()
        super().close()


def _binding(message_id: uuid.UUID) -> bytes:
    return _BINDING + message_id.bytes


def _body(meta: bytes, size: int, content: BinaryIO) -> Iterator[bytes]:
    """What an entry holds between its magic and its checksum, chunk by chunk."""
    yield _LEN.pack(len(meta))
    yield meta
    yield _LEN.pack(size)
    left = size
    while left > 0:
        chunk = content.read(min(left, 256 * 1024))
        if not chunk:
            raise OSError(errno.EIO, f"object ended {left} bytes short")
        yield chunk
        left -= len(chunk)


def _write_plain(fh: BinaryIO, meta: bytes, size: int, content: BinaryIO) -> None:
    """Format 1: magic, body, sha256 of both."""
    digest = hashlib.sha256(MAGIC)
    fh.write(MAGIC)
    for chunk in _body(meta, size, content):
        digest.update(chunk)
        fh.write(chunk)
    fh.write(digest.digest())


def _write_sealed(fh: BinaryIO, ring: sealing.Keyring, message_id: uuid.UUID, meta: bytes,
                  size: int, content: BinaryIO) -> None:
    """Format 2: magic, master key id, wrapped data key, the body sealed."""
    key = os.urandom(32)
    wrapped = sealing.master_wrap(ring, key, _AAD_SPOOL_KEY + message_id.bytes)
    fh.write(MAGIC_SEALED + ring.master_id.encode("ascii") + wrapped)
    for chunk in sealed_stream.seal(key, _binding(message_id), _body(meta, size, content)):
        fh.write(chunk)


def _open_plain(path: Path, fh: BinaryIO, size: int) -> SpoolEntry:
    """A format 1 entry of SIZE bytes, checksum verified."""
    digest = hashlib.sha256()

    def take(n: int, what: str) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise SpoolFormatError(f"truncated in the {what} ({size} bytes in all)")
        digest.update(data)
        return data

    if take(len(MAGIC), "magic") != MAGIC:
        raise SpoolFormatError("not a postkeep spool entry (bad magic)")
    (meta_len,) = _LEN.unpack(take(_LEN.size, "metadata length"))
    if meta_len > _MAX_METADATA or meta_len > size:
        raise SpoolFormatError(f"metadata length {meta_len} impossible in a "
                               f"{size}-byte file")
    meta = take(meta_len, "metadata")
    (obj_len,) = _LEN.unpack(take(_LEN.size, "object length"))
    offset = fh.tell()
    if offset + obj_len + _DIGEST != size:
        raise SpoolFormatError(
            f"truncated or padded: {size} bytes, expected {offset + obj_len + _DIGEST}")
    left = obj_len
    while left > 0:
        chunk = take(min(left, 1 << 20), "object")
        left -= len(chunk)
    trailer = fh.read(_DIGEST)
    if trailer != digest.digest():
        raise SpoolFormatError("checksum mismatch (the file was damaged)")
    message, spooled_at, reason = decode_metadata(meta)
    return SpoolEntry(path, message, spooled_at, reason, offset, obj_len)


def _open_sealed(path: Path, fh: BinaryIO, message_id: uuid.UUID, keep: bool = False
                 ) -> SpoolEntry:
    """A format 2 entry of MESSAGE_ID, every segment authenticated (read to its end
    once); with KEEP, its object's plaintext kept in the entry (`plain`)."""
    head = fh.read(_SEALED_HEAD)
    if len(head) != _SEALED_HEAD:
        raise SpoolFormatError(f"truncated in the sealed header ({len(head)} bytes)")
    ring = sealing.keyring()
    if ring is None:
        raise sealing.SealError(f"spool entry {path} is sealed and no master key is configured"
                                " (storage.master_key_file): it stays in the spool")
    master_id = head[len(MAGIC_SEALED):len(MAGIC_SEALED) + _MASTER_ID_LEN]
    if master_id != ring.master_id.encode("ascii"):
        raise sealing.SealError(
            f"spool entry {path} was sealed with master key id"
            f" {master_id.decode('ascii', 'replace')}; the configured storage.master_key_file"
            f" has id {ring.master_id}: it stays in the spool")
    try:
        key = sealing.master_unwrap(ring, head[-_WRAPPED_LEN:],
                                    _AAD_SPOOL_KEY + message_id.bytes)
    except sealing.SealError as exc:
        raise SpoolFormatError(f"its wrapped data key does not open (damaged): {exc}") from None
    got = bytearray()
    meta = b""
    meta_len = obj_len = -1
    seen = 0  # object bytes
    kept: list[bytes] = []
    try:
        for chunk in sealed_stream.open_stream(key, _binding(message_id),
                                               iter(lambda: fh.read(1 << 20), b""), str(path)):
            if obj_len >= 0:
                seen += len(chunk)
                if keep:
                    kept.append(chunk)
                continue
            got += chunk
            if meta_len < 0 and len(got) >= _LEN.size:
                (meta_len,) = _LEN.unpack(bytes(got[:_LEN.size]))
                if meta_len > _MAX_METADATA:
                    raise SpoolFormatError(f"metadata length {meta_len} impossible")
            if meta_len >= 0 and len(got) >= 2 * _LEN.size + meta_len:
                meta = bytes(got[_LEN.size:_LEN.size + meta_len])
                (obj_len,) = _LEN.unpack(bytes(got[_LEN.size + meta_len:
                                                   2 * _LEN.size + meta_len]))
                seen = len(got) - 2 * _LEN.size - meta_len
                if keep:
                    kept.append(bytes(got[2 * _LEN.size + meta_len:]))
                got.clear()
    except sealing.SealError as exc:
        raise SpoolFormatError(str(exc)) from None
    if obj_len < 0:
        raise SpoolFormatError("sealed body ends before its object")
    if seen != obj_len:
        raise SpoolFormatError(f"sealed object is {seen} bytes, its length says {obj_len}")
    message, spooled_at, reason = decode_metadata(meta)
    return SpoolEntry(path, message, spooled_at, reason, 2 * _LEN.size + meta_len, obj_len,
                      key, plain=b"".join(kept) if keep else None)


def _check_object_length(entry: SpoolEntry) -> None:
    """SpoolFormatError unless ENTRY's object is as long as its metadata says."""
    if entry.message.compressed_size != entry.object_length:
        raise SpoolFormatError(f"object is {entry.object_length} bytes, metadata says "
                               f"{entry.message.compressed_size}")


def _id_of(path: Path) -> uuid.UUID:
    """The message id a sealed entry's name says (its key and stream are bound to it)."""
    try:
        return uuid.UUID(path.name.removesuffix(SUFFIX))
    except ValueError:
        raise SpoolFormatError(f"file name {path.name} is not <message id>{SUFFIX}") from None


def write_entry(fh: BinaryIO, message: CapturedMessage, content: BinaryIO, reason: str, *,
                now: datetime | None = None, sealed: bool | None = None) -> None:
    """An entry of MESSAGE (its object: message.compressed_size bytes of CONTENT)
    to FH: sealed (format 2) when a master key is installed, unless SEALED says
    otherwise."""
    meta = encode_metadata(message, spooled_at=now or datetime.now(UTC), reason=reason)
    ring = sealing.keyring() if sealed is None else sealing.required() if sealed else None
    if ring is None:
        _write_plain(fh, meta, message.compressed_size, content)
    else:
        _write_sealed(fh, ring, message.id, meta, message.compressed_size, content)


def encode_record(message: CapturedMessage, content: BinaryIO, reason: str, *,
                  now: datetime | None = None, sealed: bool | None = None) -> bytes:
    """One journal segment record: head (length, message id, crc32) and the entry."""
    buf = io.BytesIO()
    write_entry(buf, message, content, reason, now=now, sealed=sealed)
    body = buf.getvalue()
    head = _RECORD_HEAD.pack(len(body), message.id.bytes)
    return head + _RECORD_CRC.pack(zlib.crc32(head)) + body


def _record_head(raw: bytes) -> tuple[int, uuid.UUID] | None:
    """(length, message id) of a record head, None unless whole and intact."""
    if len(raw) != RECORD_HEAD_BYTES:
        return None
    head, crc = raw[:_RECORD_HEAD.size], raw[_RECORD_HEAD.size:]
    if _RECORD_CRC.unpack(crc)[0] != zlib.crc32(head):
        return None
    length, mid = _RECORD_HEAD.unpack(head)
    return length, uuid.UUID(bytes=mid)


def segment_ids(path: Path) -> list[uuid.UUID]:
    """The message ids of PATH's whole records, in order (heads only: no record
    is read or opened).  Stops at the first head that is not whole or intact."""
    ids: list[uuid.UUID] = []
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if fh.read(len(SEGMENT_MAGIC)) != SEGMENT_MAGIC:
            return ids
        pos = len(SEGMENT_MAGIC)
        while True:
            head = _record_head(fh.read(RECORD_HEAD_BYTES))
            if head is None or pos + RECORD_HEAD_BYTES + head[0] > size:
                return ids
            ids.append(head[1])
            pos += RECORD_HEAD_BYTES + head[0]
            fh.seek(pos)


@dataclass
class SegmentScan:
    """A journal segment read to its end."""

    path: Path
    entries: list[SpoolEntry]  # whole, intact records, in order
    damaged: list[tuple[int, bytes, str]]  # (offset, record bytes, why): whole, will not open
    tail: tuple[int, bytes, str] | None  # what follows the last whole record, if anything
    # The tail is one record cut short (an intact head, or less than a head):
    # what a writer killed in the middle of an append leaves.
    cut_short: bool = False


def read_segment(path: Path) -> SegmentScan:
    """Every record of the segment PATH, verified; sealing.SealError (the pass
    stops, the segment stays) if the configured master key cannot open them."""
    scan = SegmentScan(path, [], [], None)
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(SEGMENT_MAGIC):
        if data:
            scan.tail = (0, data, "not a postkeep journal segment (bad magic)")
        return scan
    pos = len(SEGMENT_MAGIC)
    while pos < len(data):
        head = _record_head(data[pos:pos + RECORD_HEAD_BYTES])
        if head is None:
            short = len(data) - pos < RECORD_HEAD_BYTES
            scan.tail = (pos, data[pos:], "record head cut short" if short
                         else "record head damaged (crc32)")
            scan.cut_short = short
            break
        length, mid = head
        end = pos + RECORD_HEAD_BYTES + length
        if end > len(data):
            scan.tail = (pos, data[pos:], f"record of {length} bytes cut short at"
                                          f" {len(data) - pos - RECORD_HEAD_BYTES}")
            scan.cut_short = True
            break
        body = data[pos + RECORD_HEAD_BYTES:end]
        try:
            with io.BytesIO(body) as fh:
                entry = (_open_sealed(path, fh, mid, keep=True)
                         if body.startswith(MAGIC_SEALED) else _open_plain(path, fh, len(body)))
            _check_object_length(entry)
            if entry.message.id != mid:
                raise SpoolFormatError(f"record head says {mid}, its entry {entry.message.id}")
            plain = entry.plain if entry.plain is not None else body[
                entry.object_offset:entry.object_offset + entry.object_length]
            scan.entries.append(replace(entry, data=body, plain=plain))
        except SpoolFormatError as exc:
            scan.damaged.append((pos, data[pos:end], str(exc)))
        pos = end
    return scan


class _Tail(io.RawIOBase):
    """LENGTH bytes after the first OFFSET of an iterator of chunks, as a stream."""

    def __init__(self, chunks: Iterator[bytes], offset: int, length: int,
                 fh: BinaryIO) -> None:
        self._chunks = chunks
        self._skip = offset
        self._left = length
        self._pending = b""
        self._fh = fh

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending and self._left > 0:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            if self._skip:
                cut = min(self._skip, len(chunk))
                chunk, self._skip = chunk[cut:], self._skip - cut
            self._pending = chunk
        n = min(len(buf), len(self._pending), self._left)
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._left -= n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


# --- the directory -----------------------------------------------------------


@dataclass(frozen=True)
class SpoolStatus:
    """What `postkeep spool status` and the gauges report."""

    directory: str
    entries: int
    bytes: int
    oldest: datetime | None  # mtime of the oldest entry (when it was spooled)
    oldest_age_seconds: float
    quarantined: int
    fill_percent: float


def fill_percent(path: str | Path, extra_bytes: int = 0,
                 statvfs: Callable[[str | Path], os.statvfs_result] = os.statvfs) -> float:
    """How full PATH's filesystem is (0-100) once EXTRA_BYTES more are written.

    Counted as `df` does for unprivileged users: space not available is used.
    """
    st = statvfs(path)
    total = st.f_blocks * st.f_frsize
    if total <= 0:
        return 100.0
    used = (st.f_blocks - st.f_bavail) * st.f_frsize + max(0, extra_bytes)
    return 100.0 * used / total


def is_live(path: Path) -> bool:
    """Does a running milter still append to the open segment PATH (holds its flock)?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class Spool:
    """One spool directory: write, list, read, remove and quarantine entries."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.tmp = self.dir / "tmp"
        self.quarantine_dir = self.dir / "quarantine"
        self._id_cache: dict[str, tuple[int, frozenset[uuid.UUID]]] = {}

    def ensure(self) -> None:
        """Create the directory and its subdirectories (mode 0700) if missing."""
        for d in (self.dir, self.tmp, self.quarantine_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def holds(self, message_id: uuid.UUID) -> bool:
        """Is MESSAGE_ID spooled and not yet drained (its rows may not exist yet)?
        In an entry file or in a journal segment, live or closed."""
        if (self.dir / f"{message_id}{SUFFIX}").exists():
            return True
        return any(message_id in self._ids(p) for p in self.segments())

    def _ids(self, path: Path) -> frozenset[uuid.UUID]:
        """The message ids in segment PATH, cached while its size is unchanged."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return frozenset()
        cached = self._id_cache.get(path.name)
        if cached is not None and cached[0] == size:
            return cached[1]
        try:
            ids = frozenset(segment_ids(path))
        except FileNotFoundError:
            return frozenset()
        if len(self._id_cache) > 1024:
            self._id_cache.clear()
        self._id_cache[path.name] = (size, ids)
        return ids

    def segments(self, live: bool = True) -> list[Path]:
        """Journal segments, oldest first: closed ones, those a killed milter left
        open, and with LIVE those a running milter is still appending to."""
        try:
            names = sorted(e.name for e in os.scandir(self.dir)
                           if e.name.endswith((SEGMENT_SUFFIX, OPEN_SUFFIX))
                           and e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return []
        return [self.dir / n for n in names
                if live or n.endswith(SEGMENT_SUFFIX) or not is_live(self.dir / n)]

    # -- writing (the milter) ------------------------------------------------
    def write(self, message: CapturedMessage, content: BinaryIO, reason: str,
              *, now: datetime | None = None, sealed: bool | None = None) -> Path:
        """Write MESSAGE with its object (message.compressed_size bytes of CONTENT)
        durably; return the entry's path.  OSError if it could not be.

        Sealed (format 2) when a master key is installed, unless SEALED says
        otherwise (tests write format 1 entries with a key installed)."""
        return self._durably(message.id, lambda fh: write_entry(
            fh, message, content, reason, now=now, sealed=sealed))

    def write_bytes(self, message_id: uuid.UUID, data: bytes) -> Path:
        """An entry file holding DATA (a journal record's entry, as it was), durably."""
        return self._durably(message_id, lambda fh: fh.write(data))

    def _durably(self, message_id: uuid.UUID, fill: Callable[[BinaryIO], object]) -> Path:
        """`<MESSAGE_ID>.spool` as FILL writes it: in tmp/, fsync'd, renamed in,
        the directory fsync'd.  OSError if it could not be (nothing is left)."""
        final = self.dir / f"{message_id}{SUFFIX}"
        tmp = self.tmp / f"{message_id}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "xb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self.sync()
        return final

    def sync(self) -> None:
        """fsync the directory, making renames and unlinks in it durable."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading (the drain) -------------------------------------------------
    def entries(self) -> list[Path]:
        """What the drain can take, oldest first: every complete entry file and
        every journal segment no running milter still appends to."""
        return sorted([*self.files(), *self.segments(live=False)], key=lambda p: p.name)

    def files(self) -> list[Path]:
        """Every complete entry file (`<message id>.spool`), in no order."""
        try:
            return [self.dir / e.name for e in os.scandir(self.dir)
                    if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def open_entry(self, path: Path) -> SpoolEntry:
        """Read and verify PATH; SpoolFormatError if it is not intact.

        FileNotFoundError if it is gone (another drain finished it);
        sealing.SealError (a BackendError: the pass stops, the entry stays) if
        it is sealed and the configured master key cannot open it.
        """
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
            fh.seek(0)
            entry = (_open_sealed(path, fh, _id_of(path)) if head == MAGIC_SEALED
                     else _open_plain(path, fh, os.fstat(fh.fileno()).st_size))
        _check_object_length(entry)
        if path.name != f"{entry.message.id}{SUFFIX}":
            raise SpoolFormatError(f"file name does not match message id {entry.message.id}")
        return entry

    def object_stream(self, entry: SpoolEntry) -> BinaryIO:
        """The entry's object bytes as a stream (close it when done)."""
        if entry.plain is not None:  # a journal record's, read with its record
            return io.BytesIO(entry.plain)
        fh = open(entry.path, "rb")  # noqa: SIM115 - closed with the returned stream
        if entry.key is None:
            return io.BufferedReader(_Slice(fh, entry.object_offset, entry.object_length))
        fh.seek(_SEALED_HEAD)
        plain = sealed_stream.open_stream(entry.key, _binding(entry.message.id),
                                          iter(lambda: fh.read(1 << 20), b""), str(entry.path))
        return io.BufferedReader(_Tail(plain, entry.object_offset, entry.object_length, fh))

    def remove(self, path: Path) -> None:
        """Unlink an entry (already gone is fine); call sync() after a batch."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def quarantine(self, path: Path, why: str) -> Path | None:
        """Move a damaged entry to quarantine/ (never delete it); log naming it."""
        self.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.quarantine_dir / path.name
        if target.exists():
            target = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        self.sync()
        QUARANTINED.inc()
        log.error("spool entry quarantined file=%s moved_to=%s reason=%r", path, target, why)
        return target

    def quarantine_bytes(self, segment: Path, offset: int, data: bytes, why: str) -> Path:
        """Keep DATA (a damaged record, or a segment's torn tail, from OFFSET of
        SEGMENT) in quarantine/ as a file of its own; log naming both."""
        self.quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{segment.name}.{offset}"
        with open(target, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        QUARANTINED.inc()
        log.error("spool journal bytes quarantined file=%s offset=%d bytes=%d moved_to=%s"
                  " reason=%r", segment, offset, len(data), target, why)
        return target

    def remove_stale_tmp(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Delete temporary files of writers that died (never accepted); count them."""
        removed = 0
        cutoff = time.time() - older_than
        try:
            items = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return 0
        for e in items:
            with contextlib.suppress(FileNotFoundError):
                if e.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(e.path)
                    removed += 1
                    log.info("removed stale spool temp file %s (never accepted)", e.path)
        return removed

    def status(self, now: float | None = None) -> SpoolStatus:
        """Depth, bytes, age of the oldest entry, quarantined count, fill level."""
        now = time.time() if now is None else now
        count = total = 0
        oldest: float | None = None
        try:
            items = list(os.scandir(self.dir))
        except FileNotFoundError:
            items = []
        for e in items:
            segment = e.name.endswith((SEGMENT_SUFFIX, OPEN_SUFFIX))
            if not e.name.endswith(SUFFIX) and not segment:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # drained meanwhile
            when = st.st_mtime
            if segment:
                held = len(self._ids(Path(e.path)))
                if not held:
                    continue
                count += held
                with contextlib.suppress(ValueError):  # named by its creation (UUIDv7)
                    when = uuid7_time(uuid.UUID(e.name.rsplit(".", 1)[0])).timestamp()
            else:
                count += 1
            total += st.st_size
            oldest = when if oldest is None else min(oldest, when)
        try:
            quarantined = sum(1 for _ in os.scandir(self.quarantine_dir))
        except FileNotFoundError:
            quarantined = 0
        try:
            fill = fill_percent(self.dir)
        except OSError:
            fill = float("nan")
        return SpoolStatus(
            str(self.dir), count, total,
            datetime.fromtimestamp(oldest, UTC) if oldest is not None else None,
            max(0.0, now - oldest) if oldest is not None else 0.0, quarantined, fill)

    @contextlib.contextmanager
    def drain_lock(self, wait: float = 0.0) -> Iterator[None]:
        """Hold the drain lock; SpoolBusy if another drain keeps it WAIT seconds."""
        self.ensure()
        fd = os.open(self.dir / ".drain.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as exc:
                    if time.monotonic() >= deadline:
                        raise SpoolBusy(f"another drain is running on {self.dir}") from exc
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)  # releases the lock


class SpoolCollector(Collector):
    """Gauges read from the directory at scrape time (any process may serve them)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def collect(self) -> Iterable[GaugeMetricFamily]:
        st = self._spool.status()
        yield GaugeMetricFamily("postkeep_spool_entries",
                                "Messages in the outage spool waiting to be drained.",
                                value=st.entries)
        yield GaugeMetricFamily("postkeep_spool_bytes", "Bytes of the outage spool's entries.",
                                value=st.bytes)
        yield GaugeMetricFamily("postkeep_spool_oldest_entry_age_seconds",
                                "Age of the oldest spooled entry (0 when empty).",
                                value=st.oldest_age_seconds)
        yield GaugeMetricFamily("postkeep_spool_quarantined_entries",
                                "Damaged entries set aside in quarantine/ for an operator.",
                                value=st.quarantined)
        yield GaugeMetricFamily("postkeep_spool_filesystem_used_percent",
                                "How full the spool's filesystem is.", value=st.fill_percent)


# --- the drain ---------------------------------------------------------------

class RecordRows(Protocol):
    """Writes a batch's rows; PACKS (the packs their content went into) and
    KEYS (the data keys their own objects are sealed under) in the same
    transaction.  Called without them when there are none."""

    def __call__(self, msgs: Sequence[CapturedMessage],
                 packs: Sequence[packs_mod.Pack] = ...,
                 keys: Sequence[sealing.DataKey] = ..., /) -> None: ...


@dataclass(frozen=True)
class Packing:
    """The drain stores messages as the group commit does: small outbound
    ones in packs (when PACKS: the layout is packs), one PUT per pack, the
    rest in their own objects; each sealed under a fresh data key when a
    master key is installed, the keys recorded with the messages' rows
    (storage/content/packing.py, sealed_objects.py).  The daemons pass one
    when the layout is packs or content is sealed (packing_for)."""

    db: Database
    small_object_bytes: int = SMALL_OBJECT_BYTES
    packs: bool = True


@dataclass
class DrainResult:
    """What one drain pass did."""

    drained: int = 0
    quarantined: int = 0
    rejected: int = 0  # rows PostgreSQL refused (entry kept, logged)
    remaining: int = 0
    stopped: BackendError | None = None  # a backend went (or stayed) down
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.drained / self.seconds if self.seconds > 0 else 0.0


def drain(spool: Spool, objects: ObjectStore, record: RecordRows, *, batch_size: int = 256,
          put_threads: int = 8, limit: int | None = None,
          progress: Callable[[DrainResult], None] | None = None,
          stop: threading.Event | None = None, packing: Packing | None = None) -> DrainResult:
    """Store every entry present now, oldest first, and remove it; never raises
    for a backend outage (the pass stops, entries stay, `stopped` says why).

    Per batch: objects put (small ones in one request), rows inserted in one
    statement, then the entries unlinked by a second thread while the next
    batch uploads (unlinking costs about a millisecond a file here).  The
    directory is fsync'd once at the end: an unlink that a power cut undoes
    only means that entry is drained again, to the same effect.  Damaged
    entries go to quarantine; entries whose rows PostgreSQL refuses stay,
    logged and counted.  PACKING: small messages go into sealed packs.
    """
    started = time.monotonic()
    result = DrainResult()
    paths = spool.entries()
    if limit is not None:
        paths = paths[:limit]
    result.remaining = len(paths)
    removals: list[Future[None]] = []
    with ThreadPoolExecutor(put_threads, thread_name_prefix="spool-put") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="spool-unlink") as remover:
        for i, batch in _batches(paths, batch_size):
            if stop is not None and stop.is_set():
                break
            segment = None if batch[0].name.endswith(SUFFIX) else batch[0]
            try:
                recorded = (_drain_batch(spool, objects, record, batch, pool, result, packing)
                            if segment is None else
                            _drain_segment(spool, objects, record, segment, pool, result,
                                           packing))
                removals.append(remover.submit(_remove_drained, spool, recorded, segment))
            except BackendError as exc:
                result.stopped = exc
                DRAIN_FAILURES.labels(exc.backend).inc()
                log.warning("spool drain stopped: %s unavailable (%s); %d entries wait",
                            exc.backend, exc.reason, spool.status().entries)
                break
            finally:
                result.seconds = time.monotonic() - started
            result.remaining = len(paths) - i - len(batch)
            if progress is not None:
                progress(result)
    for fut in removals:
        fut.result()  # an unlink that failed is raised here, never ignored
    spool.sync()
    result.seconds = time.monotonic() - started
    result.remaining = spool.status().entries
    return result


def _batches(paths: list[Path], size: int) -> Iterator[tuple[int, list[Path]]]:
    """(index of the first, batch): entry files SIZE at a time, each journal
    segment alone (its records are a batch), in PATHS' order."""
    run: list[Path] = []
    start = 0
    for i, path in enumerate(paths):
        if path.name.endswith(SUFFIX):
            if not run:
                start = i
            run.append(path)
            if len(run) == size:
                yield start, run
                run = []
            continue
        if run:
            yield start, run
            run = []
        yield i, [path]
    if run:
        yield start, run


def _remove_drained(spool: Spool, recorded: list[SpoolEntry], segment: Path | None = None
                    ) -> None:
    """Unlink entries (or the journal SEGMENT they were records of) whose object
    and rows are durable; one log line each."""
    for path in [segment] if segment is not None else [e.path for e in recorded]:
        spool.remove(path)
    for e in recorded:
        log.info("spool drained pk_id=%s queue_id=%s key=%s spooled_at=%s", e.message.id.hex,
                 e.message.queue_id, e.message.object_key, e.spooled_at.isoformat())
    DRAINED.inc(len(recorded))


def _drain_segment(spool: Spool, objects: ObjectStore, record: RecordRows, path: Path,
                   pool: ThreadPoolExecutor, result: DrainResult,
                   packing: Packing | None = None) -> list[SpoolEntry]:
    """Store the journal segment PATH's records as one batch; the ones now durable.

    Then the segment holds nothing but what is kept elsewhere before it goes:
    records whose rows PostgreSQL refused are written out as entry files (the
    next passes treat them as any entry), damaged records and a torn tail
    are quarantined.  The caller unlinks it."""
    try:
        scan = read_segment(path)
    except FileNotFoundError:
        return []  # finished by another drain
    except OSError as exc:  # unreadable: leave it, say so, go on
        log.error("spool journal segment unreadable file=%s reason=%r", path, str(exc))
        result.rejected += 1
        return []
    recorded = (_store_entries(spool, objects, record, scan.entries, pool, result, packing)
                if scan.entries else [])
    stored = {e.message.id for e in recorded}
    for e in scan.entries:
        if e.message.id not in stored and e.data is not None:
            spool.write_bytes(e.message.id, e.data)  # kept, as an entry file
    tail = [scan.tail] if scan.tail else []
    if scan.tail and scan.cut_short and path.name.endswith(OPEN_SUFFIX):
        # A writer killed in the middle of an append: the record was never
        # whole, so never fdatasync'd, so never answered (Postfix got no 250
        # and sends the message again).  Nothing to keep.
        offset, data, why = scan.tail
        log.warning("spool journal segment left by a killed milter ends in a record never"
                    " answered: %d bytes dropped file=%s offset=%d (%s)", len(data), path,
                    offset, why)
        tail = []
    for offset, data, why in [*scan.damaged, *tail]:
        spool.quarantine_bytes(path, offset, data, why)
        result.quarantined += 1
    return recorded


def _drain_batch(spool: Spool, objects: ObjectStore, record: RecordRows, batch: list[Path],
                 pool: ThreadPoolExecutor, result: DrainResult,
                 packing: Packing | None = None) -> list[SpoolEntry]:
    """Put BATCH's objects and insert its rows; the entries now durable."""
    entries: list[SpoolEntry] = []
    for path in batch:
        try:
            entries.append(spool.open_entry(path))
        except FileNotFoundError:
            continue  # finished by another drain
        except SpoolFormatError as exc:
            if spool.quarantine(path, str(exc)) is not None:
                result.quarantined += 1
        except OSError as exc:  # unreadable: leave it, say so, go on
            log.error("spool entry unreadable file=%s reason=%r", path, str(exc))
            result.rejected += 1
    if not entries:
        return []
    return _store_entries(spool, objects, record, entries, pool, result, packing)


def _store_entries(spool: Spool, objects: ObjectStore, record: RecordRows,
                   entries: list[SpoolEntry], pool: ThreadPoolExecutor, result: DrainResult,
                   packing: Packing | None = None) -> list[SpoolEntry]:
    """Put ENTRIES' objects and insert their rows; the entries now durable."""
    done: list[SpoolEntry] = []
    stored: list[packs_mod.Pack] = []
    keys: dict[uuid.UUID, sealing.DataKey] = {}
    if packing is not None:
        # A message with rows was recorded by a drain killed before its
        # unlink (or by the milter, whose commit outcome it could not see):
        # its content is stored, under the key its row names; storing it
        # again (into another pack, or sealed under a new key the row does
        # not have) would index it twice or make it unreadable.
        done, entries = _recorded(packing, entries)
        packable = [e for e in entries if packing.packs
                    and e.object_length <= packing.small_object_bytes
                    and e.message.direction != "inbound"]  # as milter/committer.py
        if packable:
            taken = {id(e) for e in packable}
            entries = [e for e in entries if id(e) not in taken]
            stored = _pack(objects, packing, spool, packable)
            entries += packable  # recorded in their packs (_in_pack)
        in_packs = {mid for p in stored for mid in p.members}
        keys = _own_keys(packing, [e for e in entries if e.message.id not in in_packs])

    def put(entry: SpoolEntry) -> None:
        with spool.object_stream(entry) as stream:
            data, length = sealed_objects.own_stream(keys.get(entry.message.id), stream,
                                                     entry.object_length)
            put_content(objects, entry.message.object_key, data, length,
                        entry.message.content_expires_at)

    # Small objects in one request where the store can (as the milter's
    # group commit does), the rest one PUT each, in parallel.
    in_packs = {mid for p in stored for mid in p.members}
    own = [e for e in entries if e.message.id not in in_packs]
    small = [e for e in own if e.object_length <= SMALL_OBJECT_BYTES]
    singles = own
    if len(small) > 1 and objects.can_batch():
        for chunk in _by_bytes(small, BATCH_UPLOAD_BYTES):
            items = []
            for e in chunk:
                with spool.object_stream(e) as stream:
                    data = sealed_objects.own_bytes(keys.get(e.message.id), stream.read())
                items.append((e.message.object_key, data))
            objects.put_many(items)
        singles = [e for e in own if e.object_length > SMALL_OBJECT_BYTES]
    for fut in [pool.submit(put, e) for e in singles]:
        fut.result()  # BackendError stops the pass; objects put so far are harmless
    recorded = _record(record, entries, result, stored, keys) if entries else []
    result.drained += len(recorded) + len(done)
    return recorded + done


def _recorded(packing: Packing, entries: list[SpoolEntry]
              ) -> tuple[list[SpoolEntry], list[SpoolEntry]]:
    """(ENTRIES whose rows already exist: done, the others)."""
    ids = [e.message.id for e in entries]
    have = set(packing.db.run(lambda conn: [r[0] for r in conn.execute(
        "SELECT id FROM messages WHERE id = ANY(%s)", (ids,))]))
    return ([e for e in entries if e.message.id in have],
            [e for e in entries if e.message.id not in have])


def _own_keys(packing: Packing, entries: list[SpoolEntry]) -> dict[uuid.UUID, sealing.DataKey]:
    """A fresh data key per entry for its own object when sealing, by message
    id ({} when not); an organisation key that cannot be read stops the pass."""
    keys, failed = packing_mod.new_keys(packing.db, [
        (e.message.id, e.message.org_id, e.message.content_expires_at) for e in entries])
    if failed:
        raise next(iter(failed.values()))
    return keys or {}


def _pack(objects: ObjectStore, packing: Packing, spool: Spool, entries: list[SpoolEntry]
          ) -> list[packs_mod.Pack]:
    """The packs ENTRIES (none of them recorded yet: _recorded) went into.

    A pack put here whose rows are then not written is left in the bucket
    with no row: unreferenced bytes for the orphan sweep, sealed under keys
    never recorded.  BackendError (PostgreSQL or S3 down) stops the pass.
    """
    items = []
    for e in entries:
        with spool.object_stream(e) as stream:
            data = stream.read()
        m = e.message
        items.append(packs_mod.Entry(m.id, m.org_id, m.object_key, m.content_expires_at, data))
    stored, failed = packing_mod.store_packs(packing.db, objects, items)
    PACKS.inc(len(stored))
    if failed:
        raise next(iter(failed.values()))
    return stored


def _in_pack(m: CapturedMessage, stored: Sequence[packs_mod.Pack]
             ) -> tuple[CapturedMessage, list[packs_mod.Pack]]:
    """M as its row names it (its pack, if it went into one of STORED), and
    that pack with M its only member (recorded member by member)."""
    for p in stored:
        if m.id in p.members:
            return (replace(m, object_key=p.key),
                    [replace(p, members={m.id: p.members[m.id]})])
    return m, []


def _merged(parts: list[packs_mod.Pack]) -> list[packs_mod.Pack]:
    """PARTS (each pack with one member, from _in_pack) merged per pack."""
    out: dict[str, packs_mod.Pack] = {}
    for p in parts:
        if p.key in out:
            out[p.key].members.update(p.members)
        else:
            out[p.key] = replace(p, members=dict(p.members))
    return list(out.values())


def _by_bytes(entries: list[SpoolEntry], limit: int) -> Iterator[list[SpoolEntry]]:
    """ENTRIES in order, in runs whose objects total at most LIMIT bytes (at least one)."""
    run: list[SpoolEntry] = []
    size = 0
    for e in entries:
        if run and size + e.object_length > limit:
            yield run
            run, size = [], 0
        run.append(e)
        size += e.object_length
    if run:
        yield run


def _record(record: RecordRows, entries: list[SpoolEntry], result: DrainResult,
            stored: Sequence[packs_mod.Pack] = (),
            keys: dict[uuid.UUID, sealing.DataKey] | None = None) -> list[SpoolEntry]:
    """Insert the rows of ENTRIES (with their packs' rows, STORED, and their
    own objects' data keys, KEYS); the ones now in PostgreSQL.

    One statement for the batch; if PostgreSQL refuses it for a reason other
    than being down (a row it cannot take), one by one, so one bad entry
    cannot hold up the rest.
    """
    keys = keys or {}

    def write(group: list[SpoolEntry]) -> None:
        msgs, its_packs = [], []
        for e in group:
            m, p = _in_pack(e.message, stored)
            msgs.append(m)
            its_packs += p
        own = [keys[e.message.id] for e in group if e.message.id in keys]
        if own:
            record(msgs, _merged(its_packs), own)
        elif its_packs:
            record(msgs, _merged(its_packs))
        else:
            record(msgs)

    try:
        write(entries)
        return entries
    except BackendError:
        raise
    except Exception as exc:
        log.warning("spool batch of %d refused (%s); retrying one by one", len(entries), exc)
    done = []
    for e in entries:
        try:
            write([e])
            done.append(e)
        except BackendError:
            raise
        except Exception as exc:
            DRAIN_FAILURES.labels("rejected").inc()
            result.rejected += 1
            log.error("spool entry rejected by postgres file=%s pk_id=%s queue_id=%s reason=%r"
                      " (kept in the spool)", e.path, e.message.id.hex, e.message.queue_id,
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return done


def waiting_entries(spool: Spool) -> list[SpoolEntry]:
    """Every message in SPOOL accepted and not yet stored, oldest first: entry
    files and the records of every journal segment, live ones included; an
    entry drained meanwhile or that does not open (the drain quarantines it)
    is not."""
    found = []
    for path in sorted([*spool.files(), *spool.segments(live=True)], key=lambda p: p.name):
        try:
            if path.name.endswith(SUFFIX):
                found.append(spool.open_entry(path))
            elif path.exists():
                found += read_segment(path).entries
        except (FileNotFoundError, SpoolFormatError):
            continue
    return found


def waiting(spool: Spool, match: Callable[[CapturedMessage], bool]) -> list[uuid.UUID]:
    """Ids of the messages in SPOOL that MATCH (accepted, not yet stored)."""
    return [e.message.id for e in waiting_entries(spool) if match(e.message)]


def drain_forever(spool: Spool, objects: ObjectStore, record: RecordRows, *,
                  interval: float, stop: threading.Event, batch_size: int = 256,
                  on_pass: Callable[[DrainResult], None] | None = None,
                  packing: Packing | None = None, wake: threading.Event | None = None) -> None:
    """Drain every INTERVAL seconds until STOP is set (a daemon's periodic task),
    and at once when WAKE is set (whoever stops it sets WAKE too).

    Takes the drain lock for each pass only, so `postkeep spool drain` can
    still be run by hand between passes; a pass that finds the lock taken is
    skipped.  Never raises for an outage or a damaged entry; anything else
    is logged and the next pass tries again.
    """
    while not stop.is_set():
        try:
            if spool.entries():
                with spool.drain_lock():
                    spool.remove_stale_tmp()
                    result = drain(spool, objects, record, batch_size=batch_size, stop=stop,
                                   packing=packing)
                if on_pass is not None:
                    on_pass(result)
        except SpoolBusy:
            log.debug("spool drain pass skipped: another drain holds the lock")
        except Exception:
            log.exception("spool drain pass failed; retrying in %gs", interval)
        if wake is None:
            stop.wait(interval)
        else:
            wake.wait(interval)
            wake.clear()


def record_with(db: Database, then: Callable[[Any, Sequence[CapturedMessage]], None]
                | None = None) -> RecordRows:
    """The drain's row writer: one idempotent INSERT per batch, through the
    pool; then THEN on the same connection (the daemons pass
    storage.reports.inbound.link_each: inbound replies and complaints linked
    to what was sent, as the milter links those it commits itself; it must
    be idempotent, a batch may be recorded again)."""
    def write(conn: Any, msgs: Sequence[CapturedMessage], packs: Sequence[packs_mod.Pack],
              keys: Sequence[sealing.DataKey]) -> None:
        if packs or keys:  # the messages' rows, their packs' and data keys: all or none
            with conn.transaction():
                record_captures(conn, msgs)
                packs_mod.record(conn, list(packs))
                sealing.record(conn, list(keys))
                if then is not None:
                    then(conn, msgs)
            return
        record_captures(conn, msgs)
        if then is not None:
            then(conn, msgs)

    def record(msgs: Sequence[CapturedMessage], packs: Sequence[packs_mod.Pack] = (),
               keys: Sequence[sealing.DataKey] = (), /) -> None:
        db.run(lambda conn: write(conn, msgs, packs, keys))

    return record


def packing_for(cfg: Config, db: Database) -> Packing | None:
    """How the daemons drain: as the milter writes, into packs where it
    writes packs, sealed where it seals."""
    sealed = bool(cfg.storage.master_key)
    packed = cfg.s3.effective_layout(sealed=sealed) == "packs"
    return Packing(db, packs=packed) if packed or sealed else None


def log_pass(result: DrainResult) -> None:
    """One progress line per pass that did something (for daemons)."""
    if result.drained or result.quarantined or result.rejected or result.stopped:
        log.info("spool drain pass: drained %d, quarantined %d, rejected %d, left %d"
                 " (%.0f messages/s)%s", result.drained, result.quarantined, result.rejected,
                 result.remaining, result.rate,
                 f"; stopped: {result.stopped}" if result.stopped else "")
