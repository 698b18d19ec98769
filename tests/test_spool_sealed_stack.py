"""The outage spool sealed at rest, drained into sealed packs: PostgreSQL
stopped for real (storage/content/spool.py format 2, packing.py; issue 19).

A message Postfix hands over while PostgreSQL is down is spooled sealed
under a per-file key the master key wraps: the spool file holds neither its
body nor its envelope.  `postkeep spool drain` then stores it as the group
commit stores live mail, in a pack, sealed under its own data key: MinIO's
pack does not hold it either, and it restores byte for byte.  An entry
written unsealed (before a master key was configured) drains the same way.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time
import uuid
import zlib
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import zstandard
from support import smtp
from support.stack import Stack, strip_received

from postkeep.storage.content import packs, sealed_objects, sealing
from postkeep.storage.content.objects import message_key
from postkeep.storage.content.spool import MAGIC, MAGIC_SEALED, Spool
from postkeep.storage.metadata.messages import CapturedMessage, expiry_dates

pytestmark = pytest.mark.outage

RCPTS = ["r1@sink.test", "r2@sink.test"]


def _message(domain: str, token: str) -> bytes:
    return (f"From: out@{domain}\r\nTo: r1@sink.test, r2@sink.test\r\n"
            f"Subject: sealed spool {token}\r\nMessage-ID: <{token}@{domain}>\r\n"
            f"X-Test-Token: {token}\r\n\r\n").encode() + (b"secret line %s\r\n"
                                                          % token.encode()) * 40


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    venv = stack.env.get("POSTKEEP_STACK_VENV") or str(Path(__file__).parents[1] / ".venv")
    return subprocess.run([str(Path(venv) / "bin" / "postkeep"), "--config",
                           stack.env["POSTKEEP_CONFIG"], *args],
                          cwd="/", capture_output=True, text=True, timeout=300)


def _captured(stack: Stack, domain: str, timeout: float = 120) -> None:
    """Send until a message is captured directly: the milter knows the
    organisation (so it can spool its mail while PostgreSQL is down)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = smtp.send(*stack.smtp, f"out@{domain}", RCPTS,
                              _message(domain, uuid.uuid4().hex))
            with stack.connect() as conn:
                if conn.execute("SELECT 1 FROM messages WHERE queue_id = %s",
                                (reply.queue_id,)).fetchone():
                    return
        except smtp.SMTPError:
            pass
        assert time.monotonic() < deadline, "the milter never captured directly"
        time.sleep(1)


def _old_entry(spool: Spool, org_id: uuid.UUID, domain: str, body: bytes) -> CapturedMessage:
    """A format 1 (unsealed) entry, as written before the master key was configured."""
    created = datetime.now(UTC)
    mid = uuid.uuid4()
    blob = zstandard.ZstdCompressor().compress(body)
    content_at, metadata_at = expiry_dates(created, 7, 30)
    m = CapturedMessage(
        id=mid, org_id=org_id, domain=domain, queue_id=f"OLD{zlib.crc32(mid.bytes):08X}",
        envelope_from=f"out@{domain}", recipients=tuple(RCPTS), size=len(body),
        sha256=bytes(32), object_key=message_key(str(org_id), str(mid), created, 7),
        compressed_size=len(blob), created_at=created, content_expires_at=content_at,
        metadata_expires_at=metadata_at, message_id_header=f"<{mid}@{domain}>",
        header_from=f"out@{domain}", subject="old entry")
    path = spool.write(m, io.BytesIO(blob), "postgres: down", sealed=False)
    assert path.read_bytes().startswith(MAGIC)
    return m


def _assert_sealed_in_a_pack(stack: Stack, conn: psycopg.Connection, mid: uuid.UUID,
                             secret: bytes) -> str:
    row = conn.execute("SELECT object_key FROM messages WHERE id = %s", (mid,)).fetchone()
    assert row is not None, f"message {mid} was not drained"
    key = row[0]
    assert packs.is_pack_key(key), key  # packed, as the group commit packs live mail
    where = packs.location(conn, mid)
    assert where is not None and where.format == packs.FORMAT_SEALED
    assert conn.execute("SELECT count(*) FROM message_keys WHERE message_id = %s",
                        (mid,)).fetchone() == (1,)
    assert secret not in b"".join(stack.objects().get(key))
    return str(key)


