"""postkeep/logs.py: one line per event, UTC timestamps, key=value, optional JSON.

The daemons' log lines are what an operator greps (`pk_id=`, `queue_id=`) and
what a collector parses: a line that spans two, a local-time stamp or a library's
chatter each breaks that.
"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from support.reports import block, dsn

from postkeep import config, logs
from postkeep.config import ConfigError
from postkeep.storage.reports.dsn import parse_report

pytestmark = pytest.mark.unit

# 2026-12-04T13:54:20.123Z postkeep-milter[42] INFO ...
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z postkeep-test\[\d+\] [A-Z]+ ")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger's configuration is restored after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    stream = io.StringIO()
    yield stream
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def _record(msg: str, *args: object, created: float = 1764856460.123456,
            exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            import sys
            exc_info = sys.exc_info()
    rec = logging.LogRecord("postkeep.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    rec.created = created
    return rec


def test_text_lines_carry_a_utc_iso_8601_timestamp_with_z(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # local time must not leak in
    import time
    time.tzset()
    try:
        line = logs.formatter("postkeep-test").format(_record("captured pk_id=ab queue_id=Q1"))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    # 1764856460.123456 is 2025-12-04 13:54:20.123 UTC.
    assert line.startswith("2025-12-04T13:54:20.123Z postkeep-test[")
    assert line.endswith("] WARNING captured pk_id=ab queue_id=Q1")


def test_a_multi_line_message_and_its_traceback_are_one_line() -> None:
    # psycopg's notices carry DETAIL and HINT on lines of their own.
    notice = 'NOTICE:  relation "x" already exists, skipping\nDETAIL:  d\nHINT:  h\n'
    line = logs.formatter("postkeep-test").format(_record("%s", notice, exc=True))
    assert "\n" not in line and "\r" not in line
    assert TEXT_LINE.match(line)
    assert 'skipping\\nDETAIL:  d\\nHINT:  h\\nTraceback (most recent call last):' in line
    assert line.endswith("RuntimeError: boom\\nsecond line")


def test_json_lines_are_one_object_with_the_message_pairs_as_fields() -> None:
    pk = uuid.uuid4().hex
    rec = _record("report recorded report=%s pk_id=%s queue_id=%s to=<%s> reason=%r",
                  "abc123", pk, "4XyZ", "a@b.example", "it's\nmulti")
    line = logs.formatter("postkeep-test", "json").format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["ts"] == "2025-12-04T13:54:20.123Z"
    assert (doc["level"], doc["program"], doc["logger"]) == ("warning", "postkeep-test",
                                                             "postkeep.test")
    assert (doc["pk_id"], doc["queue_id"], doc["report"]) == (pk, "4XyZ", "abc123")
    assert doc["to"] == "a@b.example"
    assert doc["reason"] == "it's\\nmulti"  # %r of a str: its quotes stripped
    assert doc["msg"].startswith("report recorded report=abc123 ")


def test_json_keeps_a_traceback_in_one_field() -> None:
    doc = json.loads(logs.formatter("postkeep-test", "json").format(_record("x", exc=True)))
    assert doc["exc"].startswith("Traceback") and "RuntimeError: boom" in doc["exc"]


def test_message_pairs_are_parsed_as_written() -> None:
    assert logs.pairs("spooled pk_id=0a queue_id=Q from=<> reason='a b' n=3, k=v;") == {
        "pk_id": "0a", "queue_id": "Q", "from": "", "reason": "a b", "n": "3", "k": "v"}
    assert logs.pairs("no pairs here = at all") == {}


def test_setup_silences_flufl_bounce_chatter_and_replaces_handlers(
        captured: io.StringIO) -> None:
    logs.setup("postkeep-test", "info", "text", captured)
    logs.setup("postkeep-test", "info", "text", captured)  # twice: still one handler
    logging.getLogger("flufl.bounce").info("Running detector: %s", "Caiwireless")
    logging.getLogger("flufl.bounce").warning("a real problem")
    logging.getLogger("postkeep.storage").info("report recorded pk_id=%s", "ab")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("WARNING a real problem")
    assert lines[1].endswith("INFO report recorded pk_id=ab")
    assert all(TEXT_LINE.match(line) for line in lines)


def test_setup_json(captured: io.StringIO) -> None:
    logs.setup("postkeep-test", "debug", "json", captured)
    logging.getLogger("postkeep.milter").debug("captured pk_id=%s", "cd")
    assert json.loads(captured.getvalue())["pk_id"] == "cd"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="'xml'"):
        logs.formatter("postkeep-test", "xml")


def test_log_format_key_in_postkeep_toml() -> None:
    assert config.parse({}).log.format == "text"
    assert config.parse({"log": {"format": "json"}}).log.format == "json"
    with pytest.raises(ConfigError, match=r"^log\.format = 'xml': expected one of 'text', 'json'$"):
        config.parse({"log": {"format": "xml"}})


def test_a_postfix_dsn_names_the_reported_message_queue_id() -> None:
    """postkeep-storage logs the reported message's Postfix queue id (X-Postfix-Queue-ID)."""
    mid = uuid.uuid4()
    report = parse_report(dsn(mid, [block("r@x.example", "failed", "5.1.1")]), "",
                          ["r@x.example"], datetime.now(UTC))
    assert report.queue_id == "4ABC"
    hostile = dsn(mid, [block("r@x.example", "failed", "5.1.1")]).replace(
        b"X-Postfix-Queue-ID: 4ABC", b"X-Postfix-Queue-ID: 4A BC=x")
    assert parse_report(hostile, "", ["r@x.example"], datetime.now(UTC)).queue_id is None
