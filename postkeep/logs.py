"""Log lines of every postkeep daemon: one line per event, UTC timestamps.

Each daemon calls `setup()` once at start (instead of logging.basicConfig).
Two formats ([log] format in postkeep.toml):

- text: `2026-12-04T13:54:20.123Z postkeep-milter[42] INFO captured pk_id=... queue_id=...`
- json: one object per line, `ts`, `level`, `program`, `pid`, `logger`, `msg`, every
  `key=value` pair of the message as a field of its own, and `exc` for a traceback.

Messages carry `key=value` pairs; postkeep's message id is always `pk_id=<32 hex
digits>` (the form Postfix's log shows inside the return path `pk-<hex>-...`), and
the Postfix queue id `queue_id=<id>`, so one grep finds a message in both logs.
A message or traceback spanning lines (psycopg's notices with DETAIL/HINT, a
library's multi-line warning) is folded onto one line, its line breaks shown as
`\\n`, so a line-oriented reader never sees half an event.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import IO, Any

# Libraries whose INFO lines are chatter, not events (flufl.bounce logs one line
# per detector per report: most of a busy sidecar's log).
QUIET_LOGGERS = ("flufl.bounce", "urllib3", "psycopg.pool", "mail.log", "botocore", "boto3",
                 "s3transfer", "asyncio")
FORMATS = ("text", "json")

# key=value pairs as postkeep writes them: value quoted ('...' from %r, "..."),
# in angle brackets (addresses) or up to the next blank.
_PAIR = re.compile(r"(?<![^\s(,;])([a-z][a-z0-9_]*)="
                   r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|<[^>]*>|[^\s,;]+)")
_RESERVED = frozenset({"ts", "level", "program", "pid", "logger", "msg", "exc"})


def fold(text: str) -> str:
    """TEXT on one line: every line break shown as the two characters \\n."""
    if "\n" not in text and "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").replace("\n", "\\n")


def utc_timestamp(created: float) -> str:
    """ISO 8601 in UTC with milliseconds and a Z: 2026-12-04T13:54:20.123Z."""
    secs = int(created)
    millis = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


def pairs(message: str) -> dict[str, str]:
    """The key=value pairs of a message, values unquoted (the first of a repeated key)."""
    out: dict[str, str] = {}
    for key, value in _PAIR.findall(message):
        # The pattern only matches closed quotes and brackets: strip them.
        if value[:1] in ("'", '"', "<"):
            value = value[1:-1]
        out.setdefault(key, value)
    return out


class TextFormatter(logging.Formatter):
    """`<UTC time> <program>[<pid>] <LEVEL> <message>`, one line."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().rstrip("\r\n")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return (f"{utc_timestamp(record.created)} {self.program}[{record.process}]"
                f" {record.levelname} {fold(text)}")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the message's key=value pairs as fields."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().rstrip("\r\n")
        doc: dict[str, Any] = {
            "ts": utc_timestamp(record.created), "level": record.levelname.lower(),
            "program": self.program, "pid": record.process, "logger": record.name,
            "msg": fold(msg),
        }
        for key, value in pairs(msg).items():
            if key not in _RESERVED:
                doc[key] = fold(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        # ensure_ascii: a line stays valid whatever bytes a header carried.
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"))


def formatter(program: str, fmt: str = "text") -> logging.Formatter:
    """The formatter of FMT ('text' or 'json') for PROGRAM (e.g. postkeep-milter)."""
    if fmt == "json":
        return JsonFormatter(program)
    if fmt == "text":
        return TextFormatter(program)
    raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")


def setup(program: str, level: str | int, fmt: str = "text",
          stream: IO[str] | None = None) -> None:
    """Log to STREAM (stderr) at LEVEL in format FMT, library chatter silenced.

    Replaces any handler a previous call installed, so it is safe to call again.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(program, fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn() lines go through the formatter too
