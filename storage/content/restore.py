"""Restoring captured content: the stored object back to the exact bytes.

A stored object is one or more concatenated zstd frames (the capture path may
close a frame at the header/body boundary or on spill to disk), so decoding
must continue across frame boundaries (`read_across_frames=True`); a reader
that stops after the first frame silently truncates the message.

Everything streams: the object arrives in chunks from the `ObjectStore`, is
exposed to zstandard as a read-only file, and leaves in chunks, so memory
stays bounded by the chunk size whatever the message size.

A container object (storage/content/container.py) is a manifest and a skeleton: the
skeleton is decompressed (with the zstd dictionary version the manifest
names, fetched from the store) and each split-out part object is spliced
back in at its offset.  A missing dictionary or part is a BackendError that
names it.  Sealed parts and dictionaries (storage/content/part_keys.py,
dictionaries.py) are opened with their keys, read over the connection
`restore` is given; a part whose key is gone raises PartErased.

A message's sealed content is opened first with its data key: a packed
entry or a hold's copy of one whole (storage/content/sealing.py: they are
small), a sealed single object segment by segment as it arrives
(storage/content/sealed_objects.py).  Without the key: ContentErased.
"""

from __future__ import annotations

import io
import itertools
import uuid
from collections.abc import Iterable, Iterator

import psycopg
import zstandard

from postkeep.storage.content import container, sealed_objects, sealing
from postkeep.storage.content.objects import ObjectStore
from postkeep.storage.content.packs import Location, is_pack_key, open_entry
from postkeep.storage.content.part_keys import open_part
from postkeep.storage.metadata.db import BackendError

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


def decompress_stream(chunks: Iterable[bytes], chunk_size: int = CHUNK_SIZE,
                      dictionary: zstandard.ZstdCompressionDict | None = None
                      ) -> Iterator[bytes]:
    """The decompressed bytes of concatenated zstd frames, chunk by chunk.

    Raises BackendError('s3') if the data is not valid zstd or is truncated.
    """
    source = io.BufferedReader(_ChunkReader(chunks), buffer_size=chunk_size)
    dctx = (zstandard.ZstdDecompressor(dict_data=dictionary) if dictionary is not None
            else zstandard.ZstdDecompressor())
    reader = dctx.stream_reader(
        source, read_size=chunk_size, read_across_frames=True, closefd=False
    )
    try:
        with reader:
            while block := reader.read(chunk_size):
                yield block
    except zstandard.ZstdError as exc:
        raise BackendError("s3", f"corrupt zstd content: {exc}") from exc


def restore(store: ObjectStore, key: str, chunk_size: int = CHUNK_SIZE,
            where: Location | None = None, conn: psycopg.Connection | None = None,
            message_id: uuid.UUID | None = None) -> Iterator[bytes]:
    """The original message bytes of the object at KEY, streamed.

    WHERE: the message is an entry in the pack KEY (storage/content/packs.py):
    one ranged GET of its bytes, then the same as a message's own object.
    Sealed content (an entry, or a held copy of one) is opened with
    MESSAGE_ID's data key read over CONN (storage/content/sealing.py).
    """
    if where is None and is_pack_key(key):
        # Never the whole pack: its frames would decompress to other messages.
        raise BackendError("s3", f"{key} is a pack and the message has no entry in it"
                                 " (erased, or the index row is missing)")
    if where is not None:
        chunks = open_entry(where.format, key,
                            store.get_range(where.pack_key, where.offset, where.length),
                            conn, message_id)
    else:
        chunks = _unseal_object(key, store.get(key), conn, message_id)
    try:
        manifest, rest = container.read_header(chunks)
    except container.ContainerError as exc:
        raise BackendError("s3", f"{key}: {exc}") from exc
    if manifest is None:
        return decompress_stream(rest, chunk_size)
    return _assemble(store, key, manifest, rest, chunk_size, conn)


