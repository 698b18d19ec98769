"""The storage probe, content expiry without lifecycle, and Object Lock,
against the stack's real S3 server: MinIO, or versitygw on the stack
`make test` brings up with S3_SERVER=versitygw ($POSTKEEP_S3_SERVER says
which; each test asserts what that server really does).

Object Lock tests use a bucket of their own, created with Object Lock
(`s3.object_lock = "compliance"`); versitygw has it in posix mode when run
with a versioning directory, as devstack runs it.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import psycopg
import pytest
from conftest import StackEnv, TestOrg
from support.retention import put_message

from postkeep.storage.content.objects import S3ObjectStore, put_content, read_all
from postkeep.storage.lifecycle import erasure, holds, rules
from postkeep.storage.lifecycle.retention import RetentionSettings, run_retention
from postkeep.storage.metadata import legal_holds, messages

pytestmark = pytest.mark.stack

SERVER = os.environ.get("POSTKEEP_S3_SERVER", "minio")


def _cli(config_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    venv = os.environ["POSTKEEP_STACK_VENV"]
    return subprocess.run([f"{venv}/bin/postkeep", "--config", config_path, *args],
                          capture_output=True, text=True, timeout=120, cwd="/")


def _config_file(tmp_path: Path, source: str, **s3: str) -> str:
    """A copy of the stack's postkeep.toml with [s3] keys replaced (mode 0600)."""
    lines = Path(source).read_text().splitlines()
    out, in_s3 = [], False
    for line in lines:
        if line.startswith("["):
            in_s3 = line.strip() == "[s3]"
        key = line.split("=", 1)[0].strip()
        if in_s3 and key in s3:
            continue
        out.append(line)
        if line.strip() == "[s3]":
            out += [f'{k} = "{v}"' for k, v in s3.items()]
    path = tmp_path / "postkeep.toml"
    path.write_text("\n".join(out) + "\n")
    path.chmod(0o600)
    return str(path)


