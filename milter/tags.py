"""Application tags: what a message belongs to, read from its headers (pure).

The platform names a message's campaign, template, lead ... in headers:
each header of `[tags] headers` gives one tag (its unfolded value), each
free header (`X-Postkeep-Tag: key=value`) any one.  `read_tags` turns the
tag headers a message carried into the tags stored with it, or the 550 5.6.0
that refuses it: a refusal names the header and the rule it broke, since
only the sending application can fix it and a retry would change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from postkeep.config import TAG_KEY, TagsConfig
from postkeep.milter.decide import Reply


class TagError(Exception):
    """A malformed or oversized tag: the header and what is wrong with it."""

    def __init__(self, header: str, problem: str) -> None:
        super().__init__(f"{header}: {problem}")
        self.header = header
        self.problem = problem

    def reply(self) -> Reply:
        return Reply("550", "5.6.0", f"postkeep: tag header {self.header}: {self.problem}")


def is_tag_header(cfg: TagsConfig, name: str) -> bool:
    """Is NAME (any case) a tag header under CFG?"""
    lname = name.lower()
    if cfg.free_header and lname == cfg.free_header.lower():
        return True
    return any(lname == h.lower() for h in cfg.headers)


def _value(cfg: TagsConfig, header: str, raw: bytes) -> str:
    """The header's bytes as one tag value: UTF-8, unfolded, trimmed, bounded."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TagError(header, "not valid UTF-8") from None
    text = text.replace("\r\n", "").replace("\n", "").strip(" \t")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise TagError(header, "control characters in the value")
    return text


def _checked(cfg: TagsConfig, header: str, key: str, value: str) -> str:
    if not value:
        raise TagError(header, f"empty value for {key}")
    if len(value) > cfg.max_value_length:
        raise TagError(header, f"the value of {key} has {len(value)} characters, more than"
                               f" the {cfg.max_value_length} allowed")
    return value


def read_tags(cfg: TagsConfig, found: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """The tags of a message whose tag headers were FOUND (name, raw value), in order.

    Raises TagError for: more tag headers or tags than max_tags, a value that
    is not UTF-8, empty, over max_value_length or holding control characters,
    a free tag that is not `key=value` with a key of TAG_KEY's syntax, and a
    key given twice.
    """
    if len(found) > cfg.max_tags:
        raise TagError(found[cfg.max_tags][0],
                       f"{len(found)} tag headers, more than the {cfg.max_tags} allowed")
    mapped = {h.lower(): key for h, key in cfg.headers.items()}
    tags: dict[str, str] = {}
    for header, raw in found:
        text = _value(cfg, header, raw)
        key = mapped.get(header.lower())
        if key is None:  # the free header: key=value
            key, sep, text = text.partition("=")
            key, text = key.strip(" \t"), text.strip(" \t")
            if not sep or not TAG_KEY.fullmatch(key):
                shown = key[:64] if sep else "no '='"
                raise TagError(header, f"expected key=value with a key of lower-case letters,"
                                       f" digits and _ (at most 63), got {shown!r}")
        if key in tags:
            raise TagError(header, f"tag {key} given twice")
        tags[key] = _checked(cfg, header, key, text)
    return tags
