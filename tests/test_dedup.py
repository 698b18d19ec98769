"""Unit tests of part splitting, the container format and restore (no services).

Captures are split exactly as the milter splits them, the parts are put in a
MemoryObjectStore the way the committer stores them, and restore.restore must
give back the message byte for byte, however malformed its MIME.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import uuid

import pytest
import zstandard
from support import campaign

from postkeep.milter.capture import MessageCapture, StoredContent
from postkeep.milter.mime_split import large_parts
from postkeep.storage.content import container, restore
from postkeep.storage.content.container import DictionaryRef
from postkeep.storage.content.dictionaries import LoadedDictionary, train
from postkeep.storage.content.objects import MemoryObjectStore
from postkeep.storage.content.parts import compress_part
from postkeep.storage.metadata.db import BackendError

pytestmark = pytest.mark.unit

T = 4096  # split threshold for these tests


def _capture(message: bytes, *, threshold: int = T, spill: int = 1 << 20,
             dictionary: LoadedDictionary | None = None, dict_max: int = 0,
             prefix: bytes = b"", chunk: int = 65535) -> StoredContent:
    """MESSAGE through MessageCapture as the milter feeds it (headers, then body chunks)."""
    head, sep, body = message.partition(b"\r\n\r\n")
    assert sep, "test message needs a header/body separator"
    cap = MessageCapture(spill_bytes=spill, dkim_body_hash=bool(prefix))
    for line in _header_fields(head + b"\r\n"):
        name, _, value = line.partition(b":")
        cap.add_header(name, value.removesuffix(b"\r\n").replace(b"\r\n", b"\n"))
    cap.end_of_headers()
    for i in range(0, len(body), chunk):
        cap.add_body(body[i : i + chunk])
    return cap.finish(prefix, split_threshold=threshold, dictionary=dictionary,
                      dictionary_max=dict_max)


def _header_fields(block: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in block.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def _store(c: StoredContent, store: MemoryObjectStore, org: str = "org-a") -> str:
    """Store C's parts (content-addressed) and the sealed object; return its key."""
    keys = []
    for p in c.parts:
        key = f"parts/{org}/{p.sha256.hex()}/0.zst"
        if key not in store.objects:
            blob = compress_part(p.data)
            store.objects[key] = blob.read()
        keys.append(key)
    c.seal(keys)
    data = c.stream.read()
    assert len(data) == c.compressed_size
    key = f"messages/{org}/{hashlib.sha256(data).hexdigest()}.eml.zst"
    store.objects[key] = data
    c.close()
    return key


def _roundtrip(message: bytes, **kw: object) -> tuple[StoredContent, bytes, MemoryObjectStore]:
    store = MemoryObjectStore()
    c = _capture(message, **kw)  # type: ignore[arg-type]
    nparts = len(c.parts)
    key = _store(c, store)
    restored = b"".join(restore.restore(store, key, chunk_size=1000))
    assert restored == message
    assert c.sha256 == hashlib.sha256(message).digest()
    assert c.size == len(message)
    c.parts = c.parts[:nparts]
    return c, store.objects[key], store


def _b64(n: int, seed: int = 1) -> bytes:
    return base64.encodebytes(random.Random(seed).randbytes(n)).replace(b"\n", b"\r\n")


HEAD = b"From: a@org.example\r\nTo: b@x.example\r\nSubject: s\r\nMIME-Version: 1.0\r\n"


def _mixed(*parts: bytes, boundary: bytes = b"BB", close: bool = True,
           preamble: bytes = b"") -> bytes:
    out = HEAD + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n' + preamble
    for p in parts:
        out += b"--" + boundary + b"\r\n" + p
    return out + (b"--" + boundary + b"--\r\nepilogue\r\n" if close else b"")


def _att(data: bytes, name: bytes = b"a.pdf") -> bytes:
    return (b"Content-Type: application/pdf; name=\"" + name + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + data)


# --- the scanner ----------------------------------------------------------------


