"""Stored formats against golden files: bytes earlier postkeep versions wrote.

Message objects already in S3, mail already in an outage spool, bounces
already in flight to a return path and DKIM keys already sealed in PostgreSQL
outlive the code that wrote them.  tests/golden/ holds such bytes (its
README says what each file is and how it was made); every test here reads
them with today's code and checks the exact values, so a change that breaks
existing data fails here even if it writes and reads its own new format
consistently.  Where the writer is deterministic, today's writer must also
produce the same bytes, so an accidental format change is caught at write
time too.

A failure here is never fixed by regenerating a golden file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim
import pytest
import zstandard
from support.feed import fed

from postkeep.config import DkimConfig
from postkeep.envelope import (
    ReturnPath,
    mail_from_params,
    parse_return_path,
    return_path,
    verify_return_path,
)
from postkeep.milter import dkim as pkdkim
from postkeep.milter.capture import MessageCapture, StoredContent
from postkeep.signing_keys import Algorithm
from postkeep.storage.content import container, restore
from postkeep.storage.content.container import DictionaryRef, Manifest, PartRef
from postkeep.storage.content.dictionaries import LoadedDictionary
from postkeep.storage.content.objects import MemoryObjectStore, message_key
from postkeep.storage.content.spool import Spool, drain
from postkeep.storage.metadata import dkim_keys
from postkeep.storage.metadata.messages import CapturedMessage
from postkeep.storage.reports.dsn import parse_report

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parent / "golden"

# Every golden file, pinned: a file changed or regenerated fails here first.
GOLDEN_SHA256 = {
    "container/dict.eml": "951f604d52050fc8986d7f9ae83046a5f2be151d9577f2f6f32f2917317639e8",
    "container/dict.eml.zst": "bbf6d3acfbe95ec501f587c11a5e1a6e9439df96f8c520a453cb2c0bdd2973ae",
    "container/dictionary-v3.zdict":
        "e15edb79a89bb934277340b3e34dad3513812ae4b6cfc9cf94008b67c544db90",
    "container/part-1.zst": "577bb82d6aee892588188df6fac941b2185db46d09d074ce44f831a00e592c41",
    "container/part-2.zst": "8fd266172726d2cb53b32586ded9df160da80fc32b4f21108ba3b0cbb3cc1db9",
    "container/plain.eml": "8fbb8b455bcc03505a7e588d91c8149e8680c4ff021bf7a5cc4fa740d7bd39fe",
    "container/plain.eml.zst": "cc6546c49dc8bacc60cbeefc30298ab232d527260f83fcaa0fc6ed1073c2c412",
    "container/split-dict.eml": "c0e7c6c52f18095d0c77e678e48d9bdb88eaef7c33951a95cbdaa32b7e88eb19",
    "container/split-dict.eml.zst":
        "50b52d896870f1423f99d99fa333e724eb561ef663b351ebcf40e86b62375d30",
    "container/split.eml": "ab39640a2a33cdbd05c6fedea50e1f6a0100c13f2668fd811266f014d1322f52",
    "container/split.eml.zst": "ba55e726fc31b90e0d18d0ca48189679f0a4b601cf621da562d49a468064d929",
    "dkim/ed25519-sha256.json": "0d23c8515079e9c1547c93883dfdb10fff05be4f8e0668c9ee485fd0f0e843a3",
    "dkim/master-key.b64": "8d3757a34b373d5f682795e75f9bbfe7eff89fef8ef3fd53062dbbfd620a4aa3",
    "dkim/rsa-sha256.json": "74ede89f3afc1cba34f61c77789b2da938e75a12d81b53fb31bcdd8ba1446e12",
    "envelope/return-path-v1.txt":
        "61ae762479e86e3cf4ed0c6620cb7175448b48562da6ebaa76242b266cac1d2f",
    "envelope/return-path-v2.txt":
        "62b8ca6f027dd8cb21ebf744dde6f67e2f1580a0893fa99f96a2ed274120c340",
    "spool/0190a6c3-8f10-7d2e-b3a4-5c6d7e8f9a0b.spool":
        "d9af45665958d5bde11e641f048861863bd9b05430ba75d652b90fe92063f4a3",
}

# The fixed inputs the files were made with (tests/golden/make_golden.py).
ORG = "0190a6c3-7e2f-7c41-9a5b-3f1d2e4c5b6a"
MESSAGE_ID = uuid.UUID("0190a6c3-8f10-7d2e-b3a4-5c6d7e8f9a0b")
CREATED = datetime(2024, 7, 1, 12, 34, 56, 789012, tzinfo=UTC)
METADATA_EXPIRES = datetime(2025, 7, 1, 12, 34, 56, 789012, tzinfo=UTC)
SPLIT_THRESHOLD, DICTIONARY_MAX = 4096, 64 * 1024
BOUNCE_DOMAIN = "bounces.golden.example"
RETURN_PATH_KEY = b"postkeep-golden-test-return-path-key-not-a-real-one"
DKIM_DOMAIN, DKIM_SELECTOR = "golden.example", "g2024"
MASTER_KEY_ID = "cbba123a530caf24"


def golden(rel: str) -> bytes:
    return (GOLDEN / rel).read_bytes()


def test_golden_files_are_the_ones_checked_in() -> None:
    # bounces/, inbound/: corpora pinned by their own manifests (test_bounces_golden.py,
    # test_classify.py).
    found = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts
             and p.relative_to(GOLDEN).parts[0] not in ("bounces", "inbound")}
    assert found - {"README.md", "make_golden.py", ".gitattributes"} == set(GOLDEN_SHA256)
    changed = {rel for rel, digest in GOLDEN_SHA256.items()
               if hashlib.sha256(golden(rel)).hexdigest() != digest}
    assert not changed, f"golden files changed (never regenerate them): {sorted(changed)}"


# --- message objects: plain, containers, parts, dictionaries ----------------------------

SHA_1 = "c52859edf919f2961412855c1c6bde4a0be4aa7e5cb4946de822acd69ee07aee"
SHA_2 = "91f0c7252101e5af796260e88d79363427f68a032545ced702745ab1c1386fa8"
PART_1 = f"parts/{ORG}/{SHA_1}/0190a6c3-9a00-7000-8000-000000000001.zst"
PART_2 = f"parts/{ORG}/{SHA_2}/0190a6c3-9a00-7000-8000-000000000002.zst"
# Where a stored manifest's dictionary reference leads: spelled out, not
# computed with DictionaryRef.key, so a change of that mapping fails too.
DICT_KEY = f"dictionaries/{ORG}/3.zdict"
DICT = DictionaryRef(ORG, 3)
MANIFESTS: dict[str, Manifest | None] = {
    "plain": None,
    "dict": Manifest(DICT, ()),
    "split": Manifest(None, (PartRef(474, 12314, SHA_1, PART_1),
                             PartRef(563, 8212, SHA_2, PART_2))),
    "split-dict": Manifest(DICT, (PartRef(474, 12314, SHA_1, PART_1),)),
}
OBJECTS = sorted(MANIFESTS)


class TrickleStore(MemoryObjectStore):
    """Hands objects out a few bytes at a time (S3 may split them anywhere)."""

    def get(self, key: str) -> Iterator[bytes]:
        data = b"".join(super().get(key))
        for i in range(0, len(data), 5):
            yield data[i : i + 5]


def golden_store(store: MemoryObjectStore) -> MemoryObjectStore:
    """STORE holding every golden object under the key it was stored at."""
    for name in OBJECTS:
        store.objects[f"messages/golden/{name}.eml.zst"] = golden(f"container/{name}.eml.zst")
    store.objects[PART_1] = golden("container/part-1.zst")
    store.objects[PART_2] = golden("container/part-2.zst")
    store.objects[DICT_KEY] = golden("container/dictionary-v3.zdict")
    return store


@pytest.mark.parametrize("store_type", [MemoryObjectStore, TrickleStore])
@pytest.mark.parametrize("name", OBJECTS)
def test_golden_object_restores_to_the_exact_message(
        name: str, store_type: type[MemoryObjectStore]) -> None:
    store = golden_store(store_type())
    restored = b"".join(restore.restore(store, f"messages/golden/{name}.eml.zst",
                                        chunk_size=1000))
    assert restored == golden(f"container/{name}.eml")


@pytest.mark.parametrize("name", OBJECTS)
def test_golden_header_decodes_to_the_exact_manifest(name: str) -> None:
    data = golden(f"container/{name}.eml.zst")
    manifest, rest = container.read_header([data])
    assert manifest == MANIFESTS[name]
    if manifest is None:
        assert b"".join(rest) == data  # a plain object is all zstd frames
    else:  # the skeleton's frames follow the header (its length, as stored)
        assert b"".join(rest) == data[{"dict": 60, "split": 479, "split-dict": 300}[name]:]
        if manifest.dictionary is not None:
            assert manifest.dictionary.key == DICT_KEY


def test_golden_container_header_bytes() -> None:
    """The header layout itself, byte for byte: magic, version 1, a 4-byte
    big-endian length, compact JSON."""
    body = b'{"dict":["' + ORG.encode() + b'",3]}'
    header = b"\x89PKM\x01" + len(body).to_bytes(4, "big") + body
    assert golden("container/dict.eml.zst").startswith(header)
    assert container.read_header([header])[0] == MANIFESTS["dict"]


def test_golden_part_objects_hold_the_bytes_cut_at_their_offsets() -> None:
    """`at` is an offset in the skeleton: in the message, the second part starts
    after the first one's bytes too (and runs to the message's end)."""
    message = golden("container/split.eml")
    first, second = (zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(golden(f"container/part-{n}.zst")), read_across_frames=True).read()
        for n in (1, 2))
    assert first == message[474 : 474 + 12314]
    assert second == message[563 + 12314 :] and len(second) == 8212
    assert (hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()) == (
        SHA_1, SHA_2)


def _capture(message: bytes, *, threshold: int = 0,
             dictionary: LoadedDictionary | None = None) -> tuple[MessageCapture, StoredContent]:
    """MESSAGE through the milter's MessageCapture, fed as Postfix feeds it
    (discard the capture once the content is read)."""
    cap = fed(message)
    return cap, cap.finish(split_threshold=threshold, dictionary=dictionary,
                           dictionary_max=DICTIONARY_MAX)


def _frames(data: bytes, d: zstandard.ZstdCompressionDict | None) -> bytes:
    dctx = zstandard.ZstdDecompressor(dict_data=d) if d else zstandard.ZstdDecompressor()
    return dctx.stream_reader(io.BytesIO(data), read_across_frames=True).read()


@pytest.mark.parametrize("name", OBJECTS)
def test_todays_capture_writes_the_golden_container(name: str) -> None:
    """Today's milter, given the golden message and the settings it was stored
    with, cuts the same parts and writes the same header bytes.

    The zstd frames are compared by what they decompress to, not byte for
    byte: compressed output depends on the zstd version and is no part of the
    format (any valid frame reads)."""
    raw = golden("container/dictionary-v3.zdict")
    loaded = zstandard.ZstdCompressionDict(raw)
    loaded.precompute_compress(level=3)
    manifest = MANIFESTS[name]
    cap, content = _capture(golden(f"container/{name}.eml"),
                       threshold=SPLIT_THRESHOLD if name.startswith("split") else 0,
                            dictionary=LoadedDictionary(DICT, loaded) if "dict" in name
                            else None)
    try:
        assert [(p.at, p.size, p.sha256.hex()) for p in content.parts] == [
            (p.at, p.size, p.sha256) for p in (manifest.parts if manifest else ())]
        content.seal([p.key for p in (manifest.parts if manifest else ())])
        data = content.stream.read()
    finally:
        content.close()
        cap.discard()
    stored = golden(f"container/{name}.eml.zst")
    if manifest is None:
        assert not data.startswith(container.MAGIC)
        assert _frames(data, None) == _frames(stored, None)
        return
    header = container.encode_header(manifest)
    assert stored.startswith(header) and data.startswith(header)
    d = zstandard.ZstdCompressionDict(raw) if manifest.dictionary else None
    assert _frames(data[len(header):], d) == _frames(stored[len(header):], d)


# --- the outage spool --------------------------------------------------------------------

SPOOL_ENTRY = f"spool/{MESSAGE_ID}.spool"
SPOOLED_AT = datetime(2024, 7, 1, 12, 34, 57, 789012, tzinfo=UTC)
SPOOLED = CapturedMessage(
    id=MESSAGE_ID, org_id=uuid.UUID(ORG), domain="golden.example", queue_id="4XyZ1k2Lmn",
    envelope_from="alice@golden.example",
    recipients=("bob@elsewhere.example", "carol@elsewhere.example"), size=245,
    sha256=bytes.fromhex("8fbb8b455bcc03505a7e588d91c8149e8680c4ff021bf7a5cc4fa740d7bd39fe"),
    object_key=f"messages/90d/{ORG}/2024/07/01/{MESSAGE_ID}.eml.zst", compressed_size=227,
    created_at=CREATED, content_expires_at=datetime(2024, 9, 29, 12, 34, 56, 789012, tzinfo=UTC),
    metadata_expires_at=METADATA_EXPIRES, message_id_header="<plain-1@golden.example>",
    header_from="Alice <alice@golden.example>", subject="Café plans \udce9",
    direction="outbound",
    return_path="pk-0190a6c38f107d2eb3a45c6d7e8f9a0b-6863d5f0-08586f7db707d5b5"
                "@bounces.golden.example",
    notify=("SUCCESS,FAILURE", None), extra={"golden": "1"},
)


def _golden_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    shutil.copyfile(GOLDEN / SPOOL_ENTRY, spool.dir / f"{MESSAGE_ID}.spool")
    return spool


def test_golden_spool_entry_reads_to_the_exact_message(tmp_path: Path) -> None:
    spool = _golden_spool(tmp_path)
    [path] = spool.entries()
    entry = spool.open_entry(path)
    assert entry.message == SPOOLED
    assert (entry.spooled_at, entry.reason) == (SPOOLED_AT, "s3")
    with spool.object_stream(entry) as stream:
        assert stream.read() == golden("container/plain.eml.zst")
    # The object key says where a classed object lives (90 days: messages/90d/).
    assert message_key(ORG, str(MESSAGE_ID), CREATED, 90) == SPOOLED.object_key


def test_golden_spool_entry_drains_into_the_store(tmp_path: Path) -> None:
    spool = _golden_spool(tmp_path)
    store = MemoryObjectStore()
    recorded: list[CapturedMessage] = []
    result = drain(spool, store, recorded.extend)
    assert (result.drained, result.quarantined, result.rejected) == (1, 0, 0)
    assert recorded == [SPOOLED]
    assert store.objects == {SPOOLED.object_key: golden("container/plain.eml.zst")}
    assert b"".join(restore.restore(store, SPOOLED.object_key)) == golden("container/plain.eml")
    assert spool.entries() == []


def test_todays_spool_writer_writes_the_golden_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.ensure()
    path = spool.write(SPOOLED, io.BytesIO(golden("container/plain.eml.zst")), "s3",
                       now=SPOOLED_AT)
    assert path.name == f"{MESSAGE_ID}.spool"
    assert path.read_bytes() == golden(SPOOL_ENTRY)


# --- return paths -------------------------------------------------------------------------


def _envelope(version: int) -> list[str]:
    lines = golden(f"envelope/return-path-v{version}.txt").decode().splitlines()
    return [ln for ln in lines if not ln.startswith("#")]


EXPIRY = 0x6863D5F0  # METADATA_EXPIRES in Unix seconds
EXPIRES_AT = datetime(2025, 7, 1, 12, 34, 56, tzinfo=UTC)  # to the second (floor)


def test_golden_return_path_before_signing_still_parses() -> None:
    """Bounces to a return path from before return paths were signed are still
    in flight after an upgrade: they must still be recognised as postkeep's."""
    address, params = _envelope(1)
    want = ReturnPath(MESSAGE_ID, EXPIRY, None, BOUNCE_DOMAIN)
    assert parse_return_path(address) == want
    # MTAs may change the case of a local part; some keep the angle brackets.
    assert parse_return_path(f"<{address.upper()}>") == want
    assert want.expires_at == EXPIRES_AT
    assert params == f"RET=HDRS ENVID={MESSAGE_ID}"


