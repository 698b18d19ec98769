"""Tenant roles: which database role reads which organisation's rows.

A customer's dashboard (or any reader outside postkeep's daemons) connects as
its own PostgreSQL login role.  `grant_role` maps that role to one
organisation in `tenant_roles` and makes it a member of `postkeep_tenant`,
the group that may SELECT what a customer may see; row-level security
(migration 0012) then shows it that organisation's rows only, whatever the
session sets: the mapping is keyed by `current_user`, and only the owner
writes it.  Roles that bypass row-level security (superusers, BYPASSRLS)
and the schema's owner are refused: mapping them would promise an
isolation PostgreSQL does not give them.

The role itself (LOGIN, its password or certificate) is the DBA's to create;
postkeep never handles a tenant's credentials.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql
from psycopg.rows import class_row

GROUP = "postkeep_tenant"


class TenantError(Exception):
    """A grant or revoke refused; the text names the role and why."""


@dataclass(frozen=True)
class TenantRole:
    """One mapping as the CLI shows it."""

    role_name: str
    org_id: uuid.UUID
    org_name: str
    created_at: datetime


def refusal(conn: psycopg.Connection, role: str) -> str | None:
    """Why ROLE cannot be a tenant role, or None if it can."""
    if role == GROUP:
        return f"role {role!r} is the group every tenant role joins; map a login role instead"
    row = conn.execute(
        "SELECT r.rolsuper, r.rolbypassrls,"
        " r.oid = (SELECT relowner FROM pg_class WHERE oid = 'messages'::regclass)"
        " FROM pg_roles r WHERE r.rolname = %s", (role,)).fetchone()
    if row is None:
        return (f"no database role {role!r}: create it first"
                f" (CREATE ROLE \"{role}\" LOGIN PASSWORD '...')")
    superuser, bypass, owner = row
    if superuser or bypass:
        return f"role {role!r} bypasses row-level security (superuser or BYPASSRLS)"
    if owner:
        return (f"role {role!r} owns postkeep's tables, and owners are exempt from"
                " row-level security")
    return None


def grant_role(conn: psycopg.Connection, org_id: uuid.UUID, role: str) -> None:
    """Map ROLE to ORG_ID and let it read through postkeep_tenant.  TenantError if refused."""
    why = refusal(conn, role)
    if why is not None:
        raise TenantError(why)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO tenant_roles (role_name, org_id) VALUES (%s, %s)"
            " ON CONFLICT (role_name) DO UPDATE SET role_name = EXCLUDED.role_name"
            " RETURNING org_id", (role, org_id)).fetchone()
        assert row is not None
        if row[0] != org_id:
            raise TenantError(f"role {role!r} already reads organisation {row[0]};"
                              " revoke it first (one role, one organisation)")
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(GROUP), sql.Identifier(role)))


def revoke_role(conn: psycopg.Connection, role: str) -> bool:
    """Unmap ROLE and take it out of postkeep_tenant; False if it was not mapped."""
    with conn.transaction():
        gone = conn.execute("DELETE FROM tenant_roles WHERE role_name = %s RETURNING 1",
                            (role,)).fetchone()
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists:
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(GROUP),
                                                             sql.Identifier(role)))
    return gone is not None


def list_roles(conn: psycopg.Connection, org_id: uuid.UUID | None = None) -> list[TenantRole]:
    """Every mapping (of ORG_ID only, if given), by role name."""
    where = "" if org_id is None else " WHERE t.org_id = %s"
    with conn.cursor(row_factory=class_row(TenantRole)) as cur:
        cur.execute("SELECT t.role_name, t.org_id, o.name AS org_name, t.created_at"
                    " FROM tenant_roles t JOIN organisations o ON o.id = t.org_id"
                    + where + " ORDER BY t.role_name", () if org_id is None else (org_id,))
        return cur.fetchall()
