"""Parts stored once per organisation, through real Postfix, PostgreSQL and MinIO.

Mail goes in over SMTP; what the sink received (minus Postfix's Received:)
must equal what `postkeep messages raw` restores, while the large attachment
exists once per organisation in MinIO, never shared between organisations.
In-process tests drive the real committer against the stack's PostgreSQL and
MinIO to check that sweeping deletes a part only when no unexpired message
needs it.
"""

from __future__ import annotations

import base64
import hashlib
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import act_as, dashboard_role
from support import campaign, smtp
from support.dedup import capture_and_commit
from support.stack import Stack, strip_received

from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content import container
from postkeep.storage.content.parts import (
    PartStore,
    SplitPart,
    attachments_of,
    release_message_parts,
    sweep_parts,
)
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.metadata.messages import CapturedMessage

pytestmark = pytest.mark.stack

PDF = campaign.fake_pdf(300 * 1024, seed=11)


def _send(stack: Stack, domain: str, data: bytes, token: str) -> tuple[str, bytes]:
    reply = smtp.send(*stack.smtp, f"news@{domain}", ["rcpt@sink.test"], data)
    assert reply.queue_id, reply.text
    return reply.queue_id, strip_received(stack.sink_copy(token))


def _row(stack: Stack, queue_id: str) -> tuple[uuid.UUID, str, int, bytes]:
    with stack.connect() as conn:
        row = conn.execute("SELECT id, object_key, size, sha256 FROM messages"
                           " WHERE queue_id = %s", (queue_id,)).fetchone()
    assert row is not None, f"no messages row for queue id {queue_id}"
    return row[0], row[1], row[2], bytes(row[3])


def _raw(stack: Stack, message_id: uuid.UUID) -> subprocess.CompletedProcess[bytes]:
    script = Path(sys.executable).with_name("postkeep")
    return subprocess.run([str(script), "--config", stack.env["POSTKEEP_CONFIG"], "messages",
                           "raw", str(message_id)], capture_output=True, timeout=120,
                          check=False)


def _part_rows(stack: Stack, org_id: uuid.UUID) -> list[tuple[str, bytes, str]]:
    with stack.connect() as conn:
        return [(r[0], bytes(r[1]), r[2]) for r in conn.execute(
            "SELECT object_key, sha256, state FROM parts WHERE org_id = %s", (org_id,))]


@dataclass
class PdfMail:
    """An organisation that sent one message carrying a 150 KiB PDF, stored as a part."""

    org_id: uuid.UUID
    domain: str
    pdf: bytes
    message: CapturedMessage
    part_key: str


def _pdf_mail(stack: Stack, committer: GroupCommitter, seed: int, *, expired: bool,
              now: datetime) -> PdfMail:
    """A new organisation's message with a PDF: content EXPIRED (sent 30 days ago, kept 2)
    or not (sent NOW, kept 7)."""
    org_id, domain = stack.new_org("pro", dkim=False, missing_key="unsigned")
    pdf = campaign.fake_pdf(150 * 1024, seed=seed)
    m = capture_and_commit(committer, org_id, domain, campaign.message(1, domain, pdf=pdf),
                           created=now - timedelta(days=30) if expired else now,
                           content_days=2 if expired else 7)
    [(key, _, _)] = _part_rows(stack, org_id)
    return PdfMail(org_id, domain, pdf, m, key)


