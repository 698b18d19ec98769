"""Reports attributed by where they arrive, through the real stack.

Postfix's own VERP (XVERP on MAIL FROM, added by the bundle's command filter)
gives each recipient's copy its own return path,
pk-<id>-<expiry>-<MAC>+<local>=<domain>@<bounce domain>, after the milter has
changed the sender to the signed return path.  A remote server's late bounce
in a format no parser reads (plain text, no recipient named) sent to one
recipient's return path bounces that recipient and no other.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from support import smtp
from support.smtp_server import RemoteMX, serve_remote_mx
from support.stack import Stack
from support.wait import until

pytestmark = pytest.mark.stack



@pytest.fixture
def remote_mx(stack: Stack) -> Iterator[RemoteMX]:
    with serve_remote_mx(int(stack.env["POSTKEEP_FAKE_MX_PORT"])) as mx:
        yield mx


def _recipients(stack: Stack, mid: uuid.UUID) -> dict[str, tuple[str, str | None, str | None]]:
    with stack.connect() as conn:
        rows = conn.execute(
            "SELECT recipient, status, dsn_status, diagnostic FROM message_recipients"
            " WHERE message_id = %s", (mid,)).fetchall()
    return {str(r[0]): (str(r[1]), r[2], r[3]) for r in rows}


def _plain_bounce(to: str) -> bytes:
    # No DSN fields, no recipient named anywhere, no copy of the message: only
    # the address it arrives at says whose it is.  Dated a few seconds on, as a
    # later event than Postfix's 'relayed' notice whichever arrives first.
    dated = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(time.time() + 5))
    return (
        "From: Mail Delivery System <Mailer-Daemon@mx.test>\r\n"
        f"To: {to}\r\nDate: {dated}\r\n"
        "Subject: Undeliverable: your message\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@mx.test>\r\n\r\n"
        "Your message could not be delivered. The mailbox you wrote to is\r\n"
        "unavailable: 550 5.2.1 mailbox disabled, not accepting messages.\r\n"
    ).encode()


def test_a_plain_bounce_at_a_recipients_verp_return_path_bounces_that_recipient(
        stack: Stack, remote_mx: RemoteMX) -> None:
    _, domain = stack.new_org("pro")
    token = uuid.uuid4().hex[:10]
    ok, later, unknown = (f"ok-{token}@mx.test", f"later-{token}@mx.test",
                          f"unknown-{token}@mx.test")
    body = (f"From: app@{domain}\r\nTo: customers@{domain}\r\nSubject: verp {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\nHello.\r\n").encode()
    reply = smtp.send(*stack.smtp, f"app@{domain}", [ok, later, unknown], body)
    mid, rpath = stack.sent(reply.queue_id)
    base, _, bounce_domain = rpath.partition("@")

    # Each copy left from its recipient's VERP form of the signed return path:
    # XVERP survived the milter's change of sender.
    until(lambda: len(remote_mx.senders) == 3, "the remote MX to see all three recipients")
    for rcpt in (ok, later, unknown):
        local, _, rdomain = rcpt.partition("@")
        assert remote_mx.senders[rcpt] == f"{base}+{local}={rdomain}@{bounce_domain}"

    # The refusal at RCPT: Postfix's own notice, to the refused recipient's VERP
    # return path; Postfix's success notices for the other two.
    until(lambda: _recipients(stack, mid).get(unknown, ("",))[0] == "bounced"
          and _recipients(stack, mid)[ok][0] == "relayed"
          and _recipients(stack, mid)[later][0] == "relayed",
          "Postfix's notices for all three recipients", timeout=60)

    # The remote server's late bounce, in no format a parser reads, arrives at
    # LATER's return path (through Postfix, like any remote bounce).
    local, _, rdomain = later.partition("@")
    verp = f"{base}+{local}={rdomain}@{bounce_domain}"
    smtp.send(*stack.smtp, "", [verp], _plain_bounce(verp))
    rows = until(lambda: (r := _recipients(stack, mid))[later][0] == "bounced" and r,
                 "the late bounce to be recorded for its VERP recipient", timeout=60)
    assert rows[later][1] == "5.2.1"
    assert "mailbox disabled" in (rows[later][2] or "")
    assert rows[ok][0] == "relayed"
    assert rows[unknown][:2] == ("bounced", "5.1.1")
    with stack.connect() as conn:
        unmatched = conn.execute(
            "SELECT count(*) FROM unmatched_reports WHERE envelope_to LIKE %s",
            (f"%{mid.hex}%",)).fetchone()
    assert unmatched is not None and unmatched[0] == 0


def test_a_plain_bounce_at_a_single_recipient_messages_return_path_is_that_recipients(
        stack: Stack, remote_mx: RemoteMX) -> None:
    # Sent to the message's plain return path (as a server that strips the VERP
    # part, or mail that left without VERP, would): with one recipient, the
    # report can only concern it, whatever its format.
    _, domain = stack.new_org("pro")
    token = uuid.uuid4().hex[:10]
    only = f"only-{token}@mx.test"
    body = (f"From: app@{domain}\r\nTo: {only}\r\nSubject: single {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\nHello.\r\n").encode()
    reply = smtp.send(*stack.smtp, f"app@{domain}", [only], body)
    mid, rpath = stack.sent(reply.queue_id)
    until(lambda: _recipients(stack, mid)[only][0] == "relayed", "Postfix's relayed notice")
    smtp.send(*stack.smtp, "", [rpath], _plain_bounce(rpath))
    rows = until(lambda: (r := _recipients(stack, mid))[only][0] == "bounced" and r,
                 "the late bounce to be recorded for the only recipient", timeout=60)
    assert rows[only][1] == "5.2.1"
