"""Inbound mail in PostgreSQL: per-domain settings and the parent link.

A domain takes inbound mail once `postkeep domain set-inbound` gave it a mode
('archive': captured, then discarded; 'relay': captured, then relayed to
the organisation's own host).  `find_parent` resolves what an inbound message
names of the mail it answers (storage/reports/classify.py gives the clues; the
milter verified the return paths) to one sent message of the SAME
organisation: every lookup carries the organisation's id, so a message can
never be linked across organisations, whatever it quotes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg

ARCHIVE, RELAY = "archive", "relay"


@dataclass(frozen=True)
class ParentClues:
    """What an inbound message names of the message it answers, strongest first."""

    # (message id, metadata expiry) from return paths whose MAC verified.
    return_paths: tuple[tuple[uuid.UUID, datetime], ...] = ()
    # X-Postkeep-Id values quoted in it (unverifiable: same organisation only).
    ids: tuple[uuid.UUID, ...] = ()
    # In-Reply-To/References, nearest first; for a complaint, the carried original's.
    message_ids: tuple[str, ...] = ()
    # A complaint: the recipient it is about, and the report's Feedback-Type.
    complained: str | None = None
    feedback_type: str | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (the outage spool keeps it with the message)."""
        return {"return_paths": [[str(i), e.isoformat()] for i, e in self.return_paths],
                "ids": [str(i) for i in self.ids], "message_ids": list(self.message_ids),
                "complained": self.complained, "feedback_type": self.feedback_type}

    @classmethod
    def from_json(cls, doc: object) -> ParentClues:
        """Back from to_json(); TypeError/ValueError/KeyError if DOC is not one."""
        if not isinstance(doc, dict):
            raise TypeError(f"{doc!r} is not an object")
        complained, feedback = doc["complained"], doc["feedback_type"]
        if not all(v is None or isinstance(v, str) for v in (complained, feedback)):
            raise TypeError("complained/feedback_type must be strings")
        return cls(tuple((uuid.UUID(str(i)), datetime.fromisoformat(str(e)))
                         for i, e in doc["return_paths"]),
                   tuple(uuid.UUID(str(i)) for i in doc["ids"]),
                   tuple(str(m) for m in doc["message_ids"]), complained, feedback)


@dataclass(frozen=True)
class Parent:
    id: uuid.UUID
    metadata_expires_at: datetime


def _one(conn: psycopg.Connection, sql: str, params: tuple[object, ...]) -> Parent | None:
    row = conn.execute(sql, params).fetchone()
    return Parent(row[0], row[1]) if row else None


def find_parent(conn: psycopg.Connection, org_id: uuid.UUID, clues: ParentClues) -> Parent | None:
    """The ORG_ID's sent message CLUES point at, or None."""
    for mid, expires in clues.return_paths:
        # The return path carries the expiry to the second: one partition.
        found = _one(conn, "SELECT id, metadata_expires_at FROM messages WHERE id = %s"
                     " AND org_id = %s AND direction = 'outbound'"
                     " AND metadata_expires_at >= %s AND metadata_expires_at < %s"
                     " + interval '1 second'", (mid, org_id, expires, expires))
        if found:
            return found
    for mid in clues.ids:
        found = _one(conn, "SELECT id, metadata_expires_at FROM messages WHERE id = %s"
                     " AND org_id = %s AND direction = 'outbound'", (mid, org_id))
        if found:
            return found
    for header in clues.message_ids:
        found = _one(conn, "SELECT id, metadata_expires_at FROM messages WHERE org_id = %s"
                     " AND message_id_header = %s AND direction = 'outbound'"
                     " ORDER BY created_at DESC LIMIT 1", (org_id, header))
        if found:
            return found
    return None


def set_parent(conn: psycopg.Connection, message_id: uuid.UUID, metadata_expires_at: datetime,
               parent: Parent) -> None:
    conn.execute("UPDATE messages SET parent_message_id = %s, parent_metadata_expires_at = %s"
                 " WHERE id = %s AND metadata_expires_at = %s",
                 (parent.id, parent.metadata_expires_at, message_id, metadata_expires_at))


@dataclass(frozen=True)
class Child:
    """An inbound message linked to a sent one (the thread view)."""

    id: uuid.UUID
    message_type: str
    envelope_from: str
    header_from: str | None
    subject: str | None
    created_at: datetime


def children(conn: psycopg.Connection, parent_id: uuid.UUID, org_id: uuid.UUID) -> list[Child]:
    """The replies, auto-replies, bounces and complaints linked to PARENT_ID, oldest first."""
    rows = conn.execute(
        "SELECT id, message_type, envelope_from, header_from, subject, created_at FROM messages"
        " WHERE parent_message_id = %s AND org_id = %s ORDER BY created_at, id",
        (parent_id, org_id)).fetchall()
    return [Child(*r) for r in rows]


# --- per-domain settings --------------------------------------------------


@dataclass(frozen=True)
class InboundDomain:
    domain: str
    mode: str  # archive | relay
    relay: str | None  # host[:port] for relay


def set_inbound(conn: psycopg.Connection, domain: str, mode: str | None,
                relay: str | None) -> bool:
    """Set DOMAIN's inbound mode (None: takes no inbound mail); False if no such domain."""
    cur = conn.execute("UPDATE domains SET inbound_mode = %s, inbound_relay = %s"
                       " WHERE domain = %s", (mode, relay, domain.lower().rstrip(".")))
    return cur.rowcount == 1


def inbound_domains(conn: psycopg.Connection) -> list[InboundDomain]:
    """Every domain that takes inbound mail, by name."""
    rows = conn.execute("SELECT domain, inbound_mode, inbound_relay FROM domains"
                        " WHERE inbound_mode IS NOT NULL ORDER BY domain").fetchall()
    return [InboundDomain(*r) for r in rows]
