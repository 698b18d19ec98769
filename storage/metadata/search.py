"""Message search: a typed filter and the SQL it becomes (pure, testable).

`MessageFilter` is what `postkeep messages list`, `postkeep messages search`
and a dashboard select by; `to_json()` turns it into the JSON object the SQL
function `search_messages` (migration 0028) takes, which builds the query
with every value as a parameter.  The reader that runs it is
`messages.list_messages`, on the owner's connection (every organisation, or
the one the filter names) or on a tenant's dashboard login, where the
function searches the login's own organisation only, whatever the filter says.

Matching rules:
- sender, recipient: whole address, case-insensitive;
- subject: a substring, case-insensitive, taken literally: `%`, `_` and `\\`
  in it match themselves (escape_like), never as LIKE wildcards;
- status: a recipient's status (delivered, bounced, complained ...); with
  `recipient`, that recipient's status;
- tags: (key, value) pairs, all must match (messages.tags, 0016).
Indexes serving each shape: migrations 0001, 0016, 0019; the plans: 0028.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
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


def to_json(f: MessageFilter) -> str:
    """Filter F as the JSON object `search_messages()` (migration 0028) reads:
    only the criteria given, values as data, never as SQL."""
    doc: dict[str, object] = {"limit": f.limit}
    for key, value in (("org_id", f.org_id), ("sender", f.sender),
                       ("recipient", f.recipient), ("subject", f.subject),
                       ("status", f.status), ("direction", f.direction),
                       ("message_type", f.message_type), ("since", f.since),
                       ("until", f.until)):
        if value is not None:
            doc[key] = value.isoformat() if isinstance(value, datetime) else str(value)
    if f.tags:
        doc["tags"] = dict(f.tags)
    if f.after is not None:
        doc["after_at"], doc["after_id"] = f.after[0].isoformat(), str(f.after[1])
    return json.dumps(doc, sort_keys=True)


def select(f: MessageFilter, columns: str) -> tuple[str, list[object]]:
    """The SELECT of COLUMNS (of `messages m`) for F, newest first, at most
    f.limit rows, and its one parameter.

    The query itself is built and run by the SQL function `search_messages`
    (migration 0028): one implementation for the owner and for dashboard
    logins, run with the owner's indexes and the tenant check inside it.
    """
    return (f"SELECT {columns} FROM search_messages(%s::jsonb) m"
            " ORDER BY m.created_at DESC, m.id DESC", [to_json(f)])
