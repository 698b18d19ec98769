"""Sealed content and crypto-shredding through real Postfix, PostgreSQL and
MinIO (storage/content/sealing.py, issue 19).

A message captured through Postfix is sealed in its pack under its own data
key (the stack configures [storage] master_key_file): MinIO's bytes do not
contain it, restore gives it back byte for byte; an altered or moved entry
does not open and says so; erasure, organisation removal and content expiry
destroy keys, after which restore says the content is erased; on a bucket
with Object Lock erasure succeeds by destroying keys, without a DELETE.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from click.testing import CliRunner
from conftest import CountingRetention, Invoke, TestOrg
from support import smtp
from support.sealed import sealed_pack
from support.stack import Stack, strip_received

from postkeep import cli
from postkeep.storage.content import packs, sealing
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.content.restore import restore, restore_message
from postkeep.storage.lifecycle import erasure, rules
from postkeep.storage.lifecycle.retention import run_retention
from postkeep.storage.metadata import legal_holds

pytestmark = pytest.mark.stack



def _send(stack: Stack, domain: str, to: str = "r@example.net") -> tuple[str, bytes, str]:
    """One message through Postfix; (queue id, data, token)."""
    token = uuid.uuid4().hex
    data = (f"From: s@{domain}\r\nTo: {to}\r\nSubject: sealed {token}\r\n"
            f"X-Test-Token: {token}\r\n\r\n" + f"secret line {token}\r\n" * 30).encode()
    reply = smtp.send(*stack.smtp, f"s@{domain}", [to], data)
    assert reply.queue_id, reply.text
    return reply.queue_id, data, token


def _row(db: psycopg.Connection, queue_id: str) -> tuple[uuid.UUID, str, datetime]:
    row = db.execute("SELECT id, object_key, content_expires_at FROM messages"
                     " WHERE queue_id = %s", (queue_id,)).fetchone()
    assert row is not None, f"no row for {queue_id}"
    return row[0], row[1], row[2]


def _restore(stack: Stack, db: psycopg.Connection, mid: uuid.UUID,
             where: packs.Location | None = None) -> bytes:
    """MID's bytes: by its index row, or from WHERE (a location saved before
    its row went: what an attacker holding the bucket and the database has)."""
    if where is None:
        row = db.execute("SELECT object_key FROM messages WHERE id = %s", (mid,)).fetchone()
        assert row is not None
        return b"".join(restore_message(db, stack.objects(), mid, row[0]))
    return b"".join(restore(stack.objects(), where.pack_key, where=where, conn=db,
                            message_id=mid))


def _keys(db: psycopg.Connection, mid: uuid.UUID) -> list[tuple[uuid.UUID, datetime]]:
    return [(r[0], r[1]) for r in db.execute(
        "SELECT org_id, expires_at FROM message_keys WHERE message_id = %s", (mid,))]


def test_a_captured_message_is_sealed_restores_byte_exact_and_s3_holds_no_plaintext(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], run: Invoke) -> None:
    org = make_org("pro")
    queue_id, _data, token = _send(stack, org.domain)
    mid, key, content_expires = _row(db, queue_id)
    where = packs.location(db, mid)
    assert where is not None and where.format == packs.FORMAT_SEALED
    assert _keys(db, mid) == [(org.id, content_expires)]  # its key, in its expiry's partition
    assert db.execute("SELECT count(*) FROM org_keys WHERE org_id = %s",
                      (org.id,)).fetchone() == (1,)
    # Inside the seal: the compressed object, where the token is plain to see
    # (zstd keeps a random token's first occurrence literally)...
    assert token.encode() in stack.stored(key)
    # ...and in what MinIO holds, the whole pack object: nowhere.
    whole = b"".join(objects.get(key))
    assert token.encode() not in whole and b"secret line" not in whole
    assert sealing.is_sealed(stack.raw_entry(key))
    delivered = strip_received(stack.sink_copy(token))
    assert _restore(stack, db, mid) == delivered
    out = run("messages", "raw", str(mid))  # checked against the recorded size and sha256
    assert out.exit_code == 0, out.stderr
    assert out.stdout_bytes == delivered


def test_an_altered_or_moved_entry_does_not_open_and_says_so(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    org, other = make_org("pro"), make_org("pro")
    q1, _, _ = _send(stack, org.domain)
    q2, _, _ = _send(stack, org.domain)
    q3, _, _ = _send(stack, other.domain)
    (m1, k1, _), (m2, _, _), (m3, _, _) = _row(db, q1), _row(db, q2), _row(db, q3)
    w1, w2, w3 = (packs.location(db, m) for m in (m1, m2, m3))
    assert w1 is not None and w2 is not None and w3 is not None

    # Moved: message 2's index row pointed at message 1's entry (same tenant),
    # then at another organisation's entry.
    for stolen in (w1, w3):
        db.execute("UPDATE message_packs SET pack_key = %s, pack_offset = %s, length = %s"
                   " WHERE message_id = %s", (stolen.pack_key, stolen.offset, stolen.length, m2))
        with pytest.raises(sealing.SealError, match="does not authenticate"):
            _restore(stack, db, m2)
    # Altered: one byte of message 1's ciphertext flipped in MinIO.
    body = bytearray(b"".join(objects.get(k1)))
    body[w1.offset + w1.length - 20] ^= 0x01
    objects.put(k1, io.BytesIO(bytes(body)), len(body))
    with pytest.raises(sealing.SealError, match=f"{m1}.*does not authenticate"):
        _restore(stack, db, m1)
    # The same through the CLI's restore: a clear one-line error, exit 1.
    done = CliRunner().invoke(cli.cli, ["--config", stack.env["POSTKEEP_CONFIG"], "messages",
                                        "raw", str(m1)])
    assert done.exit_code != 0 and "does not authenticate" in done.stderr, done.stderr


def test_erasure_destroys_the_key_and_restore_then_says_erased(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], run: Invoke) -> None:
    org = make_org("pro")
    q1, _, _ = _send(stack, org.domain, to="erase.me@example.net")
    q2, _, token2 = _send(stack, org.domain, to="keep@example.net")
    (m1, _, _), (m2, _, _) = _row(db, q1), _row(db, q2)
    saved = packs.location(db, m1)
    assert saved is not None and _keys(db, m1)
    # A copy of its pack, as a backup or replica of the bucket would keep it
    # (erasure deletes a pack it empties; put back below).
    copy = b"".join(objects.get(saved.pack_key))
    store = rules.S3Retention(objects.client, objects.bucket)
    rep = erasure.erase_address(db, store, org.id, "erase.me@example.net")
    assert rep.messages == 1
    assert _keys(db, m1) == []  # the data key row is gone
    audit = db.execute("SELECT detail FROM retention_audit WHERE action = 'erased'"
                       " AND org_id = %s ORDER BY at DESC LIMIT 1", (org.id,)).fetchone()
    assert audit is not None and audit[0]["data_keys_destroyed"] == 1
    # Even with the bytes and the old index row in hand, they do not open.
    objects.put(saved.pack_key, io.BytesIO(copy), len(copy))
    try:
        with pytest.raises(sealing.ContentErased, match=f"message {m1}: content erased"):
            _restore(stack, db, m1, saved)
    finally:
        objects.delete(saved.pack_key)
    out = run("messages", "raw", str(m1))
    assert out.exit_code != 0 and "erased" in out.stderr, out.stderr
    assert _restore(stack, db, m2) == strip_received(stack.sink_copy(token2))


def test_removing_an_organisation_destroys_its_content_key(
        stack: Stack, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        run: Invoke) -> None:
    org = make_org("pro")
    queue_id, _, _ = _send(stack, org.domain)
    mid, _, _ = _row(db, queue_id)
    saved = packs.location(db, mid)
    assert saved is not None
    assert db.execute("SELECT count(*) FROM org_keys WHERE org_id = %s",
                      (org.id,)).fetchone() == (1,)
    # The pack object outlives the removal here (restored below from a copy
    # put back under its key): what a backup or a replica of the bucket holds.
    copy = b"".join(stack.objects().get(saved.pack_key))
    out = run("org", "remove", org.name, "--force", "--yes", "--json")
    assert out.exit_code == 0, out.stderr
    assert db.execute("SELECT count(*) FROM org_keys WHERE org_id = %s",
                      (org.id,)).fetchone() == (0,)
    assert _keys(db, mid) == []
    stack.objects().put(saved.pack_key, io.BytesIO(copy), len(copy))
    try:
        with pytest.raises(sealing.ContentErased, match="content erased"):
            _restore(stack, db, mid, saved)
    finally:
        stack.objects().delete(saved.pack_key)


def test_expired_content_keys_are_destroyed_by_the_retention_run(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """A message whose content expired: the run deletes its key (the bytes
    go with the pack, by lifecycle rule or pack sweep)."""
    org = make_org("pro")
    queue_id, _, _ = _send(stack, org.domain)
    mid, _, _ = _row(db, queue_id)
    saved = packs.location(db, mid)
    assert saved is not None
    past = datetime.now(UTC) - timedelta(minutes=5)
    copy = b"".join(objects.get(saved.pack_key))
    with db.transaction():  # its stamps as if it had expired (key row moves with it)
        db.execute("UPDATE messages SET content_expires_at = %s WHERE id = %s", (past, mid))
        db.execute("UPDATE message_keys SET expires_at = %s WHERE message_id = %s", (past, mid))
    report = run_retention(db, rules.S3Retention(objects.client, objects.bucket))
    assert report.keys_expired >= 1
    assert _keys(db, mid) == []
    objects.put(saved.pack_key, io.BytesIO(copy), len(copy))  # as if the bytes survived
    try:
        with pytest.raises(sealing.ContentErased):
            _restore(stack, db, mid, saved)
    finally:
        objects.delete(saved.pack_key)


def test_a_legal_hold_keeps_the_key_of_content_past_its_expiry(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """The retention run moves a covered message's key out of expiry's way
    (to 'infinity', the partition never dropped) instead of destroying it."""
    org = make_org("pro")
    queue_id, _, token = _send(stack, org.domain, to="held@example.net")
    mid, _, _ = _row(db, queue_id)
    saved = packs.location(db, mid)
    assert saved is not None
    copy = b"".join(objects.get(saved.pack_key))
    hold = legal_holds.add_hold(db, org.id, "held@example.net", "case 19 sealed")
    try:
        past = datetime.now(UTC) - timedelta(minutes=5)
        with db.transaction():
            db.execute("UPDATE messages SET content_expires_at = %s WHERE id = %s",
                       (past, mid))
            db.execute("UPDATE message_keys SET expires_at = %s WHERE message_id = %s",
                       (past, mid))
        run_retention(db, rules.S3Retention(objects.client, objects.bucket))
        assert db.execute("SELECT expires_at = 'infinity' FROM message_keys"
                          " WHERE message_id = %s", (mid,)).fetchall() == [(True,)]
        objects.put(saved.pack_key, io.BytesIO(copy), len(copy))
        assert _restore(stack, db, mid, saved) == strip_received(stack.sink_copy(token))
    finally:
        legal_holds.release_hold(db, hold.id)


# --- Object Lock (WORM) ------------------------------------------------------------


def test_erasure_on_object_lock_destroys_keys_and_sends_no_delete(
        db: psycopg.Connection, locked: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("pro")
    (gone, _), (kept, kept_raw) = sealed_pack(db, locked, org.id, org.domain,
                                              ["erase.me@example.net", "keep@example.net"],
                                              "locked")
    store = CountingRetention(locked.client, locked.bucket, object_lock=True)
    saved = packs.location(db, gone.id)
    assert saved is not None
    # The lock is real: the server refuses to delete the pack's version.
    assert store.delete_many([saved.pack_key]) == [saved.pack_key]
    store.deletes.clear()

    rep = erasure.erase_address(db, store, org.id, "erase.me@example.net")
    assert (rep.messages, rep.objects_locked) == (1, 0)
    assert store.deletes == []  # no DELETE attempted, none needed
    assert _keys(db, gone.id) == []
    assert store.exists(saved.pack_key)  # the bytes are still there, locked...
    with pytest.raises(sealing.ContentErased, match=f"message {gone.id}: content erased"):
        b"".join(restore(locked, saved.pack_key, where=saved, conn=db, message_id=gone.id))
    # ...and the other message of the same pack restores.
    assert b"".join(restore_message(db, locked, kept.id, kept.object_key)) == kept_raw


def test_an_org_emptied_by_erasure_on_object_lock_keeps_its_pack_row_until_expiry(
        db: psycopg.Connection, locked: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """Every message of a locked pack erased: no DELETE (the server would
    refuse it), the pack stays indexed for the sweep after its expiry, and a
    retention run now reports no failed delete."""
    org = make_org("pro")
    [(m, _)] = sealed_pack(db, locked, org.id, org.domain, ["only@example.net"], "locked")
    store = CountingRetention(locked.client, locked.bucket, object_lock=True)
    erasure.erase_address(db, store, org.id, "only@example.net")
    assert store.deletes == []
    assert db.execute("SELECT count(*) FROM packs WHERE object_key = %s",
                      (m.object_key,)).fetchone() == (1,)
    swept = packs.sweep(db, store.delete_many, datetime.now(UTC), locked=True)
    assert swept.failed == 0 and m.object_key not in swept.keys
    assert store.deletes == []
    print(json.dumps({"pack": m.object_key}))
