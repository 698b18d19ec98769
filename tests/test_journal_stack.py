"""`[milter] accept_after = "journal"` through real Postfix, MinIO and PostgreSQL.

End of message is answered once the message is fsync'd in the spool
directory; postkeep-storage drains it into packs.  What must hold: the milter
touches neither S3 nor PostgreSQL for the message (a session never waits for
them; MinIO stopped changes nothing for the sender), the drain stores every
journaled message byte-exact in one pack per pass, a delivery report that
arrives before the drain waits for it instead of being answered 451, and
an erasure does not miss the address's mail still in the spool.

The module turns the mode on in the stack's postkeep.toml and restarts the
milter, and puts both back afterwards.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import Invoke
from support import smtp
from support.reports import remote_dsn
from support.sidecar import metric
from support.smtp import Sent
from support.stack import Stack, strip_received
from support.wait import until
from test_packs_stack import _burst, _rows
from test_spool_stack import (
    SENDERS,
    _assert_refused_as_meant,
    _assert_stored_exactly_once,
    _kill9,
    _sender,
)

from postkeep.storage.content import packs
from postkeep.storage.content.spool import Spool, waiting_entries

pytestmark = pytest.mark.stack

JOURNALED = 'postkeep_milter_messages_total{outcome="journaled"}'
SPOOLED = 'postkeep_milter_messages_total{outcome="spooled"}'
S3_ERRORS = 'postkeep_milter_backend_errors_total{backend="s3"}'
WAITED_451 = "postkeep_storage_reports_spool_wait_total"


@pytest.fixture(scope="module")
def journal(stack: Stack) -> Iterator[Spool]:
    """The stack's milter with accept_after = 'journal'; its spool."""
    path = Path(stack.env["POSTKEEP_CONFIG"])
    original = path.read_text()
    assert "\n[milter]\n" in original and "accept_after" not in original
    path.write_text(original.replace("\n[milter]\n", '\n[milter]\naccept_after = "journal"\n',
                                     1))
    try:
        stack.stack_ctl("stop", "milter")
        stack.stack_ctl("start", "milter")
        yield Spool(stack.config.milter.outage_spool_directory)
    finally:
        path.write_text(original)
        stack.stack_ctl("stop", "milter")
        stack.stack_ctl("start", "milter")


def _milter(stack: Stack, sample: str) -> float:
    return metric(stack.env["POSTKEEP_MILTER_METRICS"], sample)


def _queued(spool: Spool) -> dict[str, uuid.UUID]:
    """Queue id -> message id of every entry in the journal."""
    return {e.message.queue_id: e.message.id for e in waiting_entries(spool)}


def _all_rows(conn: psycopg.Connection, queue_ids: list[str]
              ) -> dict[str, tuple[uuid.UUID, str]] | None:
    rows = _rows(conn, queue_ids)
    return rows if len(rows) == len(queue_ids) else None


def test_journaled_mail_waits_on_disk_then_one_drain_pass_packs_it_byte_exact(
        stack: Stack, journal: Spool) -> None:
    _, domain = stack.new_org("pro")
    before = _milter(stack, JOURNALED)
    with stack.connect() as conn, journal.drain_lock(wait=30):  # no drain meanwhile
        sent = _burst(stack, domain, 6)
        queue_ids = [q for q, _, _ in sent]
        # Accepted: each is in the journal, and nothing is in PostgreSQL yet.
        assert set(queue_ids) <= set(_queued(journal))
        assert _rows(conn, queue_ids) == {}
    assert _milter(stack, JOURNALED) - before == 6
    with stack.connect() as conn:
        found = until(lambda: _all_rows(conn, queue_ids),
                      "the drain to store the six journaled messages", 60)
    rows: dict[str, tuple[uuid.UUID, str]] = found or {}
    pack_keys = {key for _, key in rows.values()}
    assert len(pack_keys) == 1 and packs.is_pack_key(next(iter(pack_keys))), pack_keys
    # Unlinked once their rows are in (the drain's last step).
    until(lambda: not set(queue_ids) & set(_queued(journal)), "the entries unlinked", 30)
    for queue_id, _data, token in sent:
        mid, key = rows[queue_id]
        assert stack.restored(key, mid) == strip_received(stack.sink_copy(token))