def _unseal_object(key: str, chunks: Iterator[bytes], conn: psycopg.Connection | None,
                   message_id: uuid.UUID | None) -> Iterator[bytes]:
    """An own object's chunks, opened if it is sealed: segment by segment if
    it is a sealed single object (storage/content/sealed_objects.py), whole
    if it is a held copy of a sealed entry (storage/lifecycle/holds.py
    copies the range as it is)."""
    first = b""
    for piece in chunks:  # enough to see the magic (4 bytes)
        first += piece
        if len(first) >= 4:
            break
    whole = sealed_objects.is_sealed_object(first)
    if not whole and not sealing.is_sealed(first):
        return itertools.chain([first], chunks)
    if conn is None or message_id is None:
        raise BackendError("s3", f"{key}: sealed content is read with its message's key"
                                 " (restore_message)")
    if whole:
        return sealed_objects.open_object(conn, message_id, itertools.chain([first], chunks),
                                          key)
    data = first + b"".join(chunks)
    return iter([sealing.open_sealed(conn, message_id, data, key)])


def restore_message(conn: psycopg.Connection, store: ObjectStore, message_id: uuid.UUID,
                    key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The original bytes of message MESSAGE_ID whose row names KEY: from its
    pack if the index has it there (one ranged GET), else from its own object."""
    from postkeep.storage.content.packs import location

    return restore(store, key, chunk_size, location(conn, message_id), conn, message_id)


def restore_object(conn: psycopg.Connection, store: ObjectStore, key: str,
                   chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The original bytes of the own object at KEY, which a row names by key
    alone (an unmatched report): a message's object is named after its id
    (objects.message_key), which opens it if it is sealed."""
    name = key.rsplit("/", 1)[-1].split(".", 1)[0]
    try:
        message_id: uuid.UUID | None = uuid.UUID(name)
    except ValueError:
        message_id = None
    return restore(store, key, chunk_size, None, conn, message_id)


def _assemble(store: ObjectStore, key: str, manifest: container.Manifest,
              skeleton: Iterator[bytes], chunk_size: int,
              conn: psycopg.Connection | None = None) -> Iterator[bytes]:
    """The skeleton's bytes with every part spliced back in at its offset
    (sealed parts and dictionaries opened with their keys, read over CONN)."""
    from postkeep.storage.content.dictionaries import for_restore

    d = for_restore(store, manifest.dictionary, key, conn) if manifest.dictionary else None
    pos = 0  # bytes of skeleton emitted
    pending = list(manifest.parts)
    for block in decompress_stream(skeleton, chunk_size, d):
        while pending and pending[0].at <= pos + len(block):
            part = pending.pop(0)
            cut = part.at - pos
            if cut:
                yield block[:cut]
            block, pos = block[cut:], part.at
            yield from _part(store, key, part, chunk_size, conn)
        if block:
            yield block
            pos += len(block)
    for part in pending:  # parts at the very end of the message
        if part.at != pos:
            raise BackendError("s3", f"{key}: skeleton ends at {pos}, before the part"
                               f" at {part.at}")
        yield from _part(store, key, part, chunk_size, conn)


def _part(store: ObjectStore, key: str, part: container.PartRef, chunk_size: int,
          conn: psycopg.Connection | None = None) -> Iterator[bytes]:
    """One part's bytes; BackendError naming it if missing or the wrong size.
    A sealed part (storage/content/part_keys.py) is opened with its key; one
    whose key is gone raises PartErased."""
    n = 0
    try:
        for block in decompress_stream(open_part(conn, part.key, store.get(part.key)),
                                       chunk_size):
            n += len(block)
            yield block
    except sealing.SealError:
        raise  # erased or altered: says so itself, naming the part
    except BackendError as exc:
        raise BackendError("s3", f"{key}: part {part.key} cannot be read: {exc.reason}"
                           ) from exc
    if n != part.size:
        raise BackendError("s3", f"{key}: part {part.key} has {n} bytes, expected {part.size}")