def test_repeated_pdf_is_stored_once_per_organisation(stack: Stack) -> None:
    org_a, dom_a = stack.new_org("pro")
    org_b, dom_b = stack.new_org("pro")
    sent = []
    for org_id, domain, n in ((org_a, dom_a, 3), (org_b, dom_b, 2)):
        for i in range(n):
            token = uuid.uuid4().hex
            data = campaign.message(i, domain, pdf=PDF, token=token)
            qid, delivered = _send(stack, domain, data, token)
            sent.append((org_id, qid, delivered))

    for org_id, qid, delivered in sent:
        mid, key, size, sha = _row(stack, qid)
        proc = _raw(stack, mid)  # checks size and sha256 itself
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == delivered  # DKIM signature and all, byte for byte
        assert (size, sha) == (len(delivered), hashlib.sha256(delivered).digest())
        obj = stack.stored(key)
        assert obj.startswith(container.MAGIC)
        with stack.connect() as conn:
            recorded = conn.execute("SELECT compressed_size FROM messages WHERE id = %s",
                                    (mid,)).fetchone()
        assert recorded == (len(obj),)
        assert len(obj) < 8 * 1024, "the message object must not carry the PDF"
        with stack.connect() as conn:
            atts = attachments_of(conn, mid)
        assert [(a.filename, a.content_type) for a in atts] == [
            ("winter-catalogue.pdf", "application/pdf")]
        assert atts[0].object_key.startswith(f"parts/{org_id}/{atts[0].sha256.hex()}/")

    rows_a, rows_b = _part_rows(stack, org_a), _part_rows(stack, org_b)
    assert len(rows_a) == 1 and len(rows_b) == 1, (rows_a, rows_b)
    assert rows_a[0][1] == rows_b[0][1]  # the same PDF bytes ...
    assert rows_a[0][0] != rows_b[0][0]  # ... stored separately per organisation
    assert rows_a[0][0].startswith(f"parts/{org_a}/")
    assert rows_b[0][0].startswith(f"parts/{org_b}/")
    for key, _, _ in rows_a + rows_b:
        assert len(stack.stored(key)) > 300 * 1024  # both objects really exist


def _b64(n: int, seed: int) -> bytes:
    return base64.encodebytes(random.Random(seed).randbytes(n)).replace(b"\n", b"\r\n")


def _malformed(domain: str, token: str, case: str) -> bytes:
    head = (f"From: news@{domain}\r\nTo: rcpt@sink.test\r\nSubject: {case}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\nMIME-Version: 1.0\r\n"
            ).encode()
    big = _b64(200_000, len(case))
    att = (b"Content-Type: application/octet-stream; name=\"x.bin\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n")
    if case == "missing-close":
        return (head + b"Content-Type: multipart/mixed; boundary=\"Q\"\r\n\r\n--Q\r\n"
                b"Content-Type: text/plain\r\n\r\nhello\r\n--Q\r\n" + att + big)
    if case == "boundary-in-preamble":
        return (head + b"Content-Type: multipart/mixed; boundary=\"Q\"\r\n\r\n"
                b"a preamble that says --Q in the middle\r\n--Qx not ours\r\n--Q\r\n"
                + att + big + b"--Q--\r\n")
    if case == "garbage-base64":
        return (head + b"Content-Type: multipart/mixed; boundary=\"Q\"\r\n\r\n--Q\r\n" + att
                + big[:90_000] + b"%%% not base64 \xff\xfe ===\r\n" + big[90_000:]
                + b"--Q--\r\n")
    if case == "nested":
        return (head + b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n--outer\r\n"
                b"Content-Type: multipart/alternative; boundary=\"alt\"\r\n\r\n--alt\r\n"
                b"Content-Type: text/plain\r\n\r\ntext\r\n--alt\r\n"
                b"Content-Type: multipart/related; boundary=\"rel\"\r\n\r\n--rel\r\n"
                b"Content-Type: text/html\r\n\r\n<img src=cid:a>\r\n--rel\r\n" + att + big
                + b"--rel--\r\n--alt--\r\n--outer\r\n" + att + _b64(150_000, 99)
                + b"--outer--\r\n")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing-close", "boundary-in-preamble", "garbage-base64",
                                  "nested"])
def test_malformed_mime_through_postfix_restores_byte_for_byte(stack: Stack, case: str) -> None:
    org_id, domain = stack.new_org("pro")
    token = uuid.uuid4().hex
    qid, delivered = _send(stack, domain, _malformed(domain, token, case), token)
    mid, key, _, _ = _row(stack, qid)
    assert stack.restored(key) == delivered
    proc = _raw(stack, mid)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == delivered
    expected = 2 if case == "nested" else 1
    assert len(_part_rows(stack, org_id)) == expected


