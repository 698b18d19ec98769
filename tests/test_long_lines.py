"""Lines over 998 octets broken byte for byte as Postfix's smtp client breaks
them (smtp_text_out in src/smtp/smtp_proto.c, Postfix 3.7: the first 998
octets, then CRLF SPACE and 997 more at a time; a line that ends exactly at
the limit is left whole), streamed in any chunking; the capture that folds;
and the % in reply texts that libmilter reads as a format."""

from __future__ import annotations

import random

import pytest
import zstandard

from postkeep import config
from postkeep.milter.adapter import reply_text
from postkeep.milter.capture import MessageCapture, restore
from postkeep.milter.longlines import LineBreaker, break_lines, longest_line

pytestmark = pytest.mark.unit


def postfix_smtp_text_out(records: list[tuple[bytes, bool]], limit: int = 998) -> bytes:
    """A transcription of Postfix's smtp_text_out over queue-file records
    (content, is_continued), without SMTP dot-stuffing: the reference."""
    out = bytearray()
    space_left = limit
    for text, cont in records:
        data = text
        while True:
            if limit > 0 and len(data) >= space_left:
                out += data[:space_left] + b"\r\n"
                data = data[space_left:]
                space_left = limit
                if len(data) > 0 or cont:
                    out += b" "
                    space_left -= 1
                if len(data) == 0:
                    break
            else:
                if cont:
                    out += data
                    space_left -= len(data)
                else:
                    out += data + b"\r\n"
                    space_left = limit
                break
    return bytes(out)


def records(text: bytes, record_limit: int = 2048) -> list[tuple[bytes, bool]]:
    """TEXT's CRLF lines as Postfix's queue file holds them: lines longer
    than line_length_limit (2048) in continued records."""
    out: list[tuple[bytes, bool]] = []
    for line in text.split(b"\r\n")[:-1]:
        while len(line) > record_limit:
            out.append((line[:record_limit], True))
            line = line[record_limit:]
        out.append((line, False))
    return out


def test_exact_bytes_at_997_998_999_and_5000() -> None:
    assert break_lines(b"a" * 997 + b"\r\n") == b"a" * 997 + b"\r\n"
    assert break_lines(b"a" * 998 + b"\r\n") == b"a" * 998 + b"\r\n"
    assert break_lines(b"a" * 999 + b"\r\n") == b"a" * 998 + b"\r\n a\r\n"
    line = bytes(range(48, 58)) * 500  # 5,000 octets
    want = (line[:998] + b"\r\n " + line[998:1995] + b"\r\n " + line[1995:2992]
            + b"\r\n " + line[2992:3989] + b"\r\n " + line[3989:4986] + b"\r\n "
            + line[4986:] + b"\r\n")
    assert break_lines(line + b"\r\n") == want
    # the rest fits the second line exactly (998 + 997): no empty continuation
    assert break_lines(b"b" * 1995 + b"\r\n") == b"b" * 998 + b"\r\n " + b"b" * 997 + b"\r\n"
    assert break_lines(b"b" * 1996 + b"\r\n") == (b"b" * 998 + b"\r\n " + b"b" * 997
                                                  + b"\r\n b\r\n")


@pytest.mark.parametrize("length", [0, 1, 997, 998, 999, 1995, 1996, 2047, 2048, 2049,
                                    4096, 5000, 10_000])
