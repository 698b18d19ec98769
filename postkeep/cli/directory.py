"""`postkeep org|tier|domain|submitter`: who a message belongs to.

Organisations (tier, retention and limit overrides, forward_failures), the
tiers they are on, their sending domains (and each domain's bounce domain)
and their SASL submitters: everything an operator changes here would
otherwise be SQL.  The daemons re-read these rows within their directory
cache periods; nothing needs a restart.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from psycopg import errors

from postkeep.cli.common import (
    Override,
    changes_of,
    check_domain,
    confirm,
    destructive,
    fail,
    find_org,
    json_flag,
    say,
    session,
)
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.metadata import audit, directory, inbound, migrate


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
@json_flag
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
        say(str(oid), id=str(oid), name=name, tier=tier)


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
@json_flag
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
        say(f"{name} -> {target.name}", domain=name, org=target.name, org_id=str(target.id))


@domain.command("set-bounce")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("bounce_domain", metavar="BOUNCE_DOMAIN", required=False)
@click.option("--default", "use_default", is_flag=True,
              help="Go back to the platform's bounce domain (milter.bounce_domain).")
@json_flag
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
    say(f"{name}: bounces to {bounce or 'the platform default (milter.bounce_domain)'}",
        domain=name, bounce_domain=bounce)


INBOUND_DOMAINS_MAP = "postkeep-inbound-domains"
INBOUND_TRANSPORT_MAP = "postkeep-inbound-transport"
_RELAY_TARGET = re.compile(r"^(?:\[?([A-Za-z0-9.-]+)\]?)(?::(\d{1,5}))?$")


def relay_transport(target: str) -> str:
    """HOST[:PORT] as a Postfix transport: smtp:[HOST]:PORT (no MX lookup)."""
    m = _RELAY_TARGET.match(target.strip())
    if not m or (m.group(2) and not 0 < int(m.group(2)) < 65536):
        raise ValueError(f"{target!r} is not HOST or HOST:PORT")
    return f"smtp:[{m.group(1)}]" + (f":{m.group(2)}" if m.group(2) else "")


def inbound_maps(rows: list[inbound.InboundDomain]) -> tuple[str, str]:
    """The texthash maps Postfix reads: relay domains, and each domain's transport.

    Archive-only mail is discarded once the milter has captured it.
    """
    head = "# Written by `postkeep domain set-inbound` from PostgreSQL; do not edit.\n"
    domains = head + "".join(f"{r.domain}\tinbound\n" for r in rows)
    transport = head + "".join(
        f"{r.domain}\t" + (relay_transport(r.relay) if r.mode == inbound.RELAY and r.relay
                           else "discard:archived by postkeep") + "\n" for r in rows)
    return domains, transport


def write_inbound_maps(config_directory: str, rows: list[inbound.InboundDomain]) -> None:
    """Replace both maps atomically, then have Postfix re-read them (postfix reload)."""
    domains, transport = inbound_maps(rows)
    for name, text in ((INBOUND_DOMAINS_MAP, domains), (INBOUND_TRANSPORT_MAP, transport)):
        path = Path(config_directory) / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    done = subprocess.run(["postfix", "-c", config_directory, "reload"], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        fail(f"maps written, but 'postfix reload' failed: {done.stderr.strip()}")


@domain.command("set-inbound")
@click.argument("domain_name", metavar="DOMAIN")
@click.option("--archive-only", is_flag=True, help="Capture inbound mail, deliver it nowhere.")
@click.option("--relay-to", metavar="HOST[:PORT]",
              help="Capture inbound mail, then relay it to the organisation's own host.")
@click.option("--off", is_flag=True, help="Take no inbound mail for DOMAIN any more.")
@click.option("--config-directory", default=None, metavar="DIR",
              help="Postfix configuration directory (default: [postfix].config_directory).")
@json_flag
@click.pass_context
def domain_set_inbound(ctx: click.Context, domain_name: str, archive_only: bool,
                       relay_to: str | None, off: bool, config_directory: str | None) -> None:
    """What happens to mail for DOMAIN arriving from outside (this host its MX).

    It is captured (direction inbound) and then discarded (--archive-only) or
    relayed to HOST[:PORT] (--relay-to).  The setting is kept in PostgreSQL;
    the Postfix maps postkeep-inbound-domains (relay_domains) and
    postkeep-inbound-transport (transport_maps) are rewritten from it and
    Postfix reloaded.
    """
    if archive_only + (relay_to is not None) + off != 1:
        fail("give exactly one of --archive-only, --relay-to HOST[:PORT], --off")
    try:
        name = check_domain(domain_name)
        if relay_to is not None:
            relay_transport(relay_to)
    except ValueError as exc:
        fail(str(exc))
    mode = None if off else (inbound.ARCHIVE if archive_only else inbound.RELAY)
    with session(ctx) as s:
        if not inbound.set_inbound(s.conn, name, mode, relay_to):
            fail(f"domain {name!r} belongs to no organisation (postkeep domain add)")
        rows = inbound.inbound_domains(s.conn)
        directory_ = config_directory or s.cfg.postfix.config_directory
    write_inbound_maps(directory_, rows)
    what = {None: "no inbound mail", inbound.ARCHIVE: "inbound mail archived only",
            inbound.RELAY: f"inbound mail archived and relayed to {relay_to}"}[mode]
    say(f"{name}: {what}", domain=name, inbound=mode, relay_to=relay_to)


@click.group()
def submitter() -> None:
    """SASL users that submit mail for an organisation."""


@submitter.command("add")
@click.argument("org_name", metavar="ORG")
@click.argument("username")
@json_flag
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
        say(f"{username} -> {target.name}", username=username, org=target.name,
            org_id=str(target.id))


def _override_options(allow_tier: bool) -> list[Any]:
    word = "tier (the tier's value)" if allow_tier else "unlimited"
    return [
        click.option("--content-days", type=Override(1, allow_tier),
                     help=f"Content retention in days, or {word}."),
        click.option("--metadata-days", type=Override(1, allow_tier),
                     help="Metadata retention in days, or "
                          + ("tier." if allow_tier else "unlimited.")),
        click.option("--messages-per-hour", type=Override(0, allow_tier),
                     help=f"Rate limit, or {word}."),
        click.option("--recipients-per-day", type=Override(0, allow_tier),
                     help=f"Rate limit, or {word}."),
        click.option("--bytes-per-day", type=Override(0, allow_tier),
                     help=f"Rate limit, or {word}."),
    ]


F = TypeVar("F", bound=Callable[..., Any])


def _with(options: list[Any]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f
    return apply


def settings_to_json(st: directory.OrgSettings) -> dict[str, Any]:
    """`org show --json`: own values (null: the tier's) and effective ones."""
    return {**org_to_json(st.org), "overrides": st.overrides, "effective": st.effective,
            "forward_failures": st.forward_failures, "rate_shadow": st.rate_shadow,
            "dkim_missing_key": st.org.dkim_missing_key, "legal_hold": st.org.legal_hold}


def format_settings(st: directory.OrgSettings) -> str:
    lines = [f"{st.org.name} ({st.org.id}) tier {st.org.tier}"]
    for col, own in st.overrides.items():
        value = st.effective[col]
        shown = "unlimited" if value is None else str(value)
        lines.append(f"  {col:20} {shown:>12}  {'(own)' if own is not None else '(tier)'}")
    lines.append(f"  {'forward_failures':20} {'on' if st.forward_failures else 'off':>12}")
    lines.append(f"  {'dkim_missing_key':20} {st.org.dkim_missing_key:>12}")
    return "\n".join(lines)


@org.command("show")
@click.argument("org_name", metavar="ORG")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def org_show(ctx: click.Context, org_name: str, as_json: bool) -> None:
    """ORG's tier, its own overrides, the effective values and its flags."""
    with session(ctx) as s:
        st = directory.org_settings(s.conn, find_org(s.conn, org_name))
    click.echo(json.dumps(settings_to_json(st), indent=2) if as_json else format_settings(st))


@org.command("set")
@click.argument("org_name", metavar="ORG")
@click.option("--tier", help="Move ORG to this tier.")
@_with(_override_options(True))
@click.option("--forward-failures", type=click.Choice(["on", "off"]),
              help="Forward delivery failures to the original sender.")
@json_flag
@click.pass_context
def org_set(ctx: click.Context, /, org_name: str, tier: str | None, forward_failures: str | None,
            **overrides: int | str | None) -> None:
    """Change ORG's tier, overrides ('tier': back to the tier's value) or flags.

    All given changes apply together or not at all; refused if content would
    then outlive metadata.
    """
    changes = changes_of(overrides)
    if tier is not None:
        changes["tier"] = tier
    if forward_failures is not None:
        changes["forward_failures"] = forward_failures == "on"
    if not changes:
        fail("nothing to change: give --tier, an override or --forward-failures")
    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        if tier is not None and tier not in (tiers := directory.tier_names(s.conn)):
            fail(f"--tier {tier!r}: unknown tier; allowed: {', '.join(tiers)}")
        try:
            directory.update_organisation(s.conn, target.id, changes)
        except ValueError as exc:
            fail(f"{target.name}: {exc}; nothing changed")
        if "metadata_days" in changes or "tier" in changes:
            migrate.ensure_partitions(s.conn)  # a longer retention needs partitions ahead
        st = directory.org_settings(s.conn, target)
    shown = ", ".join(f"{k}={'tier' if v is None else v}" for k, v in changes.items())
    say(f"{st.org.name}: {shown}", org=st.org.name, org_id=str(st.org.id), changes=changes)


@org.command("rename")
@click.argument("org_name", metavar="ORG")
@click.argument("new_name")
@json_flag
@click.pass_context
def org_rename(ctx: click.Context, org_name: str, new_name: str) -> None:
    """Rename ORG to NEW_NAME (its id, domains, submitters and mail stay)."""
    if not new_name.strip():
        fail("organisation name must not be empty")
    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        try:
            directory.rename_organisation(s.conn, target.id, new_name)
        except errors.UniqueViolation:
            fail(f"organisation {new_name!r} already exists")
    say(f"{target.name} -> {new_name} ({target.id})", org_id=str(target.id), old=target.name,
        new=new_name)


@org.command("remove")
@click.argument("org_name", metavar="ORG")
@click.option("--force", is_flag=True,
              help="Also when ORG has stored mail: delete its objects and rows.")
@destructive
@json_flag
@click.pass_context
def org_remove(ctx: click.Context, org_name: str, force: bool, yes: bool,
               dry_run: bool) -> None:
    """Remove ORG with its domains, submitters, DKIM keys and counters.

    Refused while ORG has stored mail (messages, attachment parts,
    dictionaries) unless --force, which deletes those objects from S3 first
    and then every row of ORG, so nothing is left that no row names.
    Refused, even with --force, while a legal hold is active on ORG.  The
    retention audit keeps a row saying what was removed.
    """
    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        rows = directory.org_footprint(s.conn, target.id)
        keys = directory.org_object_keys(s.conn, target.id)
        holds = directory.active_holds(s.conn, target.id)
        stored = {t: n for t, n in rows.items()
                  if t in ("messages", "parts", "zstd_dictionaries")}
        summary = ", ".join(f"{n} {t}" for t, n in sorted(rows.items())) or "no other rows"
        what = (f"remove organisation {target.name} ({target.id}): {summary};"
                f" {len(keys)} S3 objects")
        if dry_run:
            refused = (f": {holds} active legal hold(s)" if holds else
                       " without --force: it has stored mail" if stored and not force else None)
            say(f"would {what}" + (f"\nrefused anyway{refused}" if refused else ""),
                dry_run=True, org=target.name, org_id=str(target.id), rows=rows,
                objects=len(keys), refused=refused.lstrip(": ") if refused else None)
            return
        if holds:
            fail(f"organisation {target.name} has {holds} active legal hold(s);"
                 " release them first (postkeep hold list --org)")
        if stored and not force:
            fail(f"organisation {target.name} has stored mail ("
                 + ", ".join(f"{n} {t}" for t, n in sorted(stored.items()))
                 + "): --force deletes it (objects and rows), or let retention expire it first")
        confirm(what + (" deleted" if keys else ""), yes)
        if keys:
            store = S3ObjectStore(s.cfg.s3)
            for key in keys:  # objects first: a row may name a gone object, never the reverse
                store.delete(key)
        done = directory.remove_organisation(s.conn, target.id)
        audit.audit(s.conn, None, "org_removed", sum(done.values()), target.id, target.name,
                    {"rows": done, "objects_deleted": len(keys)})
    say(f"removed organisation {target.name}: "
        + (", ".join(f"{n} {t}" for t, n in sorted(done.items())) or "no other rows")
        + f"; {len(keys)} objects deleted",
        org=target.name, org_id=str(target.id), rows=done, objects_deleted=len(keys))


@click.group()
def tier() -> None:
    """Tiers: default retention and rate limits of the organisations on them."""


def tier_to_json(t: directory.Tier) -> dict[str, Any]:
    return dict(t.__dict__)


@tier.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def tier_list(ctx: click.Context, as_json: bool) -> None:
    """Every tier with its retention, limits and how many organisations use it."""
    with session(ctx) as s:
        tiers = directory.list_tiers(s.conn)
    if as_json:
        click.echo(json.dumps([tier_to_json(t) for t in tiers], indent=2))
        return

    def v(n: int | None) -> str:
        return "unlimited" if n is None else str(n)

    click.echo(f"{'NAME':14}  {'CONTENT':>9}  {'METADATA':>9}  {'MSG/HOUR':>9}"
               f"  {'RCPT/DAY':>9}  {'BYTES/DAY':>12}  {'ORGS':>5}")
    for t in tiers:
        click.echo(f"{t.name:14}  {_days(t.content_days):>9}  {_days(t.metadata_days):>9}"
                   f"  {v(t.messages_per_hour):>9}  {v(t.recipients_per_day):>9}"
                   f"  {v(t.bytes_per_day):>12}  {t.organisations:>5}")


@tier.command("add")
@click.argument("name")
@_with(_override_options(False))
@json_flag
@click.pass_context
def tier_add(ctx: click.Context, /, name: str, **values: int | str | None) -> None:
    """Define tier NAME (--content-days required; limits default to unlimited)."""
    given = changes_of(values)
    if not name.strip():
        fail("tier name must not be empty")
    if given.get("content_days") is None:
        fail("--content-days is required (a whole number of days)")
    try:
        check_retention(given["content_days"], given.get("metadata_days"))
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        try:
            directory.add_tier(s.conn, name, given)
        except errors.UniqueViolation:
            fail(f"tier {name!r} already exists")
        migrate.ensure_partitions(s.conn)
    say(f"tier {name} added", tier=name, values=given)


@tier.command("set")
@click.argument("name")
@_with(_override_options(False))
@json_flag
@click.pass_context
def tier_set(ctx: click.Context, /, name: str, **values: int | str | None) -> None:
    """Change tier NAME ('unlimited' for no limit); every organisation on it follows.

    Refused if an organisation on it would then keep content longer than metadata.
    """
    changes = changes_of(values)
    if not changes:
        fail("nothing to change: give at least one option")
    if "content_days" in changes and changes["content_days"] is None:
        fail("--content-days cannot be unlimited")
    with session(ctx) as s:
        try:
            if not directory.update_tier(s.conn, name, changes):
                fail(f"no tier {name!r} (see `postkeep tier list`)")
        except ValueError as exc:
            fail(f"tier {name}: {exc}; nothing changed")
        migrate.ensure_partitions(s.conn)
    say(f"tier {name}: " + ", ".join(
        f"{k}={'unlimited' if v is None else v}" for k, v in changes.items()),
        tier=name, changes=changes)


@tier.command("remove")
@click.argument("name")
@destructive
@json_flag
@click.pass_context
def tier_remove(ctx: click.Context, name: str, yes: bool, dry_run: bool) -> None:
    """Remove tier NAME; refused while an organisation is on it."""
    with session(ctx) as s:
        t = directory.get_tier(s.conn, name)
        if t is None:
            fail(f"no tier {name!r} (see `postkeep tier list`)")
        if t.organisations:
            fail(f"tier {name!r} is used by {t.organisations} organisation(s);"
                 " move them first (postkeep org set ORG --tier ...)")
        if dry_run:
            say(f"would remove tier {name}", dry_run=True, tier=name)
            return
        confirm(f"remove tier {name}", yes)
        directory.remove_tier(s.conn, name)
    say(f"tier {name} removed", tier=name)


def _domain_or_fail(text: str) -> str:
    try:
        return check_domain(text)
    except ValueError as exc:
        fail(str(exc))


@domain.command("list")
@click.option("--org", "org_name", help="Only this organisation's domains.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def domain_list(ctx: click.Context, org_name: str | None, as_json: bool) -> None:
    """Sender domains, their organisation, bounce domain and DKIM key count."""
    with session(ctx) as s:
        rows = directory.list_domains(s.conn, find_org(s.conn, org_name).id
                                      if org_name else None)
    if as_json:
        click.echo(json.dumps([{**d.__dict__, "org_id": str(d.org_id)} for d in rows],
                              indent=2))
        return
    click.echo(f"{'DOMAIN':32}  {'ORGANISATION':24}  {'DKIM':>4}  BOUNCES TO")
    for d in rows:
        click.echo(f"{d.domain:32}  {d.org_name:24}  {d.dkim_keys:>4}"
                   f"  {d.bounce_domain or '(platform default)'}")


@domain.command("remove")
@click.argument("domain_name", metavar="DOMAIN")
@destructive
@json_flag
@click.pass_context
def domain_remove(ctx: click.Context, domain_name: str, yes: bool, dry_run: bool) -> None:
    """Remove DOMAIN from its organisation, with its DKIM keys.

    Mail already captured keeps its rows and content; new mail from DOMAIN is
    no longer attributed to the organisation.
    """
    name = _domain_or_fail(domain_name)
    with session(ctx) as s:
        found = directory.list_domains(s.conn, domain=name)
        if not found:
            fail(f"no domain {name!r} (see `postkeep domain list`)")
        d = found[0]
        what = f"remove domain {name} from {d.org_name} with its {d.dkim_keys} DKIM key(s)"
        if dry_run:
            say(f"would {what}", dry_run=True, domain=name, org=d.org_name,
                dkim_keys=d.dkim_keys)
            return
        confirm(what, yes)
        directory.remove_domain(s.conn, name)
    say(f"removed domain {name} from {d.org_name} ({d.dkim_keys} DKIM key(s) deleted)",
        domain=name, org=d.org_name, dkim_keys_deleted=d.dkim_keys)


@domain.command("rename")
@click.argument("old", metavar="DOMAIN")
@click.argument("new", metavar="NEW_DOMAIN")
@json_flag
@click.pass_context
def domain_rename(ctx: click.Context, old: str, new: str) -> None:
    """Rename DOMAIN (a typo, say); refused while it has DKIM keys, which
    are published under its old name (add the new domain and keygen instead)."""
    old_name, new_name = _domain_or_fail(old), _domain_or_fail(new)
    with session(ctx) as s:
        found = directory.list_domains(s.conn, domain=old_name)
        if not found:
            fail(f"no domain {old_name!r} (see `postkeep domain list`)")
        if found[0].dkim_keys:
            fail(f"domain {old_name!r} has {found[0].dkim_keys} DKIM key(s) published under"
                 f" that name: add {new_name} (`postkeep domain add`) and give it its own keys")
        try:
            directory.rename_domain(s.conn, old_name, new_name)
        except errors.UniqueViolation:
            fail(f"domain {new_name!r} already exists")
    say(f"{old_name} -> {new_name} ({found[0].org_name})", old=old_name, new=new_name,
        org=found[0].org_name)


@submitter.command("list")
@click.option("--org", "org_name", help="Only this organisation's submitters.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def submitter_list(ctx: click.Context, org_name: str | None, as_json: bool) -> None:
    """SASL submitters and their organisation."""
    with session(ctx) as s:
        rows = directory.list_submitters(s.conn, find_org(s.conn, org_name).id
                                         if org_name else None)
    if as_json:
        click.echo(json.dumps([{**u.__dict__, "org_id": str(u.org_id)} for u in rows],
                              indent=2))
        return
    click.echo(f"{'USERNAME':32}  ORGANISATION")
    for u in rows:
        click.echo(f"{u.username:32}  {u.org_name}")


@submitter.command("remove")
@click.argument("username")
@destructive
@json_flag
@click.pass_context
def submitter_remove(ctx: click.Context, username: str, yes: bool, dry_run: bool) -> None:
    """Stop USERNAME submitting for its organisation (its captured mail stays)."""
    with session(ctx) as s:
        found = directory.list_submitters(s.conn, username=username)
        if not found:
            fail(f"no submitter {username!r} (see `postkeep submitter list`)")
        what = f"remove submitter {username} of {found[0].org_name}"
        if dry_run:
            say(f"would {what}", dry_run=True, username=username, org=found[0].org_name)
            return
        confirm(what, yes)
        directory.remove_submitter(s.conn, username)
    say(f"removed submitter {username} of {found[0].org_name}", username=username,
        org=found[0].org_name)


@submitter.command("rename")
@click.argument("old", metavar="USERNAME")
@click.argument("new", metavar="NEW_USERNAME")
@json_flag
@click.pass_context
def submitter_rename(ctx: click.Context, old: str, new: str) -> None:
    """Rename SASL submitter USERNAME (same organisation)."""
    if not new.strip():
        fail("username must not be empty")
    with session(ctx) as s:
        try:
            if not directory.rename_submitter(s.conn, old, new):
                fail(f"no submitter {old!r} (see `postkeep submitter list`)")
        except errors.UniqueViolation:
            fail(f"submitter {new!r} already exists")
    say(f"{old} -> {new}", old=old, new=new)


COMMANDS: list[click.Group] = [org, tier, domain, submitter]