def test_the_journal_accepts_with_minio_stopped_without_trying_s3(
        stack: Stack, journal: Spool) -> None:
    _, domain = stack.new_org("pro")
    token = uuid.uuid4().hex
    data = (f"From: s@{domain}\r\nTo: r@example.net\r\nSubject: minio down\r\n"
            f"X-Test-Token: {token}\r\n\r\nbody {token}\r\n").encode()
    s3_errors, spooled = _milter(stack, S3_ERRORS), _milter(stack, SPOOLED)
    stack.stack_ctl("stop", "minio")
    try:
        reply = smtp.send(*stack.smtp, f"s@{domain}", ["r@example.net"], data)
        assert reply.code == 250 and reply.queue_id, reply.text
        assert reply.queue_id in _queued(journal)
        # Journaled, not spooled after a failed S3 call: the milter made none.
        assert _milter(stack, S3_ERRORS) == s3_errors
        assert _milter(stack, SPOOLED) == spooled
    finally:
        stack.stack_ctl("start", "minio")
    with stack.connect() as conn:
        rows = until(lambda: _rows(conn, [reply.queue_id or ""]),
                     "the drain to store the message once MinIO is back", 120)
    mid, key = rows[reply.queue_id]
    assert stack.restored(key, mid) == strip_received(stack.sink_copy(token))


def test_a_report_before_the_drain_waits_for_it_and_is_recorded_not_answered_451(
        stack: Stack, journal: Spool) -> None:
    _, domain = stack.new_org("basic")
    token = uuid.uuid4().hex
    rcpt = f"j-{token[:8]}@sink.test"
    data = (f"From: app@{domain}\r\nTo: {rcpt}\r\nSubject: early report\r\n"
            f"X-Test-Token: {token}\r\n\r\ntracked {token}\r\n").encode()
    waited = metric(stack.env["POSTKEEP_STORAGE_METRICS"], WAITED_451)
    answers: list[smtp.Reply] = []
    with journal.drain_lock(wait=30):  # the drain cannot run until this ends
        reply = smtp.send(*stack.smtp, f"app@{domain}", [rcpt], data)
        assert reply.code == 250 and reply.queue_id, reply.text
        entry = next(e.message for e in waiting_entries(journal)
                     if e.message.queue_id == reply.queue_id)
        assert entry.return_path
        bounce = remote_dsn(entry.id, rcpt, "failed", "5.1.1", "550 5.1.1 no such user")

        def report() -> None:
            client = smtp.Client("127.0.0.1", int(stack.env["POSTKEEP_STORAGE_LMTP_PORT"]),
                                 greeting="LHLO")
            try:
                answers.append(client.send("", [entry.return_path or ""], bounce))
            finally:
                client.close()

        sender = threading.Thread(target=report)
        sender.start()
        # The report is in, its message still only in the journal; the old
        # sidecar answered 451 at once here.
        sender.join(1.0)
        assert not answers, answers
    sender.join(30)
    assert [a.code for a in answers] == [250], answers
    assert "recorded" in answers[0].text
    assert metric(stack.env["POSTKEEP_STORAGE_METRICS"], WAITED_451) == waited
    with stack.connect() as conn:
        status = conn.execute("SELECT status, dsn_status FROM message_recipients"
                              " WHERE message_id = %s AND recipient = %s",
                              (entry.id, rcpt)).fetchone()
    assert status is not None and tuple(map(str, status)) == ("bounced", "5.1.1")


