"""Retention end to end: mail through Postfix and the milter, then `postkeep` commands.

Captured mail lands under its retention class (free: messages/7d/), a held
organisation's under messages/hold/.  The test then backdates the captured
rows into a week of its own in the past (as if 30 days had gone by), erases
one address, runs `postkeep retention run`, and checks what a user relies on:
the week's partitions are gone and with them the rows and objects, the
statistics for the day remain, the audit says what happened, the held
organisation's mail is intact and still restorable byte for byte, the erased
address is nowhere, and erasure under a hold is refused naming it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from support import smtp
from support.retention import audit_rows, exists, past_week, stats_row
from support.stack import Stack, strip_received

from postkeep.storage.lifecycle import holds, rules
from postkeep.storage.metadata import legal_holds, messages

pytestmark = pytest.mark.stack

SCRIPT = Path(sys.executable).with_name("postkeep")


def _postkeep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def _send(stack: Stack, domain: str, rcpts: list[str], subject: str) -> tuple[str, str]:
    """Send one message; return (queue id, token)."""
    token = uuid.uuid4().hex
    sender = f"app@{domain}"
    data = (f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
            f"X-Test-Token: {token}\r\n\r\nHello, this is {subject}.\r\n").encode()
    reply = smtp.send(*stack.smtp, sender, rcpts, data)
    assert reply.queue_id, reply.text
    return reply.queue_id, token


def _row(conn: psycopg.Connection, queue_id: str) -> messages.MessageRow:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = conn.execute("SELECT id FROM messages WHERE queue_id = %s", (queue_id,)).fetchone()
        if row:
            detail = messages.get_message(conn, row[0])
            assert detail is not None
            return detail.message
        time.sleep(0.2)
    raise AssertionError(f"no messages row for queue id {queue_id}")


def _wait_relayed(conn: psycopg.Connection, ids: list[uuid.UUID], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute("SELECT count(*) FILTER (WHERE status <> 'relayed'), count(*)"
                           " FROM message_recipients WHERE message_id = ANY(%s)",
                           (ids,)).fetchone()
        if row is not None and row[0] == 0 and row[1] > 0:
            return
        time.sleep(0.3)
    raise AssertionError("the relayed notices never came back")


def _backdate(conn: psycopg.Connection, ids: list[uuid.UUID], stamp: datetime) -> None:
    """Move rows as if captured 30 days before STAMP (free tier: content 7, metadata 30)."""
    created = stamp - timedelta(days=30)
    with conn.transaction():
        conn.execute(
            "UPDATE messages SET created_at = %s, content_expires_at = %s,"
            " metadata_expires_at = %s WHERE id = ANY(%s)",
            (created, created + timedelta(days=7), stamp, ids))
        conn.execute(
            "UPDATE message_recipients SET created_at = %s, metadata_expires_at = %s"
            " WHERE message_id = ANY(%s)", (created, stamp, ids))
        # Delivery reports already recorded for them follow their message.
        conn.execute("UPDATE recipient_events SET metadata_expires_at = %s"
                     " WHERE message_id = ANY(%s)", (stamp, ids))


def test_mail_through_postfix_expires_is_held_and_erased(stack: Stack) -> None:
    started = datetime.now(UTC)
    free_id, free_domain = stack.new_org("free")
    held_id, held_domain = stack.new_org("free")
    with stack.connect() as conn:
        free_name = conn.execute("SELECT name FROM organisations WHERE id = %s",
                                 (free_id,)).fetchone()[0]  # type: ignore[index]
        held_name = conn.execute("SELECT name FROM organisations WHERE id = %s",
                                 (held_id,)).fetchone()[0]  # type: ignore[index]
    hold = _postkeep("hold", "add", "--org", held_name, "--reason", "litigation 42")
    assert hold.returncode == 0, hold.stderr
    hold_id = int(hold.stdout.split()[1])

    sent = {
        "two": _send(stack, free_domain, ["alice@sink.test", "bob@sink.test"], "two rcpts"),
        "one": _send(stack, free_domain, ["carol@sink.test"], "one rcpt"),
        "erin": _send(stack, free_domain, ["Erin@Sink.test"], "for erin@sink.test"),
        "held": _send(stack, held_domain, ["dan@sink.test", "erin@sink.test"], "held mail"),
    }
    delivered = {k: stack.sink_copy(tok) for k, (_, tok) in sent.items()}
    with stack.connect() as conn:
        rows = {k: _row(conn, qid) for k, (qid, _) in sent.items()}
        # Postfix's success notices come back through postkeep-storage: wait
        # for them, so the report history exists and is expired, held and
        # erased along with its message.
        _wait_relayed(conn, [m.id for m in rows.values()])
        assert rows["two"].object_key.startswith(f"messages/7d/{free_id}/")
        # The organisation was under a hold at capture: out of lifecycle reach at once.
        assert rows["held"].object_key.startswith(f"messages/hold/{held_id}/")

        week = past_week(conn)
        stamp = week.monday + timedelta(days=1)
        expired = [rows[k].id for k in ("two", "one", "held")]
        _backdate(conn, expired, stamp)
        day = (stamp - timedelta(days=30)).date()

    # Erasure under the hold is refused, naming it; elsewhere it goes ahead.
    refused = _postkeep("erase", "--yes", "--org", held_name, "--address", "erin@sink.test")
    assert refused.returncode == 1
    assert f"hold {hold_id} on org {held_name} (litigation 42)" in refused.stderr
    erased = _postkeep("erase", "--yes", "--org", free_name, "--address", "erin@sink.test")
    assert erased.returncode == 0, erased.stderr
    assert erased.stdout.startswith("erased 1 messages of erin@sink.test")

    run = _postkeep("retention", "run", "--content-expiry", "sweep", "--sweep-from",
                    (week.monday - timedelta(days=60)).isoformat())
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"retention: dropped {week.messages} and {week.recipients}" in run.stderr

    objects = stack.objects()
    store = rules.S3Retention(objects.client, objects.bucket)
    with stack.connect() as conn:
        # Metadata went with the partitions, content with the sweep.
        assert not exists(conn, week.messages) and not exists(conn, week.recipients)
        for k in ("two", "one"):
            assert messages.get_message(conn, rows[k].id) is None
            assert not store.exists(rows[k].object_key)
        (count, detail), = audit_rows(conn, "partition_dropped", week.messages, started)
        assert count == 2 and detail["recipients"] == 3 and detail["held_messages_kept"] == 1
        swept = conn.execute("SELECT sum(count) FROM retention_audit WHERE action ="
                             " 'content_swept' AND at >= %s", (started,)).fetchone()
        assert swept is not None and swept[0] >= 2
        # The day's statistics outlive the rows.
        s = stats_row(conn, free_id, day)
        assert (s["messages"], s["sent"], s["delivered"]) == (2, 3, 3)
        events = conn.execute("SELECT count(*) FROM recipient_events WHERE message_id = ANY(%s)",
                              ([rows["two"].id, rows["one"].id],)).fetchone()
        assert events == (0,), "their report history went with the week's partitions"
        held_events = conn.execute(
            "SELECT recipient, metadata_expires_at, held_metadata_expires_at"
            " FROM recipient_events WHERE message_id = %s ORDER BY recipient",
            (rows["held"].id,)).fetchall()
        assert [(r, m, h) for r, m, h in held_events] == [
            ("dan@sink.test", holds.HELD_AT, stamp), ("erin@sink.test", holds.HELD_AT, stamp)]
        assert s["bytes"] == rows["two"].size + rows["one"].size
        assert stats_row(conn, held_id, day)["messages"] == 1

        # The held organisation's message: metadata and content intact.
        held = messages.get_message(conn, rows["held"].id)
        assert held is not None
        assert held.message.held_metadata_expires_at == stamp
        assert sorted(r.recipient for r in held.recipients) == ["dan@sink.test",
                                                                 "erin@sink.test"]
        assert legal_holds.list_holds(conn, held_id)[0].id == hold_id

        # The erased address is nowhere in its message; the content is gone.
        e = messages.get_message(conn, rows["erin"].id)
        assert e is not None and e.message.content_erased_at is not None
        assert "erin" not in repr(e).lower()
        assert not store.exists(rows["erin"].object_key)
        history = conn.execute("SELECT recipient, diagnostic FROM recipient_events"
                               " WHERE message_id = %s", (rows["erin"].id,)).fetchall()
        assert history and all("erin" not in repr(h).lower() for h in history)
        # Status and history still pair up under the redacted name.
        assert {h[0] for h in history} == {r.recipient for r in e.recipients}

    raw = subprocess.run([str(SCRIPT), "messages", "raw", str(rows["held"].id)],
                         capture_output=True, timeout=60, check=False)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == strip_received(delivered["held"])
    assert hashlib.sha256(raw.stdout).digest() == rows["held"].sha256
    show = _postkeep("messages", "show", str(rows["erin"].id))
    assert "content:             content erased on request" in show.stdout

    # Released: the next run applies the retention the hold held back.
    assert _postkeep("hold", "remove", "--yes", str(hold_id)).returncode == 0
    run = _postkeep("retention", "run", "--content-expiry", "sweep")
    assert run.returncode == 0, run.stdout + run.stderr
    with stack.connect() as conn:
        assert messages.get_message(conn, rows["held"].id) is None
        assert stats_row(conn, held_id, day)["messages"] == 1
    assert not store.exists(rows["held"].object_key)
