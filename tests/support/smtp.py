"""A raw SMTP client for tests: sends exactly the bytes it is given.

smtplib rewrites line ends and so cannot send a CRLF/LF mix or a bare CR;
this client only dot-stuffs and terminates DATA, nothing else.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def queue_id(self) -> str | None:
        m = re.search(r"queued as ([0-9A-Za-z]+)", self.text)
        return m.group(1) if m else None

    @property
    def enhanced(self) -> str | None:
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})", self.text)
        return m.group(1) if m else None


@dataclass
class Sent:
    """One message a test sent and how it ended (accepted, or the reply)."""

    token: str
    accepted: bool
    code: int
    text: str
    queue_id: str | None


class SMTPError(Exception):
    def __init__(self, stage: str, reply: Reply) -> None:
        super().__init__(f"{stage}: {reply.code} {reply.text}")
        self.stage = stage
        self.reply = reply


def dot_stuff(data: bytes) -> bytes:
    """Double a leading dot on every line (RFC 5321 4.5.2), LF or CRLF ends."""
    out = re.sub(rb"(^|\n)\.", rb"\1..", data)
    if not out.endswith(b"\n"):
        out += b"\r\n"
    return out


class Client:
    def __init__(self, host: str, port: int, timeout: float = 60.0,
                 greeting: str = "EHLO") -> None:
        """Connect and greet (EHLO; LHLO for an LMTP server)."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self._expect("banner", 220)
        self.command(f"{greeting} test.example", 250)

    def _read(self) -> Reply:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        return Reply(int(lines[-1][:3]), "\n".join(x[4:] for x in lines))

    def _expect(self, stage: str, code: int) -> Reply:
        reply = self._read()
        if reply.code != code:
            raise SMTPError(stage, reply)
        return reply

    def command(self, line: str, code: int) -> Reply:
        self.sock.sendall(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self._expect(line.split(" ", 1)[0], code)

    def send(self, mail_from: str, rcpts: list[str], data: bytes,
             mail_params: str = "", rcpt_params: dict[str, str] | None = None) -> Reply:
        """One transaction; returns the final reply or raises SMTPError.

        RCPT_PARAMS: ESMTP parameters per recipient (e.g. "NOTIFY=NEVER").
        """
        self.command(f"MAIL FROM:<{mail_from}>{' ' + mail_params if mail_params else ''}", 250)
        for rcpt in rcpts:
            extra = (rcpt_params or {}).get(rcpt)
            self.command(f"RCPT TO:<{rcpt}>{' ' + extra if extra else ''}", 250)
        self.command("DATA", 354)
        self.sock.sendall(dot_stuff(data) + b".\r\n")
        return self._expect("end of data", 250)

    def xclient(self, addr: str, name: str = "[UNAVAILABLE]") -> None:
        """Appear as client ADDR (Postfix XCLIENT; the stack authorizes loopback)."""
        self.command(f"XCLIENT ADDR={addr} NAME={name}", 220)
        self.command("EHLO test.example", 250)

    def reset(self) -> None:
        self.command("RSET", 250)

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self._read()
        except OSError:
            pass
        self.file.close()
        self.sock.close()


def send(host: str, port: int, mail_from: str, rcpts: list[str], data: bytes,
         mail_params: str = "", rcpt_params: dict[str, str] | None = None,
         timeout: float = 60.0) -> Reply:
    client = Client(host, port, timeout)
    try:
        return client.send(mail_from, rcpts, data, mail_params, rcpt_params)
    finally:
        client.close()


@contextmanager
def senders(send: Callable[[threading.Event, list[Sent]], None], count: int,
            join_seconds: float) -> Iterator[list[Sent]]:
    """COUNT threads running SEND(stop, sent) until the block ends; yields SENT, the list
    they append to.  On exit they are told to stop and joined (up to JOIN_SECONDS each)."""
    sent: list[Sent] = []
    stop = threading.Event()
    threads = [threading.Thread(target=send, args=(stop, sent)) for _ in range(count)]
    for t in threads:
        t.start()
    try:
        yield sent
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=join_seconds)
