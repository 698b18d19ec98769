"""Inbound mail through the real stack: captured, classified, linked (issue 17).

A client off the trusted networks (XCLIENT ADDR=198.51.100.x) sends mail to
an organisation's domain after `postkeep domain set-inbound`: Postfix accepts
it (relay_domains map), the milter captures it as direction 'inbound' with
its message_type, links a reply to the sent message by In-Reply-To, a
complaint through the original it carries (marking that recipient
'complained'), never across organisations, and Postfix relays it to the
organisation's host (the sink) or discards it (archive only).
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support.inbound import send_inbound
from support.stack import Stack
from support.wait import until

from postkeep import cli
from postkeep.storage.metadata import directory

pytestmark = pytest.mark.stack



def _cli(stack: Stack, *args: str) -> str:
    cli._register()
    result = CliRunner().invoke(cli.cli, ["--config", stack.env["POSTKEEP_CONFIG"], *args])
    assert result.exit_code == 0, result.output
    return result.output


def _logged(stack: Stack, pattern: str) -> str:
    """A line of Postfix's log matching PATTERN (waited for)."""
    log = Path(stack.env["POSTKEEP_POSTFIX_LOG"])

    def find() -> str | None:
        return next((line for line in log.read_text(errors="replace").splitlines()
                     if re.search(pattern, line)), None)
    return until(find, f"Postfix log line matching {pattern!r}")


def _row(stack: Stack, token: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        with stack.connect() as conn:
            cur = conn.execute(
                "SELECT id, org_id, direction, message_type, parent_message_id, object_key,"
                " recipient_count, message_id_header, return_path, created_at,"
                " content_expires_at, metadata_expires_at FROM messages"
                " WHERE subject = %s", (token,))
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip([d.name for d in cur.description or ()], row, strict=True))
    found = until(find, f"message {token} captured")
    assert found is not None
    return found


def _sent(stack: Stack, domain: str, rcpt: str) -> dict[str, Any]:
    token = f"sent-{uuid.uuid4().hex[:10]}"
    data = (f"From: news@{domain}\r\nTo: {rcpt}\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\n\r\nOffer\r\n").encode()
    send_inbound(stack, rcpt, data, f"news@{domain}", outside=False)
    return _row(stack, token)


