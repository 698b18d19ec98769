"""Per-organisation suppression lists (migration 0015).

An address on its organisation's list is refused at RCPT by postkeep-policyd
with a coded reply naming why (`reply`), or, for an organisation in shadow
mode, only logged and counted.  Lists are never shared between
organisations: every row, lookup and change is keyed by org_id, and tenant
roles see their own rows only (row-level security, 0012).

Addresses: the local part is compared exactly, the domain
case-insensitively (`normalise`, the same as SQL's suppression_address()).
`Bob@Example.COM` and `Bob@example.com` are one entry; `bob@example.com` is
another, since only the receiving host may decide that local parts fold.

What puts an address on the list:
- recorded outcomes, in the same transaction as record_report() (a trigger
  on recipient_events; the DSN codes that count as hard, soft or neither are
  listed in 0015_suppression.sql): hard bounces at once, soft bounces after
  the tier's soft_bounce_limit within soft_bounce_window_days, complaints;
- `suppress` (complaints, unsubscribes, `postkeep suppression add`).
Entries expire after the tier's suppression_days (None: never); expired ones
are ignored everywhere and replaced by the next suppression.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

REASONS = ("hard_bounce", "soft_bounce", "complaint", "unsubscribe", "manual")
MODES = ("enforce", "shadow")
# Hard-bounce DSN codes (mirrors suppression_kind() in 0015; a test holds them equal).
HARD_CODES = ("5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1")

_LABELS = {"hard_bounce": "hard bounce", "soft_bounce": "repeated soft bounces",
           "complaint": "complaint", "unsubscribe": "unsubscribe",
           "manual": "added by the operator"}


def normalise(address: str) -> str:
    """ADDRESS as stored and looked up: local part as given, domain lower case (pure)."""
    s = address.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    local, at, domain = s.rpartition("@")
    if not at:
        return s
    return f"{local}@{domain.lower().rstrip('.')}"


@dataclass(frozen=True)
class Suppression:
    """One entry of an organisation's list."""

    org_id: uuid.UUID
    address: str
    reason: str
    source: str
    detail: str | None
    message_id: uuid.UUID | None
    suppressed_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class Hit:
    """What policyd needs to answer for a suppressed recipient."""

    reason: str
    detail: str | None
    suppressed_at: datetime
    mode: str  # the organisation's suppression_mode

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"


def _printable(text: str, limit: int) -> str:
    shown = "".join(c if " " <= c < "\x7f" else "?" for c in text)
    return shown[:limit] + ("..." if len(shown) > limit else "")


def reply(hit: Hit) -> str:
    """policyd's answer for a suppressed recipient (pure): `550 5.7.1 suppressed: hard
    bounce on 2026-12-04 (5.1.1)` (the date in UTC; the detail printable ASCII).

    Postfix puts the address in front of a policy service's text, so the
    client reads `550 5.7.1 <a@x.example>: Recipient address rejected:
    suppressed: hard bounce on 2026-12-04 (5.1.1)`.
    """
    detail = f" ({_printable(hit.detail, 60)})" if hit.detail else ""
    day = hit.suppressed_at.astimezone(UTC)
    return (f"550 5.7.1 suppressed: {_LABELS.get(hit.reason, hit.reason)} on {day:%Y-%m-%d}"
            f"{detail}")


LOOKUP = (
    "SELECT s.reason, s.detail, s.suppressed_at, o.suppression_mode FROM suppressions s"
    " JOIN organisations o ON o.id = s.org_id"
    " WHERE s.org_id = %(org)s"
    " AND s.address IN (%(addr)s, suppression_erased_key(%(org)s, %(addr)s))"
    " AND (s.expires_at IS NULL OR s.expires_at > now())"
    " ORDER BY s.suppressed_at DESC LIMIT 1"
)


def _hit(row: tuple[Any, ...] | None) -> Hit | None:
    return None if row is None else Hit(str(row[0]), row[1], row[2], str(row[3]))


def lookup(conn: psycopg.Connection, org_id: uuid.UUID, address: str) -> Hit | None:
    """ADDRESS's live entry on ORG_ID's list, or None (one primary-key probe)."""
    return _hit(conn.execute(LOOKUP, {"org": org_id, "addr": normalise(address)}).fetchone())