# --- in-process: the committer against the stack's PostgreSQL and MinIO ----------


@pytest.fixture
def committer(stack: Stack) -> Iterator[GroupCommitter]:
    db = Database(stack.config.postgres, min_size=1)
    c = GroupCommitter(db, stack.objects(), workers=1, linger=0)
    yield c
    c.close()
    db.close()


def test_sweep_deletes_a_part_only_when_no_unexpired_message_needs_it(
        stack: Stack, committer: GroupCommitter) -> None:
    org_id, domain = stack.new_org("pro", dkim=False, missing_key="unsigned")
    now = datetime.now(UTC)
    pdf = campaign.fake_pdf(200 * 1024, seed=5)
    short = capture_and_commit(committer, org_id, domain,
                               campaign.message(1, domain, pdf=pdf), created=now, content_days=2)
    long = capture_and_commit(committer, org_id, domain,
                              campaign.message(2, domain, pdf=pdf), created=now, content_days=20)
    objects = stack.objects()
    [(key, sha, state)] = _part_rows(stack, org_id)
    assert state == "live"
    with stack.connect() as conn:
        # The premise as recorded (not as this test computed it): the two expiries
        # straddle the first sweep, and the part is needed until the later one.
        recorded = dict(conn.execute(
            "SELECT id, content_expires_at FROM messages WHERE id = ANY(%s)",
            ([short.id, long.id],)).fetchall())
        assert recorded == {short.id: now + timedelta(days=2), long.id: now + timedelta(days=20)}
        needed = conn.execute("SELECT needed_until FROM parts WHERE object_key = %s",
                              (key,)).fetchone()
        assert needed is not None and needed[0] >= recorded[long.id]
        # After the short-lived message expired, before the long one: nothing goes.
        assert sweep_parts(conn, objects, now + timedelta(days=5), org_id=org_id).deleted == 0
        assert _part_rows(stack, org_id) == [(key, sha, "live")]
        assert stack.restored(long.object_key) == campaign.message(2, domain, pdf=pdf)
        # Once the last referencing message's content has expired, the part goes.
        result = sweep_parts(conn, objects, now + timedelta(days=22), org_id=org_id)
        assert result.deleted == 1 and result.bytes_freed > 150 * 1024
    assert _part_rows(stack, org_id) == []
    with pytest.raises(BackendError, match="NoSuchKey"):
        stack.stored(key)


def test_a_swept_part_is_uploaded_afresh_for_new_mail(stack: Stack,
                                                     committer: GroupCommitter) -> None:
    now = datetime.now(UTC)
    sent = _pdf_mail(stack, committer, 6, expired=True, now=now)
    org_id, domain, pdf, old_key = sent.org_id, sent.domain, sent.pdf, sent.part_key
    with stack.connect() as conn:
        sweep_parts(conn, stack.objects(), now, org_id=org_id)
    assert _part_rows(stack, org_id) == []
    # The committer still remembers the old object: it must notice it is gone.
    m = capture_and_commit(committer, org_id, domain, campaign.message(2, domain, pdf=pdf),
                           created=now, content_days=7)
    [(new_key, _, state)] = _part_rows(stack, org_id)
    assert new_key != old_key and state == "live"
    assert stack.restored(m.object_key) == campaign.message(2, domain, pdf=pdf)


def test_interrupted_sweep_is_finished_and_other_orgs_are_untouched(
        stack: Stack, committer: GroupCommitter) -> None:
    org_a, dom_a = stack.new_org("pro", dkim=False, missing_key="unsigned")
    org_b, dom_b = stack.new_org("pro", dkim=False, missing_key="unsigned")
    now = datetime.now(UTC)
    pdf = campaign.fake_pdf(150 * 1024, seed=8)
    capture_and_commit(committer, org_a, dom_a, campaign.message(1, dom_a, pdf=pdf),
                       created=now - timedelta(days=30), content_days=2)
    keep = capture_and_commit(committer, org_b, dom_b, campaign.message(1, dom_b, pdf=pdf),
                              created=now, content_days=7)
    [(key_a, _, _)] = _part_rows(stack, org_a)
    with stack.connect() as conn:
        # A sweeper that died after marking: its row stays 'deleting'.
        conn.execute("UPDATE parts SET state = 'deleting' WHERE object_key = %s", (key_a,))
        sweep_parts(conn, stack.objects(), now, org_id=org_a)
        sweep_parts(conn, stack.objects(), now, org_id=org_b)
    assert _part_rows(stack, org_a) == []
    [(key_b, _, state)] = _part_rows(stack, org_b)
    assert state == "live"
    assert stack.restored(keep.object_key) == campaign.message(1, dom_b, pdf=pdf)
    assert len(stack.stored(key_b)) > 100 * 1024


