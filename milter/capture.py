"""Rebuilding the accepted message from milter events, compressed as it streams.

Postfix hands the milter the header fields one by one (name and value, with the
value's leading space kept because the milter negotiates P_HDR_LEADSPC) and
the body in chunks of at most 64 KiB with CRLF line ends.  `MessageCapture`
turns those back into the message's bytes and compresses them on the fly:

- The header block (every header as the client sent it, then postkeep's own
  added headers, then the empty line) becomes one zstd frame.
- The body is fed chunk by chunk into a second zstd frame written to a
  SpooledTemporaryFile, which stays in memory for small messages and spills to
  disk past `spill_bytes`.  Memory therefore stays bounded whatever the size.
- Concatenated zstd frames decompress as one stream, so the stored object is
  header frame + body frame and restores the message byte for byte.
- sha256 and size are of the uncompressed message as stored.  When the milter
  can sign, the DKIM body hash (relaxed) is computed while streaming, and the
  signatures, known only at end of message, go on top of the header block
  (where Postfix inserts them): `finish(prefix=...)` then hashes the final
  bytes by decompressing the body frame once.  A capture that can never be
  signed hashes while streaming instead.
- Storage economics, at end of message (`finish(split_threshold=...,
  dictionary=...)`): a body larger than the threshold is decompressed once
  (into memory up to `spill_bytes`, else a temporary file read through mmap)
  and scanned for large leaf parts (mime_split.py); those are cut out and
  handed on as `SplitPart`s for the committer to store once per
  organisation, and what remains (the skeleton) is compressed.  A small
  message of an organisation that has a dictionary is recompressed with it
  as one frame.  Either way the object becomes a container
  (storage/content/container.py) and sha256/size stay those of the whole message.
  Any failure there falls back to the plain object: splitting is an
  optimisation, never a reason to refuse mail.

Nothing here talks to Postfix, S3 or PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mmap
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from postkeep.milter.dkim import BodyHasher
from postkeep.milter.longlines import SMTP_LINE_LIMIT, LineBreaker, break_lines, longest_line
from postkeep.milter.mime_split import large_parts, top_boundary
from postkeep.storage.content.container import DictionaryRef, Manifest, PartRef, encode_header
from postkeep.storage.content.dictionaries import LoadedDictionary
from postkeep.storage.content.parts import SplitPart

log = logging.getLogger("postkeep.milter")


class CompressorPool:
    """zstd compression contexts, reused from one message to the next.

    A streaming context at level 3 holds a 3.6 MB workspace.  Made afresh for
    every message it is allocated and set up each time, and a 10 MB message
    raised the milter's RSS by ~20 MiB; reused, it costs that once per
    concurrent stream (5 KB capture 0.077 -> 0.059 ms of CPU, a 9.5 MB
    message's peak +6 MiB: bench/milter_rss.sh).  Idle contexts are kept up
    to `keep` (at most 3.6 MB each): after a burst of concurrent sessions the
    RSS stays up to that much higher, which a new context per message avoided.
    """

    def __init__(self, level: int, keep: int = 32) -> None:
        self.level = level
        self.keep = keep
        self._free: list[zstandard.ZstdCompressor] = []
        self._lock = threading.Lock()

    def get(self) -> zstandard.ZstdCompressor:
        with self._lock:
            if self._free:
                return self._free.pop()
        return zstandard.ZstdCompressor(level=self.level)

    def put(self, cctx: zstandard.ZstdCompressor) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(cctx)


_POOLS: dict[int, CompressorPool] = {}
_POOLS_LOCK = threading.Lock()


def compressor_pool(level: int) -> CompressorPool:
    """The process's pool of compression contexts for LEVEL."""
    with _POOLS_LOCK:
        return _POOLS.setdefault(level, CompressorPool(level))


def header_line(name: str | bytes, value: bytes) -> bytes:
    """One header field as it appears in the message, CRLF line ends throughout.

    Postfix passes folded values with bare LF between the lines; the message on
    the wire (and in the store) uses CRLF.
    """
    raw_name = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return raw_name + b":" + value + b"\r\n"


@dataclass
class StoredContent:
    """A finished capture: the object to upload and what describes it."""

    stream: BinaryIO  # the whole object: header frame then body frame
    compressed_size: int
    size: int  # uncompressed message size
    sha256: bytes
    body_size: int
    # A container (storage/content/container.py) until sealed: parts cut out (their
    # keys are known only once stored) and/or the dictionary the skeleton needs.
    parts: list[SplitPart] = field(default_factory=list)
    dictionary: DictionaryRef | None = None
    sealed: bool = True
    _closers: list[Callable[[], None]] = field(default_factory=list)
    # The whole object again from its first byte (the outage spool rereads
    # what a failed upload consumed); None: `stream` itself is seekable.
    reopen: Callable[[], BinaryIO] | None = None

    def seal(self, part_keys: list[str]) -> None:
        """Put the manifest (with the parts' object keys) in front of the skeleton."""
        if self.sealed:
            return
        refs = tuple(PartRef(p.at, p.size, p.sha256.hex(), k)
                     for p, k in zip(self.parts, part_keys, strict=True))
        header = encode_header(Manifest(self.dictionary, refs))
        self.stream = io.BufferedReader(_Concat(header, self.stream))
        self.compressed_size += len(header)
        self.sealed = True

    def close(self) -> None:
        self.stream.close()
        for p in self.parts:
            p.data.release()
        for closer in self._closers:
            closer()


class _Concat(io.RawIOBase):
    """A read-only file over a bytes prefix followed by a file's contents."""

    def __init__(self, prefix: bytes, rest: BinaryIO) -> None:
        self._prefix = memoryview(prefix)
        self._pos = 0
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(buf)
        if self._pos < len(self._prefix):
            part = self._prefix[self._pos : self._pos + n]
            buf[: len(part)] = part
            self._pos += len(part)
            return len(part)
        data = self._rest.read(n)
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._rest.close()
        super().close()


class MessageCapture:
    """Accumulates one message's headers and body, compressing as it goes."""

    def __init__(self, *, level: int = 3, spill_bytes: int = 1 << 20,
                 spool_dir: str | None = None, dkim_body_hash: bool = True,
                 fold_lines: bool = False) -> None:
        self._level = level
        # Lines over 998 octets (longlines.py): with FOLD_LINES the capture
        # holds them broken as Postfix's smtp client will break them, so what
        # is hashed, signed and stored is what is delivered; either way the
        # longest line is known (to refuse such mail instead).
        self._fold = fold_lines
        self._breaker = LineBreaker(SMTP_LINE_LIMIT if fold_lines else 0)
        self.longest_header_line = 0
        self._frame_done = False
        self._spill = spill_bytes
        self._spool_dir = spool_dir
        self._headers: list[bytes] = []
        self._added: list[bytes] = []
        # Closed by discard() or by the uploaded stream: lives across callbacks.
        self._body = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=spill_bytes, dir=spool_dir
        )
        self._pool = compressor_pool(level)
        self._cctx: zstandard.ZstdCompressor | None = self._pool.get()
        self._body_writer: zstandard.ZstdCompressionObj | None = None
        self._hash: hashlib._Hash | None = None
        self._header_block: bytes | None = None
        self.body_size = 0
        # Only when the milter can sign at all: canonicalizing costs ~15 us/KiB.
        self.body_hasher = BodyHasher() if dkim_body_hash else None

    # -- headers -----------------------------------------------------------
    def add_header(self, name: str | bytes, value: bytes) -> None:
        """A header field from the client, in order."""
        if self._header_block is not None:
            raise RuntimeError("header after end of headers")
        line = header_line(name, value)
        self.longest_header_line = max(self.longest_header_line, longest_line(line[:-2]))
        # Postfix's smtp client breaks a header's lines as it breaks body
        # lines (the same smtp_text_out): folded here alike, the stored and
        # signed header is what the next hop receives, with no change asked
        # of Postfix.
        self._headers.append(break_lines(line) if self._fold else line)

    def add_own_header(self, name: str, value: str) -> None:
        """A header postkeep adds (placed after the client's, as Postfix does)."""
        if self._header_block is not None:
            raise RuntimeError("header after end of headers")
        self._added.append(header_line(name, b" " + value.encode("ascii")))

    def end_of_headers(self) -> None:
        """Freeze the header block; the body follows."""
        if self._header_block is None:
            self._header_block = b"".join(self._headers) + b"".join(self._added) + b"\r\n"
            # Signed mail gets its signatures on top at the end, and its sha256
            # is then taken over the final bytes (_rehash): hash while
            # streaming only when this capture will never be signed.
            if self.body_hasher is None:
                self._hash = hashlib.sha256(self._header_block)
            assert self._cctx is not None
            self._body_writer = self._cctx.compressobj()

    @property
    def header_block(self) -> bytes:
        self.end_of_headers()
        assert self._header_block is not None
        return self._header_block

    # -- body --------------------------------------------------------------
    def add_body(self, chunk: bytes) -> None:
        """A body chunk, compressed and hashed on arrival, never kept whole."""
        self.end_of_headers()
        assert self._body_writer is not None
        chunk = self._breaker.feed(chunk)
        self._add_body(chunk)

    def _add_body(self, chunk: bytes) -> None:
        assert self._body_writer is not None
        if self._hash is not None:
            self._hash.update(chunk)
        if self.body_hasher is not None:
            self.body_hasher.update(chunk)
        self.body_size += len(chunk)
        out = self._body_writer.compress(chunk)
        if out:
            self._body.write(out)

    @property
    def longest_body_line(self) -> int:
        """Octets of the longest body line as received (CRLF not counted)."""
        return self._breaker.longest

    @property
    def lines_broken(self) -> bool:
        """Whether folding changed the body (it must then replace Postfix's copy)."""
        return self._breaker.broke

    def folded_body(self) -> BinaryIO:
        """The body as captured (lines broken), to replace Postfix's copy with.

        Closes the body frame if finish() has not yet; the caller closes the
        file (in memory up to spill_bytes, else in the spool directory).
        """
        self.end_body()
        self._body.seek(0)
        out = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=self._spill, dir=self._spool_dir)
        reader = zstandard.ZstdDecompressor().stream_reader(self._body, closefd=False)
        while chunk := reader.read(256 * 1024):
            out.write(chunk)
        self._body.seek(0)
        out.seek(0)
        return out  # type: ignore[return-value]

    def end_body(self) -> None:
        """The end of the body: the breaker's last bytes, then the frame's end."""
        self.end_of_headers()
        if self._frame_done:
            return
        tail = self._breaker.flush()
        if tail:
            self._add_body(tail)
        assert self._body_writer is not None
        self._body.seek(0, io.SEEK_END)
        self._body.write(self._body_writer.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        self._frame_done = True
        self._body_writer = None  # closed: the context may go back to the pool

    # -- finish ------------------------------------------------------------
    def finish(self, prefix: bytes = b"", *, split_threshold: int = 0,
               dictionary: LoadedDictionary | None = None,
               dictionary_max: int = 0) -> StoredContent:
        """Close both frames and return the object to upload.

        PREFIX (complete header lines, e.g. DKIM signatures) goes before the
        header block, as Postfix places headers a milter inserts at index 1.
        Leaf parts larger than SPLIT_THRESHOLD (0: never) are cut out; a
        message (or skeleton) of at most DICTIONARY_MAX bytes is compressed
        with DICTIONARY.
        """
        self.end_body()
        header_block = prefix + self.header_block
        body_compressed = self._body.seek(0, io.SEEK_END)
        self._body.seek(0)
        size = len(header_block) + self.body_size
        # Only a multipart message has parts to cut out: anything else is not
        # decompressed again just to find that out.
        split = 0 < split_threshold < self.body_size and top_boundary(header_block) is not None
        # Small enough for the dictionary: the whole message, or (decided in
        # _rebuild) what remains once large parts are cut out.
        if not split and not (dictionary is not None and size <= dictionary_max):
            dictionary = None
        if split or dictionary is not None:
            try:
                rebuilt = self._rebuild(header_block, prefix, split_threshold if split else 0,
                                        dictionary, dictionary_max)
                if rebuilt is not None:
                    return rebuilt
            except Exception:  # an optimisation only: store the plain object instead
                log.exception("splitting/dictionary compression failed; storing plainly")
            self._body.seek(0)
        if self._hash is not None and not prefix:
            digest = self._hash.digest()
        else:
            digest = self._rehash(header_block)
        header_frame = self._compressor().compress(header_block)
        self._release()
        body = self._body

        def reopen() -> BinaryIO:
            body.seek(0)
            return io.BufferedReader(_Concat(header_frame, body))  # type: ignore[arg-type]

        return StoredContent(
            stream=reopen(),
            compressed_size=len(header_frame) + body_compressed,
            size=len(header_block) + self.body_size,
            sha256=digest,
            body_size=self.body_size,
            reopen=reopen,
        )

    def plain(self, prefix: bytes, sha256: bytes) -> StoredContent:
        """After finish(): the whole message as one plain object (no parts cut
        out, no dictionary), e.g. for the outage spool, which must not depend
        on PostgreSQL to restore it.  SHA256 is the message's (finish() made it)."""
        header_block = prefix + self.header_block
        header_frame = self._compressor().compress(header_block)
        self._release()
        body = self._body
        body_compressed = body.seek(0, io.SEEK_END)

        def reopen() -> BinaryIO:
            body.seek(0)
            return io.BufferedReader(_Concat(header_frame, body))  # type: ignore[arg-type]

        return StoredContent(stream=reopen(), compressed_size=len(header_frame) + body_compressed,
                             size=len(header_block) + self.body_size, sha256=sha256,
                             body_size=self.body_size, reopen=reopen)

    def _rebuild(self, header_block: bytes, prefix: bytes, threshold: int,
                 dictionary: LoadedDictionary | None, dictionary_max: int
                 ) -> StoredContent | None:
        """The container object, or None when there is nothing to cut out and no
        dictionary to use (the plain object is then what finish() makes)."""
        body, closers = self._decompressed_body()
        try:
            spans = large_parts(header_block, body, threshold) if threshold else []
            if not spans and dictionary is None:
                for closer in closers:
                    closer()
                return None
            if self._hash is not None and not prefix:
                digest = self._hash.digest()
            else:
                h = hashlib.sha256(header_block)
                h.update(body)
                digest = h.digest()
            skeleton_size = len(header_block) + self.body_size - sum(sp.size for sp in spans)
            if dictionary is None or skeleton_size > dictionary_max:
                dictionary = None
                cctx = self._compressor()
            else:
                cctx = zstandard.ZstdCompressor(level=self._level, dict_data=dictionary.data)
            out = tempfile.SpooledTemporaryFile(  # noqa: SIM115
                max_size=self._spill, dir=self._spool_dir)
            cobj = cctx.compressobj()
            out.write(cobj.compress(header_block))
            view = memoryview(body)
            parts: list[SplitPart] = []
            prev, at = 0, len(header_block)  # position in the body, in the skeleton
            for sp in spans:
                out.write(cobj.compress(view[prev : sp.start]))
                at += sp.start - prev
                data = view[sp.start : sp.end]
                parts.append(SplitPart(at, data, hashlib.sha256(data).digest(), sp.filename,
                                       sp.content_type))
                prev = sp.end
            out.write(cobj.compress(view[prev:]))
            out.write(cobj.flush())
            compressed = out.tell()
            out.seek(0)
            view.release()
            # self._body (the plain compressed body) stays until discard():
            # plain() needs it if the outage spool must keep this message.
            content = StoredContent(
                stream=out,  # type: ignore[arg-type]
                compressed_size=compressed,
                size=len(header_block) + self.body_size,
                sha256=digest,
                body_size=self.body_size,
                parts=parts,
                dictionary=dictionary.ref if dictionary is not None else None,
                sealed=False,
                _closers=closers,
            )
        except BaseException:
            for closer in closers:
                closer()
            raise
        if not parts:
            content.seal([])
        self._release()
        return content

    def _decompressed_body(self) -> tuple[bytes | mmap.mmap, list[Callable[[], None]]]:
        """The body, decompressed: bytes up to spill_bytes, else an mmap'ed
        temporary file (closers release it)."""
        reader = zstandard.ZstdDecompressor().stream_reader(self._body, closefd=False)
        if self.body_size <= self._spill:
            data = reader.readall()
            self._body.seek(0)
            return data, []
        tmp = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115
        while chunk := reader.read(1 << 20):
            tmp.write(chunk)
        tmp.flush()
        self._body.seek(0)
        mm = mmap.mmap(tmp.fileno(), 0, access=mmap.ACCESS_READ)

        def close() -> None:
            # A view still alive keeps the mapping; it goes when the view does.
            with contextlib.suppress(BufferError):
                mm.close()
            tmp.close()

        return mm, [close]

    def _rehash(self, header_block: bytes) -> bytes:
        """sha256 of HEADER_BLOCK + body, decompressing the body frame once."""
        digest = hashlib.sha256(header_block)
        reader = zstandard.ZstdDecompressor().stream_reader(self._body, closefd=False)
        while chunk := reader.read(256 * 1024):
            digest.update(chunk)
        self._body.seek(0)
        return digest.digest()

    def _compressor(self) -> zstandard.ZstdCompressor:
        """This capture's context, or (after finish released it) a pooled one."""
        if self._cctx is None:
            self._cctx = self._pool.get()
        return self._cctx

    def _release(self) -> None:
        """Back to the pool, once no frame of ours is open on it."""
        if self._cctx is not None:
            self._body_writer = None
            self._pool.put(self._cctx)
            self._cctx = None

    def discard(self) -> None:
        """Drop everything (abort, refusal, or after upload)."""
        if self._body_writer is None:
            self._release()
        else:  # a frame is still open on it: let it go with the message
            self._body_writer = None
            self._cctx = None
        self._body.close()


def restore(chunks: list[bytes] | BinaryIO) -> bytes:
    """Decompress a stored object (all its frames) back to message bytes."""
    data = b"".join(chunks) if isinstance(chunks, list) else chunks.read()
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return reader.read()

