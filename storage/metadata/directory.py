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


def find_by_inbound_domain(conn: psycopg.Connection, domain: str) -> Organisation | None:
    """The organisation whose domain DOMAIN takes inbound mail (`domain set-inbound`), if any."""
    row = conn.execute(
        f"SELECT {_ORG_COLUMNS} FROM domains d JOIN organisations o ON o.id = d.org_id"
        " JOIN tiers t ON t.name = o.tier WHERE d.domain = %s AND d.inbound_mode IS NOT NULL",
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


# --- changing the directory (postkeep org|tier|domain|submitter) -------------

# The columns an operator may set: on an organisation NULL means "the tier's value".
OVERRIDE_COLUMNS = ("content_days", "metadata_days", "messages_per_hour",
                    "recipients_per_day", "bytes_per_day")
TIER_COLUMNS = OVERRIDE_COLUMNS
ORG_FLAGS = ("forward_failures",)


@dataclass(frozen=True)
class Tier:
    """A tiers row (None: unlimited) and how many organisations use it."""

    name: str
    content_days: int
    metadata_days: int | None
    messages_per_hour: int | None
    recipients_per_day: int | None
    bytes_per_day: int | None
    rate_shadow: bool
    organisations: int


def list_tiers(conn: psycopg.Connection) -> list[Tier]:
    rows = conn.execute(
        "SELECT t.name, t.content_days, t.metadata_days, t.messages_per_hour,"
        " t.recipients_per_day, t.bytes_per_day, t.rate_shadow,"
        " (SELECT count(*) FROM organisations o WHERE o.tier = t.name)"
        " FROM tiers t ORDER BY t.content_days, t.name").fetchall()
    return [Tier(*r) for r in rows]


def get_tier(conn: psycopg.Connection, name: str) -> Tier | None:
    return next((t for t in list_tiers(conn) if t.name == name), None)


def add_tier(conn: psycopg.Connection, name: str, values: dict[str, int | None]) -> None:
    """Insert a tier; VALUES holds TIER_COLUMNS (content_days required)."""
    cols = [c for c in TIER_COLUMNS if c in values]
    conn.execute(
        f"INSERT INTO tiers (name, {', '.join(cols)}) VALUES (%s{', %s' * len(cols)})",
        (name, *[values[c] for c in cols]))


def _set(conn: psycopg.Connection, table: str, key: str, ident: object,
         changes: dict[str, object], allowed: tuple[str, ...]) -> bool:
    unknown = set(changes) - set(allowed)
    if unknown:
        raise ValueError(f"not settable on {table}: {', '.join(sorted(unknown))}")
    if not changes:
        return True
    assignments = ", ".join(f"{c} = %s" for c in changes)  # names from the allowed list only
    cur = conn.execute(f"UPDATE {table} SET {assignments} WHERE {key} = %s",
                       (*changes.values(), ident))
    return cur.rowcount == 1


def retention_conflicts(conn: psycopg.Connection, *, org_id: uuid.UUID | None = None,
                        tier: str | None = None) -> list[tuple[str, int, int]]:
    """(organisation, content days, metadata days) where content would outlive
    metadata, among ORG_ID or the organisations on TIER."""
    return [(o.name, o.content_days, o.metadata_days) for o in list_organisations(conn)
            if (o.id == org_id or o.tier == tier)
            and o.metadata_days is not None and o.content_days > o.metadata_days]


def _refuse_conflicts(conn: psycopg.Connection, *, org_id: uuid.UUID | None = None,
                      tier: str | None = None) -> None:
    bad = retention_conflicts(conn, org_id=org_id, tier=tier)
    if bad:
        name, content, metadata = bad[0]
        raise ValueError(f"organisation {name!r} would keep content {content} days but"
                         f" metadata only {metadata} days (metadata must outlive content)")


def update_tier(conn: psycopg.Connection, name: str, changes: dict[str, int | None]) -> bool:
    """Change a tier's definition; False if there is no such tier.

    ValueError (nothing changed) if an organisation on it would then keep
    content longer than its metadata.
    """
    with conn.transaction():
        if not _set(conn, "tiers", "name", name, dict(changes), TIER_COLUMNS):
            return False
        _refuse_conflicts(conn, tier=name)
    return True


def remove_tier(conn: psycopg.Connection, name: str) -> bool:
    """Delete an unused tier; False if there is none (the FK refuses a tier in use)."""
    return conn.execute("DELETE FROM tiers WHERE name = %s", (name,)).rowcount == 1


@dataclass(frozen=True)
class OrgSettings:
    """An organisation's own values (None: the tier's) beside the effective ones."""

    org: Organisation
    overrides: dict[str, int | None]
    effective: dict[str, int | None]
    forward_failures: bool
    rate_shadow: bool | None


def org_settings(conn: psycopg.Connection, org: Organisation) -> OrgSettings:
    own = ", ".join(f"o.{c}" for c in OVERRIDE_COLUMNS)
    eff = ", ".join(f"coalesce(o.{c}, t.{c})" for c in OVERRIDE_COLUMNS)
    row = conn.execute(
        f"SELECT {own}, {eff}, o.forward_failures, o.rate_shadow FROM organisations o"
        " JOIN tiers t ON t.name = o.tier WHERE o.id = %s", (org.id,)).fetchone()
    assert row is not None
    n = len(OVERRIDE_COLUMNS)
    effective = dict(zip(OVERRIDE_COLUMNS, row[n:2 * n], strict=True))
    effective["metadata_days"] = org.metadata_days  # NULL override: the tier's, maybe unlimited
    return OrgSettings(org, dict(zip(OVERRIDE_COLUMNS, row[:n], strict=True)), effective,
                       bool(row[2 * n]), row[2 * n + 1])


def update_organisation(conn: psycopg.Connection, org_id: uuid.UUID,
                        changes: dict[str, object]) -> None:
    """Set tier, overrides (None: back to the tier's) and flags, all or nothing.

    ValueError (nothing changed) if content would then outlive metadata.
    """
    with conn.transaction():
        _set(conn, "organisations", "id", org_id, dict(changes),
             ("tier", *OVERRIDE_COLUMNS, *ORG_FLAGS))
        _refuse_conflicts(conn, org_id=org_id)


def rename_organisation(conn: psycopg.Connection, org_id: uuid.UUID, new_name: str) -> None:
    """Rename (the id, which every row carries, stays): UniqueViolation if taken."""
    conn.execute("UPDATE organisations SET name = %s WHERE id = %s", (new_name, org_id))


# Tables whose org_id rows are the organisation's record of its own: removed
# with it.  retention_audit is kept (who removed what, when).
_KEEP_ON_REMOVE = ("retention_audit", "organisations")


def org_tables(conn: psycopg.Connection) -> list[str]:
    """Every (non-partition) table of this schema with an org_id column."""
    return [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
        " WHERE a.attname = 'org_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p')"
        " AND NOT c.relispartition AND c.relnamespace = current_schema()::regnamespace"
        " ORDER BY c.relname")]