def test_dashboard_role_sees_only_its_organisations_parts(stack: Stack) -> None:
    with stack.connect() as conn:
        policies = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_policies WHERE policyname = 'tenant_isolation'")}
        rls = {r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relrowsecurity AND relname IN"
            " ('parts', 'attachments', 'zstd_dictionaries')")}
    assert {"parts", "attachments", "zstd_dictionaries"} <= policies
    assert rls == {"parts", "attachments", "zstd_dictionaries"}
    key = uuid.uuid4().hex[:8]
    org_a, _ = stack.new_org("pro", dkim=False, missing_key="unsigned")
    with stack.connect() as conn:
        conn.execute(
            "INSERT INTO parts (object_key, org_id, sha256, size, stored_size, needed_until)"
            " VALUES (%s, %s, %s, 1, 1, now())", (f"parts/{org_a}/x/{key}", org_a, b"\x01" * 32))
        try:
            with dashboard_role(conn, "parts") as role:
                with conn.transaction():
                    act_as(conn, role)  # mapped to no organisation
                    seen = conn.execute("SELECT count(*) FROM parts").fetchone()
                with conn.transaction():
                    act_as(conn, role, org_a)
                    mine = conn.execute("SELECT count(*) FROM parts").fetchone()
        finally:
            conn.execute("DELETE FROM parts WHERE object_key = %s", (f"parts/{org_a}/x/{key}",))
    assert seen == (0,) and mine == (1,)


