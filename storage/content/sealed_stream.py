"""Sealed streams: content too large to seal in memory, sealed segment by segment.

A packed entry (storage/content/sealing.py) is one AES-256-GCM message in
memory.  Shared large parts (storage/content/parts.py) and outage spool
files (storage/content/spool.py) can be tens of megabytes: they are sealed
as a stream of segments instead, each its own AES-256-GCM message (the
STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, as in Tink's
streaming AEAD), so memory stays one segment whatever the size:

    MAGIC (4) | VERSION (1) | segment size, u32 big-endian (4) | nonce prefix (7)
    | segment 0 | segment 1 | ... | last segment

Each segment is the ciphertext of SEGMENT plaintext bytes (the last one:
0 to SEGMENT bytes) and its 16-byte tag.  Segment i's nonce is the prefix,
i as u32 big-endian, and one byte saying whether it is the last: so
segments cannot be reordered, dropped or repeated, and a stream cut at a
segment boundary does not authenticate (its new last segment was sealed as
not last).  The AAD is the header and the caller's BINDING (what the
stream belongs to: a part's organisation and object key, a spool file's
message id), so a stream moved under another name does not open either.

Whoever holds the key reads the stream; who holds it, and when it is
destroyed, is the caller's business (storage/content/part_keys.py, spool.py).
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from postkeep.storage.content.sealing import SealError

MAGIC = b"\x89PKT"  # like the container's and sealing's: never a zstd frame's first bytes
VERSION = 1
SEGMENT = 64 * 1024
_HEADER = struct.Struct(">4sBI7s")
HEADER_LEN = _HEADER.size  # 16
TAG = 16
_MAX_SEGMENT = 1 << 24  # a header claiming more is damage, not a stream
_AAD = b"postkeep-stream-v1\x00"


def is_sealed(head: bytes) -> bool:
    """Whether bytes starting with HEAD are a sealed stream."""
    return head[:4] == MAGIC


def sealed_size(plain: int, segment: int = SEGMENT) -> int:
    """How many bytes PLAIN bytes take sealed (for a PUT's Content-Length)."""
    segments = max(1, -(-plain // segment))
    return HEADER_LEN + plain + segments * TAG


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= 1 << 32:
        raise SealError("sealed stream: more than 2^32 segments")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def seal(key: bytes, binding: bytes, chunks: Iterable[bytes],
         segment: int = SEGMENT) -> Iterator[bytes]:
    """CHUNKS sealed under KEY (32 bytes) for BINDING, as a stream of byte strings."""
    header = _HEADER.pack(MAGIC, VERSION, segment, os.urandom(7))
    aad = _AAD + header + binding
    aead = AESGCM(key)
    prefix = header[-7:]
    yield header
    pending = bytearray()
    index = 0
    for chunk in chunks:
        pending += chunk
        # Strictly more than a segment: the last segment is only known at the end.
        while len(pending) > segment:
            yield aead.encrypt(_nonce(prefix, index, False), bytes(pending[:segment]), aad)
            del pending[:segment]
            index += 1
    yield aead.encrypt(_nonce(prefix, index, True), bytes(pending), aad)


def open_stream(key: bytes, binding: bytes, chunks: Iterable[bytes],
                where: str) -> Iterator[bytes]:
    """The plaintext of the sealed stream in CHUNKS (read from WHERE, named in
    errors), segment by segment; SealError at the first segment that does not
    authenticate (altered, truncated, reordered, or another's stream).  The
    bytes before it have been yielded: a caller that must not act on a
    partial stream reads it to its end first."""
    it = iter(chunks)
    buf = bytearray()
    for chunk in it:
        buf += chunk
        if len(buf) >= HEADER_LEN:
            break
    if len(buf) < HEADER_LEN or not is_sealed(bytes(buf[:4])):
        raise SealError(f"{where}: not a sealed stream, or truncated in its header"
                        f" ({len(buf)} bytes)")
    _magic, version, segment, prefix = _HEADER.unpack_from(bytes(buf[:HEADER_LEN]))
    if version != VERSION:
        raise SealError(f"{where}: sealed stream version {version} is not supported")
    if not 0 < segment <= _MAX_SEGMENT:
        raise SealError(f"{where}: sealed stream header names a segment of {segment} bytes")
    aad = _AAD + bytes(buf[:HEADER_LEN]) + binding
    del buf[:HEADER_LEN]
    aead = AESGCM(key)
    full = segment + TAG
    index = 0

    def opened(data: bytes, last: bool) -> bytes:
        try:
            return aead.decrypt(_nonce(prefix, index, last), data, aad)
        except InvalidTag:
            raise SealError(f"{where}: sealed segment {index} does not authenticate"
                            " (altered, truncated, or sealed for something else)") from None

    for chunk in itertools.chain([b""], it):  # the bytes read with the header first
        buf += chunk
        while len(buf) > full:  # more follows: not the last segment
            yield opened(bytes(buf[:full]), False)
            del buf[:full]
            index += 1
    if len(buf) < TAG:
        raise SealError(f"{where}: sealed stream truncated ({len(buf)} bytes of its last"
                        " segment)")
    yield opened(bytes(buf), True)
