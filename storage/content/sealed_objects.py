"""Sealed single objects: a message's own object sealed under its data key, streamed.

Packed entries are sealed whole in memory (storage/content/sealing.py): they
are small.  A message kept as its own object (compressed size above the pack
threshold, inbound mail, a reply at a return path, anything under the
"objects" layout) may be tens of megabytes, so it is sealed, uploaded and
opened as a stream of segments (storage/content/sealed_stream.py: the
STREAM construction), memory bounded by one segment, under the message's
own data key (sealing.Keyring.new_data_keys), whose message_keys row is
written in the transaction that writes the message's row.  The same key
chain, the same crypto-shredding: deleting the key row erases the object
wherever its bytes are (under Object Lock, in a replica, in a backup of
the bucket).

The format (version 1):

    MAGIC "\\x89PKO" (4) | VERSION (1)
    | content expiry, microseconds since 1970 UTC, big-endian (8)
    | a sealed stream of the compressed object (sealed_stream.py: its own
      header, then 64 KiB segments, each its ciphertext and 16-byte tag)

Segment i's nonce carries i and a last-segment flag, so segments reordered,
dropped, repeated, or the object cut at a segment boundary do not
authenticate.  The stream's binding (part of every segment's AAD) is a
label, the 13 bytes above, the organisation id and the message id: another
message's object or segment, another tenant's, or an edited expiry does
not authenticate either.  Every such failure is a SealError naming the
object, the message and the segment ("does not authenticate").  The expiry
says which message_keys partition holds the key, as in sealing's format
(an expiry the key row does not have is refused by Keyring.data_key).

The object's length follows from the compressed length (`sealed_length`),
so a PUT's Content-Length is known before a byte is sealed.  The magic
differs from sealing.MAGIC (a packed entry, or a hold's copy of one), from
sealed_stream.MAGIC (a shared part, a spool file) and from a zstd frame's
or a container's first bytes: restore tells them apart, and unsealed
objects written before (or without a master key) read as they always did.
"""

from __future__ import annotations

import io
import struct
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import psycopg

from postkeep.storage.content import sealed_stream, sealing

MAGIC = b"\x89PKO"
VERSION = 1
_HEADER = struct.Struct(">4sBq")
HEADER_LEN = _HEADER.size  # 13
_READ = sealed_stream.SEGMENT  # bytes read from the source at a time
_AAD = b"postkeep-sealed-object-v1\x00"


def is_sealed_object(head: bytes) -> bool:
    """Whether bytes starting with HEAD are a sealed single object."""
    return head[:4] == MAGIC


def sealed_length(length: int, segment: int = sealed_stream.SEGMENT) -> int:
    """The sealed object's length for a compressed object of LENGTH bytes."""
    return HEADER_LEN + sealed_stream.sealed_size(length, segment)


def _binding(header: bytes, org_id: uuid.UUID, message_id: uuid.UUID) -> bytes:
    return _AAD + header + org_id.bytes + message_id.bytes


def _pieces(source: BinaryIO, length: int) -> Iterator[bytes]:
    """LENGTH bytes of SOURCE in pieces; SealError if it ends before."""
    left = length
    while left:
        piece = source.read(min(_READ, left))
        if not piece:
            raise sealing.SealError(f"the object to seal ended {left} bytes short of its"
                                    " recorded length")
        left -= len(piece)
        yield piece


def sealed_chunks(key: sealing.DataKey, source: BinaryIO, length: int,
                  segment: int = sealed_stream.SEGMENT) -> Iterator[bytes]:
    """The sealed object of the LENGTH compressed bytes read from SOURCE,
    under KEY (the message's data key), chunk by chunk as SOURCE is read."""
    header = _HEADER.pack(MAGIC, VERSION, sealing._micros(key.expires_at))
    yield header
    yield from sealed_stream.seal(key.key, _binding(header, key.org_id, key.message_id),
                                  _pieces(source, length), segment)


class _Reader(io.RawIOBase):
    """A readable file over an iterator of byte strings (for a PUT's body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        """Always readable: this is a source."""
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Fill BUFFER from the current chunk, taking the next when it is used up."""
        while not self._pending:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._pending = nxt
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def sealing_reader(key: sealing.DataKey, source: BinaryIO, length: int,
                   segment: int = sealed_stream.SEGMENT) -> tuple[io.BufferedReader, int]:
    """(file, its length): SOURCE's LENGTH compressed bytes sealed under KEY,
    sealed as the file is read (for put_content: memory stays a segment)."""
    return (io.BufferedReader(_Reader(sealed_chunks(key, source, length, segment)),
                              buffer_size=_READ + sealed_stream.TAG),
            sealed_length(length, segment))


def seal_bytes(key: sealing.DataKey, compressed: bytes,
               segment: int = sealed_stream.SEGMENT) -> bytes:
    """COMPRESSED (a small object, in memory) sealed under KEY."""
    return b"".join(sealed_chunks(key, io.BytesIO(compressed), len(compressed), segment))


def own_stream(key: sealing.DataKey | None, source: BinaryIO, length: int
               ) -> tuple[BinaryIO, int]:
    """(file, length) to put as a message's own object: SOURCE's LENGTH bytes
    sealed as they stream under KEY, or as they are without one (the group
    commit's and the spool drain's own objects alike)."""
    return (source, length) if key is None else sealing_reader(key, source, length)


def own_bytes(key: sealing.DataKey | None, compressed: bytes) -> bytes:
    """A small own object's bytes: COMPRESSED sealed under KEY, or as it is."""
    return compressed if key is None else seal_bytes(key, compressed)


def open_object(conn: psycopg.Connection, message_id: uuid.UUID, chunks: Iterator[bytes],
                where: str) -> Iterator[bytes]:
    """The compressed object sealed in CHUNKS (MESSAGE_ID's own object, read
    from WHERE, named in errors), streamed segment by segment.

    The header is read and the key fetched at once: ContentErased (its key
    is gone) or SealError before a byte is returned.  A segment that does
    not authenticate raises SealError when it is reached.
    """
    buf = b""
    for piece in chunks:
        buf += piece
        if len(buf) >= HEADER_LEN:
            break
    what = f"{where}: the sealed object of message {message_id}"
    if len(buf) < HEADER_LEN or not is_sealed_object(buf):
        raise sealing.SealError(f"{what} is truncated in its header or not sealed")
    header = buf[:HEADER_LEN]
    _magic, version, micros = _HEADER.unpack(header)
    if version != VERSION:
        raise sealing.SealError(f"{where}: sealed object format version {version} is not"
                                " supported")
    org, key = sealing.required().data_key(conn, message_id, sealing._expiry(micros))
    rest = _chain(buf[HEADER_LEN:], chunks)
    return sealed_stream.open_stream(key, _binding(header, org, message_id), rest, what)


def _chain(first: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from chunks
