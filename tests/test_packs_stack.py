"""Packs through real Postfix, PostgreSQL and MinIO (storage/content/packs.py).

Messages captured together share one object per organisation and class (one
PUT, counted by MinIO's listing and the milter's counter) and each restores
byte for byte by one ranged GET; objects of the old layout stay readable next
to packs and `postkeep storage repack` moves them; erasure drops a message's
index row and `storage compact` rewrites the pack without it; a legal hold
copies the held message's range out; a pack expires whole, never before its
last message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from click.testing import Result
from conftest import Invoke, StoreMessage, TestOrg
from support import smtp
from support.sidecar import metric
from support.stack import Stack, strip_received

from postkeep.storage.content import packs
from postkeep.storage.content.layout import covered_by_rules
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.content.restore import restore_message
from postkeep.storage.lifecycle import erasure, holds, rules
from postkeep.storage.lifecycle.retention import EPOCH
from postkeep.storage.metadata import legal_holds

pytestmark = pytest.mark.stack

PACKS_METRIC = "postkeep_milter_packs_total"


def _ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result.stdout


def _present(objects: S3ObjectStore, key: str) -> bool:
    return rules.S3Retention(objects.client, objects.bucket).exists(key)


def _burst(stack: Stack, domain: str, n: int) -> list[tuple[str, bytes, str]]:
    """N messages in N sessions whose final dots are sent together; (queue id, data, token)."""
    clients, sent = [], []
    try:
        for i in range(n):
            token = uuid.uuid4().hex
            data = (f"From: s@{domain}\r\nTo: r@example.net\r\nSubject: pack {i}\r\n"
                    f"X-Test-Token: {token}\r\n\r\n" + f"body {i} {token}\r\n" * (20 + i)
                    ).encode()
            c = smtp.Client(*stack.smtp)
            c.command(f"MAIL FROM:<s@{domain}>", 250)
            c.command("RCPT TO:<r@example.net>", 250)
            c.command("DATA", 354)
            c.sock.sendall(smtp.dot_stuff(data))
            clients.append(c)
            sent.append((data, token))
        for c in clients:
            c.sock.sendall(b".\r\n")
        replies = [c._expect("end of data", 250) for c in clients]
    finally:
        for c in clients:
            c.close()
    out = []
    for reply, (data, token) in zip(replies, sent, strict=True):
        assert reply.queue_id, reply.text
        out.append((reply.queue_id, data, token))
    return out


def _rows(db: psycopg.Connection, queue_ids: list[str]) -> dict[str, tuple[uuid.UUID, str]]:
    return {r[0]: (r[1], r[2]) for r in db.execute(
        "SELECT queue_id, id, object_key FROM messages WHERE queue_id = ANY(%s)", (queue_ids,))}


def test_a_batch_through_postfix_is_one_put_per_pack_and_each_message_restores(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], run: Invoke) -> None:
    org = make_org("pro")
    before = metric(stack.env["POSTKEEP_MILTER_METRICS"], PACKS_METRIC)
    sent = _burst(stack, org.domain, 10)
    rows = _rows(db, [q for q, _, _ in sent])
    assert len(rows) == 10
    pack_keys = {key for _, key in rows.values()}
    assert all(packs.is_pack_key(k) and covered_by_rules(k) for k in pack_keys), pack_keys
    # Every PUT of this organisation's content is a pack: what MinIO holds
    # under its prefix is exactly the packs the rows name, and the milter
    # counted one PUT for each.
    prefix = next(iter(pack_keys)).split(f"{org.id}/")[0] + f"{org.id}/"
    listed = {o.object_name for o in objects.client.list_objects(
        objects.bucket, prefix=prefix, recursive=True)}
    assert listed == pack_keys
    assert metric(stack.env["POSTKEEP_MILTER_METRICS"], PACKS_METRIC) - before == len(pack_keys)
    # How many share a pack depends on timing (each session waits for its own
    # group commit); one PUT per batch is tests/test_packs.py's, without timing.
    assert len(pack_keys) <= 10
    for queue_id, _data, token in sent:
        mid, key = rows[queue_id]
        delivered = strip_received(stack.sink_copy(token))
        assert stack.restored(key, mid) == delivered
    # and through the CLI, checked against the recorded size and sha256
    mid, _ = rows[sent[3][0]]
    out = run("messages", "raw", str(mid))
    assert out.exit_code == 0, out.stderr
    assert out.stdout_bytes == strip_received(stack.sink_copy(sent[3][2]))


def _old(store_message: StoreMessage, org: TestOrg, n: int, *, to: str = "rcpt@example.net",
         content_days: int = 7) -> list[tuple[uuid.UUID, str, bytes]]:
    out = []
    for i in range(n):
        parts = (f"Subject: old {i}\r\nTo: {to}\r\n\r\n".encode(), f"old body {i}\r\n".encode())
        m = store_message(org, parts, recipients=(to,) if i == 0 else (f"r{i}@example.net",),
                          content_days=content_days)
        out.append((m.id, m.object_key, b"".join(parts)))
    return out


def _restore(stack: Stack, db: psycopg.Connection, mid: uuid.UUID) -> bytes:
    row = db.execute("SELECT object_key FROM messages WHERE id = %s", (mid,)).fetchone()
    assert row is not None
    return b"".join(restore_message(db, stack.objects(), mid, row[0]))


def test_old_objects_and_packs_restore_side_by_side_and_repack_moves_the_old(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage, run: Invoke) -> None:
    org = make_org("pro")
    old = _old(store_message, org, 3)
    sent = _burst(stack, org.domain, 2)
    new = _rows(db, [q for q, _, _ in sent])
    for mid, key, raw in old:
        assert not packs.is_pack_key(key) and _restore(stack, db, mid) == raw
    for queue_id, _data, token in sent:
        assert _restore(stack, db, new[queue_id][0]) == strip_received(stack.sink_copy(token))

    dry = json.loads(_ok(run("storage", "repack", "--org", org.name, "--dry-run", "--json")))
    assert dry["dry_run"] and dry["messages"] == 3 and dry["packs_written"] == 0
    assert all(_present(objects, key) for _, key, _ in old)

    done = json.loads(_ok(run("storage", "repack", "--org", org.name, "--json")))
    assert (done["messages"], done["packs_written"], done["objects_deleted"]) == (3, 1, 3)
    assert not any(_present(objects, key) for _, key, _ in old)  # the old objects are gone
    keys = {r[0] for r in db.execute("SELECT object_key FROM messages WHERE id = ANY(%s)",
                                     ([m for m, _, _ in old],))}
    assert len(keys) == 1 and packs.is_pack_key(next(iter(keys)))
    for mid, _, raw in old:
        assert _restore(stack, db, mid) == raw
    for queue_id, _data, token in sent:  # the packed ones untouched
        assert _restore(stack, db, new[queue_id][0]) == strip_received(stack.sink_copy(token))
    again = json.loads(_ok(run("storage", "repack", "--org", org.name, "--json")))
    assert again["messages"] == 0 and again["packs_written"] == 0  # idempotent


def _repacked(run: Invoke, org: TestOrg) -> None:
    _ok(run("storage", "repack", "--org", org.name, "--json"))


def test_erasure_drops_the_index_row_and_compact_rewrites_the_pack_without_it(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage, run: Invoke) -> None:
    org = make_org("pro")
    old = _old(store_message, org, 3, to="erase.me@example.net")
    _repacked(run, org)
    pack = packs.location(db, old[0][0])
    assert pack is not None
    store = rules.S3Retention(objects.client, objects.bucket)

    rep = erasure.erase_address(db, store, org.id, "erase.me@example.net")
    assert rep.messages == 1
    assert packs.location(db, old[0][0]) is None
    assert _present(objects, pack.pack_key)  # its bytes stay in the pack until compaction
    with pytest.raises(Exception, match="is a pack"):
        _restore(stack, db, old[0][0])
    for mid, _, raw in old[1:]:
        assert _restore(stack, db, mid) == raw

    # one of three dead: above the default threshold, nothing to do
    assert json.loads(_ok(run("storage", "compact", "--org", org.name, "--json"))
                      )["packs_compacted"] == 0
    erasure.erase_address(db, store, org.id, "r1@example.net")
    dry = json.loads(_ok(run("storage", "compact", "--org", org.name, "--dry-run", "--json")))
    assert dry["packs_compacted"] == 1 and _present(objects, pack.pack_key)
    done = json.loads(_ok(run("storage", "compact", "--org", org.name, "--json")))
    assert (done["packs_compacted"], done["packs_written"], done["objects_deleted"]) == (1, 1, 1)
    assert not _present(objects, pack.pack_key)
    moved = packs.location(db, old[2][0])
    assert moved is not None and moved.pack_key != pack.pack_key and moved.offset == 0
    # only the live entry is left (the whole object is its entry, sealed or not)
    assert len(b"".join(objects.get(moved.pack_key))) == moved.length
    assert _restore(stack, db, old[2][0]) == old[2][2]


def test_a_held_packed_message_is_copied_out_and_outlives_its_pack(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage, run: Invoke) -> None:
    org = make_org("pro")
    old = _old(store_message, org, 2, to="held@example.net")
    _repacked(run, org)
    pack = packs.location(db, old[0][0])
    assert pack is not None
    store = rules.S3Retention(objects.client, objects.bucket)
    hold = legal_holds.add_hold(db, org.id, "held@example.net", "case 19")
    try:
        res = holds.protect(db, store, hold, EPOCH)
        assert res.moved == 1
        key = db.execute("SELECT object_key FROM messages WHERE id = %s",
                         (old[0][0],)).fetchone()
        assert key is not None and key[0].startswith("messages/hold/")
        assert packs.location(db, old[0][0]) is None
        assert _restore(stack, db, old[0][0]) == old[0][2]
        # The pack expires (both messages' content stamps pass): swept whole,
        # the held copy stays.
        past = datetime.now(UTC) - timedelta(hours=1)
        db.execute("UPDATE messages SET content_expires_at = %s WHERE id = ANY(%s)",
                   (past, [m for m, _, _ in old]))
        db.execute("UPDATE packs SET expires_at = %s WHERE object_key = %s",
                   (past, pack.pack_key))
        swept = packs.sweep(db, store.delete_many, datetime.now(UTC))
        assert swept.deleted >= 1 and not _present(objects, pack.pack_key)
        assert _restore(stack, db, old[0][0]) == old[0][2]
    finally:
        legal_holds.release_hold(db, hold.id)


def test_a_pack_expires_whole_and_never_before_its_last_message(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage, run: Invoke) -> None:
    org = make_org("pro")
    old = _old(store_message, org, 3)
    _repacked(run, org)
    pack = packs.location(db, old[0][0])
    assert pack is not None
    past = datetime.now(UTC) - timedelta(hours=1)
    # Two of three messages past their content stamp: the per-message sweep
    # (sweep mode: it deletes every expired object) must leave the pack alone.
    db.execute("UPDATE messages SET content_expires_at = %s WHERE id = ANY(%s)",
               (past, [old[0][0], old[1][0]]))
    out = json.loads(_ok(run("retention", "run", "--content-expiry", "sweep",
                             "--sweep-from", "1d", "--json")))
    assert out["errors"] == [], out["errors"]
    assert _present(objects, pack.pack_key)
    assert _restore(stack, db, old[2][0]) == old[2][2]
    # The last one passes too (the pack's expiry is its latest message's): gone whole.
    db.execute("UPDATE messages SET content_expires_at = %s WHERE id = %s", (past, old[2][0]))
    db.execute("UPDATE packs SET expires_at = %s WHERE object_key = %s", (past, pack.pack_key))
    out = json.loads(_ok(run("retention", "run", "--content-expiry", "sweep", "--json")))
    assert out["packs_swept"] >= 1
    assert not _present(objects, pack.pack_key)
    assert db.execute("SELECT count(*) FROM message_packs WHERE pack_key = %s",
                      (pack.pack_key,)).fetchone() == (0,)
