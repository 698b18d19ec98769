"""Messages captured by the real milter, for tests of what reads stored content.

A test that writes an object with its own writer and reads it back proves
only that its writer and the reader agree: a capture path that changed how
it stores messages (frames, containers of split parts, dictionaries) would
leave such a test green and every stored message unreadable.  So readers
(`restore`, `postkeep messages raw`) are tested on objects the milter wrote:
the message goes through the stack's Postfix, and what it must restore to
is what the next hop received, minus Postfix's own Received: header (which
milters never see), taken from the sink, not from postkeep.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass

from support import smtp
from support.stack import Stack, strip_received


@dataclass(frozen=True)
class Captured:
    """One message the milter stored, and the bytes it must restore to."""

    id: uuid.UUID
    object_key: str
    size: int
    sha256: bytes
    delivered: bytes  # the sink's copy without Postfix's Received: header


def send_captured(stack: Stack, sender: str, data: bytes, token: str,
                  rcpts: tuple[str, ...] = ("r@sink.test",)) -> Captured:
    """DATA (carrying `X-Test-Token: TOKEN`) from SENDER through Postfix; what was stored."""
    reply = smtp.send(*stack.smtp, sender, list(rcpts), data)  # 250 only once stored
    assert reply.queue_id, reply.text
    with stack.connect() as conn:
        rows = conn.execute("SELECT id, object_key, size, sha256 FROM messages"
                            " WHERE queue_id = %s AND envelope_from = %s",
                            (reply.queue_id, sender)).fetchall()
    assert len(rows) == 1, f"{len(rows)} messages rows for queue id {reply.queue_id}"
    mid, key, size, digest = rows[0]
    delivered = strip_received(stack.sink_copy(token))
    # the oracle is the sink's copy: it must be what the rows describe
    assert (len(delivered), hashlib.sha256(delivered).digest()) == (size, bytes(digest))
    return Captured(mid, key, size, bytes(digest), delivered)


def awkward_message(sender: str, token: str, attachment: bytes) -> bytes:
    """A message whose bytes a reader could get wrong: folded and encoded
    headers, an 8-bit text part, a long line, and ATTACHMENT in base64 (over
    milter.part_split_bytes, the milter stores it as a part object of its own).
    Lines stay under 998 bytes, so the stored copy is also the one submitted
    (longer lines are broken before storing: tests/test_long_lines*.py)."""
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (
        f"From: Sender <{sender}>\r\nTo: r@sink.test\r\n".encode()
        + b"Subject: =?utf-8?q?caf=C3=A9?=\r\n  folded\r\n"
        + f"Message-ID: <{token}@captured.test>\r\nX-Test-Token: {token}\r\n".encode()
        + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
        + b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        + b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + b"line one\r\n\xc3\xa9\xff\xfe raw 8-bit  \t\r\n" + b"0123456789abcdef" * 60 + b"\r\n"
        + b"--b1\r\nContent-Type: application/octet-stream\r\n"
        + b"Content-Transfer-Encoding: base64\r\n"
        + b"Content-Disposition: attachment; filename=\"a.bin\"\r\n\r\n"
        + b64 + b"--b1--\r\n"
    )