def test_golden_return_path_parses_and_verifies() -> None:
    address, _ = _envelope(2)
    want = ReturnPath(MESSAGE_ID, EXPIRY, "08586f7db707d5b5", BOUNCE_DOMAIN)
    assert parse_return_path(address) == want
    assert parse_return_path(f"<{address.upper()}>") == want
    assert want.expires_at == EXPIRES_AT
    assert verify_return_path(want, RETURN_PATH_KEY) is None
    assert verify_return_path(want, RETURN_PATH_KEY + b"x") is not None


def test_todays_writer_writes_the_golden_return_path() -> None:
    address, params = _envelope(2)
    assert return_path(MESSAGE_ID, METADATA_EXPIRES, BOUNCE_DOMAIN, RETURN_PATH_KEY) == address
    assert mail_from_params(MESSAGE_ID) == params


def test_a_dsn_to_the_golden_return_path_names_the_message() -> None:
    address, params = _envelope(2)
    envid = params.split("ENVID=", 1)[1]
    dsn = (
        "From: MAILER-DAEMON@mx.golden.example\r\nTo: " + address + "\r\n"
        "Subject: Successful Mail Delivery Report\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="R"\r\n\r\n'
        "--R\r\nContent-Type: text/plain\r\n\r\ndelivered\r\n"
        "--R\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.golden.example\r\nOriginal-Envelope-Id: " + envid + "\r\n\r\n"
        "Final-Recipient: rfc822; bob@elsewhere.example\r\nAction: relayed\r\n"
        "Status: 2.0.0\r\n\r\n--R--\r\n").encode()
    report = parse_report(dsn, "", [address], CREATED, RETURN_PATH_KEY)
    assert (report.kind, report.message_id, report.expires_at, report.reason) == (
        "dsn", MESSAGE_ID, EXPIRES_AT, None)
    assert [(o.recipient, o.status) for o in report.outcomes] == [
        ("bob@elsewhere.example", "relayed")]


