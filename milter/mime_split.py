"""Finding the large leaf parts of a MIME message, for storing them once.

`large_parts(header_block, body, threshold)` walks the multipart structure by
boundary tracking and returns, for every leaf part inside a multipart whose
body is larger than THRESHOLD, the byte range of that body (as it appears in
the message: still base64 or whatever its transfer encoding is) plus its
filename and MIME type.  BODY may be `bytes` or an `mmap` of a spilled file:
only `find` and slicing are used, so the search runs at C speed over base64
(which has no '-', so a delimiter search skips it in one call) and memory
stays bounded for messages spilled to disk.

Restoring never depends on this parse: the message is rebuilt by splicing
the cut bytes back at recorded offsets.  So the parser only has to be safe,
not right, on malformed MIME: a missing closing delimiter makes the last part
run to the end of its enclosing entity; a delimiter-like string inside a line
(or in a preamble, not at a line start) is not a delimiter; nesting is capped
at MAX_DEPTH; garbage never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

MAX_DEPTH = 32
MAX_PARTS = 10_000


class Buffer(Protocol):
    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...
    def __getitem__(self, s: slice) -> bytes: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Span:
    """A leaf part's body: BODY[start:end]."""

    start: int
    end: int
    content_type: str | None
    filename: str | None

    @property
    def size(self) -> int:
        return self.end - self.start


_CT = re.compile(rb"(?im)^content-type[ \t]*:[ \t]*([^;\r\n]*)((?:[^\r\n]|\r?\n[ \t])*)")
_CD = re.compile(rb"(?im)^content-disposition[ \t]*:((?:[^\r\n]|\r?\n[ \t])*)")


def _param(params: bytes, name: bytes) -> str | None:
    """A Content-Type/-Disposition parameter, quoted or not (unfolded)."""
    m = re.search(rb'(?i)(?:^|;)\s*' + name + rb'\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))',
                  params.replace(b"\r\n", b"").replace(b"\n", b""))
    if not m:
        return None
    raw = m.group(1) if m.group(1) is not None else m.group(2)
    return raw.replace(b'\\"', b'"').decode("utf-8", "replace")


def parse_headers(headers: bytes) -> tuple[str, str | None, str | None]:
    """(lower-cased MIME type, boundary or None, filename or None) from a header block."""
    m = _CT.search(headers)
    ctype = "text/plain"
    boundary = filename = None
    if m:
        ctype = m.group(1).strip().decode("ascii", "replace").lower() or "text/plain"
        boundary = _param(m.group(2), b"boundary")
        filename = _param(m.group(2), b"name")
    d = _CD.search(headers)
    if d:
        filename = _param(d.group(1), b"filename") or filename
    return ctype, boundary, filename


def _header_end(buf: Buffer, start: int, end: int) -> int:
    """Where a part's body starts (after the blank line), END if there is none."""
    if buf[start : start + 2] == b"\r\n":
        return start + 2
    if buf[start : start + 1] == b"\n":
        return start + 1
    crlf = buf.find(b"\r\n\r\n", start, end)
    lf = buf.find(b"\n\n", start, end)
    cands = [c + 4 for c in (crlf,) if c >= 0] + [c + 2 for c in (lf,) if c >= 0]
    return min(cands) if cands else end


def _delimiters(buf: Buffer, boundary: bytes, start: int, end: int
                ) -> list[tuple[int, int, bool]]:
    """Delimiter lines for BOUNDARY in BUF[start:end]: (line start incl. the
    preceding line break, first byte after the line, is the close delimiter)."""
    dash = b"--" + boundary
    out: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end and len(out) < MAX_PARTS:
        if pos == start and buf[start : start + len(dash)] == dash:
            hit, line = start, start
        else:
            hit = buf.find(b"\n" + dash, pos, end)
            if hit < 0:
                break
            line = hit + 1
            if hit > start and buf[hit - 1 : hit] == b"\r":
                hit -= 1
        after = line + len(dash)
        close = buf[after : after + 2] == b"--"
        if close:
            after += 2
        nl = buf.find(b"\n", after, end)
        tail = buf[after : (nl if nl >= 0 else end)]
        if tail.strip(b" \t\r"):  # "--boundaryX": a longer boundary, not ours
            pos = after
            continue
        out.append((hit, nl + 1 if nl >= 0 else end, close))
        if close:
            break
        pos = nl + 1 if nl >= 0 else end
    return out


def top_boundary(header_block: bytes) -> str | None:
    """The boundary of a multipart message, None if it is not one (nothing to split)."""
    ctype, boundary, _ = parse_headers(header_block)
    return boundary if ctype.startswith("multipart/") and boundary else None


def large_parts(header_block: bytes, body: Buffer, threshold: int) -> list[Span]:
    """Leaf parts inside multiparts whose body exceeds THRESHOLD bytes, in order."""
    boundary = top_boundary(header_block)
    if boundary is None:
        return []
    spans: list[Span] = []
    _walk(body, boundary.encode("utf-8", "surrogateescape"), 0, len(body), threshold, spans, 0)
    return spans


def _walk(buf: Buffer, boundary: bytes, start: int, end: int, threshold: int,
          spans: list[Span], depth: int) -> None:
    if depth >= MAX_DEPTH:
        return
    delims = _delimiters(buf, boundary, start, end)
    for i, (_, after, close) in enumerate(delims):
        if close:
            break
        part_end = delims[i + 1][0] if i + 1 < len(delims) else end
        if part_end - after <= threshold:
            continue  # nothing inside can exceed the threshold either
        body_start = _header_end(buf, after, part_end)
        ctype, inner, filename = parse_headers(buf[after:body_start])
        if ctype.startswith("multipart/") and inner:
            _walk(buf, inner.encode("utf-8", "surrogateescape"), body_start, part_end,
                  threshold, spans, depth + 1)
        elif part_end - body_start > threshold:
            spans.append(Span(body_start, part_end, ctype, filename))
