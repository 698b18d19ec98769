"""The `legal_holds` table: holds, what they cover, and who may see them.

A hold covers an organisation's mail (address NULL) or only the mail to or
from one address.  What a hold means for content and partitions (protect,
reconcile, move rows out of a dropped partition) is storage/lifecycle/holds.py;
this module owns the rows and the two SQL definitions every other module
shares: `involves_sql` ("this message is to or from that address", also used
by erasure) and `covered_sql` ("an active hold covers this message", used by
every sweeper before it deletes).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from postkeep.storage.metadata.audit import audit


def normalise_address(text: str) -> str:
    """An address as holds and erasure compare it: trimmed, no <>, lower case.

    ValueError for anything that is not local@domain.
    """
    addr = text.strip().removeprefix("<").removesuffix(">").strip().lower()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in addr):
        raise ValueError(f"address {text!r}: expected local@domain")
    return addr


def involves(envelope_from: str, header_from: str | None, recipients: Iterable[str],
             addr: str) -> bool:
    """involves_sql for a message not in PostgreSQL yet (a spool entry's fields);
    ADDR normalised."""
    sender, head = envelope_from.lower(), (header_from or "").lower()
    return (sender == addr or head == addr or f"<{addr}>" in head
            or any(r.lower() == addr for r in recipients))


def involves_sql(m: str, addr: str) -> str:
    """SQL: message alias M is to or from the address in expression ADDR.

    Envelope sender, From: (bare or in <>) or any recipient of the same
    message (recipient rows share the message's org and partition key).
    """
    return (
        f"(lower({m}.envelope_from) = {addr}"
        f" OR lower({m}.header_from) = {addr}"
        f" OR position('<' || {addr} || '>' in lower({m}.header_from)) > 0"
        f" OR EXISTS (SELECT 1 FROM message_recipients hr WHERE hr.message_id = {m}.id"
        f" AND hr.org_id = {m}.org_id AND hr.metadata_expires_at = {m}.metadata_expires_at"
        f" AND lower(hr.recipient) = {addr}))"
    )


def covered_sql(m: str) -> str:
    """SQL: message alias M is covered by an active legal hold."""
    return (
        "EXISTS (SELECT 1 FROM legal_holds h WHERE h.released_at IS NULL"
        f" AND h.org_id = {m}.org_id AND (h.address IS NULL OR {involves_sql(m, 'h.address')}))"
    )


@dataclass(frozen=True)
class Hold:
    """One legal hold as readers see it."""

    id: int
    org_id: uuid.UUID
    org_name: str
    address: str | None
    reason: str
    created_at: datetime
    released_at: datetime | None
    reconciled_at: datetime | None

    def scope(self) -> str:
        """'org NAME' or 'ADDRESS in org NAME', for messages."""
        return f"{self.address} in org {self.org_name}" if self.address else f"org {self.org_name}"


class HoldError(Exception):
    """An action refused because of a hold (or a hold request refused)."""


_HOLD_COLUMNS = """h.id, h.org_id, o.name AS org_name, h.address, h.reason, h.created_at,
    h.released_at, h.reconciled_at"""


def list_holds(conn: psycopg.Connection, org_id: uuid.UUID | None = None,
               include_released: bool = False) -> list[Hold]:
    """Holds, oldest first; only active ones unless INCLUDE_RELEASED."""
    where = []
    params: list[object] = []
    if org_id is not None:
        where.append("h.org_id = %s")
        params.append(org_id)
    if not include_released:
        where.append("h.released_at IS NULL")
    sql = (f"SELECT {_HOLD_COLUMNS} FROM legal_holds h JOIN organisations o ON o.id = h.org_id"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY h.id")
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def get_hold(conn: psycopg.Connection, hold_id: int) -> Hold | None:
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        cur.execute(f"SELECT {_HOLD_COLUMNS} FROM legal_holds h JOIN organisations o"
                    " ON o.id = h.org_id WHERE h.id = %s", (hold_id,))
        return cur.fetchone()


def add_hold(conn: psycopg.Connection, org_id: uuid.UUID, address: str | None,
             reason: str) -> Hold:
    """Create an active hold; HoldError if the same one is already active."""
    if not reason.strip():
        raise HoldError("a hold needs a reason (--reason), e.g. a case reference")
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO legal_holds (org_id, address, reason) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING id", (org_id, address, reason.strip()),
        ).fetchone()
        if row is None:
            raise HoldError("an identical hold is already active (see `postkeep hold list`)")
        hold = get_hold(conn, int(row[0]))
        assert hold is not None
        audit(conn, None, "hold_added", 0, org_id, f"hold {hold.id}",
              {"address_sha256": _digest(address), "reason": hold.reason})
    return hold


def release_hold(conn: psycopg.Connection, hold_id: int) -> Hold:
    """Mark hold HOLD_ID released (the next retention run applies it)."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE legal_holds SET released_at = now() WHERE id = %s AND released_at IS NULL"
            " RETURNING id", (hold_id,)).fetchone()
        hold = get_hold(conn, hold_id)
        if hold is None:
            raise HoldError(f"no hold {hold_id} (see `postkeep hold list`)")
        if row is None:
            raise HoldError(f"hold {hold_id} was already released at {hold.released_at}")
        audit(conn, None, "hold_released", 0, hold.org_id, f"hold {hold.id}",
              {"address_sha256": _digest(hold.address)})
    return hold


def holds_covering(conn: psycopg.Connection, org_id: uuid.UUID,
                   message_ids: list[uuid.UUID]) -> list[Hold]:
    """Active holds that cover any of MESSAGE_IDS (all of ORG_ID)."""
    with conn.cursor(row_factory=class_row(Hold)) as cur:
        cur.execute(
            f"SELECT {_HOLD_COLUMNS} FROM legal_holds h JOIN organisations o ON o.id = h.org_id"
            " WHERE h.released_at IS NULL AND h.org_id = %(org)s AND (h.address IS NULL"
            " OR EXISTS (SELECT 1 FROM messages m WHERE m.org_id = %(org)s"
            f" AND m.id = ANY(%(ids)s) AND {involves_sql('m', 'h.address')})) ORDER BY h.id",
            {"org": org_id, "ids": message_ids},
        )
        return cur.fetchall()


def _digest(address: str | None) -> str | None:
    return hashlib.sha256(address.encode()).hexdigest() if address else None