# --- sealed DKIM keys -------------------------------------------------------------------------

ALGORITHMS: tuple[Algorithm, ...] = ("rsa-sha256", "ed25519-sha256")
SIGNED = (b"From: Alice <alice@golden.example>\r\nTo: bob@elsewhere.example\r\n"
          b"Subject: golden\r\nDate: Mon, 01 Jul 2024 12:34:56 +0000\r\n"
          b"Message-ID: <dkim-1@golden.example>\r\n\r\nSigned with a key sealed in 2024.\r\n")


def _row(algorithm: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(golden(f"dkim/{algorithm}.json"))
    return row


def _master() -> dkim_keys.MasterKey:
    return dkim_keys.load_master_key(DkimConfig(master_key=golden("dkim/master-key.b64").decode()))


def _sealed(row: dict[str, Any]) -> dkim_keys.SealedKey:
    return dkim_keys.SealedKey(bytes.fromhex(row["private_key_enc"]), bytes.fromhex(row["nonce"]),
                               row["master_key_id"])


def test_golden_master_key_keeps_its_id() -> None:
    """Rows name their master key by this id: a change of its derivation
    would refuse every stored key."""
    assert _master().key_id == MASTER_KEY_ID
    assert {_row(a)["master_key_id"] for a in ALGORITHMS} == {MASTER_KEY_ID}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_sealed_key_unseals_and_signs_for_its_published_record(
        algorithm: Algorithm) -> None:
    row = _row(algorithm)
    assert (row["domain"], row["selector"], row["algorithm"]) == (
        DKIM_DOMAIN, DKIM_SELECTOR, algorithm)
    public = bytes.fromhex(row["public_key"])
    key = dkim_keys.DkimKey(1, uuid.UUID(ORG), DKIM_DOMAIN, DKIM_SELECTOR, algorithm, public,
                            CREATED, CREATED, None, CREATED)
    ring = dkim_keys.KeyRing(_master(), 0, [key], {1: _sealed(row)})
    [signing] = ring.signing_keys(DKIM_DOMAIN, METADATA_EXPIRES)
    assert dkim_keys.public_key_bytes(signing.private_key) == public
    signed = pkdkim.sign_message(SIGNED, signing.private_key, DKIM_DOMAIN, DKIM_SELECTOR,
                                 algorithm, 1719837296) + SIGNED
    # dkimpy verifies against the TXT record published in 2024, not against
    # a record derived from the key just unsealed.
    record = row["dns_txt"].encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == f"{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}.".encode() else None

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"sealed in 2024", b"sealed in 2025"), dnsfunc=dnsfunc)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_golden_sealed_key_opens_only_under_its_own_name(algorithm: Algorithm) -> None:
    row = _row(algorithm)
    for domain, selector in ((DKIM_DOMAIN, "other"), ("other.example", DKIM_SELECTOR)):
        with pytest.raises(dkim_keys.DkimKeyError, match="does not decrypt"):
            dkim_keys.open_private_key(_master(), _sealed(row), domain, selector, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_todays_sealing_writes_the_golden_row(algorithm: Algorithm,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """AES-GCM is deterministic once the nonce is: with the golden row's nonce in
    place of a random one, today's sealing must give its exact ciphertext."""
    row = _row(algorithm)
    master, sealed = _master(), _sealed(row)
    key = dkim_keys.open_private_key(master, sealed, DKIM_DOMAIN, DKIM_SELECTOR, algorithm)
    urandom = os.urandom
    monkeypatch.setattr(os, "urandom",
                        lambda n: sealed.nonce if n == len(sealed.nonce) else urandom(n))
    assert dkim_keys.seal_private_key(master, key, DKIM_DOMAIN, DKIM_SELECTOR) == sealed
    public = dkim_keys.public_key_bytes(key)
    assert public == bytes.fromhex(row["public_key"])
    assert dkim_keys.dns_txt_value(algorithm, public) == row["dns_txt"]
    assert base64.b64decode(row["dns_txt"].rsplit("p=", 1)[1]) == public
