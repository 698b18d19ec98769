"""The stored message object's format: plain zstd, or a manifest and a skeleton.

Two formats live side by side under `messages/...eml.zst`:

- plain (every object written before split parts and dictionaries, and still
  most objects): concatenated zstd frames that decompress to the message;
- container: `MAGIC`, one version byte, a 4-byte big-endian manifest length,
  the manifest (compact JSON), then zstd frames of the *skeleton*, which is
  the message with its split-out parts cut away.

The manifest says which zstd dictionary the skeleton needs (organisation and
version; the dictionary object's key follows from them) and, for each part
cut out, where it goes back (`at`: an offset in the skeleton), its size, its
sha256 and the key of the part object (plain zstd frames of the part's bytes
as they appeared in the message).  Restoring is then "decompress the
skeleton, splice each part in at its offset", so no parsing of the message is
ever needed to get it back byte for byte.

MAGIC starts with 0x89 and is not a zstd frame magic (0xFD2FB528) nor a
skippable-frame magic (0x184D2A5?): a reader that only knows the plain format
fails loudly on a container ("corrupt zstd content") instead of silently
returning the skeleton.  Unknown versions are refused with their number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAGIC = b"\x89PKM"
VERSION = 1
_LEN_BYTES = 4
# A manifest lists at most a few thousand parts; refuse absurd lengths early.
MAX_MANIFEST_BYTES = 1 << 20


class ContainerError(Exception):
    """The object claims the container format but its header is not readable."""


@dataclass(frozen=True)
class DictionaryRef:
    """A zstd dictionary version of one organisation."""

    org_id: str
    version: int

    @property
    def key(self) -> str:
        """dictionaries/{org_id}/{version}.zdict"""
        return f"dictionaries/{self.org_id}/{self.version}.zdict"

    def __str__(self) -> str:
        return f"dictionary v{self.version} of organisation {self.org_id} ({self.key})"


@dataclass(frozen=True)
class PartRef:
    """One split-out part: spliced back in after `at` bytes of skeleton."""

    at: int
    size: int
    sha256: str  # hex
    key: str


@dataclass(frozen=True)
class Manifest:
    dictionary: DictionaryRef | None
    parts: tuple[PartRef, ...] = ()


def encode_header(manifest: Manifest) -> bytes:
    """MAGIC + version + length + manifest JSON: what precedes the skeleton."""
    doc: dict[str, object] = {}
    if manifest.dictionary is not None:
        doc["dict"] = [manifest.dictionary.org_id, manifest.dictionary.version]
    if manifest.parts:
        doc["parts"] = [[p.at, p.size, p.sha256, p.key] for p in manifest.parts]
    body = json.dumps(doc, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + len(body).to_bytes(_LEN_BYTES, "big") + body


def decode_manifest(body: bytes) -> Manifest:
    """The manifest from its JSON (ContainerError if malformed)."""
    try:
        doc = json.loads(body)
        d = doc.get("dict")
        dictionary = DictionaryRef(str(d[0]), int(d[1])) if d is not None else None
        parts = tuple(PartRef(int(p[0]), int(p[1]), str(p[2]), str(p[3]))
                      for p in doc.get("parts", ()))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ContainerError(f"unreadable manifest: {exc}") from exc
    last = 0
    for p in parts:
        if p.at < last or p.size < 0:
            raise ContainerError("unreadable manifest: part offsets out of order")
        last = p.at
    return Manifest(dictionary, parts)


def read_header(chunks: Iterable[bytes]) -> tuple[Manifest | None, Iterator[bytes]]:
    """Split an object's chunks into (manifest or None for plain, the rest).

    Reads only as many chunks as the header needs; the returned iterator
    yields the remaining bytes (the skeleton's frames, or the whole plain
    object).
    """
    it = iter(chunks)
    head = b""
    need = len(MAGIC) + 1 + _LEN_BYTES
    for chunk in it:
        head += chunk
        if len(head) >= need or not head.startswith(MAGIC[: len(head)]):
            break
    if not head.startswith(MAGIC) or len(head) < need:
        if head.startswith(MAGIC):
            raise ContainerError("object truncated inside its header")
        return None, _chain(head, it)
    version = head[len(MAGIC)]
    if version != VERSION:
        raise ContainerError(f"container version {version} is not supported"
                             f" (this postkeep reads version {VERSION})")
    length = int.from_bytes(head[len(MAGIC) + 1 : need], "big")
    if length > MAX_MANIFEST_BYTES:
        raise ContainerError(f"manifest of {length} bytes is implausible")
    while len(head) < need + length:
        try:
            head += next(it)
        except StopIteration:
            raise ContainerError("object truncated inside its manifest") from None
    manifest = decode_manifest(head[need : need + length])
    return manifest, _chain(head[need + length :], it)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest
