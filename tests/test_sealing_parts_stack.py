"""Sealed shared parts and dictionaries through real Postfix, PostgreSQL and
MinIO (storage/content/part_keys.py, dictionaries.py; issue 19).

With the stack's master key, a large attachment stored once per organisation
is sealed under a part key of its own: MinIO's object neither contains nor
decompresses to it, and every message using it restores byte for byte.  The
part key goes when the last message using the part does (erasure, expiry),
so a copy of the object kept anywhere no longer opens; a dictionary trained
from an organisation's mail is sealed under the organisation's key and
does not open once the organisation is removed.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import zstandard
from conftest import Invoke, StoreMessage, TestOrg
from support import campaign, smtp
from support.dedup import capture_and_commit
from support.stack import Stack, strip_received

from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content import dictionaries, part_keys, sealed_stream, sealing
from postkeep.storage.content.container import DictionaryRef
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.content.parts import sweep_parts
from postkeep.storage.lifecycle import erasure, rules
from postkeep.storage.metadata.db import Database

pytestmark = pytest.mark.stack



def _ledger(token: str) -> bytes:
    """A 200 KB text attachment (split out: over milter.part_split_bytes) saying TOKEN."""
    return b"".join(b"ledger line %06d account %s balance %d\r\n" % (i, token.encode(), i * 7)
                    for i in range(3500))


def _mail(domain: str, to: str, ledger: bytes, token: str) -> bytes:
    return (f"From: s@{domain}\r\nTo: {to}\r\nSubject: ledger {token}\r\n"
            f"X-Test-Token: {token}-{to}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\n"
            "Content-Type: text/plain\r\n\r\nthe ledger, attached\r\n--B\r\n"
            "Content-Type: text/plain; name=\"ledger.txt\"\r\n"
            "Content-Disposition: attachment; filename=\"ledger.txt\"\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + ledger + b"--B--\r\n"


def _send(stack: Stack, domain: str, to: str, ledger: bytes, token: str
          ) -> tuple[uuid.UUID, bytes]:
    reply = smtp.send(*stack.smtp, f"s@{domain}", [to], _mail(domain, to, ledger, token))
    assert reply.queue_id, reply.text
    delivered = strip_received(stack.sink_copy(f"{token}-{to}"))
    with stack.connect() as conn:
        row = conn.execute("SELECT id FROM messages WHERE queue_id = %s",
                           (reply.queue_id,)).fetchone()
    assert row is not None
    return row[0], delivered


def _parts(db: psycopg.Connection, org: TestOrg) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in db.execute(
        "SELECT object_key, state FROM parts WHERE org_id = %s", (org.id,))]


def _has_key(db: psycopg.Connection, key: str) -> bool:
    return part_keys.exists(db, key)


def _reveals(obj: bytes, plain: bytes, token: str) -> bool:
    """Whether OBJ, as stored, gives away PLAIN: literally, or decompressed as zstd."""
    if token.encode() in obj:
        return True
    try:
        out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(obj),
                                                         read_across_frames=True).read()
    except zstandard.ZstdError:
        return False
    return plain[:4096] in out


def test_a_shared_part_is_sealed_under_its_own_key_and_every_message_restores(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], run: Invoke) -> None:
    org = make_org("pro")
    token = uuid.uuid4().hex
    ledger = _ledger(token)
    m1, d1 = _send(stack, org.domain, "one@example.net", ledger, token)
    m2, d2 = _send(stack, org.domain, "two@example.net", ledger, token)
    [(key, state)] = _parts(db, org)  # stored once for both
    assert state == "live" and key.startswith(f"parts/{org.id}/")
    obj = b"".join(objects.get(key))
    assert sealed_stream.is_sealed(obj)
    assert not _reveals(obj, ledger, token)
    row = db.execute("SELECT org_id FROM part_keys WHERE object_key = %s", (key,)).fetchone()
    assert row == (org.id,)  # its own key, the organisation's to open
    for mid, delivered in ((m1, d1), (m2, d2)):
        out = run("messages", "raw", str(mid))  # checked against the recorded sha256
        assert out.exit_code == 0, out.stderr
        assert out.stdout_bytes == delivered


def test_erasing_the_last_message_using_a_part_destroys_its_key(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], run: Invoke) -> None:
    org = make_org("pro")
    token = uuid.uuid4().hex
    ledger = _ledger(token)
    _send(stack, org.domain, "first@example.net", ledger, token)
    m2, d2 = _send(stack, org.domain, "second@example.net", ledger, token)
    [(key, _)] = _parts(db, org)
    copy = b"".join(objects.get(key))  # what a replica or a locked bucket keeps
    store = rules.S3Retention(objects.client, objects.bucket)

    assert erasure.erase_address(db, store, org.id, "first@example.net").messages == 1
    assert _has_key(db, key)  # the second message still uses it
    out = run("messages", "raw", str(m2))
    assert out.exit_code == 0 and out.stdout_bytes == d2, out.stderr

    assert erasure.erase_address(db, store, org.id, "second@example.net").messages == 1
    assert not _has_key(db, key)  # the last reference went: so did the key
    assert _parts(db, org) == []
    objects.put(key, io.BytesIO(copy), len(copy))  # the bytes survive somewhere...
    try:
        with pytest.raises(part_keys.PartErased, match=f"part {key}: content erased"):
            b"".join(part_keys.open_part(db, key, iter([copy])))  # ...and are noise
    finally:
        objects.delete(key)


def test_an_expired_part_loses_its_key_when_swept(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg],
        committer: tuple[GroupCommitter, Database]) -> None:
    org = make_org("pro")
    now = datetime.now(UTC)
    pdf = campaign.fake_pdf(150 * 1024, seed=23)
    m = capture_and_commit(committer[0], org.id, org.domain,
                           campaign.message(1, org.domain, pdf=pdf),
                           created=now - timedelta(days=30), content_days=2)
    [(key, _)] = _parts(db, org)
    assert _has_key(db, key)
    assert stack.restored(m.object_key) == campaign.message(1, org.domain, pdf=pdf)
    assert sweep_parts(db, objects, now, org_id=org.id).deleted == 1
    assert not _has_key(db, key) and _parts(db, org) == []


def _seed(org: TestOrg, store_message: StoreMessage, n: int = 80) -> None:
    for i in range(n):
        data = campaign.message(i, org.domain)
        head, sep, body = data.partition(b"\r\n\r\n")
        store_message(org, parts=(head + sep, body), content_days=30, metadata_days=90)


def test_a_dictionary_is_sealed_under_its_organisations_key_gone_with_it(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage,
        committer: tuple[GroupCommitter, Database], run: Invoke) -> None:
    org = make_org("pro")
    _seed(org, store_message)
    now = datetime.now(UTC)
    dictionaries.train_for_org(db, objects, org.id, now)
    ref = DictionaryRef(str(org.id), 1)
    obj = b"".join(objects.get(ref.key))
    # A dictionary's content is the organisation's own text, verbatim, unless sealed.
    assert dictionaries.is_sealed_dictionary(obj)
    assert b"winter collection" not in obj and b"loyalty programme" not in obj
    opened = dictionaries.open_dictionary(db, ref, obj)
    assert b"winter collection" in opened or b"loyalty programme" in opened

    loaded = dictionaries.DictionaryCache(committer[1], objects, refresh=0.0).get(org.id)
    assert loaded is not None and loaded.ref == ref  # the milter's side opens it too
    m = capture_and_commit(committer[0], org.id, org.domain, campaign.message(7, org.domain),
                           created=now, content_days=30, dictionary=loaded)
    assert stack.restored(m.object_key) == campaign.message(7, org.domain)

    out = run("org", "remove", org.name, "--force", "--yes", "--json")
    assert out.exit_code == 0, out.stderr
    objects.put(ref.key, io.BytesIO(obj), len(obj))  # a copy outlived the removal
    try:
        fresh = stack.objects()  # no cached dictionary
        with pytest.raises(sealing.SealError, match="content erased"):
            dictionaries.for_restore(fresh, ref, "a test", db)
    finally:
        objects.delete(ref.key)


def test_an_altered_or_moved_part_or_dictionary_does_not_open_and_says_so(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg], store_message: StoreMessage) -> None:
    org, other = make_org("pro"), make_org("pro")
    token = uuid.uuid4().hex
    m1, _ = _send(stack, org.domain, "x@example.net", _ledger(token), token)
    _send(stack, other.domain, "y@example.net", _ledger(token), token)
    [(key, _)] = _parts(db, org)
    [(other_key, _)] = _parts(db, other)
    obj = b"".join(objects.get(key))
    flipped = bytearray(obj)
    flipped[len(obj) // 2] ^= 1
    with pytest.raises(sealing.SealError, match=f"{key}: sealed segment \\d+ does not"):
        b"".join(part_keys.open_part(db, key, iter([bytes(flipped)])))
    # The other organisation's part (same bytes, its own key) under this one's name.
    stolen = b"".join(objects.get(other_key))
    with pytest.raises(sealing.SealError, match="does not authenticate"):
        b"".join(part_keys.open_part(db, key, iter([stolen])))
    # Through restore: the message names the part it cannot open.
    objects.put(key, io.BytesIO(bytes(flipped)), len(flipped))
    try:
        with pytest.raises(sealing.SealError, match=key):
            b"".join(stack.restored(
                db.execute("SELECT object_key FROM messages WHERE id = %s",
                           (m1,)).fetchone()[0], m1))  # type: ignore[index]
    finally:
        objects.put(key, io.BytesIO(obj), len(obj))

    _seed(org, store_message, 40)
    dictionaries.train_for_org(db, objects, org.id, datetime.now(UTC))
    ref = DictionaryRef(str(org.id), 1)
    sealed = b"".join(objects.get(ref.key))
    for moved in (DictionaryRef(str(org.id), 2), DictionaryRef(str(other.id), 1)):
        with pytest.raises(sealing.SealError, match="does not authenticate"):
            dictionaries.open_dictionary(db, moved, sealed)
    bad = bytearray(sealed)
    bad[-3] ^= 1
    with pytest.raises(sealing.SealError, match=f"{ref.key}.*does not authenticate"):
        dictionaries.open_dictionary(db, ref, bytes(bad))
