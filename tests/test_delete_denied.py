"""Retention, erasure and legal holds while MinIO refuses deletes (IAM policy).

The stack's MinIO stays up; a user of its own (support/s3faults.py) may do
everything but delete under the prefixes a test names, so each delete comes
back AccessDenied from the real server.  What postkeep records as gone
(the sweeper's watermark and its audit rows, `content_erased_at`, a hold's
reconciliation, rows removed) must then be gone from S3 for real, the failure
must be reported, and once the policy allows deletes again a rerun must
finish the job and record exactly what is gone.  The oracle is S3 itself,
asked with the root credentials.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import TestOrg
from support import campaign, smtp
from support.retention import active_hold, audit_rows, exists, past_week, put_message
from support.s3faults import DeleteDenier, delete_denier
from support.stack import Stack

from postkeep.config import Config
from postkeep.storage.content.layout import held_key
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import erasure, holds, rules
from postkeep.storage.lifecycle.retention import RetentionSettings, run_retention
from postkeep.storage.metadata import legal_holds
from postkeep.storage.metadata.db import BackendError

pytestmark = pytest.mark.stack

SWEEP = RetentionSettings(content_expiry="sweep")


@pytest.fixture(scope="module")
def denier(config: Config) -> Iterator[DeleteDenier]:
    with delete_denier(config.s3) as d:
        yield d


@pytest.fixture(autouse=True)
def _deletes_allowed_again(denier: DeleteDenier) -> Iterator[None]:
    """Each test starts with the denier's deletes allowed, whatever the last one left."""
    denier.allow()
    yield
    denier.allow()


def _present(objects: S3ObjectStore, key: str) -> bool:
    """Whether S3 holds KEY, asked as root (not as the denied user)."""
    return rules.S3Retention(objects.client, objects.bucket).exists(key)


def _watermark(db: psycopg.Connection) -> tuple[datetime, uuid.UUID]:
    row = db.execute("SELECT at, id FROM retention_state WHERE name = 'sweep'").fetchone()
    assert row is not None
    return row[0], row[1]


def _erased_at(db: psycopg.Connection, message_id: uuid.UUID) -> datetime | None:
    row = db.execute("SELECT content_erased_at FROM messages WHERE id = %s",
                     (message_id,)).fetchone()
    assert row is not None, f"message {message_id} has no row"
    return row[0]


def test_sweep_refused_for_one_key_records_only_what_is_gone(
        db: psycopg.Connection, objects: S3ObjectStore, denier: DeleteDenier,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("free")
    week = past_week(db)
    first = week.monday + timedelta(days=1) - timedelta(days=30)
    # Content stamps a minute apart, swept in this order; the third object is
    # under the legacy layout (messages/<org>/...), where deletes are refused.
    sent = [put_message(db, objects, org.id, org.domain, created=first + timedelta(minutes=i),
                        classed=i != 2) for i in range(4)]
    denier.deny(f"messages/{org.id}/")

    report = run_retention(db, denier.store(), settings=SWEEP,
                           sweep_from=week.monday - timedelta(days=40))

    assert report.sweep_failures >= 1
    assert any("not deleted" in e and sent[2].object_key in e for e in report.errors), \
        report.errors
    at, last = _watermark(db)
    for m in sent:
        if (m.content_expires_at, m.id) <= (at, last):  # recorded as swept
            assert not _present(objects, m.object_key), f"{m.object_key} swept but still in S3"
    assert _present(objects, sent[2].object_key)
    assert (sent[1].content_expires_at, sent[1].id) <= (at, last) < (
        sent[2].content_expires_at, sent[2].id), "the sweep did not stop at the refused key"
    # No audit row claims more than the watermark; the run's row names the failure.
    throughs = [datetime.fromisoformat(str(d["through"])) for _, d in db.execute(
        "SELECT count, detail FROM retention_audit WHERE run_id = %s"
        " AND action = 'content_swept'", (report.run_id,))]
    assert throughs and max(throughs) == at
    (_, run_detail), = db.execute("SELECT count, detail FROM retention_audit WHERE run_id = %s"
                                  " AND action = 'run'", (report.run_id,)).fetchall()
    assert any("not deleted" in e for e in run_detail["errors"])
    # The week's rows still name the object: the partition is not dropped under it.
    assert week.messages not in report.partitions_dropped and exists(db, week.messages)
    assert db.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                      (org.id,)).fetchone() == (4,)

    denier.allow()
    again = run_retention(db, denier.store(), settings=SWEEP)

    assert not again.errors, again.errors
    assert not any(_present(objects, m.object_key) for m in sent)
    assert _watermark(db)[0] >= max(m.content_expires_at for m in sent)
    assert week.messages in again.partitions_dropped and not exists(db, week.messages)
    (count, _), = audit_rows(db, "partition_dropped", week.messages, report.started)
    assert count == 4