def test_scanner_finds_large_leaf_parts_in_nested_multiparts() -> None:
    big = _b64(20_000)
    inner = (b'Content-Type: multipart/related; boundary="in"\r\n\r\n--in\r\n'
             b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n--in\r\n" + _att(big, b"img.png")
             + b"--in--\r\n")
    msg = _mixed(b"Content-Type: text/plain\r\n\r\nhello\r\n", inner, _att(big))
    head, _, body = msg.partition(b"\r\n\r\n")
    spans = large_parts(head + b"\r\n\r\n", body, T)
    # the line break before a delimiter belongs to the delimiter (RFC 2046)
    assert [body[s.start : s.end] for s in spans] == [big[:-2], big[:-2]]
    assert [s.filename for s in spans] == ["img.png", "a.pdf"]
    assert spans[0].content_type == "application/pdf"


@pytest.mark.parametrize("body", [
    b"", b"--", b"--BB", b"--BB--", b"\r\n--BB\r\n", os.urandom(50_000),
    b"--BB\r\n" * 5000, b"--BB\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n" * 200,
])
def test_scanner_never_raises_on_garbage(body: bytes) -> None:
    head = HEAD + b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n"
    for span in large_parts(head, body, 10):
        assert 0 <= span.start <= span.end <= len(body)


def test_longer_boundary_is_not_a_delimiter() -> None:
    big = _b64(10_000)
    msg = _mixed(_att(b"--BBX\r\n" + big))
    head, _, body = msg.partition(b"\r\n\r\n")
    spans = large_parts(head + b"\r\n\r\n", body, T)
    assert len(spans) == 1 and body[spans[0].start : spans[0].end] == b"--BBX\r\n" + big[:-2]


# --- capture, split, restore -------------------------------------------------------


def test_large_attachment_is_split_and_restored_byte_for_byte() -> None:
    pdf = campaign.fake_pdf(60_000)
    msg = campaign.message(3, "shop.example", pdf=pdf)
    c, obj, _ = _roundtrip(msg)
    assert obj.startswith(container.MAGIC)
    assert len(c.parts) == 1
    assert c.parts[0].filename == "winter-catalogue.pdf"
    assert c.parts[0].content_type == "application/pdf"
    assert c.parts[0].size >= len(pdf) * 4 // 3
    # the message object holds the rest only: far smaller than the PDF
    assert len(obj) < 4000


def test_same_part_in_two_messages_is_one_object() -> None:
    pdf = campaign.fake_pdf(50_000)
    store = MemoryObjectStore()
    keys = [_store(_capture(campaign.message(i, "shop.example", pdf=pdf)), store)
            for i in range(2)]
    parts = [k for k in store.objects if k.startswith("parts/")]
    assert len(parts) == 1
    for i, key in enumerate(keys):
        assert b"".join(restore.restore(store, key)) == campaign.message(i, "shop.example",
                                                                         pdf=pdf)


@pytest.mark.parametrize("case", [
    "missing-close", "boundary-in-preamble", "garbage-base64", "part-at-end",
    "lf-only", "no-part-headers", "two-large", "deep-nesting",
])
def test_malformed_mime_restores_byte_for_byte(case: str) -> None:
    big = _b64(9000)
    if case == "missing-close":
        msg = _mixed(b"Content-Type: text/plain\r\n\r\nhi\r\n", _att(big), close=False)
    elif case == "boundary-in-preamble":
        msg = _mixed(_att(big), preamble=b"see --BB inline and\r\n--BB-not\r\n")
    elif case == "garbage-base64":
        msg = _mixed(_att(big[:5000] + b"!!\x00\xff garbage ==\r\n" + big[5000:]))
    elif case == "part-at-end":
        msg = _mixed(_att(big), close=False).removesuffix(b"\r\n")
    elif case == "lf-only":
        head, _, body = _mixed(_att(big)).partition(b"\r\n\r\n")
        msg = head + b"\r\n\r\n" + body.replace(b"\r\n", b"\n")
    elif case == "no-part-headers":
        msg = _mixed(b"\r\n" + big)
    elif case == "two-large":
        msg = _mixed(_att(big), b"Content-Type: text/plain\r\n\r\nmid\r\n", _att(_b64(7000, 2)))
    else:
        inner = _att(big)
        for depth in range(40):
            b = f"d{depth}".encode()
            inner = (b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n--' + b
                     + b"\r\n" + inner + b"--" + b + b"--\r\n")
        msg = _mixed(inner)
    # Exactly the bytes each case must split out (none: deep-nesting is past
    # MAX_DEPTH), so a parser that silently stops splitting fails here too.
    # The line break before a delimiter belongs to the delimiter; a part with
    # no closing delimiter runs to the end of the message.
    expected = {
        "missing-close": [big],
        "boundary-in-preamble": [big[:-2]],
        "garbage-base64": [big[:5000] + b"!!\x00\xff garbage ==\r\n" + big[5000:-2]],
        "part-at-end": [big[:-2]],
        "lf-only": [big.replace(b"\r\n", b"\n")[:-1]],
        "no-part-headers": [big[:-2]],
        "two-large": [big[:-2], _b64(7000, 2)[:-2]],
        "deep-nesting": [],
    }[case]
    c, _, _ = _roundtrip(msg)
    assert [(p.size, p.sha256) for p in c.parts] == [
        (len(e), hashlib.sha256(e).digest()) for e in expected], case