def test_a_message_spooled_while_postgres_is_down_is_sealed_on_disk_and_in_s3(
        stack: Stack) -> None:
    assert stack.config.storage.master_key_bytes() is not None
    org_id, domain = stack.new_org("basic")
    _captured(stack, domain)
    spool = Spool(stack.config.milter.outage_spool_directory)
    token = uuid.uuid4().hex
    old_body = b"Subject: old\r\n\r\nold secret " + uuid.uuid4().hex.encode() + b"\r\n"
    stack.stack_ctl("stop", "storage")  # only `postkeep spool drain` drains here
    try:
        stack.stack_ctl("stop", "postgres")
        try:
            reply = smtp.send(*stack.smtp, f"out@{domain}", RCPTS, _message(domain, token))
            assert reply.code == 250, reply.text
        finally:
            stack.stack_ctl("start", "postgres")
        [path] = [p for p in spool.entries() if p.read_bytes().startswith(MAGIC_SEALED)
                  and spool.open_entry(p).message.queue_id == reply.queue_id]
        raw = path.read_bytes()
        assert token.encode() not in raw and b"secret line" not in raw
        assert domain.encode() not in raw and b"r1@sink.test" not in raw  # envelope too
        old = _old_entry(spool, org_id, domain, old_body)
        drained = _cli(stack, "spool", "drain", "--yes", "--wait", "60")
        assert drained.returncode == 0, drained.stderr
    finally:
        stack.stack_ctl("start", "storage")
    assert not path.exists()
    delivered = strip_received(stack.sink_copy(token))
    with sealing.using(stack.config.storage.master_key_bytes()), stack.connect() as conn:
        row = conn.execute("SELECT id FROM messages WHERE queue_id = %s",
                           (reply.queue_id,)).fetchone()
        assert row is not None
        key = _assert_sealed_in_a_pack(stack, conn, row[0], token.encode())
        assert stack.restored(key, row[0]) == delivered
        old_key = _assert_sealed_in_a_pack(stack, conn, old.id, old_body[-34:])
        assert stack.restored(old_key, old.id) == old_body


def test_a_large_message_spooled_while_postgres_is_down_is_drained_into_a_sealed_own_object(
        stack: Stack) -> None:
    """Over the pack threshold: drained into its own object, sealed segment by
    segment under its own data key (sealed_objects.py), as the milter stores
    large live mail."""
    _, domain = stack.new_org("basic")
    _captured(stack, domain)
    spool = Spool(stack.config.milter.outage_spool_directory)
    token = uuid.uuid4().hex
    noise = base64.encodebytes(os.urandom(420_000))  # incompressible: > 256 KiB stored
    body = _message(domain, token) + noise.replace(b"\n", b"\r\n")
    stack.stack_ctl("stop", "storage")
    try:
        stack.stack_ctl("stop", "postgres")
        try:
            reply = smtp.send(*stack.smtp, f"out@{domain}", RCPTS, body)
            assert reply.code == 250, reply.text
        finally:
            stack.stack_ctl("start", "postgres")
        assert any(spool.open_entry(p).message.queue_id == reply.queue_id
                   for p in spool.entries())
        drained = _cli(stack, "spool", "drain", "--yes", "--wait", "60")
        assert drained.returncode == 0, drained.stderr
    finally:
        stack.stack_ctl("start", "storage")
    delivered = strip_received(stack.sink_copy(token))
    with sealing.using(stack.config.storage.master_key_bytes()), stack.connect() as conn:
        row = conn.execute("SELECT id, object_key FROM messages WHERE queue_id = %s",
                           (reply.queue_id,)).fetchone()
        assert row is not None, "not drained"
        mid, key = row
        assert not packs.is_pack_key(key) and packs.location(conn, mid) is None
        assert conn.execute("SELECT count(*) FROM message_keys WHERE message_id = %s",
                            (mid,)).fetchone() == (1,)
        stored = b"".join(stack.objects().get(key))
        assert sealed_objects.is_sealed_object(stored[:8]), stored[:8]
        assert token.encode() not in stored and noise[:64] not in stored
        assert stack.restored(key, mid) == delivered
