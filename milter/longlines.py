"""Lines over SMTP's 998 octets, broken the way Postfix's smtp client breaks them.

RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1 allow at most 998 octets per line (CRLF
not counted).  Postfix accepts longer lines; its smtp (and lmtp) client breaks
them when it relays (smtp_line_length_limit, 998 by default; smtp_text_out in
src/smtp/smtp_proto.c, Postfix 3.7): the first 998 octets of the line, then
CRLF SPACE and the next 997, and so on; a line of exactly 998 octets (or one
whose rest fits exactly) is left whole.  The same code sends header and body
lines, so a header's physical lines are broken alike (a header field is
passed on line by line, continuation lines included).  The SMTP dot-stuffing
of a leading "." is not counted, and disable_mime_output_conversion = yes
(the bundle's main.cf) keeps the client from re-encoding 8-bit bodies, so
this breaking is the only change the relayed copy undergoes.

A milter signing or archiving the message as received would therefore sign
and archive bytes that are never delivered: `LineBreaker` applies the same
breaking to what the milter sees (lines joined by CRLF, streamed in chunks)
so that the signed, archived and (replaced) delivered bytes are the same.
A CR just before the CRLF is line content, as it is in Postfix's queue file.

Plain functions and one small state machine: nothing here talks to Postfix.
"""

from __future__ import annotations

# Postfix's default smtp_line_length_limit (and lmtp_line_length_limit).
SMTP_LINE_LIMIT = 998

_CRLF = b"\r\n"
_FOLD = b"\r\n "


class LineBreaker:
    """Breaks the lines of a CRLF text fed in arbitrary chunks.

    `feed` returns what can be emitted so far; `flush` the rest at the end.
    `broke` tells whether any line was broken (the text changed).
    LIMIT 0 disables breaking, as smtp_line_length_limit = 0 does.
    """

    def __init__(self, limit: int = SMTP_LINE_LIMIT) -> None:
        if limit < 0 or limit == 1:
            raise ValueError("line limit must be 0 or at least 2")
        self.limit = limit
        self.broke = False
        self._longest = 0  # longest finished line, as received (CRLF not counted)
        self._col = 0  # octets already on the current output line
        self._line = 0  # octets of the current input line so far
        self._cr = False  # the last chunk ended in CR: maybe half a CRLF

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):  # decided by the next chunk (or flush)
            chunk = chunk[:-1]
            self._cr = True
        pieces = chunk.split(_CRLF)
        if len(pieces) > 1 and self._fits(pieces):
            return chunk  # the common case: lengths noted, nothing to break
        out = bytearray()
        for i, piece in enumerate(pieces):
            self._content(piece, out)
            if i < len(pieces) - 1:
                out += _CRLF
                self._end_line()
        return bytes(out)

    def flush(self) -> bytes:
        """The end of the text: a held CR is content of an unterminated last line."""
        out = bytearray()
        if self._cr:
            self._cr = False
            self._content(b"\r", out)
        return bytes(out)

    def _fits(self, pieces: list[bytes]) -> bool:
        """Whether no line of PIECES (a chunk split at CRLF) needs breaking;
        if so the state moves past them (the chunk is passed on as it is)."""
        first = len(pieces[0])
        middle = max(map(len, pieces[1:-1]), default=0)
        last = len(pieces[-1])
        if self.limit and (self._col + first > self.limit or max(middle, last) > self.limit):
            return False
        self._longest = max(self._longest, self._line + first, middle)
        self._line = self._col = last
        return True

    @property
    def longest(self) -> int:
        """The longest line so far, as received (CRLF not counted)."""
        return max(self._longest, self._line)

    def _end_line(self) -> None:
        self._longest = max(self._longest, self._line)
        self._col = self._line = 0

    def _content(self, data: bytes, out: bytearray) -> None:
        self._line += len(data)
        if not self.limit:
            out += data
            return
        view = memoryview(data)
        while view:
            # A full output line is broken only once more content follows:
            # a line that ends exactly at the limit is left whole.
            if self._col == self.limit:
                out += _FOLD
                self._col = 1
                self.broke = True
            take = min(len(view), self.limit - self._col)
            out += view[:take]
            self._col += take
            view = view[take:]


def break_lines(text: bytes, limit: int = SMTP_LINE_LIMIT) -> bytes:
    """TEXT (CRLF line ends) with every line over LIMIT octets broken as Postfix would."""
    breaker = LineBreaker(limit)
    return breaker.feed(text) + breaker.flush()


def longest_line(text: bytes) -> int:
    """Octets of TEXT's longest CRLF-terminated (or last) line, CRLF not counted."""
    return max((len(line) for line in text.split(_CRLF)), default=0)