def test_erasure_refused_for_one_key_marks_only_the_batches_gone(
        db: psycopg.Connection, objects: S3ObjectStore, denier: DeleteDenier,
        make_org: Callable[..., TestOrg], monkeypatch: pytest.MonkeyPatch) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    target = "target@example.net"
    now = datetime.now(UTC)
    scope = sorted((put_message(db, objects, org.id, org.domain, created=now - timedelta(hours=1),
                                recipients=((target, "delivered"),)) for _ in range(4)),
                   key=lambda m: m.id)  # the order erasure works in
    bystander = put_message(db, objects, org.id, org.domain, created=now - timedelta(hours=1))
    digest = hashlib.sha256(target.encode()).hexdigest()
    monkeypatch.setattr(erasure, "BATCH", 2)
    denier.deny(scope[2].object_key)  # the second batch's first object

    with pytest.raises(BackendError, match="not deleted"):
        erasure.erase_address(db, denier.store(), org.id, target)

    for m in scope:
        if _erased_at(db, m.id) is not None:
            assert not _present(objects, m.object_key), f"{m.id} marked erased, still in S3"
    assert [_erased_at(db, m.id) is not None for m in scope] == [True, True, False, False]
    assert _present(objects, scope[2].object_key)
    # The batch not marked is not redacted either: the rerun finds it by the address.
    named = db.execute("SELECT count(*) FROM message_recipients WHERE org_id = %s"
                       " AND recipient = %s", (org.id, target)).fetchone()
    assert named == (2,)
    assert [c for c, _ in audit_rows(db, "erased", f"address sha256 {digest}", started)] == [2]

    denier.allow()
    rep = erasure.erase_address(db, denier.store(), org.id, target)

    assert rep.messages == 2
    assert all(_erased_at(db, m.id) is not None for m in scope)
    assert not any(_present(objects, m.object_key) for m in scope)
    assert [c for c, _ in audit_rows(db, "erased", f"address sha256 {digest}", started)] == [2, 2]
    assert _erased_at(db, bystander.id) is None and _present(objects, bystander.object_key)


def _captured(stack: Stack, queue_id: str) -> tuple[uuid.UUID, str]:
    """(id, object_key) of the message the milter stored under QUEUE_ID."""
    deadline = time.monotonic() + 60
    with stack.connect() as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT id, object_key FROM messages WHERE queue_id = %s",
                               (queue_id,)).fetchone()
            if row is not None:
                return row[0], row[1]
            time.sleep(0.2)
    raise AssertionError(f"no messages row for queue id {queue_id}")


def test_erasure_with_an_attachment_part_refused_marks_nothing_until_all_is_gone(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        denier: DeleteDenier) -> None:
    """A message the milter stored with its PDF as a part: the part's delete refused."""
    org_id, domain = stack.new_org("pro", dkim=False, missing_key="unsigned")
    sender = f"news@{domain}"
    data = campaign.message(1, domain, pdf=campaign.fake_pdf(150 * 1024, seed=2201))
    reply = smtp.send(*stack.smtp, sender, ["rcpt@sink.test"], data)
    assert reply.queue_id, reply.text
    mid, key = _captured(stack, reply.queue_id)
    [(part,)] = db.execute("SELECT object_key FROM parts WHERE org_id = %s",
                           (org_id,)).fetchall()
    assert _present(objects, key) and _present(objects, part)
    denier.deny(f"parts/{org_id}/")

    with pytest.raises(BackendError, match="could not delete"):
        erasure.erase_address(db, denier.store(), org_id, sender)

    assert _present(objects, part)
    assert _erased_at(db, mid) is None, "marked erased while its attachment is still in S3"

    denier.allow()
    rep = erasure.erase_address(db, denier.store(), org_id, sender)

    assert rep.messages == 1 and _erased_at(db, mid) is not None
    assert not _present(objects, key) and not _present(objects, part)
    assert db.execute("SELECT count(*) FROM parts WHERE org_id = %s",
                      (org_id,)).fetchone() == (0,)


