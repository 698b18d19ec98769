"""A message fed to the milter's MessageCapture the way Postfix passes it."""

from __future__ import annotations

from postkeep.milter.capture import MessageCapture

CHUNK = 65535  # Postfix passes the body in chunks of at most this many bytes


def fed(message: bytes) -> MessageCapture:
    """A capture of MESSAGE up to finish(): header fields (a folded field's lines
    joined by LF, as Postfix passes them), the end of headers, the body in chunks."""
    head, _, body = message.partition(b"\r\n\r\n")
    cap = MessageCapture(dkim_body_hash=False)
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
    for field in fields:
        name, _, value = field.partition(b":")
        cap.add_header(name, value)
    cap.end_of_headers()
    for i in range(0, len(body), CHUNK):
        cap.add_body(body[i : i + CHUNK])
    return cap
