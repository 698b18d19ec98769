"""Replies and auto-replies that arrive at a return path (issue 17).

An out-of-office or a reply sent to a message's return path (the VERP
bounce address pk-...@<bounce domain>) reaches postkeep-storage over LMTP
like a delivery notice, never the milter.  Before it is taken for a report,
`reply_type` classifies it (storage/reports/classify.py): a non-DSN whose
return path verified and that is a `reply` or an `auto_reply` is recorded as
what it is, an inbound message of the sent message's organisation linked to
it (`record_returned`), not as an unmatched report.  The return path's MAC
is the link (never across organisations: the parent is the message it names).
A request to unsubscribe (subject `unsubscribe`, what a `List-Unsubscribe:
<mailto:...?subject=unsubscribe>` sends) is recorded as a reply and puts the
recipient it comes from on the organisation's suppression list, if that
address is one of the sent message's recipients.

The object is written before the rows (rows never name a missing object,
and a duplicate's object is deleted again); a retry of the same delivery
finds the row by its hash or Message-ID among the parent's children and
records nothing twice.
"""

from __future__ import annotations

import email.utils
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import Message

import psycopg
import zstandard

from postkeep.ids import uuid7
from postkeep.storage.metadata import directory, suppression
from postkeep.storage.metadata.inbound import ParentClues
from postkeep.storage.metadata.messages import CapturedMessage, expiry_dates, record_capture
from postkeep.storage.reports import classify
from postkeep.storage.reports.dsn import Report
from postkeep.storage.reports.inbound import link_inbound

ANSWERS = (classify.REPLY, classify.AUTO_REPLY)


def reply_type(raw: bytes, envelope_from: str, report: Report) -> str | None:
    """'reply' or 'auto_reply' if REPORT (at a verified return path) is one, else None.

    A DSN is a notice whatever its text says; anything else is classified as
    inbound mail is (complaint > bounce > auto_reply > reply > email).  A
    request to unsubscribe (classify.is_unsubscribe) is a reply, whether or
    not it names the message it answers.
    """
    if report.message_id is None or report.expires_at is None or report.kind == "dsn":
        return None
    msg = classify.parse(raw)
    kind = classify.message_type(msg, envelope_from)
    if kind == classify.EMAIL and classify.is_unsubscribe(msg):
        return classify.REPLY
    return kind if kind in ANSWERS else None


def unsubscriber(raw: bytes, envelope_from: str, report: Report) -> tuple[str, ...]:
    """Who may be asking to unsubscribe, best first, if RAW is such a request
    (else ()): the recipient its VERP return path names, its From: address,
    its envelope sender.  `record_returned` suppresses the first of them that
    is a recipient of the sent message, so a request can never put anyone
    else on the list (pure)."""
    msg = classify.parse(raw)
    if not classify.is_unsubscribe(msg):
        return ()
    found: list[str] = []
    if report.verp_recipient:
        found.append(report.verp_recipient)
    _, from_addr = email.utils.parseaddr(_header(msg, "From") or "")
    for addr in (from_addr, envelope_from.strip("<>")):
        if "@" in addr and addr not in found:
            found.append(addr)
    return tuple(found)


@dataclass(frozen=True)
class SentMessage:
    """The sent message a return path names, and its organisation's retention."""

    id: uuid.UUID
    metadata_expires_at: datetime
    org: directory.Organisation
    domain: str
    sender: str


def sent_message(conn: psycopg.Connection, report: Report) -> SentMessage | None:
    """The outbound message REPORT's verified return path names, or None (expired)."""
    row = conn.execute(
        "SELECT id, metadata_expires_at, org_id, domain, envelope_from FROM messages"
        " WHERE id = %s AND direction = 'outbound' AND metadata_expires_at >= %s"
        " AND metadata_expires_at < %s + interval '1 second'",
        (report.message_id, report.expires_at, report.expires_at)).fetchone()
    if row is None:
        return None
    org = directory.find_by_name(conn, str(row[2]))
    if org is None:
        return None
    return SentMessage(row[0], row[1], org, str(row[3]), str(row[4]))


# Where a message's object lives: (org id, message id, created, content days,
# held) -> key; storage/content's message_key, passed in by the daemon
# (storage/reports stands below storage/content).
KeyOf = Callable[[str, str, datetime, int, bool], str]