@pytest.mark.parametrize("classed", [False, True], ids=["legacy-layout", "7d-class"])
def test_hold_protection_refused_to_delete_leaves_no_original_once_released(
        db: psycopg.Connection, objects: S3ObjectStore, denier: DeleteDenier,
        make_org: Callable[..., TestOrg], classed: bool) -> None:
    """The move under messages/hold/ copies, repoints, deletes the original: when
    the last step is refused, the original must still go with the held copy.
    No lifecycle rule reaches the layout before classes, nor a class in sweep
    mode (a server without lifecycle support)."""
    org = make_org("free")
    now = datetime.now(UTC)
    # Content expired 12 hours ago, not yet swept.
    m = put_message(db, objects, org.id, org.domain, created=now - timedelta(days=7, hours=12),
                    metadata_days=None, classed=classed)
    with active_hold(db, org.id, "case 22-2") as hold:
        denier.deny(m.object_key)

        report = run_retention(db, denier.store(), settings=SWEEP,
                               sweep_from=now - timedelta(days=2))

        assert any(f"hold {hold.id}:" in e and "not deleted" in e for e in report.errors), \
            report.errors
        row = db.execute("SELECT object_key FROM messages WHERE id = %s", (m.id,)).fetchone()
        assert row == (held_key(m.object_key),)
        assert _present(objects, held_key(m.object_key))
        legal_holds.release_hold(db, hold.id)
    denier.allow()
    again = run_retention(db, denier.store(), settings=SWEEP)

    assert again.holds_reconciled >= 1 and not again.errors, again.errors
    assert not _present(objects, held_key(m.object_key))
    assert not _present(objects, m.object_key), "the original the move left behind is still in S3"
    (_, detail), = audit_rows(db, "hold_reconciled", f"hold {hold.id}")
    assert detail["objects_deleted"] == 1


def test_release_refused_to_delete_keeps_the_hold_unreconciled(
        db: psycopg.Connection, objects: S3ObjectStore, denier: DeleteDenier,
        make_org: Callable[..., TestOrg]) -> None:
    """Releasing a hold deletes what it kept, then drops the rows past their stamp:
    with the deletes refused, nothing of that may be recorded."""
    org = make_org("free")
    week = past_week(db)
    kept = [put_message(db, objects, org.id, org.domain, week) for _ in range(2)]
    held = [held_key(m.object_key) for m in kept]
    with active_hold(db, org.id, "case 22-3") as hold:
        first = run_retention(db, denier.store(), settings=SWEEP,
                              sweep_from=week.monday - timedelta(days=40))
        assert not first.errors, first.errors
        assert all(_present(objects, k) for k in held) and not exists(db, week.messages)
        legal_holds.release_hold(db, hold.id)
    denier.deny(f"messages/hold/{org.id}/")

    report = run_retention(db, denier.store(), settings=SWEEP)

    assert any(e.startswith(f"released hold {hold.id}:") for e in report.errors), report.errors
    assert all(_present(objects, k) for k in held)
    got = legal_holds.get_hold(db, hold.id)
    assert got is not None and got.reconciled_at is None
    assert db.execute("SELECT count(*) FROM messages WHERE org_id = %s AND metadata_expires_at"
                      " = %s", (org.id, holds.HELD_AT)).fetchone() == (2,)
    assert audit_rows(db, "hold_reconciled", f"hold {hold.id}") == []

    denier.allow()
    again = run_retention(db, denier.store(), settings=SWEEP)

    assert not again.errors, again.errors
    assert not any(_present(objects, k) for k in held)
    assert db.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                      (org.id,)).fetchone() == (0,)
    (count, detail), = audit_rows(db, "hold_reconciled", f"hold {hold.id}")
    assert count == 2 and detail["objects_deleted"] == 2 and detail["messages_dropped"] == 2
