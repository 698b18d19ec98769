"""Unit tests of the byte-exact, streaming capture (no services)."""

from __future__ import annotations

import hashlib
import os

import pytest
import zstandard

from postkeep.milter.capture import MessageCapture, header_line, restore

pytestmark = pytest.mark.unit


def _capture(headers: list[tuple[str, bytes]], body_chunks: list[bytes],
             spill: int = 1 << 20) -> tuple[bytes, MessageCapture, object]:
    cap = MessageCapture(spill_bytes=spill)
    cap.add_own_header("X-Postkeep-Id", "0190-test")
    for name, value in headers:
        cap.add_header(name, value)
    cap.end_of_headers()
    for chunk in body_chunks:
        cap.add_body(chunk)
    content = cap.finish()
    blob = content.stream.read()
    assert len(blob) == content.compressed_size
    return blob, cap, content


def test_header_line_keeps_leading_space_and_folding() -> None:
    assert header_line("Subject", b" hi") == b"Subject: hi\r\n"
    assert header_line("Subject", b"hi") == b"Subject:hi\r\n"
    assert header_line("To", b" a@x,\n\tb@y") == b"To: a@x,\r\n\tb@y\r\n"
    assert header_line("To", b" a@x,\r\n b@y") == b"To: a@x,\r\n b@y\r\n"


def test_restores_byte_for_byte_with_own_header_last() -> None:
    body = [b"line one\r\n", b"\xe9t\xe9 8-bit\r\n", b"..dot\r\n"]
    blob, _, content = _capture([("From", b" a@x.example"), ("Subject", b"  two spaces")], body)
    expected = (b"From: a@x.example\r\nSubject:  two spaces\r\nX-Postkeep-Id: 0190-test\r\n"
                b"\r\n" + b"".join(body))
    assert restore([blob]) == expected
    assert content.size == len(expected)  # type: ignore[attr-defined]
    assert content.sha256 == hashlib.sha256(expected).digest()  # type: ignore[attr-defined]


def test_two_frames_header_then_body() -> None:
    blob, _, _ = _capture([("From", b" a@x")], [b"body\r\n"])
    # The object is two concatenated frames: a plain single-frame decoder
    # would stop after the headers, a frame-aware one reads both.
    first = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    assert first == b"From: a@x\r\nX-Postkeep-Id: 0190-test\r\n\r\n"


def test_empty_body_and_no_headers() -> None:
    blob, _, content = _capture([], [])
    assert restore([blob]) == b"X-Postkeep-Id: 0190-test\r\n\r\n"
    assert content.body_size == 0  # type: ignore[attr-defined]


def test_large_body_spills_to_disk_and_restores() -> None:
    chunk = os.urandom(65535)
    chunks = [chunk] * 40  # ~2.6 MB, incompressible
    blob, cap, _ = _capture([("From", b" a@x")], chunks, spill=64 * 1024)
    assert cap._body._rolled  # type: ignore[attr-defined]  # spilled to a real file
    assert restore([blob]).endswith(chunk * 40)


def test_header_after_body_is_refused() -> None:
    cap = MessageCapture()
    cap.add_body(b"x")
    with pytest.raises(RuntimeError):
        cap.add_header("From", b" late")


def test_both_sha256_paths_hash_the_stored_bytes() -> None:
    """Streaming (never signed) and re-read (signatures on top) agree with the bytes."""
    for dkim, prefix in ((False, b""), (True, b""), (True, b"DKIM-Signature: v=1\r\n")):
        cap = MessageCapture(dkim_body_hash=dkim)
        cap.add_header("From", b" a@x")
        cap.add_body(b"line\r\n" * 5000)
        content = cap.finish(prefix=prefix)
        stored = restore([content.stream.read()])
        assert stored.startswith(prefix + b"From: a@x\r\n")
        assert content.sha256 == hashlib.sha256(stored).digest()
        assert content.size == len(stored)


def test_compression_contexts_are_reused_and_a_half_written_frame_is_not() -> None:
    from postkeep.milter.capture import CompressorPool

    pool = CompressorPool(level=3, keep=4)
    cap = MessageCapture(level=3)
    cap._pool = pool  # a private pool, so other tests' captures do not interfere
    assert cap._cctx is not None
    first = cap._cctx
    cap.add_header("Subject", b" one")
    cap.add_body(b"body\r\n" * 1000)
    content = cap.finish()
    assert pool._free == [first]  # released at finish, the object still complete
    assert restore([content.stream.read()]).endswith(b"body\r\n" * 1000)
    cap.discard()
    assert pool._free == [first]  # not twice
    # the next capture takes it; one aborted mid-body does not give it back
    again = MessageCapture(level=3)
    again._pool = pool
    again._cctx = pool.get()
    assert again._cctx is first and pool._free == []
    again.add_header("Subject", b" two")
    again.add_body(b"half a message\r\n")
    again.discard()
    assert pool._free == []
    # and a reused context makes the same bytes as a fresh one
    a, b = MessageCapture(level=3), MessageCapture(level=3)
    for c in (a, b):
        c.add_header("Subject", b" same")
        c.add_body(b"x" * 70000 + b"\r\n")
    assert a.finish().stream.read() == b.finish().stream.read()