def org_footprint(conn: psycopg.Connection, org_id: uuid.UUID) -> dict[str, int]:
    """Rows per table that belong to the organisation (tables with none left out)."""
    out: dict[str, int] = {}
    for table in org_tables(conn):
        if table in _KEEP_ON_REMOVE:
            continue
        n = conn.execute(f'SELECT count(*) FROM "{table}" WHERE org_id = %s',
                         (org_id,)).fetchone()
        if n and n[0]:
            out[table] = int(n[0])
    return out


def org_object_keys(conn: psycopg.Connection, org_id: uuid.UUID) -> list[str]:
    """Every S3 object the organisation's rows name: messages, packs, parts, dictionaries."""
    keys: list[str] = []
    for table in ("messages", "packs", "parts", "zstd_dictionaries"):
        keys += [r[0] for r in conn.execute(
            f"SELECT DISTINCT object_key FROM {table} WHERE org_id = %s AND object_key <> ''"
            " ORDER BY 1", (org_id,))]
    return list(dict.fromkeys(keys))  # a pack is named by its messages and its own row


def active_holds(conn: psycopg.Connection, org_id: uuid.UUID) -> int:
    row = conn.execute("SELECT count(*) FROM legal_holds WHERE org_id = %s"
                       " AND released_at IS NULL", (org_id,)).fetchone()
    return int(row[0]) if row else 0


