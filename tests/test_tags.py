"""Application tags without services (issue 17): the [tags] configuration, the
decision that reads a message's tag headers into tags or refuses them
(550 5.6.0 naming the header and the limit), what the capture service keeps
out of the signed and stored header block, the `--tag` filter.

Through the real stack: tests/test_tags_stack.py.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import pytest
import zstandard

from postkeep import config
from postkeep.cli.messages import parse_tag_filter
from postkeep.config import ConfigError, MilterConfig, TagsConfig
from postkeep.milter.capture import StoredContent
from postkeep.milter.service import CaptureService, Verdict
from postkeep.milter.tags import TagError, is_tag_header, read_tags
from postkeep.storage.metadata import search
from postkeep.storage.metadata.directory import Organisation
from postkeep.storage.metadata.messages import CapturedMessage, MessageFilter

pytestmark = pytest.mark.unit

CFG = TagsConfig(headers={"X-Campaign-Id": "campaign_id", "X-Lead-Id": "lead_id"},
                 max_tags=4, max_value_length=20)


def _refused(found: list[tuple[str, bytes]], cfg: TagsConfig = CFG) -> TagError:
    with pytest.raises(TagError) as info:
        read_tags(cfg, found)
    return info.value


# --- the decision ------------------------------------------------------------


def test_mapped_and_free_headers_become_tags() -> None:
    tags = read_tags(CFG, [("x-campaign-id", b" c-42"), ("X-Lead-Id", b"\t981 "),
                           ("X-Postkeep-Tag", b" segment = vip\r\n  list")])
    assert tags == {"campaign_id": "c-42", "lead_id": "981", "segment": "vip  list"}


def test_utf8_values_are_kept() -> None:
    assert read_tags(CFG, [("X-Postkeep-Tag", " ort=Zürich".encode())]) == {"ort": "Zürich"}


@pytest.mark.parametrize(("found", "header", "words"), [
    ([("X-Lead-Id", b" \xff\xfe")], "X-Lead-Id", "not valid UTF-8"),
    ([("X-Lead-Id", b" " + b"9" * 21)], "X-Lead-Id", "21 characters, more than the 20 allowed"),
    ([("X-Lead-Id", b" ")], "X-Lead-Id", "empty value for lead_id"),
    ([("X-Lead-Id", b" a\x00b")], "X-Lead-Id", "control characters"),
    ([("X-Postkeep-Tag", b" novalue")], "X-Postkeep-Tag", "expected key=value"),
    ([("X-Postkeep-Tag", b" Bad-Key=1")], "X-Postkeep-Tag", "'Bad-Key'"),
    ([("X-Postkeep-Tag", b" 1st=1")], "X-Postkeep-Tag", "'1st'"),
    ([("X-Postkeep-Tag", b" k=")], "X-Postkeep-Tag", "empty value for k"),
    ([("X-Campaign-Id", b" a"), ("X-Postkeep-Tag", b" campaign_id=b")], "X-Postkeep-Tag",
     "tag campaign_id given twice"),
    ([("X-Postkeep-Tag", f" k{i}=v".encode()) for i in range(5)], "X-Postkeep-Tag",
     "5 tag headers, more than the 4 allowed"),
])
def test_malformed_or_oversized_tags_are_refused(found: list[tuple[str, bytes]], header: str,
                                                 words: str) -> None:
    err = _refused(found)
    assert err.header == header and words in err.problem, err
    reply = err.reply()
    assert (reply.code, reply.enhanced) == ("550", "5.6.0")
    assert f"tag header {header}" in reply.text and words in reply.text


def test_a_key_of_63_characters_is_the_longest() -> None:
    assert read_tags(CFG, [("X-Postkeep-Tag", b" " + b"k" * 63 + b"=v")]) == {"k" * 63: "v"}
    assert "expected key=value" in _refused([("X-Postkeep-Tag", b" " + b"k" * 64 + b"=v")]).problem


def test_tag_headers_are_matched_whatever_their_case() -> None:
    assert is_tag_header(CFG, "x-postkeep-tag") and is_tag_header(CFG, "X-CAMPAIGN-ID")
    assert not is_tag_header(CFG, "X-Template-Id")
    assert not is_tag_header(TagsConfig(free_header=""), "X-Postkeep-Tag")


# --- configuration -----------------------------------------------------------


def _refusal(tags: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse({"tags": tags})
    return str(info.value)


def test_the_tags_table_is_read() -> None:
    cfg = config.parse({"tags": {"headers": {"X-Campaign-Id": "campaign_id"}, "strip": False,
                                 "max_tags": 8}}).tags
    assert dict(cfg.headers) == {"X-Campaign-Id": "campaign_id"}
    assert (cfg.strip, cfg.max_tags, cfg.free_header) == (False, 8, "X-Postkeep-Tag")
    assert config.parse({}).tags.strip is True and dict(config.parse({}).tags.headers) == {}


@pytest.mark.parametrize(("tags", "words"), [
    ({"headers": {"X-Campaign-Id": "Campaign"}}, "tags.headers.X-Campaign-Id = 'Campaign'"),
    ({"headers": {"X Campaign": "c"}}, "tags.headers.X Campaign: 'X Campaign' is not a header"),
    ({"headers": {"Subject": "s"}}, "tags.headers.Subject: Subject cannot be a tag header"),
    ({"headers": {"X-Postkeep-Id": "s"}}, "X-Postkeep-Id cannot be a tag header"),
    ({"headers": {"X-A": "a", "x-a": "b"}}, "named twice"),
    ({"headers": {"X-A": 1}}, "tags.headers = {'X-A': 1}: expected a table of strings"),
    ({"free_header": "X-A", "headers": {"X-A": "a"}}, "tags.free_header = 'X-A'"),
    ({"max_tags": 0}, "tags.max_tags = 0"),
    ({"max_value_length": 999}, "tags.max_value_length = 999"),
])
def test_bad_tags_configuration_is_refused_naming_the_key(tags: dict[str, Any],
                                                           words: str) -> None:
    assert words in _refusal(tags)


# --- the capture service: tag headers neither signed nor stored with strip ----


class _Keep:
    def __init__(self) -> None:
        self.message: CapturedMessage | None = None
        self.stored = b""

    def commit(self, message: CapturedMessage, content: StoredContent) -> None:
        self.message = message
        self.stored = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(content.stream.read()), read_across_frames=True).read()


class _Directory:
    org = Organisation(uuid.uuid4(), "acme", "basic", 30, 90, "unsigned")

    def by_submitter(self, name: str) -> Organisation | None:
        return None

    def by_domain(self, domain: str) -> Organisation | None:
        return self.org

    def by_inbound_domain(self, domain: str) -> Organisation | None:
        return None  # no domain here takes inbound mail


def _send(strip: bool, headers: list[tuple[str, bytes]]) -> tuple[Verdict, Any, _Keep]:
    keep = _Keep()
    service = CaptureService(MilterConfig(), keep, _Directory(),  # type: ignore[arg-type]
                             tags=TagsConfig(headers={"X-Campaign-Id": "campaign_id"},
                                             strip=strip))
    tx = service.begin("<a@acme.example>", None, "192.0.2.1")
    tx.recipients.append("r@x.example")
    for name, value in [("From", b" a@acme.example"), *headers, ("Subject", b" hi")]:
        service.header(tx, name, value)
    tx.capture.add_body(b"hello\r\n")
    return service.end_of_message(tx, "QID1"), tx, keep


TAGGED = [("X-Campaign-Id", b" c-1"), ("x-postkeep-tag", b" a=1"), ("X-Postkeep-Tag", b" b=2")]


def test_with_strip_tag_headers_are_deleted_and_not_stored() -> None:
    verdict, tx, keep = _send(True, TAGGED)
    assert verdict.reply is None and keep.message is not None
    assert keep.message.tags == {"campaign_id": "c-1", "a": "1", "b": "2"}
    # indexes count per name, case-insensitively, as Postfix's chgheader does
    assert tx.strip_headers == [("X-Campaign-Id", 1), ("x-postkeep-tag", 1),
                                ("X-Postkeep-Tag", 2)]
    assert keep.stored.startswith(b"From: a@acme.example\r\nSubject: hi\r\nX-Postkeep-Id: ")


def test_without_strip_tag_headers_stay_and_are_stored() -> None:
    verdict, tx, keep = _send(False, TAGGED)
    assert verdict.reply is None and keep.message is not None
    assert keep.message.tags == {"campaign_id": "c-1", "a": "1", "b": "2"}
    assert tx.strip_headers == []
    assert keep.stored.startswith(b"From: a@acme.example\r\nX-Campaign-Id: c-1\r\n"
                                  b"x-postkeep-tag: a=1\r\nX-Postkeep-Tag: b=2\r\nSubject: hi\r\n")


def test_malformed_tags_refuse_the_message_before_anything_is_stored() -> None:
    verdict, _, keep = _send(True, [("X-Postkeep-Tag", b" no equals sign")])
    assert verdict.reject and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.enhanced) == ("550", "5.6.0")
    assert "X-Postkeep-Tag" in verdict.reply.text and keep.message is None


# --- the list filter ---------------------------------------------------------


def test_tag_filter_parses_and_selects_by_containment() -> None:
    assert parse_tag_filter("campaign_id=c=1") == ("campaign_id", "c=1")
    for bad in ("campaign_id", "Campaign=1", "k="):
        with pytest.raises(ValueError, match="--tag"):
            parse_tag_filter(bad)
    doc = json.loads(search.to_json(MessageFilter(tags=(("campaign_id", "c-1"), ("a", "1")))))
    assert doc["tags"] == {"campaign_id": "c-1", "a": "1"}


def test_tags_survive_the_outage_spool_and_untagged_entries_are_unchanged() -> None:
    from datetime import UTC, datetime

    from postkeep.storage.content.spool import decode_metadata, encode_metadata

    now = datetime(2026, 1, 2, tzinfo=UTC)
    plain = CapturedMessage(uuid.uuid4(), uuid.uuid4(), "acme.example", "Q", "a@acme.example",
                            ("r@x.example",), 10, b"\x00" * 32, "k", 5, now, now, now)
    tagged = CapturedMessage(**{**plain.__dict__, "tags": {"campaign_id": "c", "ort": "Zürich"}})
    assert b'"tags"' not in encode_metadata(plain, spooled_at=now, reason="s3")
    for m in (plain, tagged):
        assert decode_metadata(encode_metadata(m, spooled_at=now, reason="s3"))[0] == m