def prepare(raw: bytes, envelope_from: str, kind: str, sent: SentMessage, report: Report,
            now: datetime, key_of: KeyOf) -> tuple[CapturedMessage, bytes]:
    """The inbound message to record and its object's bytes (zstd, as captured)."""
    msg = classify.parse(raw)
    blob = zstandard.ZstdCompressor(level=3).compress(raw)
    mid = uuid7()
    content_at, metadata_at = expiry_dates(now, sent.org.content_days, sent.org.metadata_days)
    assert report.message_id is not None and report.expires_at is not None
    return CapturedMessage(
        id=mid, org_id=sent.org.id, domain=sent.domain,
        queue_id=report.queue_id or "lmtp", envelope_from=envelope_from,
        # It was written to the sender the return path stands for.
        recipients=(sent.sender,), size=len(raw), sha256=hashlib.sha256(raw).digest(),
        object_key=key_of(str(sent.org.id), str(mid), now, sent.org.content_days,
                          sent.org.legal_hold),
        compressed_size=len(blob), created_at=now, content_expires_at=content_at,
        metadata_expires_at=metadata_at,
        message_id_header=_header(msg, "Message-ID"), header_from=_header(msg, "From"),
        subject=report.subject, direction="inbound", message_type=kind,
        clues=ParentClues(return_paths=((report.message_id, report.expires_at),)),
    ), blob


def _header(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    if value is None:
        return None
    return " ".join(str(value).split())[:998] or None


def already(conn: psycopg.Connection, sent: SentMessage,
            m: CapturedMessage) -> uuid.UUID | None:
    """The inbound message M already is among SENT's children: the same bytes (an
    LMTP retry) or the same Message-ID (the remote sent it again, e.g. after a
    lost reply: Postfix's Received: line differs, the message does not)."""
    row = conn.execute(
        "SELECT id FROM messages WHERE parent_message_id = %s AND org_id = %s"
        " AND direction = 'inbound' AND (sha256 = %s OR message_id_header = %s) LIMIT 1",
        (sent.id, sent.org.id, m.sha256, m.message_id_header)).fetchone()
    return None if row is None else uuid.UUID(str(row[0]))


@dataclass(frozen=True)
class Recorded:
    """What record_returned did: the message M duplicates (nothing written),
    or the address it put on the suppression list as unsubscribed."""

    duplicate_of: uuid.UUID | None = None
    unsubscribed: str | None = None


def record_returned(conn: psycopg.Connection, sent: SentMessage, m: CapturedMessage,
                    unsubscribe: tuple[str, ...] = (),
                    with_rows: Callable[[psycopg.Connection], None] | None = None) -> Recorded:
    """Write M's rows and link it to SENT in one transaction (nothing if it
    duplicates one: `already`).  UNSUBSCRIBE (`unsubscriber`): the first of
    these that is one of SENT's recipients goes on the organisation's
    suppression list (reason unsubscribe), in the same transaction.  WITH_ROWS
    writes more rows of M in it (the sidecar: its sealed object's data key).

    Two copies at once take turns on a lock per sent message, so the second
    sees the first.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 17))", (str(sent.id),))
        dup = already(conn, sent, m)
        if dup is not None:
            return Recorded(duplicate_of=dup)
        record_capture(conn, m)
        if with_rows is not None:  # e.g. its sealed object's key row
            with_rows(conn)
        parent = link_inbound(conn, m)
        # The parent was read moments ago: gone now means it expired meanwhile.
        if parent is None:
            raise LookupError(f"sent message of {m.id} no longer present")
        address = _sent_to(conn, sent, unsubscribe)
        if address is not None:
            suppression.suppress(conn, sent.org.id, address, "unsubscribe", "return_path",
                                 detail=f"unsubscribe mail {m.id}", message_id=sent.id,
                                 at=m.created_at)
    return Recorded(unsubscribed=address)


def _sent_to(conn: psycopg.Connection, sent: SentMessage,
             candidates: tuple[str, ...]) -> str | None:
    """The first of CANDIDATES that SENT was addressed to (the recipient as
    recorded), or None."""
    if not candidates:
        return None
    rows = conn.execute(
        "SELECT recipient FROM message_recipients WHERE message_id = %s AND org_id = %s"
        " AND metadata_expires_at = %s", (sent.id, sent.org.id, sent.metadata_expires_at))
    recipients = {suppression.normalise(str(r[0])): str(r[0]) for r in rows}
    for c in candidates:
        hit = recipients.get(suppression.normalise(c))
        if hit is not None:
            return hit
    return None
