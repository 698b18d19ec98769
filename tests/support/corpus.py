"""Awkward but legal messages for the byte-exact capture tests.

Each case carries a unique `X-Test-Token` header so the test can find the copy
the sink received.  Bodies and headers are built as bytes: line ends, 8-bit
bytes and spacing are exactly what the case is about.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    rcpts: tuple[str, ...]


def _headers(sender: str, token: str, subject: bytes = b"corpus", extra: bytes = b"",
             message_id: bool = True) -> bytes:
    out = (
        b"From: Sender <" + sender.encode() + b">\r\n"
        b"To: rcpt@sink.test\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Date: Wed, 25 Nov 2026 01:00:00 +0000\r\n"
    )
    if message_id:
        out += b"Message-ID: <" + token.encode() + b"@corpus.test>\r\n"
    return out + b"X-Test-Token: " + token.encode() + b"\r\n" + extra


def _multipart(depth: int) -> bytes:
    if depth == 0:
        return b"Content-Type: text/plain; charset=utf-8\r\n\r\nleaf \xc3\xa9\r\n"
    boundary = f"b{depth}-boundary".encode()
    inner = _multipart(depth - 1)
    return (
        b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"
        b"preamble\r\n--" + boundary + b"\r\n" + inner
        + b"--" + boundary + b"\r\nContent-Type: text/plain\r\n\r\nsibling "
        + str(depth).encode() + b"\r\n--" + boundary + b"--\r\nepilogue\r\n"
    )


def build(sender: str, token: str, rcpt: str = "rcpt@sink.test") -> list[Case]:
    """The corpus for one sender address; tokens are TOKEN-<case name>."""
    one = (rcpt,)
    cases: list[Case] = []

    def add(name: str, data_fn: bytes, rcpts: tuple[str, ...] = one) -> None:
        cases.append(Case(name, data_fn, rcpts))

    t = lambda name: f"{token}-{name}"  # noqa: E731

    add("dot-stuffing", _headers(sender, t("dot-stuffing")) + b"\r\n"
        b".leading dot\r\n..two dots\r\n.\r\n. space\r\nend\r\n")
    add("eight-bit-body", _headers(sender, t("eight-bit-body"),
        extra=b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Content-Transfer-Encoding: 8bit\r\n")
        + b"\r\nd\xc3\xa9j\xc3\xa0 vu \xe2\x82\xac \xf0\x9f\x93\xa8\r\nlatin1 \xe9\xe8\r\n")
    add("rfc2047-folded", _headers(
        sender, t("rfc2047-folded"),
        subject=b"=?UTF-8?B?w6l0w6kgZW5jb2RlZA==?=\r\n =?UTF-8?Q?second_=C3=A9_part?=",
        extra=b"Cc: a@sink.test,\r\n\tb@sink.test,\r\n    c@sink.test\r\n"
              b"X-Long: word1\r\n word2\r\n\tword3\r\n") + b"\r\nbody\r\n")
    add("duplicate-headers", _headers(sender, t("duplicate-headers"),
        extra=b"X-Dup: one\r\nX-Dup: two\r\nX-Dup: three\r\nSubject: second subject\r\n"
              b"Comments: first\r\nComments: second\r\n") + b"\r\nbody\r\n")
    add("no-message-id", _headers(sender, t("no-message-id"), message_id=False)
        + b"\r\nno id here\r\n")
    add("empty-body", _headers(sender, t("empty-body")) + b"\r\n")
    add("deep-multipart", _headers(sender, t("deep-multipart"), extra=b"MIME-Version: 1.0\r\n")
        + _multipart(12))
    add("header-spacing", _headers(sender, t("header-spacing"),
        extra=b"X-None:nospace\r\nX-Many:    four spaces\r\nX-Tab:\ttab\r\n"
              b"X-Trailing: trailing   \r\nX-Empty:\r\n") + b"\r\nbody\r\n")
    add("many-headers", _headers(sender, t("many-headers"),
        extra=b"".join(b"X-Header-%d: value %d\r\n" % (i, i) for i in range(400)))
        + b"\r\nbody\r\n")
    add("long-lines", _headers(sender, t("long-lines"),
        extra=b"X-Long-Header: " + b"h" * 900 + b"\r\n")
        + b"\r\n" + b"x" * 990 + b"\r\n" + b"y" * 998 + b"\r\nshort\r\n")
    add("crlf-lf-mix", _headers(sender, t("crlf-lf-mix")) + b"\r\ncrlf line\r\nlf line\n"
        b"another lf\n.dot after lf\ncrlf again\r\n")
    add("many-recipients", _headers(sender, t("many-recipients")) + b"\r\nto many\r\n",
        tuple(f"r{i:03d}@sink.test" for i in range(120)))
    blob = base64.encodebytes(os.urandom(6_700_000)).replace(b"\n", b"\r\n")
    add("nine-megabytes", _headers(sender, t("nine-megabytes"),
        extra=b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"BB\"\r\n")
        + b"\r\n--BB\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--BB\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"big.bin\"\r\n\r\n" + blob
        + b"--BB--\r\n")
    return cases
