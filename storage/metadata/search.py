"""Message search: a typed filter and the SQL it becomes (pure, testable).

`MessageFilter` is what `postkeep messages list`, `postkeep messages search`
and a dashboard select by; `where()` turns it into a WHERE clause with
parameters, never with values spliced into the SQL.  The reader that runs it
is `messages.list_messages`, on the owner's connection (every organisation,
or the one the filter names) or on a tenant's dashboard login, where
row-level security (migration 0012) limits it to the login's organisation
whatever the filter says.

Matching rules:
- sender, recipient: whole address, case-insensitive;
- subject: a substring, case-insensitive, taken literally: `%`, `_` and `\\`
  in it match themselves (escape_like), never as LIKE wildcards;
- status: a recipient's status (delivered, bounced, complained ...); with
  `recipient`, that recipient's status;
- tags: (key, value) pairs, all must match (messages.tags, 0016).
Indexes serving each shape: migrations 0001, 0016, 0019.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

DIRECTIONS = ("outbound", "inbound")
MESSAGE_TYPES = ("email", "reply", "auto_reply", "bounce", "complaint")
RECIPIENT_STATUSES = ("queued", "relayed", "delivered", "deferred", "bounced", "expired",
                      "complained")


@dataclass(frozen=True)
class MessageFilter:
    """What `list_messages` selects; None (or empty) means "any"."""

    org_id: uuid.UUID | None = None
    sender: str | None = None
    recipient: str | None = None
    since: datetime | None = None
    limit: int = 50
    until: datetime | None = None  # created strictly before
    # keyset cursor: only rows after this (created_at, id) in newest-first order
    after: tuple[datetime, uuid.UUID] | None = None
    tags: tuple[tuple[str, str], ...] = ()  # (key, value): all must match
    subject: str | None = None  # substring, case-insensitive, literal
    status: str | None = None  # a recipient's status (RECIPIENT_STATUSES)
    direction: str | None = None  # DIRECTIONS
    message_type: str | None = None  # MESSAGE_TYPES

    def __post_init__(self) -> None:
        # The CLI offers only these; a caller passing others gets a clear
        # error instead of an empty page.
        for name, value, allowed in (("direction", self.direction, DIRECTIONS),
                                     ("message_type", self.message_type, MESSAGE_TYPES),
                                     ("status", self.status, RECIPIENT_STATUSES)):
            if value is not None and value not in allowed:
                raise ValueError(f"{name} {value!r}: one of {', '.join(allowed)}")


def escape_like(text: str) -> str:
    """TEXT as a LIKE pattern matching exactly itself (escape character `\\`)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _recipient_clause(f: MessageFilter) -> tuple[str, list[object]]:
    """EXISTS over the message's recipient rows: the recipient and/or status,
    on one and the same row.  Same org_id and expiry as the message: the
    lookup stays inside one partition of message_recipients."""
    conds = ["r.message_id = m.id", "r.org_id = m.org_id",
             "r.metadata_expires_at = m.metadata_expires_at"]
    params: list[object] = []
    if f.recipient is not None:
        conds.append("(r.recipient COLLATE postkeep_ci) = %s")
        params.append(f.recipient)
    if f.status is not None:
        conds.append("r.status = %s")
        params.append(f.status)
    return f"EXISTS (SELECT 1 FROM message_recipients r WHERE {' AND '.join(conds)})", params


def where(f: MessageFilter) -> tuple[str, list[object]]:
    """SQL WHERE clause (or "") and its parameters for filter F, on `messages m`."""
    clauses: list[str] = []
    params: list[object] = []

    def add(clause: str, *values: object) -> None:
        clauses.append(clause)
        params.extend(values)

    if f.org_id is not None:
        add("m.org_id = %s", f.org_id)
    if f.sender is not None:
        # The collation (0019), not lower(): an index condition under RLS too.
        add("(m.envelope_from COLLATE postkeep_ci) = %s", f.sender)
    if f.recipient is not None or f.status is not None:
        clause, values = _recipient_clause(f)
        add(clause, *values)
    if f.subject is not None:
        add("m.subject ILIKE %s ESCAPE '\\'", f"%{escape_like(f.subject)}%")
    if f.direction is not None:
        add("m.direction = %s", f.direction)
    if f.message_type is not None:
        add("m.message_type = %s", f.message_type)
    if f.since is not None:
        # Metadata never expires before the message was created, so the
        # partitions (by metadata_expires_at) ending before SINCE hold no
        # match: this bound lets the planner prune them.
        add("m.created_at >= %s AND m.metadata_expires_at >= %s", f.since, f.since)
    if f.until is not None:
        add("m.created_at < %s", f.until)
    if f.tags:
        # Containment, which the GIN index (jsonb_path_ops) answers; the
        # campaign_id column's b-tree, when that is the tag asked for.
        add("m.tags @> %s::jsonb", json.dumps(dict(f.tags)))
        campaign = dict(f.tags).get("campaign_id")
        if campaign is not None:
            add("m.campaign_id = %s", campaign)
    if f.after is not None:
        # Keyset paging: the row comparison matches ORDER BY created_at DESC, id DESC.
        add("(m.created_at, m.id) < (%s, %s)", *f.after)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


_ORDER = " ORDER BY m.created_at DESC, m.id DESC LIMIT %s"


def select(f: MessageFilter, columns: str) -> tuple[str, list[object]]:
    """The whole SELECT of COLUMNS (of `messages m`) for F, newest first, at
    most f.limit rows, and its parameters.

    With a recipient, the query starts from that address's recipient rows
    (an index scan on (org_id, recipient)) and looks each message up by its
    key, a nested loop the LATERAL forces (OFFSET 0 keeps the planner from
    flattening it): left to itself the planner estimates at least a row per
    partition, 60 and more with mostly empty future ones, and hashes the
    organisation's whole messages table instead (EXPLAIN in BENCHMARKS.md
    "Search").  A recipient's messages are few against an organisation's.
    """
    if f.recipient is None:
        where_sql, params = where(f)
        return f"SELECT {columns} FROM messages m{where_sql}{_ORDER}", [*params, f.limit]
    conds = ["(r.recipient COLLATE postkeep_ci) = %s"]
    hit_params: list[object] = [f.recipient]
    for clause, value in (("r.org_id = %s", f.org_id), ("r.status = %s", f.status),
                          ("r.created_at >= %s", f.since), ("r.created_at < %s", f.until)):
        if value is not None:  # recipient rows carry the message's created_at
            conds.append(clause)
            hit_params.append(value)
    rest, params = where(replace(f, recipient=None, status=None))
    keyed = ("m.id = hit.message_id AND m.metadata_expires_at = hit.metadata_expires_at"
             + (" AND " + rest.removeprefix(" WHERE ") if rest else ""))
    return (f"SELECT m.* FROM (SELECT DISTINCT r.message_id, r.metadata_expires_at"
            f" FROM message_recipients r WHERE {' AND '.join(conds)}) AS hit,"
            f" LATERAL (SELECT {columns} FROM messages m WHERE {keyed} OFFSET 0) AS m"
            f"{_ORDER}", [*hit_params, *params, f.limit])
