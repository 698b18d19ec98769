"""Backends stopped for real mid-run: nothing accepted is lost.

A stream of messages flows through Postfix while MinIO (then PostgreSQL) is
stopped and started again, with the outage spool off (`[milter] outage_spool
= false`: the tempfail path; tests/test_spool_stack.py covers spooling through
the same outages).  Every message the client saw accepted must be
fully stored (row + object restoring to the delivered bytes); every other one
must have been tempfailed with 451 4.3.0 naming the backend — never a 5xx,
never a hang, and mail flows again once the backend is back.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from support import smtp
from support.daemon_settings import daemon_settings
from support.refused import assert_refused_left_nothing
from support.smtp import Sent
from support.stack import Stack, load_stack, strip_received
from support.wait import until

pytestmark = pytest.mark.outage


def _tempfailed(backend: str) -> str:
    """The milter's reply text (after the code) when BACKEND cannot take a message."""
    what = {"s3": "content store", "postgres": "metadata database"}[backend]
    return f"4.3.0 postkeep: {what} ({backend}) unavailable, message not accepted; try again later"


@pytest.fixture(scope="module", autouse=True)
def _outage_spool_off(stack: Stack) -> Iterator[None]:
    """Every test here runs against a milter with the outage spool off."""
    with daemon_settings(stack, "milter", {"outage_spool": False}):
        yield


def _message(domain: str, token: str) -> bytes:
    return (f"From: out@{domain}\r\nTo: r@sink.test\r\nSubject: outage {token}\r\n"
            f"X-Test-Token: {token}\r\n\r\n").encode() + b"body line\r\n" * 50


def _send_stream(stack: Stack, domain: str, stop: threading.Event, out: list[Sent]) -> None:
    while not stop.is_set():
        token = uuid.uuid4().hex
        try:
            # Longer than Postfix's milter_content_timeout (120 s): every
            # message gets a definite answer, and is checked by it.
            reply = smtp.send(*stack.smtp, f"out@{domain}", ["r@sink.test"],
                              _message(domain, token), timeout=180)
            out.append(Sent(token, True, reply.code, reply.text, reply.queue_id))
        except smtp.SMTPError as exc:
            out.append(Sent(token, False, exc.reply.code, exc.reply.text, None))
        except OSError as exc:  # no answer at all: counted, and fails the check below
            out.append(Sent(token, False, 0, f"no reply: {exc!r}", None))
        time.sleep(0.02)  # pacing: leaves the two cores some room, synchronises nothing


def _count(sent: list[Sent], since: int, accepted: bool) -> int:
    return sum(s.accepted == accepted for s in sent[since:])


def _run_outage(stack: Stack, service: str) -> list[Sent]:
    """Mail flowing; SERVICE stopped until it has tempfailed some; started
    again, until mail is accepted again.  Every phase ends on what the
    senders saw, never after a fixed time."""
    _, domain = stack.new_org("basic")
    with smtp.senders(lambda stop, sent: _send_stream(stack, domain, stop, sent), 3,
                      240) as sent:
        until(lambda: _count(sent, 0, True) >= 3, "mail accepted before the outage", 120)
        stack.stack_ctl("stop", service)
        down = len(sent)
        try:
            until(lambda: _count(sent, down, False) >= 3, f"mail tempfailed with {service} down",
                  180)
        finally:
            stack.stack_ctl("start", service)
        up = len(sent)
        until(lambda: _count(sent, up, True) >= 3, f"mail accepted again after {service}"
              " restarted", 180)
    return sent


def _assert_nothing_lost(stack: Stack, sent: list[Sent], backend: str) -> None:
    accepted = [s for s in sent if s.accepted]
    refused = [s for s in sent if not s.accepted]
    assert accepted, "no message went through at all"
    assert refused, f"stopping {backend} tempfailed nothing: the outage was not exercised"
    for s in refused:
        assert (s.code, s.text) == (451, _tempfailed(backend)), f"{s.token}: {s.code} {s.text}"
    # Mail flows again after the restart: the last messages were accepted.
    assert sent[-1].accepted or sent[-2].accepted, [(s.code, s.text) for s in sent[-3:]]
    with stack.connect() as conn:
        for s in accepted:
            row = conn.execute(
                "SELECT object_key, sha256, size, org_id, id FROM messages WHERE queue_id = %s",
                (s.queue_id,)).fetchone()
            assert row is not None, f"accepted message {s.queue_id} has no row"
            stored = stack.restored(row[0], row[4])  # by id: a pack may hold several
            assert hashlib.sha256(stored).digest() == bytes(row[1])
            assert stored == strip_received(stack.sink_copy(s.token))
            org_id = row[3]
    # Stored exactly once means none of the tempfailed ones stored at all.
    assert_refused_left_nothing(stack, org_id, [s.token for s in refused])


def test_minio_stopped_mid_run(stack: Stack) -> None:
    sent = _run_outage(load_stack(), "minio")
    _assert_nothing_lost(stack, sent, "s3")


def test_postgres_stopped_mid_run(stack: Stack) -> None:
    sent = _run_outage(load_stack(), "postgres")
    _assert_nothing_lost(stack, sent, "postgres")


def _pids_of(pattern: str) -> list[int]:
    import subprocess

    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_frozen_minio_tempfails_within_timeout(stack: Stack) -> None:
    """MinIO alive but not answering (SIGSTOP): 451 4.3.0 after the S3 timeout."""
    import os
    import signal

    org_id, domain = stack.new_org("basic")
    pids = _pids_of(f"minio server {stack.env['POSTKEEP_STACK_DIR']}")
    assert pids, "MinIO process of the test stack not found"
    refused = uuid.uuid4().hex
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(smtp.SMTPError) as err:
            smtp.send(*stack.smtp, f"out@{domain}", ["r@sink.test"],
                      _message(domain, refused))
        waited = time.monotonic() - started
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert (err.value.reply.code, err.value.reply.text) == (451, _tempfailed("s3"))
    # Bounded by the configured S3 timeout (two attempts), far below Postfix's
    # 120 s: the timeout is what is under test here, so this one elapsed-time
    # bound stays, with twice the room two attempts need.
    assert waited < 4 * stack.config.s3.timeout_seconds + 5
    token = uuid.uuid4().hex
    reply = smtp.send(*stack.smtp, f"out@{domain}", ["r@sink.test"], _message(domain, token))
    assert reply.queue_id
    # MinIO thawed may still finish the PUT it was frozen in: that object must not stay.
    assert_refused_left_nothing(stack, org_id, [refused])


def test_locked_table_tempfails_with_statement_timeout(stack: Stack) -> None:
    """PostgreSQL alive but the insert cannot proceed: 451 after statement_timeout."""
    org_id, domain = stack.new_org("basic")
    refused = uuid.uuid4().hex
    with stack.connect() as locker:
        locker.autocommit = False
        locker.execute("LOCK TABLE message_recipients IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(smtp.SMTPError) as err:
            smtp.send(*stack.smtp, f"out@{domain}", ["r@sink.test"],
                      _message(domain, refused))
        locker.rollback()
    assert (err.value.reply.code, err.value.reply.text) == (451, _tempfailed("postgres"))
    reply = smtp.send(*stack.smtp, f"out@{domain}", ["r@sink.test"],
                      _message(domain, uuid.uuid4().hex))
    assert reply.queue_id
    assert_refused_left_nothing(stack, org_id, [refused])