def test_erase_refuses_while_the_addresss_mail_waits_in_the_spool_then_erases_it(
        stack: Stack, journal: Spool, run: Invoke) -> None:
    org_id, domain = stack.new_org("pro")
    token = uuid.uuid4().hex
    addr = f"gone-{token[:8]}@sink.test"
    data = (f"From: app@{domain}\r\nTo: {addr}\r\nSubject: erase me\r\n"
            f"X-Test-Token: {token}\r\n\r\npersonal {token}\r\n").encode()
    with journal.drain_lock(wait=30):  # accepted, not stored: erasure would miss it
        reply = smtp.send(*stack.smtp, f"app@{domain}", [addr], data)
        assert reply.code == 250 and reply.queue_id, reply.text
        refused = run("erase", "--org", str(org_id), "--address", addr.upper(), "--yes",
                      "--spool-wait", "0.5")
        assert refused.exit_code == 3, refused.output
        assert "1 of its messages still wait in the spool" in refused.output
        # Another address of the organisation is not held up by it.
        other = run("erase", "--org", str(org_id), "--address", f"x-{token[:6]}@sink.test",
                    "--yes", "--spool-wait", "0")
        assert other.exit_code == 0, other.output
    erased = run("erase", "--org", str(org_id), "--address", addr, "--yes")
    assert erased.exit_code == 0, erased.output
    assert "erased 1 messages" in erased.output
    with stack.connect() as conn:
        row = conn.execute("SELECT content_erased_at FROM messages WHERE queue_id = %s",
                           (reply.queue_id,)).fetchone()
    assert row is not None and row[0] is not None


def test_kill9_of_the_journaling_milter_and_the_drain_loses_and_duplicates_nothing(
        stack: Stack, journal: Spool) -> None:
    """Mail flowing from 8 clients through the journal: the drain (postkeep-storage)
    is killed -9 and the journal fills; then the milter is killed -9 too, Postfix
    tempfails while it is dead; both start again.  Every message Postfix
    accepted is stored exactly once, byte-exact; a refused one left nothing
    but what the kill cut in flight."""
    org_id, domain = stack.new_org("pro")  # basic's hourly limit is too low for this
    assert journal.status().entries == 0, "the journal is not empty before the test"

    def accepted_from(sent: list[Sent], since: int, more: int) -> Callable[[], bool]:
        return lambda: sum(s.accepted for s in sent[since:]) >= more

    with smtp.senders(lambda stop, out: _sender(stack, domain, stop, out), SENDERS,
                      300) as sent:
        until(accepted_from(sent, 0, 100), "mail flowing through the journal", 180)
        _kill9(stack, "storage")
        depth = journal.status().entries
        until(lambda: journal.status().entries >= depth + 100,
              "100 more messages journaled with no drain running", 180)
        killed = len(sent)
        _kill9(stack, "milter")
        until(lambda: any(not s.accepted for s in sent[killed:]),
              "mail tempfailed while the milter was dead", 120)
        stack.stack_ctl("start", "milter")
        stack.stack_ctl("start", "storage")
        until(accepted_from(sent, len(sent), 100), "mail accepted again after the restarts",
              240)
    until(lambda: journal.status().entries == 0, "the journal to drain", 300)
    accepted = [s for s in sent if s.accepted]
    _assert_refused_as_meant(stack, org_id, sent, killed, journal)
    _assert_stored_exactly_once(stack, org_id, accepted)
    assert list(journal.quarantine_dir.iterdir()) == []
    # Postfix deferred the success notices postkeep-storage missed while it was
    # dead: every one recorded before the next test, whose own notice would
    # otherwise queue behind hundreds of them.
    queue_ids = [s.queue_id for s in accepted if s.queue_id]
    until(lambda: _notices_all_in(stack, org_id, queue_ids), "every recipient's notice recorded",
          300, interval=2.0)


def _notices_all_in(stack: Stack, org_id: uuid.UUID, queue_ids: list[str]) -> bool:
    """No recipient of the messages Postfix accepted (QUEUE_IDS) still 'queued'
    (postqueue -f first: deliver the deferred notices now)."""
    subprocess.run(["postqueue", "-c", stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-f"],
                   check=False, capture_output=True, timeout=60)
    with stack.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM message_recipients r JOIN messages m ON m.id = r.message_id"
            " AND m.metadata_expires_at = r.metadata_expires_at WHERE m.org_id = %s"
            " AND m.queue_id = ANY(%s) AND r.status = 'queued'", (org_id, queue_ids)).fetchone()
    return row is not None and row[0] == 0