def test_same_as_postfix_over_its_queue_records(length: int) -> None:
    text = b"short\r\n" + b"x" * length + b"\r\n" + b".dot\r\n" + b"y" * (length // 2) + b"\r\n"
    assert break_lines(text) == postfix_smtp_text_out(records(text))


def test_every_output_line_within_the_limit_and_unfolds_to_the_input() -> None:
    text = b"".join(b"z" * n + b"\r\n" for n in (5000, 998, 999, 0, 12_345))
    out = break_lines(text)
    assert longest_line(out) == 998
    assert out.replace(b"\r\n ", b"") == text


def test_cr_before_crlf_is_line_content() -> None:
    # 997 octets and a CR: 998 octets of content, left whole
    assert break_lines(b"c" * 997 + b"\r\r\n") == b"c" * 997 + b"\r\r\n"
    # 998 and a CR: the CR goes to the continuation line
    assert break_lines(b"c" * 998 + b"\r\r\n") == b"c" * 998 + b"\r\n \r\r\n"
    # a bare CR (no LF) in the middle of a line is content too
    assert break_lines(b"d\rd" * 400 + b"\r\n") == postfix_smtp_text_out(
        records(b"d\rd" * 400 + b"\r\n"))


def test_lf_alone_is_not_a_line_end() -> None:
    # Postfix passes the body with CRLF ends; a bare LF never reaches the
    # milter, and is content here (the line is still counted whole).
    assert longest_line(b"a" * 600 + b"\n" + b"a" * 600 + b"\r\n") == 1201


@pytest.mark.parametrize("chunk", [1, 2, 3, 997, 998, 999, 4096])
def test_any_chunking_gives_the_same_bytes(chunk: int) -> None:
    text = (b"q" * 998 + b"\r\n" + b"r" * 5000 + b"\r\n" + b"s" * 999 + b"\r\r\n"
            + b"t" * 1995 + b"\r\n")
    breaker = LineBreaker()
    out = b"".join(breaker.feed(text[i : i + chunk]) for i in range(0, len(text), chunk))
    out += breaker.flush()
    assert out == break_lines(text)
    assert breaker.broke and breaker.longest == 5000


def test_random_lines_and_chunks_match_postfix() -> None:
    rng = random.Random(14)
    for _ in range(200):
        text = b"".join(bytes(rng.choice(b"ab.\r ") for _ in range(rng.choice(
            (0, 1, 996, 997, 998, 999, 1000, 1995, 1996, 2048, 3000, rng.randrange(6000)))))
            + b"\r\n" for _ in range(rng.randrange(1, 6)))
        breaker, out, i = LineBreaker(), b"", 0
        while i < len(text):
            n = rng.choice((1, 2, 997, 998, 999, 4096, 65535))
            out += breaker.feed(text[i : i + n])
            i += n
        out += breaker.flush()
        want = postfix_smtp_text_out(records(text))
        assert out == want
        assert breaker.longest == longest_line(text[:-2])


def test_short_lines_untouched_and_limit_zero_disables() -> None:
    text = b"a\r\n" + b"b" * 998 + b"\r\n\r\n"
    breaker = LineBreaker()
    assert breaker.feed(text) + breaker.flush() == text
    assert not breaker.broke
    assert break_lines(b"x" * 5000 + b"\r\n", limit=0) == b"x" * 5000 + b"\r\n"


def test_unterminated_last_line_and_trailing_cr() -> None:
    assert break_lines(b"e" * 999) == b"e" * 998 + b"\r\n e"
    assert break_lines(b"e" * 998 + b"\r") == b"e" * 998 + b"\r\n \r"


def _capture(fold: bool, header_value: bytes, body: bytes) -> MessageCapture:
    cap = MessageCapture(fold_lines=fold)
    cap.add_header("From", b" a@x.example")
    cap.add_header("X-Long", header_value)
    cap.end_of_headers()
    for i in range(0, len(body), 65535):
        cap.add_body(body[i : i + 65535])
    return cap


def test_fold_capture_stores_signs_and_replaces_the_broken_lines() -> None:
    body = b"head\r\n" + b"B" * 5000 + b"\r\ntail\r\n"
    value = b" " + b"H" * 1500
    cap = _capture(True, value, body)
    assert (cap.longest_body_line, cap.longest_header_line) == (5000, 1508)
    replacement = cap.folded_body()
    assert cap.lines_broken and replacement.read() == break_lines(body)
    content = cap.finish()
    stored = restore(content.stream)
    assert stored == (b"From: a@x.example\r\n" + break_lines(b"X-Long:" + value + b"\r\n")
                      + b"\r\n" + break_lines(body))
    assert cap.body_hasher is not None
    unfolded = MessageCapture()
    unfolded.end_of_headers()
    unfolded.add_body(break_lines(body))
    unfolded.end_body()
    assert unfolded.body_hasher is not None
    assert cap.body_hasher.digest() == unfolded.body_hasher.digest()


def test_without_fold_the_capture_keeps_lines_and_measures_them() -> None:
    body = b"B" * 5000 + b"\r\n"
    cap = _capture(False, b" short", body)
    assert (cap.longest_body_line, cap.longest_header_line, cap.lines_broken) == (5000, 17,
                                                                                  False)
    data = zstandard.ZstdDecompressor().stream_reader(cap.finish().stream,
                                                      read_across_frames=True).read()
    assert data.endswith(b"\r\n\r\n" + body)


def test_reply_text_doubles_every_percent() -> None:
    assert reply_text("login mal%lory is not") == "login mal%%lory is not"
    assert reply_text("100%% odd %%% end%") == "100%%%% odd %%%%%% end%%"
    assert reply_text("no percent") == "no percent"


def test_long_lines_key_defaults_to_fold_and_takes_only_its_choices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("POSTKEEP_S3_ACCESS_KEY", "POSTKEEP_S3_SECRET_KEY", "POSTKEEP_DKIM_MASTER_KEY",
                 "POSTKEEP_SYSTEM_DKIM_KEY", "PGPASSWORD", "POSTKEEP_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert config.parse({}).milter.long_lines == "fold"
    assert config.parse({"milter": {"long_lines": "reject"}}).milter.long_lines == "reject"
    with pytest.raises(config.ConfigError, match="long_lines"):
        config.parse({"milter": {"long_lines": "wrap"}})
