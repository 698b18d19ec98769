"""Rate-limit counters in PostgreSQL: one atomic round trip per decision.

Why the counts are exact across any number of policyd processes and hosts:
every decision that consumes is one call of `rate_consume()` (migration
0003), which runs as one autocommit transaction.  Its first step inserts the
organisation's counter rows for the current windows if missing and locks
them `FOR UPDATE`, always in the same order.  Under READ COMMITTED a second
caller for the same organisation blocks on that lock until the first
commits, and then reads the committed `used` values: the check (`used + n <=
limit`) and the increment happen under the same lock, so no two callers can
both see room for the last slot.  Callers for different organisations lock
different rows and never wait for each other.  There is no check-then-insert
race: the rows exist (INSERT ... ON CONFLICT DO NOTHING) before anyone reads
them, and nobody reads them for a decision without holding the lock.

A message is counted once: the reservation made at DATA is keyed by the
organisation and Postfix's `instance` attribute (unique per message in a
session); a second DATA or END-OF-MESSAGE for it finds the reservation.
RCPT only reads (an early, advisory "no room"); DATA and END-OF-MESSAGE are
where consumption is decided.  Unsettled reservations expire and give their
counts back, so a client that disconnects after DATA does not eat the quota
for longer than `policyd.reservation_seconds`.

Windows are fixed UTC hours (messages) and days (recipients, bytes), keyed
by their start, on the database's clock unless a test passes its own.  Their
lengths are parameters (`Windows`; aligned to the epoch, so the defaults are
UTC hours and days) only so a test can watch one roll over in real time.

Lease mode (`lease`, `release`; policyd.lease_tiers) trades one round trip
per decision for one per block of units: see policyd/decide.py (LeaseBook).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from postkeep.windows import HOURS_AND_DAYS, Windows

_LIMIT_COLUMNS = """
    o.id, o.name, o.tier,
    coalesce(o.messages_per_hour, t.messages_per_hour),
    coalesce(o.recipients_per_day, t.recipients_per_day),
    coalesce(o.bytes_per_day, t.bytes_per_day),
    coalesce(o.rate_shadow, t.rate_shadow)
"""


KINDS = ("messages", "recipients", "bytes")




@dataclass(frozen=True)
class OrgLimits:
    """An organisation, its tier and its effective limits (None: unlimited)."""

    org_id: uuid.UUID
    name: str
    tier: str
    messages_per_hour: int | None
    recipients_per_day: int | None
    bytes_per_day: int | None
    shadow: bool = False

    def limit(self, kind: str) -> int | None:
        return {"messages": self.messages_per_hour, "recipients": self.recipients_per_day,
                "bytes": self.bytes_per_day}[kind]


@dataclass(frozen=True)
class Outcome:
    """What rate_consume answered: 'ok', 'dup' or 'over' (with kind, use, limit)."""

    result: str
    kind: str | None = None
    used: int | None = None
    limit: int | None = None


def _limits(row: tuple[Any, ...] | None) -> OrgLimits | None:
    if row is None:
        return None
    oid, name, tier, msgs, rcpts, nbytes, shadow = row
    return OrgLimits(oid, name, tier, msgs, rcpts, nbytes, bool(shadow))


BY_SUBMITTER = (
    f"SELECT {_LIMIT_COLUMNS} FROM submitters s JOIN organisations o ON o.id = s.org_id"
    " JOIN tiers t ON t.name = o.tier WHERE s.username = %s"
)
BY_DOMAIN = (
    f"SELECT {_LIMIT_COLUMNS} FROM domains d JOIN organisations o ON o.id = d.org_id"
    " JOIN tiers t ON t.name = o.tier WHERE d.domain = %s"
)
BY_NAME = (
    f"SELECT {_LIMIT_COLUMNS} FROM organisations o JOIN tiers t ON t.name = o.tier"
    " WHERE o.name = %s OR o.id = %s"
)
CONSUME = ("SELECT outcome, kind, used, lim"
           " FROM rate_consume(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
CONSUME_MANY = ("SELECT outcome, kind, used, lim"
                " FROM rate_consume_many(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)")
LEASE = "SELECT kind, window_start, granted, used FROM rate_lease(%s, %s, %s, %s, %s, %s)"
RELEASE = "SELECT rate_release(%s, %s, %s, %s)"


def consume_params(stage: str, org: OrgLimits, instance: str, recipients: int, size: int,
                   ttl_seconds: int, now: datetime | None = None,
                   windows: Windows = HOURS_AND_DAYS) -> tuple[Any, ...]:
    """Parameters of CONSUME (stage: 'check', 'reserve' or 'settle')."""
    return (stage, org.org_id, instance, now, recipients, size, org.messages_per_hour,
            org.recipients_per_day, org.bytes_per_day, timedelta(seconds=ttl_seconds),
            timedelta(seconds=windows.hour_seconds), timedelta(seconds=windows.day_seconds))


@dataclass(frozen=True)
class Want:
    """Units of one kind's window a process asks to lease: at least `need`, ideally `want`."""

    kind: str
    window: datetime
    need: int
    want: int


