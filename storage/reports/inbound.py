"""Inbound mail linked to what was sent, once its rows are in.

`link_inbound` runs in the transaction that wrote an inbound message's rows
(milter/committer.py): it finds the sent message the clues point at (always
within the message's own organisation: storage/metadata/inbound.py) and sets
`parent_message_id`; for a complaint it calls `link_complaint`.

`link_complaint` is where a complaint is recorded: the complained recipient
of the sent message gets the status 'complained' through record_report(),
like any delivery notice (history in recipient_events, message status rolled
up, idempotent by the complaint's hash).  The organisation's suppression list
is to be fed from here too: see the comment in it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

import psycopg

from postkeep.storage.metadata.inbound import Parent, find_parent, set_parent
from postkeep.storage.metadata.messages import CapturedMessage
from postkeep.storage.reports.dsn import Outcome, Report
from postkeep.storage.reports.outcomes import record_batch

COMPLAINED = "complained"


log = logging.getLogger("postkeep.inbound")


def link_each(conn: psycopg.Connection, messages: Sequence[CapturedMessage]) -> None:
    """Link the inbound replies and complaints among MESSAGES to what was sent,
    once their rows are in (the milter's commit, the outage spool's drain).

    Each in its own savepoint: a link that fails on a statement error is
    logged and left out, never a reason to refuse or re-spool the mail it
    belongs to.  Linking again (a drain retried) changes nothing.
    """
    for m in messages:
        if m.direction != "inbound" or m.clues is None:
            continue
        try:
            with conn.transaction():
                parent = link_inbound(conn, m)
        except psycopg.Error as exc:
            if exc.sqlstate is None:
                raise  # the connection itself: the batch's commit is unknown
            log.warning("inbound pk_id=%s not linked: %s", m.id.hex, exc)
            continue
        log.info("inbound pk_id=%s type=%s parent=%s", m.id.hex, m.message_type,
                 parent.id.hex if parent else "-")


def link_inbound(conn: psycopg.Connection, m: CapturedMessage) -> Parent | None:
    """Link inbound message M to the sent message it answers; the parent, or None."""
    if m.direction != "inbound" or m.clues is None or m.message_type == "email":
        return None
    parent = find_parent(conn, m.org_id, m.clues)
    if parent is None:
        return None
    set_parent(conn, m.id, m.metadata_expires_at, parent)
    if m.message_type == "complaint" and m.clues.complained:
        link_complaint(conn, org_id=m.org_id, complaint_id=m.id, sha256=m.sha256,
                       object_key=m.object_key, size=m.size, parent=parent,
                       recipient=m.clues.complained, feedback_type=m.clues.feedback_type,
                       event_at=m.created_at)
    return parent


def link_complaint(conn: psycopg.Connection, *, org_id: uuid.UUID, complaint_id: uuid.UUID,
                   sha256: bytes, object_key: str, size: int, parent: Parent, recipient: str,
                   feedback_type: str | None, event_at: datetime) -> int:
    """Mark RECIPIENT of the sent message PARENT 'complained'; recipients changed.

    PARENT was found within ORG_ID (find_parent), so the recipient row is the
    organisation's own.  A recipient the sent message did not have leaves the
    complaint in unmatched_reports (object: the captured complaint's).
    """
    reason = f"complaint ({feedback_type or 'abuse'}), report {complaint_id}"
    report = Report(sha256=sha256, size=size, kind="complaint", message_id=parent.id,
                    expires_at=parent.metadata_expires_at,
                    outcomes=(Outcome(recipient, recipient, COMPLAINED, None, None, reason,
                                      event_at),))
    changed = record_batch(conn, [report], object_key=object_key)[0]
    # Suppression: the 'complained' event just recorded puts the address on
    # the sent message's organisation's list in this same transaction (the
    # trigger on recipient_events, migration 0015), never across organisations.
    _ = org_id
    return changed
