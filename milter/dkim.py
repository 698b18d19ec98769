"""DKIM signing for a message that streams: body hash as it arrives, header at the end.

The milter sees the body in chunks of up to 64 KiB and the finished header
block only at end of message, so signing is split in two:

- `BodyHasher` applies RFC 6376 relaxed body canonicalization (section 3.4.4)
  chunk by chunk and feeds SHA-256.  Chunks may split anywhere, even between
  CR and LF or inside a run of spaces; the state kept between chunks is a few
  flags and a count of empty lines not yet known to be trailing, so memory is
  O(1) whatever the message or line length.
- `sign` builds the DKIM-Signature header line from the header block and that
  body hash.  Header parsing, relaxed header canonicalization, tag order and
  folding come from dkimpy itself (`rfc822_parse`, `CanonicalizationPolicy`,
  `fold`, `hash_headers`), so the result is byte-identical to
  `dkim.sign(..., canonicalize=(b'relaxed', b'relaxed'))` for the same message,
  header list and time.  Only the public-key step differs: dkimpy computes RSA
  in pure Python (~180 signatures/s for RSA-2048); here OpenSSL does it through
  `cryptography` (PKCS#1 v1.5 and Ed25519 are deterministic, so the bytes are
  the same).

Which headers are signed (`signed_header_names`): every header of RFC 6376
section 5.4.1's recommended set that is present, in message order, then each
of `OVERSIGNED` once more, so a verifier fails if one is added in transit
(also when the message has none of it).

dkimpy's one quirk kept for byte identity: a last body line that has no CRLF
keeps one trailing space after whitespace compression.  Postfix always ends
the body with CRLF, so the milter never meets it.

Pure: no I/O, no clock (the caller passes `timestamp`), no logging of keys.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Final

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from postkeep.signing_keys import ALGORITHMS, Algorithm, DkimError, PrivateKey, algorithm_of

# RFC 6376 section 5.4.1: header fields a signer should sign when present.
RECOMMENDED: Final[frozenset[bytes]] = frozenset(dkim.DKIM.SHOULD)

# Signed once more than they occur, so that adding one breaks the signature.
OVERSIGNED: Final[tuple[bytes, ...]] = (
    b"from", b"to", b"subject", b"date", b"reply-to", b"cc", b"message-id",
    b"mime-version", b"content-type", b"content-transfer-encoding",
)

_RELAXED: Final = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_TAB_TO_SPACE: Final = bytes.maketrans(b"\t", b" ")
_CRLF: Final = b"\r\n"


def _squeeze(data: bytes) -> bytes:
    """Every run of spaces and tabs as one space.

    Faster than a regex substitution when runs are common (indented HTML):
    each pass halves every run, so a 64 KiB run takes 16 passes at most.
    """
    data = data.translate(_TAB_TO_SPACE)
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


class BodyHasher:
    """SHA-256 of the relaxed-canonicalized body, fed chunk by chunk.

    Line ends are CRLF or a bare LF (as dkimpy treats them); a bare CR is
    ordinary content.  Call `update` for each chunk, then `digest` once.
    """

    __slots__ = ("_hash", "_in_content", "_pending_cr", "_pending_empty", "_pending_wsp")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pending_empty = 0  # empty lines seen, emitted only if content follows
        self._in_content = False  # the current line has emitted content
        self._pending_wsp = False  # the current line ends (so far) in spaces or tabs
        self._pending_cr = False  # the chunk ended in CR: maybe half of a CRLF

    def update(self, chunk: bytes) -> None:
        """Hash one more piece of the body, split anywhere."""
        if not chunk:
            return
        carry = (b" " if self._pending_wsp else b"") + (b"\r" if self._pending_cr else b"")
        if carry:
            chunk = carry + chunk
        self._pending_wsp = False
        self._pending_cr = chunk.endswith(b"\r")
        if self._pending_cr:
            chunk = chunk[:-1]
        out = bytearray()
        last_lf = chunk.rfind(b"\n")
        if last_lf >= 0:
            self._complete_lines(chunk[: last_lf + 1], out)
            chunk = chunk[last_lf + 1 :]
        self._partial_line(chunk, out)
        if out:
            self._hash.update(out)

    def _complete_lines(self, block: bytes, out: bytearray) -> None:
        """BLOCK ends in LF: canonicalize its lines, holding back trailing empty ones."""
        if (
            b"\t" not in block
            and b"  " not in block
            and b" \r\n" not in block
            and block.count(b"\n") == block.count(b"\r\n") == block.count(b"\r")
        ):
            # Already canonical (CRLF only, no bare CR, no whitespace to
            # fold): the common case, hashed without copying it around.
            content = block.rstrip(b"\r\n")
            trailing = (len(block) - len(content)) // 2
        else:
            # Work with bare LF as the line end (a CR left over is content),
            # so stripping and counting trailing empty lines is exact.
            lines = _squeeze(block.replace(b"\r\n", b"\n")).replace(b" \n", b"\n")
            content = lines.rstrip(b"\n")
            trailing = len(lines) - len(content)  # line ends after the last content
            content = content.replace(b"\n", _CRLF)
        if content:
            if not self._in_content:
                out += _CRLF * self._pending_empty
            out += content
            out += _CRLF
            self._pending_empty = trailing - 1
        elif self._in_content:
            out += _CRLF  # the first LF ends a line whose content is already out
            self._pending_empty = trailing - 1
        else:
            self._pending_empty += trailing
        self._in_content = False

    def _partial_line(self, tail: bytes, out: bytearray) -> None:
        """TAIL has no LF: emit its content now, keep trailing whitespace as a flag."""
        if not tail:
            return
        tail = _squeeze(tail)
        if tail.endswith(b" "):
            self._pending_wsp = True
            tail = tail[:-1]
        if tail:
            if not self._in_content:
                out += _CRLF * self._pending_empty
                self._pending_empty = 0
                self._in_content = True
            out += tail

    def digest(self) -> bytes:
        """The 32-byte body hash (what `bh=` carries, before base64)."""
        h = self._hash.copy()
        if self._in_content or self._pending_wsp or self._pending_cr:
            # An unterminated last line: dkimpy compresses its whitespace but
            # does not strip it, then adds the CRLF.
            tail = _CRLF * self._pending_empty if not self._in_content else b""
            tail += (b" " if self._pending_wsp else b"") + (b"\r" if self._pending_cr else b"")
            h.update(tail + _CRLF)
        return h.digest()


def body_hash(body: bytes) -> bytes:
    """The relaxed body hash of a whole body (one-shot `BodyHasher`)."""
    hasher = BodyHasher()
    hasher.update(body)
    return hasher.digest()


def parse_headers(header_block: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs as dkimpy parses them; DkimError for a broken block."""
    try:
        headers, _ = dkim.rfc822_parse(header_block)
    except dkim.MessageFormatError as exc:
        raise DkimError(f"header block not parseable: {exc}") from None
    return [(bytes(name), bytes(value)) for name, value in headers]


