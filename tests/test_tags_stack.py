"""Application tags through the real stack (issue 17).

The stack's postkeep.toml maps X-Campaign-Id, X-Template-Id and X-Lead-Id to
tags and strips tag headers (devstack/stack.sh, [tags]).  A tagged message is
captured with its tags in its `messages` row, reaches the sink without any
tag header, its DKIM signature verifies there (dkimpy), and the copy restored
from S3 equals the delivered one; with strip = false the headers stay
(delivered, signed and stored); malformed tags are refused with 550 5.6.0
and leave nothing behind; `postkeep messages list --tag` selects by tag.
"""

from __future__ import annotations

import json
import re
import uuid

import dkim as dkimpy
import pytest
from click.testing import CliRunner
from support import smtp
from support.daemon_settings import daemon_settings
from support.refused import assert_refused_left_nothing
from support.stack import Stack, strip_received

from postkeep import cli

pytestmark = pytest.mark.stack

_TAG_HEADER = re.compile(rb"(?im)^(x-campaign-id|x-template-id|x-lead-id|x-postkeep-tag):")


def _dns(stack: Stack):  # type: ignore[no-untyped-def]
    records = stack.public_keys()
    return lambda name, timeout=5: records.get(name)


def _message(sender: str, domain: str, token: str, campaign: str) -> bytes:
    return (f"From: {sender}\r\nTo: r@sink.test\r\nSubject: tagged {token}\r\n"
            f"X-Campaign-Id: {campaign}\r\nX-Template-Id: welcome-2\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Lead-Id: 981\r\n"
            "X-Postkeep-Tag: segment=vip\r\nx-postkeep-tag: ort=Z\u00fcrich\r\n"
            f"X-Test-Token: {token}\r\n\r\nHello.\r\n").encode()


def _row(stack: Stack, queue_id: str) -> tuple[str, dict[str, str], str | None]:
    with stack.connect() as conn:
        row = conn.execute("SELECT object_key, tags, campaign_id FROM messages"
                           " WHERE queue_id = %s", (queue_id,)).fetchone()
    assert row is not None, "accepted but not captured"
    return row[0], row[1], row[2]


def _send(stack: Stack, campaign: str) -> tuple[uuid.UUID, bytes, str, str]:
    org_id, domain = stack.new_org("pro")
    sender, token = f"app@{domain}", uuid.uuid4().hex
    reply = smtp.send(*stack.smtp, sender, ["r@sink.test"],
                      _message(sender, domain, token, campaign))
    return org_id, stack.sink_copy(token), reply.queue_id, token


def test_tags_captured_headers_stripped_signature_verifies_archive_is_delivered(
        stack: Stack) -> None:
    assert stack.config.tags.strip, "the stack is expected to strip tag headers"
    campaign = f"spring-{uuid.uuid4().hex[:8]}"
    org_id, delivered, queue_id, _ = _send(stack, campaign)
    key, tags, column = _row(stack, queue_id)
    assert tags == {"campaign_id": campaign, "template_id": "welcome-2", "lead_id": "981",
                    "segment": "vip", "ort": "Z\u00fcrich"}
    assert column == campaign
    assert not _TAG_HEADER.search(delivered), "the recipient saw a tag header"
    unfolded = re.sub(rb"\r\n[ \t]", b"", delivered)
    sig = re.search(rb"(?m)^DKIM-Signature:.*$", unfolded)
    assert sig is not None and b"campaign" not in sig.group(0).lower()
    assert dkimpy.verify(delivered, dnsfunc=_dns(stack)), "delivered copy does not verify"
    assert stack.restored(key) == strip_received(delivered)
    # and the CLI finds it by tag, within the organisation, and nothing else
    cli._register()
    out = CliRunner().invoke(cli.cli, ["--config", stack.env["POSTKEEP_CONFIG"], "messages",
                                       "list", "--org", str(org_id), "--json",
                                       "--tag", f"campaign_id={campaign}", "--tag", "lead_id=981"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.stdout)["messages"]
    assert [m["queue_id"] for m in listed] == [queue_id] and listed[0]["tags"] == tags
    out = CliRunner().invoke(cli.cli, ["--config", stack.env["POSTKEEP_CONFIG"], "messages",
                                       "list", "--org", str(org_id), "--json",
                                       "--tag", "lead_id=982"])
    assert out.exit_code == 0 and json.loads(out.stdout)["messages"] == [], out.output


def test_without_strip_tag_headers_are_delivered_signed_and_stored(stack: Stack) -> None:
    campaign = f"kept-{uuid.uuid4().hex[:8]}"
    with daemon_settings(stack, "tags", {"strip": False}, services=("milter",)):
        _, delivered, queue_id, _ = _send(stack, campaign)
    key, tags, column = _row(stack, queue_id)
    assert tags["campaign_id"] == campaign and column == campaign
    assert f"\r\nX-Campaign-Id: {campaign}\r\n".encode() in delivered
    assert b"\r\nX-Postkeep-Tag: segment=vip\r\n" in delivered
    assert dkimpy.verify(delivered, dnsfunc=_dns(stack)), "delivered copy does not verify"
    assert stack.restored(key) == strip_received(delivered)


@pytest.mark.parametrize(("header", "words"), [
    (b"X-Postkeep-Tag: not a tag", "expected key=value"),
    (b"X-Lead-Id: " + b"9" * 300, "300 characters, more than the 256 allowed"),
    (b"X-Lead-Id: \xc3\x28", "not valid UTF-8"),
])
def test_malformed_tags_refused_and_nothing_stored(stack: Stack, header: bytes,
                                                   words: str) -> None:
    org_id, domain = stack.new_org("pro")
    sender, token = f"app@{domain}", uuid.uuid4().hex
    data = (f"From: {sender}\r\nTo: r@sink.test\r\nSubject: bad {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n").encode() + (
        header + b"\r\n\r\nHello.\r\n")
    with pytest.raises(smtp.SMTPError) as err:
        smtp.send(*stack.smtp, sender, ["r@sink.test"], data)
    exc = err.value
    assert (exc.stage, exc.reply.code, exc.reply.enhanced) == ("end of data", 550, "5.6.0"), exc
    name = header.split(b":")[0].decode()
    assert f"tag header {name}" in exc.reply.text and words in exc.reply.text, exc.reply
    assert_refused_left_nothing(stack, org_id, [token])