async def lookup_async(conn: psycopg.AsyncConnection[Any], org_id: uuid.UUID,
                       address: str) -> Hit | None:
    cur = await conn.execute(LOOKUP, {"org": org_id, "addr": normalise(address)})
    return _hit(await cur.fetchone())


def suppress(conn: psycopg.Connection, org_id: uuid.UUID, address: str, reason: str,
             source: str, *, detail: str | None = None, message_id: uuid.UUID | None = None,
             at: datetime | None = None, days: int | None = None) -> datetime | None:
    """Put ADDRESS on ORG_ID's list (or refresh its entry; the latest reason wins).

    REASON is one of REASONS; SOURCE says who (outcome, complaint, cli, api).
    AT: when it happened (default now).  DAYS: until expiry; None takes the
    tier's suppression_days, 0 never expires.  Runs in the caller's
    transaction, if any.  Returns when the entry expires (None: never).
    """
    if reason not in REASONS:
        raise ValueError(f"reason {reason!r}: expected one of {', '.join(REASONS)}")
    if days is not None and days < 0:
        raise ValueError(f"days {days}: must be 0 (never expires) or more")
    row = conn.execute(
        "SELECT suppression_add(%s, %s, %s, %s, %s, %s, %s, %s)",
        (org_id, address, reason, source, detail, message_id, at, days)).fetchone()
    return row[0] if row else None


def unsuppress(conn: psycopg.Connection, org_id: uuid.UUID, address: str) -> bool:
    """Take ADDRESS off ORG_ID's list (and forget its soft bounces); True if it was on it."""
    addr = normalise(address)
    conn.execute("DELETE FROM suppression_soft_bounces WHERE org_id = %s AND address = %s",
                 (org_id, addr))
    cur = conn.execute("DELETE FROM suppressions WHERE org_id = %(org)s AND address IN"
                       " (%(addr)s, suppression_erased_key(%(org)s, %(addr)s))",
                       {"org": org_id, "addr": addr})
    return cur.rowcount > 0


def keep_erased(conn: psycopg.Connection, org_id: uuid.UUID, address: str,
                redact: Callable[[str | None], str | None]) -> int:
    """ADDRESS is being erased: its entries on ORG_ID's list (any case of the
    local part) become one entry under suppression_erased_key(), the latest
    reason winning, REDACT applied to the detail; its soft-bounce history
    goes.  Runs in the caller's transaction.  Returns the entries replaced.
    """
    conn.execute("DELETE FROM suppression_soft_bounces WHERE org_id = %s"
                 " AND lower(address) = lower(suppression_address(%s))", (org_id, address))
    rows = conn.execute(
        "DELETE FROM suppressions WHERE org_id = %s AND address NOT LIKE 'sha256:%%'"
        " AND lower(address) = lower(suppression_address(%s))"
        " RETURNING reason, source, detail, message_id, suppressed_at, expires_at",
        (org_id, address)).fetchall()
    if not rows:
        return 0
    reason, source, detail, message_id, at, expires = max(rows, key=lambda r: r[4])
    conn.execute(
        "INSERT INTO suppressions (org_id, address, reason, source, detail, message_id,"
        " suppressed_at, expires_at) VALUES (%(org)s, suppression_erased_key(%(org)s, %(addr)s),"
        " %(reason)s, %(source)s, %(detail)s, %(mid)s, %(at)s, %(exp)s)"
        " ON CONFLICT (org_id, address) DO UPDATE SET reason = EXCLUDED.reason,"
        " source = EXCLUDED.source, detail = EXCLUDED.detail, message_id = EXCLUDED.message_id,"
        " suppressed_at = EXCLUDED.suppressed_at, expires_at = EXCLUDED.expires_at"
        " WHERE suppressions.suppressed_at <= EXCLUDED.suppressed_at",
        {"org": org_id, "addr": address, "reason": reason, "source": source,
         "detail": redact(detail), "mid": message_id, "at": at, "exp": expires})
    return len(rows)