@dataclass(frozen=True)
class Grant:
    """What rate_lease gave: `granted` units (0: not even `need` was left); `used` before."""

    kind: str
    window: datetime
    granted: int
    used: int


@dataclass(frozen=True)
class Unspent:
    """Leased units of one kind's window given back."""

    kind: str
    window: datetime
    units: int


def lease_params(org: OrgLimits, wants: list[Want]) -> tuple[Any, ...]:
    return (org.org_id, [w.kind for w in wants], [w.window for w in wants],
            [w.need for w in wants], [w.want for w in wants],
            [org.limit(w.kind) for w in wants])


async def lease_async(conn: psycopg.AsyncConnection[Any], org: OrgLimits,
                      wants: list[Want]) -> list[Grant]:
    """Take blocks of units from the shared counters, in one round trip."""
    cur = await conn.execute(LEASE, lease_params(org, wants))
    return [Grant(*row) for row in await cur.fetchall()]


async def release_async(conn: psycopg.AsyncConnection[Any], org_id: uuid.UUID,
                        unspent: list[Unspent]) -> None:
    """Give leased units back to the shared counters, in one round trip."""
    await conn.execute(RELEASE, (org_id, [u.kind for u in unspent],
                                 [u.window for u in unspent], [u.units for u in unspent]))


def outcome_of(row: tuple[Any, ...] | None) -> Outcome:
    if row is None:
        raise ValueError("rate_consume returned no row")
    result, kind, used, limit = row
    return Outcome(result, kind, used, limit)


async def find_limits_async(conn: psycopg.AsyncConnection[Any], kind: str,
                            key: str) -> OrgLimits | None:
    """An organisation's limits by 'submitter' (SASL user) or 'domain'."""
    sql = BY_SUBMITTER if kind == "submitter" else BY_DOMAIN
    cur = await conn.execute(sql, (key if kind == "submitter" else key.lower(),))
    return _limits(await cur.fetchone())


async def consume_async(conn: psycopg.AsyncConnection[Any], stage: str, org: OrgLimits,
                        instance: str, recipients: int, size: int, ttl_seconds: int,
                        now: datetime | None = None, windows: Windows = HOURS_AND_DAYS) -> Outcome:
    """One decision's counting, in one round trip (see the module docstring)."""
    cur = await conn.execute(CONSUME, consume_params(stage, org, instance, recipients, size,
                                                     ttl_seconds, now, windows))
    return outcome_of(await cur.fetchone())


@dataclass(frozen=True)
class Ask:
    """One decision's counting request (see `consume_params`)."""

    stage: str
    instance: str
    recipients: int
    size: int


