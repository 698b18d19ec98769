"""Restoring captured content: the stored object back to the exact bytes.

A stored object is one or more concatenated zstd frames (the capture path may
close a frame at the header/body boundary or on spill to disk), so decoding
must continue across frame boundaries (`read_across_frames=True`); a reader
that stops after the first frame silently truncates the message.

Everything streams: the object arrives in chunks from the `ObjectStore`, is
exposed to zstandard as a read-only file, and leaves in chunks, so memory
stays bounded by the chunk size whatever the message size.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import zstandard

from postkeep.storage.db import BackendError
from postkeep.storage.objects import ObjectStore

CHUNK_SIZE = 256 * 1024


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (no seeking)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        """Always readable: this is a source."""
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Fill BUFFER from the pending chunk, pulling the next one when empty."""
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def decompress_stream(chunks: Iterable[bytes], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The decompressed bytes of concatenated zstd frames, chunk by chunk.

    Raises BackendError('s3') if the data is not valid zstd or is truncated.
    """
    source = io.BufferedReader(_ChunkReader(chunks), buffer_size=chunk_size)
    reader = zstandard.ZstdDecompressor().stream_reader(
        source, read_size=chunk_size, read_across_frames=True, closefd=False
    )
    try:
        with reader:
            while block := reader.read(chunk_size):
                yield block
    except zstandard.ZstdError as exc:
        raise BackendError("s3", f"corrupt zstd content: {exc}") from exc


def restore(store: ObjectStore, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The original message bytes of the object at KEY, streamed."""
    return decompress_stream(store.get(key), chunk_size)