def entries(conn: psycopg.Connection, org_id: uuid.UUID, *, address: str | None = None,
            reason: str | None = None, include_expired: bool = False,
            limit: int | None = None) -> list[Suppression]:
    """ORG_ID's entries, newest first (live ones unless INCLUDE_EXPIRED)."""
    from psycopg.rows import class_row

    with conn.cursor(row_factory=class_row(Suppression)) as cur:
        cur.execute(
            "SELECT org_id, address, reason, source, detail, message_id, suppressed_at,"
            " expires_at FROM suppressions WHERE org_id = %s"
            " AND (%s::text IS NULL OR address IN (%s, suppression_erased_key(org_id, %s)))"
            " AND (%s::text IS NULL OR reason = %s)"
            " AND (%s OR expires_at IS NULL OR expires_at > now())"
            " ORDER BY suppressed_at DESC, address LIMIT %s",
            (org_id, *(3 * [None if address is None else normalise(address)]),
             reason, reason, include_expired, limit))
        return cur.fetchall()


def set_mode(conn: psycopg.Connection, org_id: uuid.UUID, mode: str) -> None:
    """Enforce (refuse at RCPT) or shadow (log and count only) for ORG_ID."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected enforce or shadow")
    conn.execute("UPDATE organisations SET suppression_mode = %s WHERE id = %s", (mode, org_id))


def mode(conn: psycopg.Connection, org_id: uuid.UUID) -> str:
    row = conn.execute("SELECT suppression_mode FROM organisations WHERE id = %s",
                       (org_id,)).fetchone()
    return str(row[0]) if row else "enforce"


@dataclass(frozen=True)
class TierSettings:
    """A tier's suppression settings (None: never expires / soft bounces never suppress)."""

    tier: str
    suppression_days: int | None
    soft_bounce_limit: int | None
    soft_bounce_window_days: int


def tier_settings(conn: psycopg.Connection, tier: str) -> TierSettings | None:
    row = conn.execute(
        "SELECT name, suppression_days, soft_bounce_limit, soft_bounce_window_days"
        " FROM tiers WHERE name = %s", (tier,)).fetchone()
    return None if row is None else TierSettings(str(row[0]), row[1], row[2], int(row[3]))


_TIER_COLUMNS = ("suppression_days", "soft_bounce_limit", "soft_bounce_window_days")


def set_tier(conn: psycopg.Connection, tier: str, changes: dict[str, int | None]) -> bool:
    """Change a tier's settings (keys of _TIER_COLUMNS; None: never/off); False if no tier."""
    from psycopg import sql

    bad = set(changes) - set(_TIER_COLUMNS)
    if bad:
        raise ValueError(f"unknown tier setting(s): {', '.join(sorted(bad))}")
    if not changes:
        return tier_settings(conn, tier) is not None
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in changes)
    cur = conn.execute(sql.SQL("UPDATE tiers SET {} WHERE name = %(tier)s").format(assignments),
                       {**changes, "tier": tier})
    return cur.rowcount > 0


@dataclass(frozen=True)
class Purged:
    expired: int       # suppressions past their expiry
    soft_bounces: int  # soft-bounce counts whose newest bounce left the tier's window


def purge(conn: psycopg.Connection, *, dry_run: bool = False) -> Purged:
    """Delete what no reader uses any more (or count it, DRY_RUN)."""
    expired = "FROM suppressions WHERE expires_at <= now()"
    stale = ("FROM suppression_soft_bounces b WHERE EXISTS (SELECT 1 FROM organisations o"
             " JOIN tiers t ON t.name = o.tier WHERE o.id = b.org_id"
             " AND (SELECT max(x) FROM unnest(b.bounce_at) x)"
             " <= now() - make_interval(days => t.soft_bounce_window_days))")
    if dry_run:
        counts = [conn.execute(f"SELECT count(*) {q}").fetchone() for q in (expired, stale)]
        return Purged(*(int(c[0]) if c else 0 for c in counts))
    with conn.transaction():
        return Purged(conn.execute(f"DELETE {expired}").rowcount,
                      conn.execute(f"DELETE {stale}").rowcount)