async def consume_many_async(conn: psycopg.AsyncConnection[Any], org: OrgLimits,
                             asks: list[Ask], ttl_seconds: int, now: datetime | None = None,
                             windows: Windows = HOURS_AND_DAYS) -> list[Outcome]:
    """Several decisions of one organisation, in order, in one round trip and transaction.

    Each is exactly what `consume_async` would decide after the ones before it.
    """
    if len(asks) == 1:
        a = asks[0]
        return [await consume_async(conn, a.stage, org, a.instance, a.recipients, a.size,
                                    ttl_seconds, now, windows)]
    cur = await conn.execute(CONSUME_MANY, (
        [a.stage for a in asks], org.org_id, [a.instance for a in asks], now,
        [a.recipients for a in asks], [a.size for a in asks], org.messages_per_hour,
        org.recipients_per_day, org.bytes_per_day, timedelta(seconds=ttl_seconds),
        timedelta(seconds=windows.hour_seconds), timedelta(seconds=windows.day_seconds)))
    rows = await cur.fetchall()
    if len(rows) != len(asks):
        raise ValueError(f"rate_consume_many answered {len(rows)} rows for {len(asks)}")
    return [outcome_of(row) for row in rows]


def consume(conn: psycopg.Connection, stage: str, org: OrgLimits, instance: str,
            recipients: int, size: int, ttl_seconds: int,
            now: datetime | None = None, windows: Windows = HOURS_AND_DAYS) -> Outcome:
    """consume_async for synchronous callers (tests, tools)."""
    row = conn.execute(CONSUME, consume_params(stage, org, instance, recipients, size,
                                               ttl_seconds, now, windows)).fetchone()
    return outcome_of(row)


def find_by_name(conn: psycopg.Connection, name_or_id: str) -> OrgLimits | None:
    try:
        oid: uuid.UUID | None = uuid.UUID(name_or_id)
    except ValueError:
        oid = None
    return _limits(conn.execute(BY_NAME, (name_or_id, oid)).fetchone())


@dataclass(frozen=True)
class Usage:
    kind: str
    window_start: datetime
    used: int
    limit: int | None


def usage(conn: psycopg.Connection, org: OrgLimits,
          windows: Windows = HOURS_AND_DAYS) -> list[Usage]:
    """Use in the current windows (database clock), one entry per kind.

    In lease mode this includes units leased to policyd processes and not yet
    spent (at most one block per process and kind).
    """
    hour, day = timedelta(seconds=windows.hour_seconds), timedelta(seconds=windows.day_seconds)
    rows = conn.execute(
        "SELECT k.kind, k.ws, coalesce(c.used, 0) FROM (VALUES"
        " ('messages', date_bin(%s, now(), 'epoch')),"
        " ('recipients', date_bin(%s, now(), 'epoch')),"
        " ('bytes', date_bin(%s, now(), 'epoch')))"
        " AS k(kind, ws) LEFT JOIN rate_counters c"
        " ON c.org_id = %s AND c.kind = k.kind AND c.window_start = k.ws",
        (hour, day, day, org.org_id),
    ).fetchall()
    return sorted((Usage(kind, ws, used, org.limit(kind)) for kind, ws, used in rows),
                  key=lambda u: KINDS.index(u.kind))


def reset(conn: psycopg.Connection, org_id: uuid.UUID) -> int:
    """Forget an organisation's counters and reservations; returns rows removed."""
    with conn.transaction():
        n = conn.execute("DELETE FROM rate_counters WHERE org_id = %s", (org_id,)).rowcount
        n += conn.execute("DELETE FROM rate_reservations WHERE org_id = %s",
                          (org_id,)).rowcount
    return n


def set_org_shadow(conn: psycopg.Connection, org_id: uuid.UUID, shadow: bool | None) -> None:
    """Shadow mode for one organisation (None: follow its tier)."""
    conn.execute("UPDATE organisations SET rate_shadow = %s WHERE id = %s", (shadow, org_id))


def set_tier_shadow(conn: psycopg.Connection, tier: str, shadow: bool) -> bool:
    """Shadow mode for a whole tier; False if there is no such tier."""
    cur = conn.execute("UPDATE tiers SET rate_shadow = %s WHERE name = %s", (shadow, tier))
    return cur.rowcount == 1