def test_reply_and_complaint_captured_inbound_and_linked(stack: Stack) -> None:
    org, domain = stack.new_org()
    other_org, other_domain = stack.new_org()
    sent = _sent(stack, domain, "reader@sink.test")
    foreign = _sent(stack, other_domain, "reader@sink.test")
    # The organisation's own inbound host: the stack's second smtpd (PORTBASE+12,
    # no milter), which hands it on to the sink; not the relayhost (the sink).
    own_host = int(stack.env["POSTKEEP_SMTP_PORT"]) + 12
    _cli(stack, "domain", "set-inbound", domain, "--relay-to", f"127.0.0.1:{own_host}")

    token = f"reply-{uuid.uuid4().hex[:10]}"
    send_inbound(stack, f"news@{domain}", (
        f"From: Reader <reader@sink.test>\r\nTo: news@{domain}\r\nSubject: {token}\r\n"
        f"X-Test-Token: {token}\r\nIn-Reply-To: {sent['message_id_header']}\r\n"
        f"References: {sent['message_id_header']}\r\n\r\nThanks!\r\n").encode(),
        "reader@sink.test", outside=True)
    reply = _row(stack, token)
    assert (reply["org_id"], reply["direction"], reply["message_type"]) == (
        org, "inbound", "reply")
    assert reply["parent_message_id"] == sent["id"]
    assert token.encode() in stack.restored(reply["object_key"])
    # Kept as the organisation's tier says (new_org: 'free', 7 and 30 days).
    assert reply["content_expires_at"] - reply["created_at"] == timedelta(days=7)
    assert reply["metadata_expires_at"] - reply["created_at"] == timedelta(days=30)
    with stack.connect() as conn:
        rcpts = conn.execute("SELECT recipient FROM message_recipients WHERE message_id = %s",
                             (reply["id"],)).fetchall()
    assert rcpts == [(f"news@{domain}",)]
    stack.sink_copy(token)
    _logged(stack, rf"to=<news@{re.escape(domain)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                   rf"{own_host},.*status=sent")  # relayed to the organisation's own host

    # A reply quoting another organisation's Message-ID is captured, never linked.
    stray = f"stray-{uuid.uuid4().hex[:10]}"
    send_inbound(stack, f"news@{domain}", (
        f"From: reader@sink.test\r\nTo: news@{domain}\r\nSubject: {stray}\r\n"
        f"In-Reply-To: {foreign['message_id_header']}\r\n\r\nhm\r\n").encode(),
        "reader@sink.test", outside=True)
    row = _row(stack, stray)
    assert (row["message_type"], row["parent_message_id"]) == ("reply", None)

    # An ARF complaint carrying the sent message marks its recipient complained.
    complaint = f"arf-{uuid.uuid4().hex[:10]}"
    arf = (
        f"From: feedback@fbl.example\r\nTo: abuse@{domain}\r\nSubject: {complaint}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report;"
        ' boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n'
        "--b1\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
        "User-Agent: fbl/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <reader@sink.test>\r\n\r\n"
        "--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        f"From: news@{domain}\r\nTo: reader@sink.test\r\n"
        f"Message-ID: {sent['message_id_header']}\r\nSubject: offer\r\n\r\nOffer\r\n"
        "--b1--\r\n").encode()
    with stack.connect() as conn:
        directory.add_domain(conn, org, f"in.{domain}")
    _cli(stack, "domain", "set-inbound", f"in.{domain}", "--archive-only")
    send_inbound(stack, f"abuse@in.{domain}", arf.replace(b"abuse@", b"abuse@in."), "",
                 outside=True)
    row = _row(stack, complaint)
    assert (row["direction"], row["message_type"], row["parent_message_id"]) == (
        "inbound", "complaint", sent["id"])
    _logged(stack, rf"discard\[\d+\]: \w+: to=<abuse@in\.{re.escape(domain)}>, relay=none,"
                   r".*status=sent \(archived by postkeep\)")  # archive only
    with stack.connect() as conn:
        status = conn.execute("SELECT status FROM message_recipients WHERE message_id = %s",
                              (sent["id"],)).fetchone()
    assert status == ("complained",)

    # Both wrote their event about the sent message, in order (issue 18).
    with stack.connect() as conn:
        evs = conn.execute("SELECT event_type, recipient, payload->>'reply_postkeep_id'"
                           " FROM event_outbox WHERE org_id = %s AND message_id = %s"
                           " AND event_type IN ('replied', 'complained') ORDER BY id",
                           (org, sent["id"])).fetchall()
    assert evs == [("replied", "reader@sink.test", str(reply["id"])),
                   ("complained", "reader@sink.test", None)], evs

    shown = json.loads(_cli(stack, "messages", "show", str(sent["id"]), "--json"))
    assert [(c["id"], c["message_type"]) for c in shown["thread"]] == [
        (str(reply["id"]), "reply"), (str(row["id"]), "complaint")]
    assert "thread (2):" in _cli(stack, "messages", "show", str(sent["id"]))
    assert other_org != org


def test_auto_replies_linked_by_verified_return_path_or_quoted_id_never_across_orgs(
        stack: Stack) -> None:
    org, domain = stack.new_org()
    _, other_domain = stack.new_org()
    sent = _sent(stack, domain, "reader@sink.test")
    quoted = _sent(stack, domain, "reader@sink.test")
    foreign = _sent(stack, other_domain, "reader@sink.test")
    _cli(stack, "domain", "set-inbound", domain, "--archive-only")
    path = sent["return_path"]
    assert path and path.startswith("pk-")

    def auto_reply(token: str, quote: str) -> dict[str, Any]:
        send_inbound(stack, f"news@{domain}", (
            f"From: reader@sink.test\r\nTo: news@{domain}\r\nSubject: {token}\r\n"
            "Auto-Submitted: auto-replied\r\n\r\nI am away.\r\n\r\n"
            f"Your message:\r\n{quote}\r\n").encode(), "", outside=True)
        return _row(stack, token)

    # The original's Return-Path quoted (its MAC verifies): linked.
    row = auto_reply(f"auto-{uuid.uuid4().hex[:8]}", f"Return-Path: <{path}>")
    assert (row["direction"], row["message_type"], row["parent_message_id"]) == (
        "inbound", "auto_reply", sent["id"])
    # A quoted X-Postkeep-Id of the organisation's own message: linked.
    row = auto_reply(f"auto-{uuid.uuid4().hex[:8]}", f"X-Postkeep-Id: {quoted['id']}")
    assert row["parent_message_id"] == quoted["id"]
    # A forged return path (MAC altered), another organisation's id: not linked.
    forged = re.sub(r"-([0-9a-f]{16})@", lambda m: "-" + "0" * 16 + "@", path)
    assert forged != path
    row = auto_reply(f"auto-{uuid.uuid4().hex[:8]}",
                     f"Return-Path: <{forged}>\r\nX-Postkeep-Id: {foreign['id']}")
    assert (row["org_id"], row["message_type"], row["parent_message_id"]) == (
        org, "auto_reply", None)


def test_out_of_band_bounce_linked_by_the_original_it_carries(stack: Stack) -> None:
    _, domain = stack.new_org()
    sent = _sent(stack, domain, "reader@sink.test")
    _cli(stack, "domain", "set-inbound", domain, "--archive-only")
    token = f"oob-{uuid.uuid4().hex[:8]}"
    # A late failure notice sent to the From: address rather than the return path.
    send_inbound(stack, f"news@{domain}", (
        "From: Mail Delivery System <MAILER-DAEMON@mx.sink.test>\r\n"
        f"To: news@{domain}\r\nSubject: {token}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=b2\r\n\r\n"
        "--b2\r\nContent-Type: text/plain\r\n\r\nThe mailbox is full.\r\n"
        "--b2\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.sink.test"
        "\r\n\r\nFinal-Recipient: rfc822; reader@sink.test\r\nAction: failed\r\n"
        "Status: 5.2.2\r\n\r\n--b2\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: news@{domain}\r\nMessage-ID: {sent['message_id_header']}\r\n\r\n"
        "--b2--\r\n").encode(), "", outside=True)
    row = _row(stack, token)
    assert (row["direction"], row["message_type"], row["parent_message_id"]) == (
        "inbound", "bounce", sent["id"])
