"""`postkeep tenant grant|revoke|list`: database roles that read one organisation.

A dashboard connects as its own PostgreSQL login role (created by the DBA);
`grant` maps it to an organisation, and row-level security then shows it
that organisation's rows only (storage/metadata/tenants.py, migration 0012).
"""

from __future__ import annotations

import json

import click

from postkeep.cli.common import confirm, destructive, fail, find_org, iso, json_flag, say, session
from postkeep.storage.metadata import tenants


def format_roles(rows: list[tenants.TenantRole]) -> str:
    """A fixed-width table of tenant roles."""
    lines = [f"{'ROLE':32}  {'ORGANISATION':24}  {'ORG ID':36}  GRANTED"]
    lines += [f"{r.role_name:32}  {r.org_name:24}  {r.org_id!s:36}  {iso(r.created_at)}"
              for r in rows]
    return "\n".join(lines)


@click.group("tenant")
def tenant_group() -> None:
    """Database roles that read one organisation's rows (dashboards)."""


@tenant_group.command("grant")
@click.argument("org_name", metavar="ORG")
@click.argument("role")
@json_flag
@click.pass_context
def grant(ctx: click.Context, org_name: str, role: str) -> None:
    """Let database role ROLE read ORG's rows, and only ORG's."""
    with session(ctx) as s:
        org = find_org(s.conn, org_name)
        try:
            tenants.grant_role(s.conn, org.id, role)
        except tenants.TenantError as exc:
            fail(str(exc))
        say(f"role {role} reads organisation {org.name} ({org.id})", role=role, org=org.name,
            org_id=str(org.id))


@tenant_group.command("revoke")
@click.argument("role")
@destructive
@json_flag
@click.pass_context
def revoke(ctx: click.Context, role: str, yes: bool, dry_run: bool) -> None:
    """Take ROLE's tenant access away (the role itself stays)."""
    with session(ctx) as s:
        mapped = [r for r in tenants.list_roles(s.conn, None) if r.role_name == role]
        if mapped:
            what = f"revoke role {role}'s access to organisation {mapped[0].org_name}"
            if dry_run:
                say(f"would {what}", dry_run=True, role=role, org=mapped[0].org_name)
                return
            confirm(what, yes)
        elif dry_run:
            fail(f"role {role!r} is not a tenant role (see `postkeep tenant list`)")
        if not tenants.revoke_role(s.conn, role):
            fail(f"role {role!r} is not a tenant role (see `postkeep tenant list`)")
        say(f"role {role} no longer reads any organisation", role=role)


@tenant_group.command("list")
@click.option("--org", "org_name", help="Only this organisation's roles.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_cmd(ctx: click.Context, org_name: str | None, as_json: bool) -> None:
    """Tenant roles and their organisations."""
    with session(ctx) as s:
        org_id = find_org(s.conn, org_name).id if org_name else None
        rows = tenants.list_roles(s.conn, org_id)
    if as_json:
        click.echo(json.dumps([{"role": r.role_name, "org_id": str(r.org_id),
                                "org": r.org_name, "granted_at": iso(r.created_at)}
                               for r in rows], indent=2))
    else:
        click.echo(format_roles(rows))


COMMANDS: list[click.Group] = [tenant_group]
