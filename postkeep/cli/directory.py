"""`postkeep org|domain|submitter`: who a message belongs to.

Organisations (tier, retention overrides), their sending domains (and each
domain's bounce domain) and their SASL submitters.
"""

from __future__ import annotations

import json
from typing import Any

import click
from psycopg import errors

from postkeep.cli.common import check_domain, fail, find_org, session
from postkeep.storage.metadata import directory, migrate


def check_retention(content_days: int, metadata_days: int | None) -> None:
    """ValueError unless metadata is kept at least as long as content.

    The row is what tells a reader the content expired, and partitions are
    created ahead for the longest metadata retention only.
    """
    if metadata_days is not None and content_days > metadata_days:
        raise ValueError(
            f"content retention {content_days} days exceeds metadata retention"
            f" {metadata_days} days; raise --metadata-days to at least {content_days}"
        )


def _days(n: int | None) -> str:
    """Retention days for display: 'unlimited' for None."""
    return "unlimited" if n is None else f"{n}d"


def org_to_json(org: directory.Organisation) -> dict[str, Any]:
    """An organisation as a JSON-ready dict."""
    return {
        "id": str(org.id),
        "name": org.name,
        "tier": org.tier,
        "content_days": org.content_days,
        "metadata_days": org.metadata_days,
    }


def format_orgs(orgs: list[directory.Organisation]) -> str:
    """A fixed-width table of organisations."""
    lines = [f"{'ID':36}  {'NAME':24}  {'TIER':10}  {'CONTENT':>9}  {'METADATA':>9}"]
    lines += [
        f"{o.id!s:36}  {o.name:24}  {o.tier:10}  {_days(o.content_days):>9}"
        f"  {_days(o.metadata_days):>9}"
        for o in orgs
    ]
    return "\n".join(lines)



@click.group()
def org() -> None:
    """Organisations (customers) and their tiers."""


@org.command("add")
@click.argument("name")
@click.option("--tier", required=True, help="Tier name (see the tiers table).")
@click.option("--content-days", type=click.IntRange(min=1), help="Override content retention.")
@click.option("--metadata-days", type=click.IntRange(min=1), help="Override metadata retention.")
@click.pass_context
def org_add(
    ctx: click.Context, name: str, tier: str, content_days: int | None, metadata_days: int | None
) -> None:
    """Create organisation NAME on TIER; prints its id."""
    with session(ctx) as s:
        tiers = directory.tier_names(s.conn)
        if tier not in tiers:
            fail(f"--tier {tier!r}: unknown tier; allowed: {', '.join(tiers)}")
        if not name.strip():
            fail("organisation name must not be empty")
        defaults = s.conn.execute(
            "SELECT content_days, metadata_days FROM tiers WHERE name = %s", (tier,)
        ).fetchone()
        assert defaults is not None
        try:
            check_retention(
                content_days or defaults[0],
                metadata_days if metadata_days is not None else defaults[1],
            )
        except ValueError as exc:
            fail(str(exc))
        try:
            oid = directory.add_organisation(
                s.conn, name, tier, content_days=content_days, metadata_days=metadata_days
            )
        except errors.UniqueViolation:
            fail(f"organisation {name!r} already exists")
        if metadata_days is not None or content_days is not None:
            migrate.ensure_partitions(s.conn)  # a longer retention needs partitions ahead
        click.echo(str(oid))


@org.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def org_list(ctx: click.Context, as_json: bool) -> None:
    """List organisations with their effective retention."""
    with session(ctx) as s:
        orgs = directory.list_organisations(s.conn)
    if as_json:
        click.echo(json.dumps([org_to_json(o) for o in orgs], indent=2))
    else:
        click.echo(format_orgs(orgs))


@click.group()
def domain() -> None:
    """Sender domains owned by organisations."""


@domain.command("add")
@click.argument("org_name")
@click.argument("domain_name", metavar="DOMAIN")
@click.pass_context
def domain_add(ctx: click.Context, org_name: str, domain_name: str) -> None:
    """Give organisation ORG (name or id) the sender domain DOMAIN."""
    try:
        name = check_domain(domain_name)
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        try:
            directory.add_domain(s.conn, target.id, name)
        except errors.UniqueViolation:
            owner = directory.find_by_domain(s.conn, name)
            fail(f"domain {name!r} already belongs to {owner.name if owner else 'another org'}")
        click.echo(f"{name} -> {target.name}")


@domain.command("set-bounce")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("bounce_domain", metavar="BOUNCE_DOMAIN", required=False)
@click.option("--default", "use_default", is_flag=True,
              help="Go back to the platform's bounce domain (milter.bounce_domain).")
@click.pass_context
def domain_set_bounce(ctx: click.Context, domain_name: str, bounce_domain: str | None,
                      use_default: bool) -> None:
    """Send DOMAIN's bounces to BOUNCE_DOMAIN (its MX must be this platform's).

    Mail from DOMAIN then leaves with the return path pk-...@BOUNCE_DOMAIN, so
    a customer can point e.g. bounces.customer.example at the platform for SPF
    alignment.  New mail only; the milter picks it up within
    milter.directory_cache_seconds.
    """
    if use_default == (bounce_domain is not None):
        fail("give either BOUNCE_DOMAIN or --default")
    try:
        name = check_domain(domain_name)
        bounce = check_domain(bounce_domain) if bounce_domain else None
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        if not directory.set_bounce_domain(s.conn, name, bounce):
            fail(f"domain {name!r} belongs to no organisation (postkeep domain add)")
    click.echo(f"{name}: bounces to {bounce or 'the platform default (milter.bounce_domain)'}")


@click.group()
def submitter() -> None:
    """SASL users that submit mail for an organisation."""


@submitter.command("add")
@click.argument("org_name", metavar="ORG")
@click.argument("username")
@click.pass_context
def submitter_add(ctx: click.Context, org_name: str, username: str) -> None:
    """Let SASL user USERNAME submit for organisation ORG (name or id)."""
    if not username.strip():
        fail("username must not be empty")
    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        try:
            directory.add_submitter(s.conn, target.id, username)
        except errors.UniqueViolation:
            fail(f"submitter {username!r} already exists")
        click.echo(f"{username} -> {target.name}")


COMMANDS: list[click.Group] = [org, domain, submitter]