def test_probe_reports_what_this_server_does(stack_env: StackEnv) -> None:
    done = _cli(stack_env.config_path, "storage", "probe", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert {k: status[k] for k in ("put_get", "ranged_get", "multipart", "listing")} == {
        "put_get": "ok", "ranged_get": "ok", "multipart": "ok", "listing": "ok"}
    # MinIO keeps lifecycle rules; versitygw has none, and the probe says so.
    assert status["lifecycle"] == ("missing" if SERVER == "versitygw" else "ok")
    assert "object_lock" not in status  # not configured on the stack's bucket
    assert report["refusal"] is None


def test_the_daemons_log_the_probe_at_start(stack_env: StackEnv) -> None:
    stack_dir = Path(os.environ["POSTKEEP_STACK_DIR"])
    for log in (stack_dir / "milter" / "milter.log", stack_dir / "storage" / "storage.log"):
        lines = [ln for ln in log.read_text().splitlines() if "storage probe" in ln]
        assert lines, f"no storage probe line in {log}"
        assert "put_get=ok" in lines[-1] and "ranged_get=ok" in lines[-1]
        assert ("lifecycle=missing" in lines[-1]) == (SERVER == "versitygw")


def test_content_expiry_without_lifecycle_is_the_sweepers(
        db: psycopg.Connection, objects: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """A classed object past its expiry: MinIO's rule deletes it (left to
    lifecycle); on versitygw, which has no lifecycle, the sweeper does."""
    org = make_org("free")
    created = datetime.now(UTC) - timedelta(days=10)
    m = put_message(db, objects, org.id, org.domain, created=created, content_days=1)
    assert m.object_key.startswith("messages/1d/")
    store = rules.S3Retention(objects.client, objects.bucket)
    report = run_retention(db, store, settings=RetentionSettings(content_expiry="auto"),
                           sweep_from=created - timedelta(days=1))
    assert not report.errors, report.errors
    if SERVER == "versitygw":
        assert report.mode == "sweep"
        assert not store.exists(m.object_key)
    else:
        assert report.mode == "lifecycle"
        assert report.objects_left_to_lifecycle >= 1
        assert store.exists(m.object_key)


def test_probe_refuses_compliance_on_a_bucket_without_object_lock(
        stack_env: StackEnv, tmp_path: Path) -> None:
    path = _config_file(tmp_path, stack_env.config_path, object_lock="compliance")
    done = _cli(path, "storage", "probe")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "object_lock missing" in done.stderr
    assert "bucket has no Object Lock configuration" in done.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_daemon_refuses_to_start_naming_the_lock_the_bucket_lacks(
        stack_env: StackEnv, tmp_path: Path) -> None:
    path = _config_file(tmp_path, stack_env.config_path, object_lock="compliance")
    venv = os.environ["POSTKEEP_STACK_VENV"]
    done = subprocess.run(
        [f"{venv}/bin/postkeep-storage", "--config", path,
         "--listen", f"127.0.0.1:{_free_port()}", "--metrics", f"127.0.0.1:{_free_port()}"],
        capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 2, done.stderr
    assert "start-up refused: storage probe" in done.stderr
    assert "object_lock missing" in done.stderr and "(s3.object_lock)" in done.stderr


def test_probe_sees_object_lock_enforced_on_a_locked_bucket(
        stack_env: StackEnv, locked: S3ObjectStore, tmp_path: Path) -> None:
    path = _config_file(tmp_path, stack_env.config_path, bucket=locked.bucket,
                        object_lock="compliance")
    done = _cli(path, "storage", "probe", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    status = {c["name"]: (c["status"], c["detail"]) for c in json.loads(done.stdout)["checks"]}
    assert status["object_lock"] == ("ok", "a retained version's delete was refused")
    # The probe leaves nothing behind, not even its retained object.
    assert not [o for o in locked.client.list_objects(locked.bucket, prefix="postkeep-probe/",
                                                      recursive=True)]


def test_a_locked_object_cannot_be_deleted_before_its_date(locked: S3ObjectStore) -> None:
    store = rules.S3Retention(locked.client, locked.bucket, object_lock=True)
    body = b"captured message bytes"
    until = datetime.now(UTC) + timedelta(seconds=4)
    key = f"messages/1d/{uuid.uuid4()}.eml.zst"
    put_content(locked, key, io.BytesIO(body), len(body), until)
    got = store.retained_until(key)
    assert got is not None and abs((got - until).total_seconds()) < 1

    assert store.delete_many([key]) == [key]  # refused by the server
    assert read_all(locked, key) == body
    # Once the date has passed the same delete goes through (polled, not timed).
    deadline = time.monotonic() + 60
    while store.delete_many([key]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not store.exists(key)


class _Retaining:
    """put_message's store: every object retained until DATE, as the milter writes."""

    def __init__(self, store: S3ObjectStore, until: datetime) -> None:
        self.store, self.until = store, until

    def put(self, key: str, data: BinaryIO, length: int) -> None:
        put_content(self.store, key, data, length, self.until)


def test_erasure_of_locked_content_erases_metadata_and_reports_the_bytes_kept(
        db: psycopg.Connection, locked: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("basic")
    now = datetime.now(UTC)
    target = "erin@example.net"
    content_at, _ = messages.expiry_dates(now, 7, 30)
    m = put_message(db, _Retaining(locked, content_at), org.id, org.domain,  # type: ignore[arg-type]
                    created=now, recipients=((target, "delivered"),))
    store = rules.S3Retention(locked.client, locked.bucket, object_lock=True)

    rep = erasure.erase_address(db, store, org.id, target)

    assert (rep.messages, rep.objects_deleted, rep.objects_locked) == (1, 0, 1)
    assert rep.locked_until is not None
    assert abs((rep.locked_until - m.content_expires_at).total_seconds()) < 1
    detail = messages.get_message(db, m.id)
    assert detail is not None and detail.message.content_erased_at is not None
    assert target not in repr(detail).lower()
    assert store.exists(m.object_key)  # the bytes remain until the lock expires
    (audit,), = db.execute("SELECT detail FROM retention_audit WHERE action = 'erased'"
                           " AND org_id = %s", (org.id,)).fetchall()
    assert audit["objects_locked"] == 1 and audit["objects_deleted"] == 0


def test_object_lock_leaves_content_to_the_sweeper_and_versions_to_a_noncurrent_rule(
        db: psycopg.Connection, locked: S3ObjectStore) -> None:
    store = rules.S3Retention(locked.client, locked.bucket, object_lock=True)
    report = run_retention(db, store, settings=RetentionSettings(content_expiry="auto"))
    assert not report.errors, report.errors
    assert report.mode == "sweep"  # no class rule may put a delete marker over held content
    if SERVER == "versitygw":
        assert store.rules() is None
    else:
        assert store.versioned()
        assert store.rules() == [rules.PlannedRule(rules.NONCURRENT_RULE, "messages/", 1,
                                                   noncurrent=True)]


def test_a_legal_hold_sets_the_object_lock_flag_instead_of_copying(
        db: psycopg.Connection, locked: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org("basic")
    now = datetime.now(UTC)
    until = now + timedelta(seconds=3)
    m = put_message(db, _Retaining(locked, until), org.id, org.domain,  # type: ignore[arg-type]
                    created=now, recipients=(("frank@example.net", "delivered"),))
    store = rules.S3Retention(locked.client, locked.bucket, object_lock=True)
    hold = legal_holds.add_hold(db, org.id, None, "case 19")

    res = holds.protect(db, store, hold, now - timedelta(days=1))

    assert res.moved == 1
    assert locked.client.is_object_legal_hold_enabled(locked.bucket, m.object_key)
    row = messages.get_message(db, m.id)
    assert row is not None and row.message.object_key == m.object_key  # not moved
    assert not store.exists(layout_held(m.object_key))  # and not copied
    assert holds.protect(db, store, hold, now - timedelta(days=1)).moved == 0  # walked once
    assert store.delete_many([m.object_key]) == [m.object_key]  # retained and held
    # Past its retention date the flag alone must refuse the delete.  MinIO
    # does; versitygw v1.8.0 does not (a version whose retention has passed
    # is deleted despite its legal hold; one without a retention is refused),
    # so this is asserted on MinIO only.  postkeep itself never deletes held
    # content (the sweeper skips it).
    if SERVER != "versitygw":
        deadline = time.monotonic() + 60
        while datetime.now(UTC) <= until + timedelta(seconds=1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.delete_many([m.object_key]) == [m.object_key]
        assert store.exists(m.object_key)

    released = legal_holds.release_hold(db, hold.id)
    holds.reconcile_released(db, store, released, datetime.now(UTC))

    assert not locked.client.is_object_legal_hold_enabled(locked.bucket, m.object_key)
    deadline = time.monotonic() + 60  # (versitygw: its retention may not have passed yet)
    while store.delete_many([m.object_key]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not store.exists(m.object_key)


def layout_held(key: str) -> str:
    from postkeep.storage.content.layout import held_key

    return held_key(key)


def test_the_sweeper_deletes_erased_content_once_its_lock_has_passed(
        db: psycopg.Connection, locked: S3ObjectStore,
        make_org: Callable[..., TestOrg]) -> None:
    """Content expired in the database, but its object still retained for a
    few seconds: erasure leaves the bytes, and the next run after the lock
    passed deletes them (erased rows are swept under Object Lock)."""
    org = make_org("basic")
    created = datetime.now(UTC) - timedelta(days=2)
    until = datetime.now(UTC) + timedelta(seconds=3)
    target = "gina@example.net"
    m = put_message(db, _Retaining(locked, until), org.id, org.domain,  # type: ignore[arg-type]
                    created=created, content_days=1, recipients=((target, "delivered"),))
    store = rules.S3Retention(locked.client, locked.bucket, object_lock=True)
    assert erasure.erase_address(db, store, org.id, target).objects_locked == 1
    deadline = time.monotonic() + 60
    while datetime.now(UTC) <= until + timedelta(seconds=1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.exists(m.object_key)

    report = run_retention(db, store, settings=RetentionSettings(content_expiry="auto"),
                           sweep_from=created - timedelta(days=1))

    assert not report.errors, report.errors
    assert not store.exists(m.object_key)