def remove_organisation(conn: psycopg.Connection, org_id: uuid.UUID) -> dict[str, int]:
    """Delete the organisation and every row of it, in one transaction.

    The caller deletes its objects first (org_object_keys): rows naming a
    deleted object are harmless for a moment, objects no row names are not.
    Returns the rows deleted per table.
    """
    done: dict[str, int] = {}
    with conn.transaction():
        for table in org_tables(conn):
            if table in _KEEP_ON_REMOVE:
                continue
            n = conn.execute(f'DELETE FROM "{table}" WHERE org_id = %s', (org_id,)).rowcount
            if n:
                done[table] = n
        conn.execute("DELETE FROM organisations WHERE id = %s", (org_id,))
    return done


@dataclass(frozen=True)
class Domain:
    domain: str
    org_id: uuid.UUID
    org_name: str
    bounce_domain: str | None
    dkim_keys: int


def list_domains(conn: psycopg.Connection, org_id: uuid.UUID | None = None,
                 domain: str | None = None) -> list[Domain]:
    rows = conn.execute(
        "SELECT d.domain, d.org_id, o.name, d.bounce_domain,"
        " (SELECT count(*) FROM dkim_keys k WHERE k.domain = d.domain)"
        " FROM domains d JOIN organisations o ON o.id = d.org_id"
        " WHERE (%(org)s::uuid IS NULL OR d.org_id = %(org)s)"
        " AND (%(dom)s::text IS NULL OR d.domain = %(dom)s) ORDER BY d.domain",
        {"org": org_id, "dom": domain.lower() if domain else None}).fetchall()
    return [Domain(*r) for r in rows]


def remove_domain(conn: psycopg.Connection, domain: str) -> bool:
    """Delete the domain (and, by the foreign key, its DKIM keys)."""
    return conn.execute("DELETE FROM domains WHERE domain = %s",
                        (domain.lower(),)).rowcount == 1


def rename_domain(conn: psycopg.Connection, old: str, new: str) -> bool:
    """Rename a domain that has no DKIM keys; UniqueViolation if NEW exists."""
    return conn.execute("UPDATE domains SET domain = %s WHERE domain = %s",
                        (new.lower(), old.lower())).rowcount == 1


@dataclass(frozen=True)
class Submitter:
    username: str
    org_id: uuid.UUID
    org_name: str


def list_submitters(conn: psycopg.Connection, org_id: uuid.UUID | None = None,
                    username: str | None = None) -> list[Submitter]:
    rows = conn.execute(
        "SELECT s.username, s.org_id, o.name FROM submitters s"
        " JOIN organisations o ON o.id = s.org_id"
        " WHERE (%(org)s::uuid IS NULL OR s.org_id = %(org)s)"
        " AND (%(user)s::text IS NULL OR s.username = %(user)s) ORDER BY s.username",
        {"org": org_id, "user": username}).fetchall()
    return [Submitter(*r) for r in rows]


def remove_submitter(conn: psycopg.Connection, username: str) -> bool:
    return conn.execute("DELETE FROM submitters WHERE username = %s",
                        (username,)).rowcount == 1


def rename_submitter(conn: psycopg.Connection, old: str, new: str) -> bool:
    """UniqueViolation if NEW exists."""
    return conn.execute("UPDATE submitters SET username = %s WHERE username = %s",
                        (new, old)).rowcount == 1
