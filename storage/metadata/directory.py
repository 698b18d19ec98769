"""Organisations, tiers, domains and submitters: who a message belongs to.

SQL for these tables lives here.  Lookups return plain `Organisation` values
with the tier's retention already combined with the organisation's overrides,
so the milter's decisions never touch SQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg

_ORG_COLUMNS = """
    o.id, o.name, o.tier,
    coalesce(o.content_days, t.content_days),
    CASE WHEN o.metadata_days IS NOT NULL THEN o.metadata_days ELSE t.metadata_days END,
    o.dkim_missing_key,
    (SELECT coalesce(array_agg(ARRAY[bd.domain, bd.bounce_domain] ORDER BY bd.domain),
                     ARRAY[]::text[][])
     FROM domains bd WHERE bd.org_id = o.id AND bd.bounce_domain IS NOT NULL),
    EXISTS (SELECT 1 FROM legal_holds h WHERE h.org_id = o.id AND h.address IS NULL
            AND h.released_at IS NULL)
"""


@dataclass(frozen=True)
class Organisation:
    id: uuid.UUID
    name: str
    tier: str
    content_days: int
    metadata_days: int | None  # None: kept without limit
    # What the milter does when it cannot sign: 'tempfail' (no active DKIM
    # key for the From domain: 451 4.7.5; a From domain not the
    # organisation's: 550 5.7.1) or 'unsigned' (send unsigned, logged and counted).
    dkim_missing_key: str = "tempfail"
    # (sending domain, its own bounce domain) for the domains that have one;
    # the others use the platform's bounce domain.
    bounce_domains: tuple[tuple[str, str], ...] = ()
    # A legal hold covers all of the organisation's mail: new objects go
    # under messages/hold/, which no lifecycle rule expires.
    legal_hold: bool = False


def _org(row: tuple[object, ...] | None) -> Organisation | None:
    if row is None:
        return None
    oid, name, tier, content_days, metadata_days, missing_key, bounces, held = row
    assert isinstance(oid, uuid.UUID) and isinstance(name, str) and isinstance(tier, str)
    assert isinstance(content_days, int) and isinstance(missing_key, str)
    assert metadata_days is None or isinstance(metadata_days, int)
    assert isinstance(bounces, list)
    pairs = tuple((str(d), str(b)) for d, b in bounces)
    return Organisation(oid, name, tier, content_days, metadata_days, missing_key, pairs,
                        bool(held))


def find_by_submitter(conn: psycopg.Connection, username: str) -> Organisation | None:
    """The organisation a SASL user submits for, if any."""
    row = conn.execute(
        f"SELECT {_ORG_COLUMNS} FROM submitters s JOIN organisations o ON o.id = s.org_id"
        " JOIN tiers t ON t.name = o.tier WHERE s.username = %s",
        (username,),
    ).fetchone()
    return _org(row)


def find_by_domain(conn: psycopg.Connection, domain: str) -> Organisation | None:
    """The organisation that owns a sender domain, if any."""
    row = conn.execute(
        f"SELECT {_ORG_COLUMNS} FROM domains d JOIN organisations o ON o.id = d.org_id"
        " JOIN tiers t ON t.name = o.tier WHERE d.domain = %s",
        (domain.lower(),),
    ).fetchone()
    return _org(row)


def find_by_name(conn: psycopg.Connection, name_or_id: str) -> Organisation | None:
    """An organisation by its name or its id."""
    try:
        oid: uuid.UUID | None = uuid.UUID(name_or_id)
    except ValueError:
        oid = None
    row = conn.execute(
        f"SELECT {_ORG_COLUMNS} FROM organisations o JOIN tiers t ON t.name = o.tier"
        " WHERE o.name = %s OR o.id = %s",
        (name_or_id, oid),
    ).fetchone()
    return _org(row)


def list_organisations(conn: psycopg.Connection) -> list[Organisation]:
    rows = conn.execute(
        f"SELECT {_ORG_COLUMNS} FROM organisations o JOIN tiers t ON t.name = o.tier"
        " ORDER BY o.name"
    ).fetchall()
    return [org for org in map(_org, rows) if org is not None]


def tier_names(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM tiers ORDER BY content_days")]


def add_organisation(
    conn: psycopg.Connection,
    name: str,
    tier: str,
    *,
    content_days: int | None = None,
    metadata_days: int | None = None,
) -> uuid.UUID:
    """Create an organisation; its id is a fresh UUID."""
    oid = uuid.uuid4()
    conn.execute(
        "INSERT INTO organisations (id, name, tier, content_days, metadata_days)"
        " VALUES (%s, %s, %s, %s, %s)",
        (oid, name, tier, content_days, metadata_days),
    )
    return oid


def add_domain(conn: psycopg.Connection, org_id: uuid.UUID, domain: str) -> None:
    conn.execute(
        "INSERT INTO domains (domain, org_id) VALUES (%s, %s)", (domain.lower(), org_id)
    )


def set_bounce_domain(conn: psycopg.Connection, domain: str, bounce_domain: str | None) -> bool:
    """Point DOMAIN's bounces at BOUNCE_DOMAIN (None: the platform default)."""
    cur = conn.execute(
        "UPDATE domains SET bounce_domain = %s WHERE domain = %s",
        (bounce_domain.lower().rstrip(".") if bounce_domain else None, domain.lower()),
    )
    return cur.rowcount == 1


def add_submitter(conn: psycopg.Connection, org_id: uuid.UUID, username: str) -> None:
    conn.execute(
        "INSERT INTO submitters (username, org_id) VALUES (%s, %s)", (username, org_id)
    )
