"""Postfix policy-delegation protocol (SMTPD_POLICY_README), without I/O.

A request is `name=value` lines ending in one empty line; the reply is
`action=WORD text` followed by an empty line.  Postfix sends every attribute
it knows (request, protocol_state, sender, recipient, instance, sasl_*,
size, ccert_*, ...) and may add more in later versions, so unknown names are
kept, not refused.  What is refused, with the reason, is what no Postfix
sends: lines without `=`, empty names, control bytes, and anything over the
configured line, request or attribute-count limits.  The caller closes the
connection on `ProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ProtocolError(Exception):
    """Input that is not a policy request; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int = 4096
    max_request_bytes: int = 16384
    max_attributes: int = 128


@dataclass
class RequestBuilder:
    """Accumulates one request's lines; `add_line` returns the request when complete."""

    limits: Limits = field(default_factory=Limits)
    _attrs: dict[str, str] = field(default_factory=dict)
    _bytes: int = 0
    _partial: bytes = b""  # the start of a line whose newline has not come yet

    @property
    def started(self) -> bool:
        """Part of a request has come in (a stall or EOF now cuts it off)."""
        return self._bytes > 0 or bool(self._partial)

    @property
    def mid_line(self) -> bool:
        return bool(self._partial)

    def feed(self, data: bytes) -> list[dict[str, str]]:
        """Feed bytes as they arrive; every request they complete, in order."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.limits.max_line_bytes + 1:
            raise ProtocolError(f"line longer than {self.limits.max_line_bytes} bytes")
        out = []
        for line in lines:
            request = self._line(line, len(line) + 1)
            if request is not None:
                out.append(request)
        if self._bytes + len(self._partial) > self.limits.max_request_bytes:
            raise ProtocolError(f"request larger than {self.limits.max_request_bytes} bytes")
        return out

    def add_line(self, line: bytes) -> dict[str, str] | None:
        """Feed one line (with or without its newline); a full request on the empty line."""
        return self._line(line.rstrip(b"\n"), len(line) or 1)

    def _line(self, line: bytes, size: int) -> dict[str, str] | None:
        """LINE without its newline, SIZE bytes on the wire."""
        if size > self.limits.max_line_bytes + 2:
            raise ProtocolError(f"line longer than {self.limits.max_line_bytes} bytes")
        self._bytes += size
        if self._bytes > self.limits.max_request_bytes:
            raise ProtocolError(f"request larger than {self.limits.max_request_bytes} bytes")
        body = line.removesuffix(b"\r")
        if not body:
            if not self._attrs:
                raise ProtocolError("empty request (blank line with no attributes)")
            request, self._attrs, self._bytes = self._attrs, {}, 0
            return request
        name, value = parse_attribute(body)
        if name not in self._attrs and len(self._attrs) >= self.limits.max_attributes:
            raise ProtocolError(f"more than {self.limits.max_attributes} attributes")
        self._attrs[name] = value
        return None


def parse_attribute(body: bytes) -> tuple[str, str]:
    """One `name=value` line (no newline) as (name, value)."""
    name, sep, value = body.partition(b"=")
    if not sep:
        raise ProtocolError(f"line without '=': {_show(body)}")
    if not name or not name.replace(b"_", b"").isalnum() or not name.isascii():
        raise ProtocolError(f"bad attribute name: {_show(name)}")
    if any(b < 0x20 and b != 0x09 for b in value) or b"\x7f" in value:
        raise ProtocolError(f"control byte in the value of {name.decode()}")
    # Postfix passes 8-bit addresses (SMTPUTF8) as UTF-8; anything else is
    # kept, undecodable bytes escaped (lone surrogates), rather than refused:
    # `decide.invalid` refuses them where policyd reads them, with an answer.
    return name.decode(), value.decode("utf-8", "surrogateescape")


def format_reply(action: str) -> bytes:
    """The reply for ACTION (e.g. 'DUNNO'), one line plus the empty line."""
    if "\n" in action or "\r" in action:
        raise ValueError("an action is one line")
    return b"action=" + action.encode("utf-8", "surrogateescape") + b"\n\n"


def _show(raw: bytes, limit: int = 60) -> str:
    text = repr(raw[:limit])
    return text + ("..." if len(raw) > limit else "")
