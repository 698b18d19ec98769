"""Sealed single objects through real Postfix, PostgreSQL and MinIO
(storage/content/sealed_objects.py, issue 19).

What is not packed is sealed in its own object, segment by segment, under the
message's own data key (the stack configures [storage] master_key_file): a
message above the pack threshold, and inbound mail.  MinIO's bytes hold
neither the message nor a zstd frame; restore gives it back byte for byte;
erasure destroys its key, after which restore says the content is erased,
even from a copy of the object; under Object Lock the erasure sends no
DELETE and reports nothing locked.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest
import zstandard
from conftest import CountingRetention, Invoke, TestOrg
from support import smtp
from support.inbound import send_inbound
from support.stack import Stack, strip_received
from support.wait import until

from postkeep import config as config_mod
from postkeep.milter.capture import StoredContent
from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content import packs, sealed_objects, sealing
from postkeep.storage.content.objects import S3ObjectStore, message_key
from postkeep.storage.content.restore import decompress_stream, restore_message
from postkeep.storage.lifecycle import erasure, rules
from postkeep.storage.metadata import messages
from postkeep.storage.metadata.db import Database

pytestmark = pytest.mark.stack

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
OUTSIDE = "198.51.100.24"  # TEST-NET-2: off the stack's trusted networks


def _large(domain: str, to: str, token: str, random_bytes: int) -> bytes:
    """A message of a random attachment as the whole body (one MIME leaf, so
    nothing is split out of it: it stays one object above the pack
    threshold, its base64 compressing to about RANDOM_BYTES)."""
    blob = base64.encodebytes(os.urandom(random_bytes)).replace(b"\n", b"\r\n")
    return (f"From: s@{domain}\r\nTo: {to}\r\nSubject: large {token}\r\n"
            f"X-Test-Token: {token}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Disposition: attachment; filename=\"{token}.bin\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + blob


def _row(db: psycopg.Connection, where: str, arg: str) -> tuple[uuid.UUID, str, int, bytes]:
    """(id, object_key, compressed_size, sha256) of the message WHERE says, waited for."""
    def find() -> tuple[uuid.UUID, str, int, bytes] | None:
        row = db.execute("SELECT id, object_key, compressed_size, sha256 FROM messages"
                         f" WHERE {where}", (arg,)).fetchone()
        return None if row is None else (row[0], row[1], row[2], bytes(row[3]))
    found = until(find, f"a message row where {where} {arg}")
    assert found is not None
    return found


def _keys(db: psycopg.Connection, mid: uuid.UUID) -> int:
    row = db.execute("SELECT count(*) FROM message_keys WHERE message_id = %s",
                     (mid,)).fetchone()
    return int(row[0]) if row else 0


def _restore(stack: Stack, db: psycopg.Connection, mid: uuid.UUID, key: str) -> bytes:
    return b"".join(restore_message(db, stack.objects(), mid, key))


def _check_sealed(stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
                  mid: uuid.UUID, key: str, token: str) -> bytes:
    """What MinIO holds at KEY: a sealed single object under MID's key, no
    plaintext, no zstd frame.  Returns it."""
    assert not packs.is_pack_key(key) and packs.location(db, mid) is None
    assert _keys(db, mid) == 1
    whole = b"".join(objects.get(key))
    assert whole[:4] == sealed_objects.MAGIC and whole[:4] != ZSTD_MAGIC
    assert token.encode() not in whole
    # Inside the seal: the compressed object (zstd frames), the token in them.
    inside = stack.stored(key)
    assert inside[:4] == ZSTD_MAGIC
    assert token.encode() in b"".join(decompress_stream([inside]))
    return whole


def _erase_and_check(stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
                     org_id: uuid.UUID, address: str, mid: uuid.UUID, key: str,
                     copy: bytes, run: Invoke) -> None:
    rep = erasure.erase_address(db, rules.S3Retention(objects.client, objects.bucket),
                                org_id, address)
    assert rep.messages == 1 and rep.objects_locked == 0
    assert _keys(db, mid) == 0
    # The object itself went too; its bytes, kept by a backup or a replica
    # and put back, do not open without the key.
    assert not rules.S3Retention(objects.client, objects.bucket).exists(key)
    objects.put(key, io.BytesIO(copy), len(copy))
    try:
        with pytest.raises(sealing.ContentErased, match=f"message {mid}: content erased"):
            _restore(stack, db, mid, key)
    finally:
        objects.delete(key)
    out = run("messages", "raw", str(mid))
    assert out.exit_code != 0 and "erased" in out.stderr, out.stderr


# ~600 KB (one PUT of the object in memory) and ~1.6 MB (above
# S3ObjectStore.STREAM_ABOVE: the sealed bytes streamed into the PUT).
@pytest.mark.parametrize("random_bytes", [450_000, 1_200_000])
def test_a_large_message_is_sealed_in_its_own_object_restored_and_erased(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], run: Invoke, random_bytes: int) -> None:
    org = make_org("pro")
    token = uuid.uuid4().hex
    data = _large(org.domain, "big@example.net", token, random_bytes)
    reply = smtp.send(*stack.smtp, f"s@{org.domain}", ["big@example.net"], data)
    assert reply.queue_id, reply.text
    mid, key, compressed, sha = _row(db, "queue_id = %s", reply.queue_id)
    assert compressed > 256 * 1024  # above the pack threshold: its own object
    whole = _check_sealed(stack, db, objects, mid, key, token)
    assert len(whole) == sealed_objects.sealed_length(compressed)
    delivered = strip_received(stack.sink_copy(token))
    assert _restore(stack, db, mid, key) == delivered
    assert hashlib.sha256(delivered).digest() == sha
    out = run("messages", "raw", str(mid))  # checked against the recorded size and sha256
    assert out.exit_code == 0, out.stderr
    assert out.stdout_bytes == delivered
    _erase_and_check(stack, db, objects, org.id, "big@example.net", mid, key, whole, run)


def test_inbound_mail_is_sealed_in_its_own_object_restored_and_erased(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        run: Invoke) -> None:
    org, domain = stack.new_org()
    out = run("domain", "set-inbound", domain, "--archive-only")
    assert out.exit_code == 0, out.output
    token = f"inbound-{uuid.uuid4().hex[:12]}"
    data = (f"From: Reader <reader@sink.test>\r\nTo: news@{domain}\r\nSubject: {token}\r\n"
            f"X-Test-Token: {token}\r\n\r\n" + f"a private line {token}\r\n" * 20).encode()
    send_inbound(stack, f"news@{domain}", data, "reader@sink.test", client_ip=OUTSIDE)
    mid, key, _compressed, sha = _row(db, "subject = %s", token)
    assert db.execute("SELECT direction FROM messages WHERE id = %s",
                      (mid,)).fetchone() == ("inbound",)
    whole = _check_sealed(stack, db, objects, mid, key, token)
    restored = _restore(stack, db, mid, key)
    # What was captured (Postfix adds its header fields): its sha256 as
    # recorded, the body as sent.
    assert hashlib.sha256(restored).digest() == sha
    assert restored.split(b"\r\n\r\n", 1)[1] == data.split(b"\r\n\r\n", 1)[1]
    done = run("messages", "raw", str(mid))
    assert done.exit_code == 0 and done.stdout_bytes == restored, done.stderr
    _erase_and_check(stack, db, objects, org, "reader@sink.test", mid, key, whole, run)


# --- Object Lock (WORM) ------------------------------------------------------------


@pytest.fixture
def committer(config: config_mod.Config, locked: S3ObjectStore) -> Iterator[GroupCommitter]:
    """The milter's group commit writing to the locked bucket, sealing."""
    database = Database(config.postgres, min_size=1)
    gc = GroupCommitter(database, locked, workers=1, linger=0, layout="packs")
    try:
        with sealing.using(config.storage.master_key_bytes()):
            yield gc
    finally:
        gc.close()
        database.close()


