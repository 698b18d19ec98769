"""Lenient reading of real-world reports, and attribution by where they arrive.

The shapes seen in the field that today's strict reading lost (issue 21,
point 13): an Action with a comment, an address in angle brackets, an X.400
Final-Recipient with the address only in Original-Recipient or the text, a
spool path as the recipient, a Status that disagrees with the reply; and the
per-recipient (VERP) return paths Postfix writes, whose recipient part is
checked against the message's recipients.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support.reports import dsn

from postkeep.envelope import parse_return_path, return_path, verify_return_path
from postkeep.storage.reports.dsn import needs_recipients, parse_report, resolve

pytestmark = pytest.mark.unit

KEY = b"test return-path key, 32 bytes!"
T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
EXPIRES = datetime(2027, 11, 25, 10, 0, tzinfo=UTC)


def _path(mid: uuid.UUID) -> str:
    return return_path(mid, EXPIRES, "bounces.example", KEY)


def _verp(mid: uuid.UUID, rcpt: str) -> str:
    local, _, domain = _path(mid).partition("@")
    r_local, _, r_domain = rcpt.partition("@")
    return f"{local}+{r_local}={r_domain}@{domain}"


def _one(raw: bytes, to: str) -> tuple[str, str, str | None, str | None]:
    report = parse_report(raw, "", [to], T0, KEY)
    assert report.reason is None, report.reason
    assert len(report.outcomes) == 1, report.outcomes
    o = report.outcomes[0]
    return o.recipient, o.status, o.dsn_status, o.diagnostic


@pytest.mark.parametrize(("fields", "want"), [
    # A comment after the action.
    ({"Final-Recipient": "rfc822; a@x.example",
      "Action": "failed (Bad destination mailbox address)", "Status": "5.1.1"},
     ("a@x.example", "bounced", "5.1.1")),
    # Angle brackets, no space after the type.
    ({"Final-Recipient": "rfc822;<a@x.example>", "Action": "failed", "Status": "5.1.1"},
     ("a@x.example", "bounced", "5.1.1")),
    # X.400: the address only in Original-Recipient.
    ({"Final-Recipient": "x400; /C=JP/ADMD=/PRMD=x/O=y/S=a/", "Original-Recipient":
      "rfc822;a@x.example", "Action": "failed", "Status": "5.1.1"},
     ("a@x.example", "bounced", "5.1.1")),
    # X.400, no Original-Recipient: the address in the server's reply.
    ({"Final-Recipient": "X400; /C=JP/S=a/", "Action": "failed", "Status": "5.0.0",
      "Diagnostic-Code": "smtp; 550 5.1.1 <a@x.example>... User unknown"},
     ("a@x.example", "bounced", "5.1.1")),
    # A local spool path as the recipient.
    ({"Final-Recipient": "rfc822; /var/spool/mail/a", "Original-Recipient":
      "rfc822; a@x.example", "Action": "failed", "Status": "5.2.2"},
     ("a@x.example", "bounced", "5.2.2")),
    # Status generic, the reply specific: the reply's code.
    ({"Final-Recipient": "rfc822; a@x.example", "Action": "failed", "Status": "5.0.0",
      "Diagnostic-Code": "smtp; 550 5.7.26 Unauthenticated email is not accepted"},
     ("a@x.example", "bounced", "5.7.26")),
    # No Status at all: the reply's code, the action from it.
    ({"Final-Recipient": "rfc822; a@x.example",
      "Diagnostic-Code": "smtp; 552-5.2.2 The email account is over quota"},
     ("a@x.example", "bounced", "5.2.2")),
])
def test_dsn_fields_are_read_leniently(fields: dict[str, str],
                                       want: tuple[str, str, str]) -> None:
    mid = uuid.uuid4()
    assert _one(dsn(mid, [fields]), _path(mid))[:3] == want


def test_an_unseparated_per_recipient_block_is_read() -> None:
    # No blank line between the per-message and the per-recipient fields.
    mid = uuid.uuid4()
    raw = dsn(mid, []).replace(
        b"Arrival-Date: Wed, 25 Nov 2026 09:59:59 +0000\r\n",
        b"Arrival-Date: Wed, 25 Nov 2026 09:59:59 +0000\r\n"
        b"Final-Recipient: rfc822; a@x.example\r\nAction: failed\r\nStatus: 5.4.4\r\n")
    assert _one(raw, _path(mid))[:3] == ("a@x.example", "bounced", "5.4.4")


def test_a_plain_bounce_names_its_recipient_and_code_in_prose() -> None:
    mid = uuid.uuid4()
    raw = (b"From: MAILER-DAEMON@mx.example\r\nTo: x@y\r\nSubject: failure notice\r\n\r\n"
           b"Sorry, we were unable to deliver your message to the following address.\r\n\r\n"
           b"<someone@far.example>:\r\n"
           b"Remote host said: 550 5.1.1 <someone@far.example>... User Unknown\r\n\r\n"
           b"--- Below this line is a copy of the message.\r\n\r\n"
           b"From: sender@customer.example\r\nTo: someone@far.example\r\n\r\nhi\r\n")
    rcpt, status, code, diag = _one(raw, _path(mid))
    assert (rcpt, status, code) == ("someone@far.example", "bounced", "5.1.1")
    assert diag is not None and "User Unknown" in diag


# --------------------------------------------------------------- VERP


def test_verp_return_path_names_its_recipient_and_verifies() -> None:
    mid = uuid.uuid4()
    parsed = parse_return_path(_verp(mid, "o=dd+x@far.example"))
    assert parsed is not None and parsed.message_id == mid
    assert parsed.recipient == "o=dd+x@far.example"
    assert verify_return_path(parsed, KEY) is None  # the MAC covers id, expiry, domain
    plain = parse_return_path(_path(mid))
    assert plain is not None and plain.recipient is None


NO_RECIPIENT = (b"From: postmaster@far.example\r\nTo: x@y\r\nSubject: Undeliverable\r\n\r\n"
                b"This message could not be delivered: 550 5.2.1 mailbox disabled\r\n")


def test_a_plain_bounce_at_a_verp_path_is_that_recipients_once_checked() -> None:
    mid = uuid.uuid4()
    report = parse_report(NO_RECIPIENT, "", [_verp(mid, "b@far.example")], T0, KEY)
    assert report.verp_recipient == "b@far.example" and needs_recipients(report)
    assert not report.outcomes and report.reason is not None  # says nobody by itself
    resolved = resolve(report, ["a@far.example", "B@far.example"])
    assert resolved.reason is None and resolved.failure
    [o] = resolved.outcomes
    assert (o.recipient, o.status, o.dsn_status) == ("B@far.example", "bounced", "5.2.1")
    # A recipient part that is not one of the message's recipients counts for nothing.
    forged = parse_report(NO_RECIPIENT, "", [_verp(mid, "c@far.example")], T0, KEY)
    assert resolve(forged, ["a@far.example", "b@far.example"]).reason is not None


def test_a_verp_path_keeps_only_its_own_recipients_outcome() -> None:
    mid = uuid.uuid4()
    raw = dsn(mid, [{"Final-Recipient": "rfc822; a@far.example", "Action": "failed",
                     "Status": "5.1.1"}])
    report = parse_report(raw, "", [_verp(mid, "b@far.example")], T0, KEY)
    [o] = resolve(report, ["a@far.example", "b@far.example"]).outcomes
    # The report arrived at B's path: its failure is B's, whatever it names.
    assert (o.recipient, o.status, o.dsn_status) == ("b@far.example", "bounced", "5.1.1")


def test_a_failure_for_a_single_recipient_message_is_that_recipients() -> None:
    mid = uuid.uuid4()
    report = parse_report(NO_RECIPIENT, "", [_path(mid)], T0, KEY)
    [o] = resolve(report, ["only@far.example"]).outcomes
    assert (o.recipient, o.status, o.dsn_status) == ("only@far.example", "bounced", "5.2.1")
    # With two recipients and no VERP, nobody can say whose: kept with the reason.
    assert resolve(report, ["a@far.example", "b@far.example"]).reason is not None


def test_an_auto_reply_at_a_return_path_bounces_nobody() -> None:
    mid = uuid.uuid4()
    raw = (b"From: a@far.example\r\nTo: x@y\r\nSubject: Out of Office: hello\r\n"
           b"Auto-Submitted: auto-replied\r\n\r\nI am away until Monday.\r\n")
    report = parse_report(raw, "", [_verp(mid, "a@far.example")], T0, KEY)
    assert not report.failure and report.anonymous is None
    assert not resolve(report, ["a@far.example"]).outcomes


def test_unsigned_or_foreign_paths_still_attribute_nothing() -> None:
    mid = uuid.uuid4()
    forged = _verp(mid, "a@far.example").replace("-", "-0", 1)
    report = parse_report(NO_RECIPIENT, "", [forged], T0, KEY)
    assert report.message_id is None and not needs_recipients(report)
    expires = EXPIRES - timedelta(days=1)
    other = return_path(mid, expires, "bounces.example", b"another key, 32 bytes long!!!!!")
    assert parse_report(NO_RECIPIENT, "", [other], T0, KEY).message_id is None


def test_a_dsn_naming_its_verp_recipient_is_read_as_it_says() -> None:
    # A standard DSN at B's path that reports A and B: each keeps its own outcome.
    mid = uuid.uuid4()
    raw = dsn(mid, [{"Final-Recipient": "rfc822; a@far.example", "Action": "relayed",
                     "Status": "2.0.0"},
                    {"Final-Recipient": "rfc822; b@far.example", "Action": "failed",
                     "Status": "5.1.1"}])
    report = parse_report(raw, "", [_verp(mid, "b@far.example")], T0, KEY)
    got = {o.recipient: (o.status, o.dsn_status)
           for o in resolve(report, ["a@far.example", "b@far.example"]).outcomes}
    assert got == {"a@far.example": ("relayed", "2.0.0"), "b@far.example": ("bounced", "5.1.1")}


@pytest.mark.parametrize("named", ["smtp=userx@example.com", "SMTP:userx@example.com",
                                   "rfc822;<userx@example.com>", "userx@example.com"])
def test_an_address_type_prefix_is_not_part_of_the_address(named: str) -> None:
    # Exchange's notices write "smtp=user@host"; flufl.bounce 4 (the tested lower
    # bound) passes it on and the notice's own text holds it too.
    from postkeep.storage.reports.dsn import _untyped

    assert _untyped(named.lower()) == "userx@example.com"