def test_concurrent_first_uploads_of_one_part_leave_one_object(stack: Stack) -> None:
    """Milters that meet a new part at the same moment each upload it; one copy
    wins, every message references it, and the losers' uploads are removed."""
    org_id, _ = stack.new_org("pro", dkim=False, missing_key="unsigned")
    data = campaign.fake_pdf(200 * 1024, seed=21)
    sha = hashlib.sha256(data).digest()
    db = Database(stack.config.postgres, min_size=1)
    objects = stack.objects()
    stores = [PartStore(db, objects) for _ in range(6)]  # six milter processes
    barrier = threading.Barrier(len(stores))
    until = datetime.now(UTC) + timedelta(days=7)
    keys: list[str] = []

    def resolve(store: PartStore) -> None:
        part = SplitPart(0, memoryview(data), sha, "x.pdf", "application/pdf")
        barrier.wait()
        keys.append(store.resolve(org_id, part, until).key)

    try:
        threads = [threading.Thread(target=resolve, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        db.close()
    assert len(keys) == len(stores) and len(set(keys)) == 1, keys
    assert [r[0] for r in _part_rows(stack, org_id)] == keys[:1]
    listed = [o.object_name for o in objects.client.list_objects(
        objects.bucket, prefix=f"parts/{org_id}/{sha.hex()}/", recursive=True)]
    assert listed == keys[:1]


def test_a_part_swept_under_a_milters_cache_tempfails_then_uploads_afresh(
        stack: Stack, committer: GroupCommitter) -> None:
    now = datetime.now(UTC)
    sent = _pdf_mail(stack, committer, 31, expired=False, now=now)
    org_id, domain, pdf, old_key = sent.org_id, sent.domain, sent.pdf, sent.part_key
    with stack.connect() as conn:  # a sweep (or erasure) got there: row marked, not yet gone
        conn.execute("UPDATE parts SET state = 'deleting' WHERE object_key = %s", (old_key,))
    # The committer still remembers the part as live: the commit-time check catches it.
    with pytest.raises(BackendError, match="deleted meanwhile"):
        capture_and_commit(committer, org_id, domain, campaign.message(2, domain, pdf=pdf),
                           created=now, content_days=7)
    # The client retries: a fresh object, never the key being deleted.
    m = capture_and_commit(committer, org_id, domain, campaign.message(2, domain, pdf=pdf),
                           created=now, content_days=7)
    keys = {r[0]: r[2] for r in _part_rows(stack, org_id)}
    assert keys[old_key] == "deleting" and len(keys) == 2
    assert stack.restored(m.object_key) == campaign.message(2, domain, pdf=pdf)


def test_erasure_release_makes_only_unshared_parts_sweepable(
        stack: Stack, committer: GroupCommitter) -> None:
    org_id, domain = stack.new_org("pro", dkim=False, missing_key="unsigned")
    now = datetime.now(UTC)
    shared = campaign.fake_pdf(150 * 1024, seed=41)
    private = campaign.fake_pdf(150 * 1024, seed=42)
    erased = capture_and_commit(committer, org_id, domain,
                                campaign.message(1, domain, pdf=private), created=now)
    capture_and_commit(committer, org_id, domain, campaign.message(2, domain, pdf=shared),
                       created=now)
    erased_too = capture_and_commit(committer, org_id, domain,
                                    campaign.message(3, domain, pdf=shared), created=now)
    with stack.connect() as conn:
        assert release_message_parts(conn, [erased.id, erased_too.id], now) == 1
        assert sweep_parts(conn, stack.objects(), now + timedelta(seconds=1),
                           org_id=org_id).deleted == 1
        still = conn.execute("SELECT object_key FROM attachments WHERE message_id = %s",
                             (erased_too.id,)).fetchall()
        shared_key = conn.execute(
            "SELECT object_key FROM attachments a WHERE org_id = %s AND message_id <> ALL(%s)",
            (org_id, [erased.id, erased_too.id])).fetchone()
    assert still == []  # the erased messages' attachments rows are gone
    assert shared_key is not None
    # The part another (unerased) message needs stays; the private one is gone.
    assert [r[0] for r in _part_rows(stack, org_id)] == [shared_key[0]]


def test_a_legal_hold_keeps_parts_past_their_expiry(stack: Stack,
                                                     committer: GroupCommitter) -> None:
    now = datetime.now(UTC)
    sent = _pdf_mail(stack, committer, 51, expired=True, now=now)
    org_id, domain, pdf, m, key = sent.org_id, sent.domain, sent.pdf, sent.message, sent.part_key
    with stack.connect() as conn:
        conn.execute("INSERT INTO legal_holds (org_id, reason) VALUES (%s, 'litigation')",
                     (org_id,))
        assert sweep_parts(conn, stack.objects(), now, org_id=org_id).deleted == 0
        assert [r[0] for r in _part_rows(stack, org_id)] == [key]
        assert stack.restored(m.object_key) == campaign.message(1, domain, pdf=pdf)
        conn.execute("UPDATE legal_holds SET released_at = now() WHERE org_id = %s", (org_id,))
        assert sweep_parts(conn, stack.objects(), now, org_id=org_id).deleted == 1


def test_retention_run_sweeps_parts_no_unexpired_message_needs(
        stack: Stack, committer: GroupCommitter) -> None:
    """`postkeep retention run` (run_retention) sweeps shared parts too."""
    from postkeep.storage.lifecycle import rules
    from postkeep.storage.lifecycle.retention import run_retention

    now = datetime.now(UTC)
    sent = _pdf_mail(stack, committer, 61, expired=True, now=now)
    org_id, key = sent.org_id, sent.part_key
    objects = stack.objects()
    with stack.connect() as conn:
        report = run_retention(conn, rules.S3Retention(objects.client, objects.bucket),
                               now)
    assert report.parts_swept >= 1, report.summary()
    assert _part_rows(stack, org_id) == []
    with pytest.raises(BackendError, match="NoSuchKey"):
        stack.stored(key)