def test_small_messages_and_plain_bodies_stay_plain() -> None:
    msg = HEAD + b"\r\n" + b"x" * 50_000 + b"\r\n"  # large but not multipart
    c, obj, _ = _roundtrip(msg)
    assert not c.parts
    assert not obj.startswith(container.MAGIC)
    assert zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(obj), read_across_frames=True).read() == msg


def test_spilled_body_is_split_through_mmap() -> None:
    msg = _mixed(_att(_b64(300_000)), _att(_b64(200_000, 3)))
    c, _, _ = _roundtrip(msg, spill=64 * 1024)
    assert len(c.parts) == 2


def test_signed_capture_hashes_the_final_bytes() -> None:
    prefix = b"DKIM-Signature: v=1; a=rsa-sha256; b=abc\r\n"
    msg = _mixed(_att(_b64(9000)))
    store = MemoryObjectStore()
    c = _capture(msg, prefix=prefix)
    key = _store(c, store)
    assert b"".join(restore.restore(store, key)) == prefix + msg
    assert c.sha256 == hashlib.sha256(prefix + msg).digest()


def test_missing_part_is_an_error_naming_it() -> None:
    store = MemoryObjectStore()
    key = _store(_capture(_mixed(_att(_b64(9000)))), store)
    part = next(k for k in store.objects if k.startswith("parts/"))
    del store.objects[part]
    with pytest.raises(BackendError, match=part):
        b"".join(restore.restore(store, key))


# --- dictionaries ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dictionary() -> tuple[LoadedDictionary, bytes]:
    samples = [campaign.message(i, "shop.example") for i in range(300)]
    d = train(samples, 32 * 1024)
    raw = d.as_bytes()
    loaded = zstandard.ZstdCompressionDict(raw)
    loaded.precompute_compress(level=3)
    return LoadedDictionary(DictionaryRef("org-a", 1), loaded), raw


def test_dictionary_compressed_message_restores_and_is_several_times_smaller(
        dictionary: tuple[LoadedDictionary, bytes]) -> None:
    loaded, raw = dictionary
    msg = campaign.message(5000, "shop.example")
    plain = _capture(msg)
    plain_size = plain.compressed_size
    plain.close()
    store = MemoryObjectStore()
    store.objects[loaded.ref.key] = raw
    c = _capture(msg, dictionary=loaded, dict_max=64 * 1024)
    assert c.dictionary == loaded.ref
    key = _store(c, store)
    assert b"".join(restore.restore(store, key)) == msg
    assert c.compressed_size * 3 < plain_size, (c.compressed_size, plain_size)


def test_dictionary_not_used_above_the_size_limit(
        dictionary: tuple[LoadedDictionary, bytes]) -> None:
    msg = campaign.message(1, "shop.example")
    c = _capture(msg, dictionary=dictionary[0], dict_max=len(msg) - 1)
    assert c.dictionary is None and not c.stream.read().startswith(container.MAGIC)


def test_split_message_skeleton_uses_the_dictionary(
        dictionary: tuple[LoadedDictionary, bytes]) -> None:
    loaded, raw = dictionary
    pdf = campaign.fake_pdf(100_000)
    msg = campaign.message(7, "shop.example", pdf=pdf)
    assert len(msg) > 64 * 1024  # the whole message is too large for the dictionary ...
    store = MemoryObjectStore()
    store.objects[loaded.ref.key] = raw
    c = _capture(msg, dictionary=loaded, dict_max=64 * 1024)  # ... what remains is not
    assert c.dictionary == loaded.ref and len(c.parts) == 1
    key = _store(c, store)
    assert b"".join(restore.restore(store, key)) == msg