def test_a_large_sealed_message_is_erased_on_object_lock_with_no_delete(
        db: psycopg.Connection, locked: S3ObjectStore, committer: GroupCommitter,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("pro")
    mid = uuid.uuid4()
    raw = (f"From: s@{org.domain}\r\nTo: worm@example.net\r\nSubject: worm\r\n\r\n".encode()
           + base64.encodebytes(os.urandom(450_000)))
    blob = zstandard.ZstdCompressor().compress(raw)
    created = datetime.now(UTC)
    content_at, metadata_at = messages.expiry_dates(created, 7, 30)
    m = messages.CapturedMessage(
        id=mid, org_id=org.id, domain=org.domain, queue_id=uuid.uuid4().hex[:10].upper(),
        envelope_from=f"s@{org.domain}", recipients=("worm@example.net",), size=len(raw),
        sha256=hashlib.sha256(raw).digest(),
        object_key=message_key(str(org.id), str(mid), created, content_days=7),
        compressed_size=len(blob), created_at=created, content_expires_at=content_at,
        metadata_expires_at=metadata_at, message_id_header=f"<{mid}@{org.domain}>",
        header_from=f"s@{org.domain}", subject="worm")
    committer.commit(m, StoredContent(io.BytesIO(blob), len(blob), len(raw),
                                      m.sha256, len(raw)))
    assert _keys(db, mid) == 1 and packs.location(db, mid) is None
    store = CountingRetention(locked.client, locked.bucket, object_lock=True)
    assert store.retained_until(m.object_key) is not None  # written under its lock
    assert b"".join(restore_message(db, locked, mid, m.object_key)) == raw
    assert b"".join(locked.get(m.object_key))[:4] == sealed_objects.MAGIC

    rep = erasure.erase_address(db, store, org.id, "worm@example.net")
    assert (rep.messages, rep.objects_locked, rep.locked_until) == (1, 0, None)
    assert store.deletes == []  # no DELETE attempted, none needed
    assert _keys(db, mid) == 0
    assert store.exists(m.object_key)  # the bytes are still there, locked, and noise
    with pytest.raises(sealing.ContentErased, match=f"message {mid}: content erased"):
        b"".join(restore_message(db, locked, mid, m.object_key))


# --- one object per message ("objects" layout), and repack --------------------------


def _captured(org: TestOrg, to: str, body: bytes) -> tuple[messages.CapturedMessage, bytes,
                                                            bytes]:
    """A message as the milter hands it to the group commit: (row, raw, zstd)."""
    mid = uuid.uuid4()
    raw = f"From: s@{org.domain}\r\nTo: {to}\r\nSubject: one\r\n\r\n".encode() + body
    blob = zstandard.ZstdCompressor().compress(raw)
    created = datetime.now(UTC)
    content_at, metadata_at = messages.expiry_dates(created, 7, 30)
    return messages.CapturedMessage(
        id=mid, org_id=org.id, domain=org.domain, queue_id=uuid.uuid4().hex[:10].upper(),
        envelope_from=f"s@{org.domain}", recipients=(to,), size=len(raw),
        sha256=hashlib.sha256(raw).digest(),
        object_key=message_key(str(org.id), str(mid), created, content_days=7),
        compressed_size=len(blob), created_at=created, content_expires_at=content_at,
        metadata_expires_at=metadata_at, message_id_header=f"<{mid}@{org.domain}>",
        header_from=f"s@{org.domain}", subject="one"), raw, blob


def test_small_messages_in_their_own_objects_are_sealed_and_repack_keeps_them_sealed(
        config: config_mod.Config, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """Under layout "objects" every message keeps its own object (a batch of
    small ones in one snowball upload): each sealed; `storage repack` then
    moves them into a pack as sealed entries under the same keys."""
    from postkeep.storage.content.repack import repack

    org = make_org("pro")
    database = Database(config.postgres, min_size=1)
    gc = GroupCommitter(database, objects, workers=1, linger=0.2, layout="objects")
    made = [_captured(org, f"r{i}@example.net", f"small {i} {uuid.uuid4()}\r\n".encode() * 5)
            for i in range(3)]
    try:
        # Concurrent commits, as the milter's sessions make them: one batch.
        threads = [threading.Thread(target=gc.commit, args=(m, StoredContent(
            io.BytesIO(blob), len(blob), len(raw), m.sha256, len(raw)))) for m, raw, blob in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        gc.close()
        database.close()
    for m, raw, _ in made:
        assert _keys(db, m.id) == 1
        assert b"".join(objects.get(m.object_key))[:4] == sealed_objects.MAGIC
        assert b"".join(restore_message(db, objects, m.id, m.object_key)) == raw
    done = repack(db, objects, rules.S3Retention(objects.client, objects.bucket).delete_many,
                  org_id=org.id)
    assert done.messages == 3 and not done.failed, done
    for m, raw, _ in made:
        where = packs.location(db, m.id)
        assert where is not None and where.format == packs.FORMAT_SEALED
        key = db.execute("SELECT object_key FROM messages WHERE id = %s", (m.id,)).fetchone()
        assert key == (where.pack_key,) and _keys(db, m.id) == 1
        assert b"".join(restore_message(db, objects, m.id, where.pack_key)) == raw