def signed_header_names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The h= list: recommended headers present, in order, then OVERSIGNED once more each."""
    names = [name.lower() for name, _ in headers if name.lower() in RECOMMENDED]
    return names + list(OVERSIGNED)


def sign(
    header_block: bytes,
    body_digest: bytes,
    key: PrivateKey,
    domain: str,
    selector: str,
    algorithm: Algorithm,
    timestamp: int,
) -> bytes:
    """The `DKIM-Signature: ...` header line (folded, CRLF-terminated) for a message.

    HEADER_BLOCK is the message's header fields with CRLF line ends (the
    empty line after them may be there or not); BODY_DIGEST is
    `BodyHasher.digest()`.  Signing is relaxed/relaxed, `i=@DOMAIN`, `t=`
    TIMESTAMP, no `l=`.
    """
    if algorithm not in ALGORITHMS:
        raise DkimError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    if algorithm != algorithm_of(key):
        raise DkimError(f"algorithm {algorithm} does not match the {algorithm_of(key)} key")
    if len(body_digest) != 32:
        raise DkimError(f"body hash of {len(body_digest)} bytes: expected a 32-byte SHA-256")
    headers = parse_headers(header_block)
    if sum(1 for name, _ in headers if name.lower() == b"from") != 1:
        raise DkimError("the message must have exactly one From: header to be signed")
    include = signed_header_names(headers)
    bdomain = domain.encode("ascii")
    fields = [
        (b"v", b"1"),
        (b"a", algorithm.encode("ascii")),
        (b"c", b"relaxed/relaxed"),
        (b"d", bdomain),
        (b"i", b"@" + bdomain),
        (b"q", b"dns/txt"),
        (b"s", selector.encode("ascii")),
        (b"t", str(int(timestamp)).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(body_digest)),
        # dkimpy reserves b= a full line first, so that folding after the real
        # value is set leaves every earlier tag where it was.
        (b"b", b"0" * 60),
    ]
    name = b"DKIM-Signature"
    unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(name))
    unsigned = dkim.RE_BTAG.sub(b"\\1", unsigned)
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher, _RELAXED, _RELAXED.canonicalize_headers(headers), include,
        (name, b" " + unsigned), None,
    )
    digest = hasher.digest()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        signature = key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 digest
    fields[-1] = (b"b", base64.b64encode(signature))
    value = b"; ".join(b"=".join(f) for f in fields) + _CRLF
    folded: bytes = dkim.fold(value, namelen=len(name), linesep=_CRLF)
    return name + b": " + folded


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block, body) of a whole message, split at the first empty line."""
    m = re.search(rb"\r?\n\r?\n", message)
    if m is None:
        return message, b""
    return message[: m.start()] + _CRLF, message[m.end() :]


def sign_message(
    message: bytes,
    key: PrivateKey,
    domain: str,
    selector: str,
    algorithm: Algorithm,
    timestamp: int,
) -> bytes:
    """`sign` for a whole message in memory (tests, small system mail)."""
    headers, body = split_message(message)
    return sign(headers, body_hash(body), key, domain, selector, algorithm, timestamp)
