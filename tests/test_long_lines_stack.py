"""Lines over 998 octets through the real stack (issue 21, point 14).

Postfix's smtp client breaks such lines with CRLF SPACE on the way to the
sink.  With [milter] long_lines = "fold" (the default) the milter breaks them
the same way first, so the delivered copy verifies (dkimpy, DKIM body hash
included) and equals the copy restored from S3; with "reject" the message is
refused with 550 5.6.0 and nothing is stored.  Also: a login with a % in it,
named in the milter's refusal, gets that refusal (pymilter rejects a single %
in a reply text; the client got a 451 from an untrapped exception).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from support import smtp
from support.daemon_settings import daemon_settings
from support.refused import assert_refused_left_nothing
from support.stack import Stack, strip_received

from postkeep import signing_keys
from postkeep.storage.metadata import dkim_keys

pytestmark = pytest.mark.stack

LONG_BODY_LINE = bytes(range(0x41, 0x5B)) * 192 + b"abcdefgh"  # 5,000 octets
LONG_SUBJECT = " " + "h" * 1200  # a signed header over 998 octets


def _dns(stack: Stack):  # type: ignore[no-untyped-def]
    records = stack.public_keys()
    return lambda name, timeout=5: records.get(name)


def _message(sender: str, domain: str, token: str) -> bytes:
    assert len(LONG_BODY_LINE) == 5000
    return (f"From: {sender}\r\nTo: r@sink.test\r\nSubject: long {token}{LONG_SUBJECT}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n").encode() + (
        b"\r\nfirst\r\n" + LONG_BODY_LINE + b"\r\n" + b"c" * 998 + b"\r\n"
        + b"d" * 999 + b"\r\n.last\r\n")


def test_long_lines_folded_signed_and_stored_as_delivered(stack: Stack) -> None:
    _, domain = stack.new_org("pro")
    sender, token = f"app@{domain}", uuid.uuid4().hex
    data = _message(sender, domain, token)
    reply = smtp.send(*stack.smtp, sender, ["r@sink.test"], data)
    delivered = stack.sink_copy(token)
    # what the sink got: every line within 998 octets, the long ones broken
    # by CRLF SPACE, nothing else changed
    assert max(len(line) for line in delivered.split(b"\r\n")) <= 998
    body = delivered.partition(b"\r\n\r\n")[2]
    assert body.replace(b"\r\n ", b"") == data.partition(b"\r\n\r\n")[2]
    assert LONG_BODY_LINE[:998] + b"\r\n " + LONG_BODY_LINE[998:1995] + b"\r\n " in body
    # the signature covers the bytes delivered, the broken Subject: included
    unfolded = re.sub(rb"\r\n[ \t]", b"", delivered)
    assert f"d={domain}".encode() in delivered and re.search(rb"\bh=[^;]*subject", unfolded)
    assert re.search(rb"\r\nSubject: [^\r]{989}\r\n h", delivered)  # broken at 998
    assert dkimpy.verify(delivered, dnsfunc=_dns(stack)), "delivered copy does not verify"
    with stack.connect() as conn:
        row = conn.execute("SELECT object_key FROM messages WHERE queue_id = %s",
                           (reply.queue_id,)).fetchone()
    assert row is not None, "accepted but not captured"
    assert stack.restored(row[0]) == strip_received(delivered)


def test_system_mail_with_a_long_line_verifies_as_delivered(stack: Stack) -> None:
    # signed with the platform key and not stored: the body is replaced all the same
    domain = stack.config.dkim.system_domains[0]
    sender, token = f"no-reply@{domain}", uuid.uuid4().hex
    smtp.send(*stack.smtp, sender, ["user@sink.test"], _message(sender, domain, token))
    delivered = stack.sink_copy(token)
    assert f"d={domain}".encode() in delivered
    pem = Path(stack.config.dkim.system_key_file).read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    txt = dkim_keys.dns_txt_value(signing_keys.algorithm_of(key),  # type: ignore[arg-type]
                                  dkim_keys.public_key_bytes(key))  # type: ignore[arg-type]
    name = f"{stack.config.dkim.system_selector}._domainkey.{domain}.".encode()
    assert dkimpy.verify(delivered, dnsfunc=lambda n, timeout=5: txt.encode() if n == name
                         else None), "delivered system mail does not verify"


def test_long_lines_refused_when_configured(stack: Stack) -> None:
    org_id, domain = stack.new_org("pro")
    sender, token = f"app@{domain}", uuid.uuid4().hex
    with (daemon_settings(stack, "milter", {"long_lines": "reject"}),
          pytest.raises(smtp.SMTPError) as err):
        smtp.send(*stack.smtp, sender, ["r@sink.test"], _message(sender, domain, token))
    exc = err.value
    assert (exc.stage, exc.reply.code, exc.reply.enhanced) == ("end of data", 550, "5.6.0"), exc
    assert "line of 5000 octets is longer than the 998 allowed" in exc.reply.text, exc.reply
    assert_refused_left_nothing(stack, org_id, [token])


def test_login_with_percent_gets_its_refusal_not_a_tempfail(stack: Stack) -> None:
    _, domain = stack.new_org("pro")
    login = f"mal%lory-{uuid.uuid4().hex[:8]}"
    client = smtp.Client(*stack.smtp)
    try:
        client.command(f"XCLIENT ADDR=203.0.113.21 LOGIN={login}", 220)
        client.command("EHLO test.example", 250)
        with pytest.raises(smtp.SMTPError) as err:
            client.send(f"app@{domain}", ["r@sink.test"],
                        f"From: app@{domain}\r\nSubject: percent\r\n\r\nbody\r\n".encode())
    finally:
        client.close()
    reply = err.value.reply
    assert (err.value.stage, reply.code, reply.enhanced) == ("MAIL", 550, "5.7.1"), err.value
    assert login in reply.text and "not a registered submitter" in reply.text, reply
