"""The event outbox through the real stack (issue 18, migration 0017).

Mail sent through Postfix to a remote MX on loopback that refuses unknown-*
with 550 5.1.1: the capture writes `accepted`, Postfix's failure notice
recorded by postkeep-storage writes `bounced` and (the hard bounce
suppresses the address) `suppressed`, each in the transaction of its change,
in that id order; a LISTEN connection is woken with 'org_id:id' for each.  A
rolled-back change leaves no event and no notification; a tenant role reads
only its organisation's events.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import psycopg
import pytest
from conftest import act_as, dashboard_role
from support import smtp
from support.reports import remote_dsn
from support.smtp_server import RemoteMX, serve_remote_mx
from support.stack import Stack
from support.wait import until
from support.webhook_receiver import receiver
from support.webhooks import add_endpoint

from postkeep import webhooks as signing
from postkeep.storage.metadata import events

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "events.schema.json").read_text())

pytestmark = pytest.mark.stack


@pytest.fixture
def remote_mx(stack: Stack) -> Iterator[RemoteMX]:
    with serve_remote_mx(int(stack.env["POSTKEEP_FAKE_MX_PORT"])) as mx:
        _flush(stack)
        yield mx


def _flush(stack: Stack) -> None:
    """postqueue -f: clears a dead-destination mark an earlier test may have
    left on mx.test's next hop (see test_suppression_stack._flush)."""
    subprocess.run(["postqueue", "-c", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f"],
                   check=False, capture_output=True, timeout=30)


@pytest.fixture
def listener(stack: Stack) -> Iterator[psycopg.Connection]:
    conn = stack.connect()
    conn.autocommit = True
    events.listen(conn)
    try:
        yield conn
    finally:
        conn.close()


def _send(stack: Stack, domain: str, rcpt: str) -> tuple[uuid.UUID, str]:
    token = uuid.uuid4().hex[:10]
    header = f"<{token}@{domain}>"
    body = (f"From: app@{domain}\r\nTo: {rcpt}\r\nSubject: events {token}\r\n"
            f"Message-ID: {header}\r\nX-Postkeep-Tag: lead_id=981\r\n\r\nHello.\r\n").encode()
    reply = smtp.send(*stack.smtp, f"app@{domain}", [rcpt], body)
    with stack.connect() as conn:
        row = conn.execute("SELECT id FROM messages WHERE queue_id = %s",
                           (reply.queue_id,)).fetchone()
    assert row is not None, reply
    return uuid.UUID(str(row[0])), header


def _events(stack: Stack, org: uuid.UUID) -> list[events.Event]:
    with stack.connect() as conn:
        return events.fetch_events(conn, org, 0, 100)


def _collect(conn: psycopg.Connection, org: uuid.UUID, want: int,
             timeout: float = 30) -> list[events.Notice]:
    got: list[events.Notice] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and (left := deadline - time.monotonic()) > 0:
        got.extend(n for n in events.notices(conn, min(left, 1.0)) if n.org_id == org)
    return got


def test_a_bounced_message_emits_accepted_bounced_suppressed_in_order_and_notifies(
        stack: Stack, remote_mx: RemoteMX, listener: psycopg.Connection) -> None:
    org, domain = stack.new_org()
    rcpt = f"unknown-{uuid.uuid4().hex[:10]}@mx.test"
    mid, header = _send(stack, domain, rcpt)
    found = until(lambda: _flush(stack) or (
        len(e := _events(stack, org)) >= 3 and e), "accepted, bounced, suppressed", timeout=90)
    assert [e.event_type for e in found] == ["accepted", "bounced", "suppressed"], found
    assert [e.id for e in found] == sorted(e.id for e in found)
    accepted, bounced, suppressed = found
    for e in found:
        p = e.payload
        assert p["schema"] == "postkeep.event.v1" and p["id"] == e.id and p["type"] == e.event_type
        assert (p["postkeep_id"], p["message_id"], p["org_id"]) == (str(mid), header, str(org))
        assert (e.org_id, e.message_id) == (org, mid)
        assert p["tags"].get("lead_id") == "981", p
        # The documented schema: every required field, a known type.
        assert set(SCHEMA["required"]) <= p.keys(), p
        assert p["type"] in SCHEMA["properties"]["type"]["enum"]
        datetime.fromisoformat(p["event_at"].replace("Z", "+00:00"))
        datetime.fromisoformat(p["recorded_at"].replace("Z", "+00:00"))
    assert accepted.recipient is None and accepted.payload["recipients"] == [rcpt]
    assert accepted.payload["status"] == "accepted"
    assert (bounced.recipient, bounced.payload["recipient"]) == (rcpt, rcpt)
    assert (bounced.payload["status"], bounced.payload["dsn_status"]) == ("bounced", "5.1.1")
    assert "5.1.1" in (bounced.payload["remote_reply"] or ""), bounced.payload
    assert suppressed.recipient == rcpt
    assert (suppressed.payload["reason"], suppressed.payload["source"]) == (
        "hard_bounce", "outcome")
    # The stream: one notice per event, 'org_id:id', after each commit.
    notes = _collect(listener, org, 3)
    assert [n.id for n in notes] == [e.id for e in found]
    # A reader resumes after the last id it has.
    with stack.connect() as conn:
        assert events.fetch_events(conn, org, accepted.id, 100) == [bounced, suppressed]
        assert events.fetch_events(conn, org, 0, 1) == [accepted]


def test_a_rolled_back_change_leaves_no_event_and_no_notice(
        stack: Stack, db: psycopg.Connection, make_org, store_message,  # type: ignore[no-untyped-def]
        listener: psycopg.Connection) -> None:
    org = make_org()
    with db.transaction(force_rollback=True):
        m = store_message(org, recipients=("a@example.net", "b@example.net"))
        inside = events.fetch_events(db, org.id)
        # Written by the capture's own statement, recipients in the payload.
        assert [(e.event_type, e.message_id) for e in inside] == [("accepted", m.id)]
        assert inside[0].payload["recipients"] == ["a@example.net", "b@example.net"]
    assert events.fetch_events(db, org.id) == []
    assert _collect(listener, org.id, 1, timeout=2) == []
    # Committed, the same capture has its event and its notice.
    m = store_message(org)
    after = events.fetch_events(db, org.id)
    assert [(e.event_type, e.message_id) for e in after] == [("accepted", m.id)]
    assert [n.id for n in _collect(listener, org.id, 1)] == [after[0].id]


def test_a_tenant_role_reads_only_its_own_events(
        db: psycopg.Connection, make_org, store_message) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = make_org(), make_org()
    store_message(mine)
    store_message(theirs)
    with dashboard_role(db, "event_outbox") as role:
        with db.transaction(force_rollback=True):
            act_as(db, role, mine.id)
            rows = db.execute("SELECT DISTINCT org_id FROM event_outbox").fetchall()
            assert rows == [(mine.id,)]
        with db.transaction(force_rollback=True):
            act_as(db, role, None)
            assert db.execute("SELECT count(*) FROM event_outbox").fetchone() == (0,)
    # postkeep_tenant (what `postkeep tenant grant` joins) may read it.
    assert db.execute("SELECT has_table_privilege('postkeep_tenant', 'event_outbox',"
                      " 'SELECT')").fetchone() == (True,)


def test_a_reply_linked_to_its_sent_message_emits_replied(
        db: psycopg.Connection, make_org, store_message) -> None:  # type: ignore[no-untyped-def]
    from postkeep.storage.metadata import inbound

    org = make_org()
    sent = store_message(org, recipients=("lead@example.net",))
    reply = store_message(org, envelope_from="lead@example.net", subject="Re: hi")
    db.execute("UPDATE messages SET direction = 'inbound', message_type = 'reply'"
               " WHERE id = %s", (reply.id,))
    # As storage/reports/inbound.py links it once its rows are in.
    inbound.set_parent(db, reply.id, reply.metadata_expires_at,
                       inbound.Parent(sent.id, sent.metadata_expires_at))
    got = events.fetch_events(db, org.id)
    assert [e.event_type for e in got] == ["accepted", "accepted", "replied"]
    replied = got[-1]
    assert (replied.message_id, replied.recipient) == (sent.id, "lead@example.net")
    p = replied.payload
    assert (p["postkeep_id"], p["message_id"]) == (str(sent.id), sent.message_id_header)
    assert (p["reply_postkeep_id"], p["status"]) == (str(reply.id), "reply")
    # Linking it again to the same message is no new reply.
    inbound.set_parent(db, reply.id, reply.metadata_expires_at,
                       inbound.Parent(sent.id, sent.metadata_expires_at))
    assert len(events.fetch_events(db, org.id)) == 3


def test_partitions_are_made_ahead_and_old_days_dropped(db: psycopg.Connection) -> None:
    old = "event_outbox_d20200101"
    db.execute(f"CREATE TABLE IF NOT EXISTS {old} PARTITION OF event_outbox"
               " FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00')")
    assert events.maintain_event_partitions(db, 7) >= 1
    parts = {r[0] for r in db.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'event_outbox'::regclass").fetchall()}
    assert old not in parts
    day = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date").fetchone()
    assert day is not None
    for ahead in range(3):
        d = date.fromordinal(day[0].toordinal() + ahead)
        assert f"event_outbox_d{d:%Y%m%d}" in parts, parts
    assert "event_outbox_default" in parts
    # Every partition is secured for tenants (RLS on, the tenant policy).
    assert db.execute("SELECT count(*) FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid"
                      " WHERE i.inhparent = 'event_outbox'::regclass"
                      " AND NOT c.relrowsecurity").fetchone() == (0,)
    assert events.maintain_event_partitions(db, 7) == 0  # idempotent


def test_a_retried_capture_writes_no_second_accepted(
        db: psycopg.Connection, make_org, store_message) -> None:  # type: ignore[no-untyped-def]
    from postkeep.storage.metadata import messages

    org = make_org()
    m = store_message(org)
    # A retry after a lost COMMIT reply (ON CONFLICT DO NOTHING): no new rows, no event.
    messages.record_captures(db, [m])
    assert [e.event_type for e in events.fetch_events(db, org.id)] == ["accepted"]




def test_relayed_then_delivered_by_the_remote_dsn_reach_a_webhook_in_order(
        stack: Stack) -> None:
    org, domain = stack.new_org()
    rcpt = f"reader-{uuid.uuid4().hex[:10]}@sink.test"
    with receiver() as rx:
        _, secret = add_endpoint(stack, org, rx.url("/d"))
        mid, header = _send(stack, domain, rcpt)
        until(lambda: [e.event_type for e in _events(stack, org)] == ["accepted", "relayed"],
              "accepted and Postfix's relayed", timeout=60)
        with stack.connect() as conn:
            row = conn.execute("SELECT return_path FROM messages WHERE id = %s",
                               (mid,)).fetchone()
        assert row is not None
        # The remote server's own success DSN, to the signed return path, as
        # Postfix hands it to postkeep-storage over LMTP.
        lmtp = smtp.Client("127.0.0.1", int(stack.env["POSTKEEP_STORAGE_LMTP_PORT"]),
                           greeting="LHLO")
        try:
            success = remote_dsn(mid, rcpt, "delivered", "2.0.0", "250 2.0.0 stored in the mailbox",
                                 mta="mx.test", subject="Delivery Status Notification (Success)")
            reply = lmtp.send("", [str(row[0])], success)
        finally:
            lmtp.close()
        assert reply.code == 250, reply
        found = until(lambda: len(e := _events(stack, org)) >= 3 and e, "delivered", timeout=30)
        assert [e.event_type for e in found] == ["accepted", "relayed", "delivered"], found
        delivered = found[-1].payload
        assert (delivered["recipient"], delivered["status"], delivered["dsn_status"]) == (
            rcpt, "delivered", "2.0.0")
        assert delivered["message_id"] == header and delivered["tags"] == {"lead_id": "981"}
        assert "stored in the mailbox" in (delivered["remote_reply"] or "")
        # All three at the organisation's endpoint, signed, in the order written.
        got = until(lambda: len(r := rx.got("/d")) >= 3 and r, "three deliveries", timeout=60)
        assert [int(r.headers["postkeep-event-id"]) for r in got] == [e.id for e in found]
        assert [r.event for r in got] == [e.payload for e in found]
        assert all(signing.verify(secret, r.headers["postkeep-signature"], r.body) for r in got)