def test_missing_dictionary_is_an_error_naming_it(
        dictionary: tuple[LoadedDictionary, bytes]) -> None:
    loaded = LoadedDictionary(DictionaryRef("org-missing", 4), dictionary[0].data)
    store = MemoryObjectStore()
    key = _store(_capture(campaign.message(2, "shop.example"), dictionary=loaded,
                          dict_max=1 << 20), store, "org-missing")
    with pytest.raises(BackendError) as err:
        b"".join(restore.restore(store, key))
    assert "dictionary v4 of organisation org-missing" in str(err.value)
    assert "dictionaries/org-missing/4.zdict" in str(err.value)


# --- the container header ---------------------------------------------------------


def test_container_header_survives_any_chunking() -> None:
    m = container.Manifest(DictionaryRef("o", 2),
                           (container.PartRef(10, 5, "ab" * 32, "parts/o/x/1.zst"),))
    data = container.encode_header(m) + b"skeleton"
    for step in (1, 2, 3, 7, 100):
        got, rest = container.read_header(data[i : i + step] for i in range(0, len(data), step))
        assert got == m and b"".join(rest) == b"skeleton"
    got, rest = container.read_header([b"\x28\xb5\x2f\xfd plain"])
    assert got is None and b"".join(rest) == b"\x28\xb5\x2f\xfd plain"


def test_unknown_container_version_is_refused() -> None:
    bad = container.MAGIC + bytes([9]) + (2).to_bytes(4, "big") + b"{}"
    store = MemoryObjectStore()
    store.objects["k"] = bad
    with pytest.raises(BackendError, match="version 9"):
        b"".join(restore.restore(store, "k"))


class _FlakyDb:
    """Database stand-in: answers the current version, or fails like a dead server."""

    def __init__(self) -> None:
        self.version: int | None = 1
        self.down = False
        self.queries = 0

    def run(self, work: object) -> object:
        self.queries += 1
        if self.down:
            raise BackendError("postgres", "connection refused")
        return None if self.version is None else (self.version,)


def test_dictionary_cache_refreshes_and_keeps_what_it_has_through_an_outage(
        dictionary: tuple[LoadedDictionary, bytes]) -> None:
    from postkeep.storage.content.dictionaries import DictionaryCache

    _, raw = dictionary
    org = uuid.uuid4()
    store = MemoryObjectStore()
    for v in (1, 2):
        store.objects[DictionaryRef(str(org), v).key] = raw
    db = _FlakyDb()
    clock = [0.0]
    cache = DictionaryCache(db, store, refresh=60, clock=lambda: clock[0])  # type: ignore[arg-type]
    first = cache.get(org)
    assert first is not None and first.ref.version == 1
    assert cache.get(org) is first and db.queries == 1  # cached within the refresh period
    db.version, clock[0] = 2, 61.0
    second = cache.get(org)
    assert second is not None and second.ref.version == 2
    db.down, clock[0] = True, 200.0
    assert cache.get(org) is second  # PostgreSQL down: keep using what was loaded
    db.down, db.version, clock[0] = False, None, 300.0
    assert cache.get(org) is None  # no current dictionary any more: compress without


def test_plain_object_of_a_split_message_restores_the_whole_message() -> None:
    """The outage spool keeps a container message as one plain object: it must
    restore byte for byte without PostgreSQL (no parts, no dictionary)."""
    msg = campaign.message(4, "shop.example", pdf=campaign.fake_pdf(60_000, seed=9))
    head, _, body = msg.partition(b"\r\n\r\n")
    cap = MessageCapture(spill_bytes=1 << 20)
    for line in _header_fields(head + b"\r\n"):
        name, _, value = line.partition(b":")
        cap.add_header(name, value.removesuffix(b"\r\n").replace(b"\r\n", b"\n"))
    cap.end_of_headers()
    cap.add_body(body)
    split = cap.finish(b"", split_threshold=T)
    assert split.parts, "the message should have been split"
    plain = cap.plain(b"", split.sha256)
    data = plain.stream.read()
    assert not data.startswith(container.MAGIC)
    assert len(data) == plain.compressed_size
    restored = b"".join(restore.decompress_stream([data]))
    assert restored == msg
    assert hashlib.sha256(restored).digest() == split.sha256 == plain.sha256
    assert plain.reopen is not None and plain.reopen().read() == data
    cap.discard()
