"""Retention, erasure and legal holds with the stack's MinIO stopped for real.

Every delete then fails outright (connection refused).  Nothing may be
recorded as gone: not the sweeper's watermark, audit rows, partition drops,
`content_erased_at`, a redaction, a move under messages/hold/ or a hold's
reconciliation.  The run must say it failed, and once MinIO is back a rerun
must finish the job and record exactly what is gone.  The oracle is S3
itself, asked after the restart.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import TestOrg
from support.retention import active_hold, audit_rows, exists, past_week, put_message
from support.s3faults import minio_stopped
from support.stack import Stack

from postkeep.storage.content.layout import held_key
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import erasure, holds, rules
from postkeep.storage.lifecycle.retention import ZERO_ID, RetentionSettings, run_retention
from postkeep.storage.metadata import legal_holds
from postkeep.storage.metadata.db import BackendError

pytestmark = pytest.mark.outage

SWEEP = RetentionSettings(content_expiry="sweep")


def _store(objects: S3ObjectStore) -> rules.S3Retention:
    return rules.S3Retention(objects.client, objects.bucket)


def _present(objects: S3ObjectStore, key: str) -> bool:
    return _store(objects).exists(key)


def _audited(db: psycopg.Connection, run_id: uuid.UUID) -> set[str]:
    """The actions a run audited."""
    return {r[0] for r in db.execute("SELECT action FROM retention_audit WHERE run_id = %s",
                                     (run_id,))}


def test_sweep_with_minio_stopped_records_nothing_then_finishes(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("free")
    week = past_week(db)
    # The layout before classes: swept in lifecycle mode too (no rule reaches it).
    sent = [put_message(db, objects, org.id, org.domain, week, classed=False)
            for _ in range(3)]
    sweep_from = week.monday - timedelta(days=40)

    with minio_stopped(stack):
        report = run_retention(db, _store(objects), sweep_from=sweep_from)

    # Rules unknown: the safe side is sweeping everything, which then fails.
    assert report.mode == "sweep" and report.objects_swept == 0
    assert any(e.startswith("lifecycle:") for e in report.errors), report.errors
    assert any(e.startswith("sweep:") for e in report.errors), report.errors
    mark = db.execute("SELECT at, id FROM retention_state WHERE name = 'sweep'").fetchone()
    assert mark is not None and (sweep_from, ZERO_ID) <= (mark[0], mark[1]) < min(
        (m.content_expires_at, m.id) for m in sent), "the watermark passed content still in S3"
    assert _audited(db, report.run_id) & {"content_swept", "partition_dropped"} == set()
    assert exists(db, week.messages) and week.messages not in report.partitions_dropped
    assert all(_present(objects, m.object_key) for m in sent)  # MinIO is back

    again = run_retention(db, _store(objects))

    assert not again.errors, again.errors
    assert not any(_present(objects, m.object_key) for m in sent)
    assert week.messages in again.partitions_dropped and not exists(db, week.messages)
    (count, _), = audit_rows(db, "partition_dropped", week.messages, report.started)
    assert count == 3


def test_erasure_with_minio_stopped_marks_nothing_then_erases(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    target = "gone@example.net"
    created = started - timedelta(hours=1)
    scope = [put_message(db, objects, org.id, org.domain, created=created,
                         recipients=((target, "delivered"), ("stays@example.net", "delivered")))
             for _ in range(2)]
    scope.append(put_message(db, objects, org.id, org.domain, created=created, sender=target))
    digest = hashlib.sha256(target.encode()).hexdigest()

    with minio_stopped(stack), pytest.raises(BackendError, match="s3"):
        erasure.erase_address(db, _store(objects), org.id, target)

    ids = [m.id for m in scope]
    assert db.execute("SELECT count(*) FROM messages WHERE id = ANY(%s)"
                      " AND content_erased_at IS NULL AND envelope_from <> '[erased]'",
                      (ids,)).fetchone() == (3,)
    assert db.execute("SELECT count(*) FROM message_recipients WHERE message_id = ANY(%s)"
                      " AND recipient = %s", (ids, target)).fetchone() == (2,)
    assert audit_rows(db, "erased", f"address sha256 {digest}", started) == []
    assert all(_present(objects, m.object_key) for m in scope)

    rep = erasure.erase_address(db, _store(objects), org.id, target)

    assert rep.messages == 3 and rep.objects_deleted == 3
    assert not any(_present(objects, m.object_key) for m in scope)
    assert db.execute("SELECT count(*) FROM messages WHERE id = ANY(%s)"
                      " AND content_erased_at IS NOT NULL", (ids,)).fetchone() == (3,)
    assert [c for c, _ in audit_rows(db, "erased", f"address sha256 {digest}", started)] == [3]


def test_holds_with_minio_stopped_neither_move_nor_release_then_do(
        stack: Stack, db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """One run, MinIO stopped: a new hold's content to move, a released hold to apply."""
    # A released hold whose rows and moved content are past their stamps.
    old_org = make_org("free")
    week = past_week(db)
    kept = [put_message(db, objects, old_org.id, old_org.domain, week) for _ in range(2)]
    held = [held_key(m.object_key) for m in kept]
    with active_hold(db, old_org.id, "case 22-5") as old_hold:
        setup = run_retention(db, _store(objects), settings=SWEEP,
                              sweep_from=week.monday - timedelta(days=40))
        assert not setup.errors, setup.errors
        assert all(_present(objects, k) for k in held) and not exists(db, week.messages)
    # A new hold on an organisation whose content expires tomorrow.
    new_org = make_org("free")
    live = put_message(db, objects, new_org.id, new_org.domain,
                       created=datetime.now(UTC) - timedelta(days=6), metadata_days=None)
    with active_hold(db, new_org.id, "case 22-4") as new_hold:
        with minio_stopped(stack):
            report = run_retention(db, _store(objects), settings=SWEEP)

        assert any(e.startswith(f"hold {new_hold.id}:") for e in report.errors), report.errors
        assert any(e.startswith(f"released hold {old_hold.id}:") for e in report.errors)
        assert _audited(db, report.run_id) & {"hold_protected", "hold_reconciled"} == set()
        assert db.execute("SELECT object_key FROM messages WHERE id = %s",
                          (live.id,)).fetchone() == (live.object_key,)
        assert _present(objects, live.object_key)
        got = legal_holds.get_hold(db, old_hold.id)
        assert got is not None and got.reconciled_at is None
        assert db.execute("SELECT count(*) FROM messages WHERE org_id = %s AND"
                          " metadata_expires_at = %s", (old_org.id, holds.HELD_AT)
                          ).fetchone() == (2,)
        assert all(_present(objects, k) for k in held)

        again = run_retention(db, _store(objects), settings=SWEEP)

        assert not again.errors, again.errors
        assert db.execute("SELECT object_key FROM messages WHERE id = %s",
                          (live.id,)).fetchone() == (held_key(live.object_key),)
        assert _present(objects, held_key(live.object_key))
        assert not _present(objects, live.object_key)
    assert not any(_present(objects, k) for k in held)
    assert db.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                      (old_org.id,)).fetchone() == (0,)
    (count, detail), = audit_rows(db, "hold_reconciled", f"hold {old_hold.id}")
    assert count == 2 and detail["objects_deleted"] == 2
