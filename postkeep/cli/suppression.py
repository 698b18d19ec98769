"""`postkeep suppression`: an organisation's suppression list.

A click adapter over `postkeep.storage.metadata.suppression`.  postkeep-policyd
reads the list at RCPT (cached for `policyd.suppression_cache_seconds`), so
changes here take effect within that time, without a restart.  Addresses
are compared with the local part exact and the domain case-insensitive.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click

from postkeep.cli.common import (
    ParamType,
    confirm,
    destructive,
    fail,
    find_org,
    iso,
    json_flag,
    say,
    session,
)
from postkeep.storage.metadata import suppression
from postkeep.storage.metadata.suppression import Suppression

_FIELDS = ("address", "reason", "source", "detail", "message_id", "suppressed_at",
           "expires_at")


def to_json(e: Suppression) -> dict[str, Any]:
    """One entry as `--json` prints it (pure)."""
    return {"address": e.address, "reason": e.reason, "source": e.source, "detail": e.detail,
            "message_id": None if e.message_id is None else str(e.message_id),
            "suppressed_at": iso(e.suppressed_at), "expires_at": iso(e.expires_at)}


def format_entries(rows: list[Suppression]) -> str:
    """One line per entry (pure)."""
    if not rows:
        return "no suppressed addresses"
    lines = []
    for e in rows:
        until = f"until {e.expires_at:%Y-%m-%d}" if e.expires_at else "never expires"
        detail = f" ({e.detail})" if e.detail else ""
        lines.append(f"{e.address}  {e.reason}{detail}  since {e.suppressed_at:%Y-%m-%d %H:%M}"
                     f" UTC  {until}  [{e.source}]")
    return "\n".join(lines)


def to_csv(rows: list[Suppression]) -> str:
    """`export` without --json: CSV with a header line (pure)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(_FIELDS)
    for e in rows:
        j = to_json(e)
        w.writerow(["" if j[f] is None else j[f] for f in _FIELDS])
    return out.getvalue()


class Days(ParamType):  # (common.ParamType: click < 8.4)
    """A whole number of days, or 'never'/'off' (None)."""

    name = "N|never"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value is None:
            return value
        text = str(value).strip().lower()
        if text in ("never", "off", "none", "unlimited"):
            return 0
        try:
            n = int(text)
        except ValueError:
            self.fail(f"{value!r}: expected a whole number or 'never'", param, ctx)
        if n < 1:
            self.fail(f"{value!r}: must be at least 1 (or 'never')", param, ctx)
        return n


@click.group("suppression")
def suppression_group() -> None:
    """Suppression lists: addresses an organisation's mail is refused to at RCPT."""


@suppression_group.command("list")
@click.argument("org")
@click.option("--reason", type=click.Choice(suppression.REASONS), default=None)
@click.option("--address", default=None, help="Only this address.")
@click.option("--all", "include_expired", is_flag=True, help="Include expired entries.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_cmd(ctx: click.Context, org: str, reason: str | None, address: str | None,
             include_expired: bool, limit: int, as_json: bool) -> None:
    """ORG's suppressed addresses, newest first."""
    with session(ctx) as s:
        o = find_org(s.conn, org)
        rows = suppression.entries(s.conn, o.id, address=address, reason=reason,
                                   include_expired=include_expired, limit=limit)
    click.echo(json.dumps([to_json(e) for e in rows], indent=2) if as_json
               else format_entries(rows))


@suppression_group.command("export")
@click.argument("org")
@click.option("--all", "include_expired", is_flag=True, help="Include expired entries.")
@click.option("--json", "as_json", is_flag=True, help="JSON array instead of CSV.")
@click.pass_context
def export(ctx: click.Context, org: str, include_expired: bool, as_json: bool) -> None:
    """Every entry of ORG's list: CSV (with a header line) or JSON on stdout."""
    with session(ctx) as s:
        o = find_org(s.conn, org)
        rows = suppression.entries(s.conn, o.id, include_expired=include_expired)
    if as_json:
        click.echo(json.dumps([to_json(e) for e in rows], indent=2))
    else:
        click.echo(to_csv(rows), nl=False)


@suppression_group.command("add")
@click.argument("org")
@click.argument("addresses", nargs=-1, required=True)
@click.option("--reason", type=click.Choice(suppression.REASONS), default="manual",
              show_default=True)
@click.option("--note", default=None, help="Detail shown in the refusal and the list.")
@click.option("--days", type=Days(), default=None,
              help="Until expiry (default: the tier's suppression_days; 'never').")
@json_flag
@click.pass_context
def add(ctx: click.Context, org: str, addresses: tuple[str, ...], reason: str,
        note: str | None, days: int | None) -> None:
    """Put ADDRESSES on ORG's list (an entry already there is replaced)."""
    for a in addresses:
        if "@" not in a:
            fail(f"address {a!r}: expected local@domain")
    with session(ctx) as s:
        o = find_org(s.conn, org)
        added: list[dict[str, Any]] = []
        with s.conn.transaction():
            for a in addresses:
                expires = suppression.suppress(s.conn, o.id, a, reason, "cli", detail=note,
                                               days=days)
                added.append({"address": suppression.normalise(a),
                              "expires_at": iso(expires) if expires else None})
    say("\n".join(f"{o.name}: {e['address']} suppressed ({reason}), "
                  + (f"until {e['expires_at']}" if e["expires_at"] else "never expires")
                  for e in added), org=o.name, org_id=str(o.id), reason=reason, added=added)


@suppression_group.command("remove")
@click.argument("org")
@click.argument("addresses", nargs=-1, required=True)
@destructive
@json_flag
@click.pass_context
def remove(ctx: click.Context, org: str, addresses: tuple[str, ...], yes: bool,
           dry_run: bool) -> None:
    """Take ADDRESSES off ORG's list: mail to them is accepted again."""
    with session(ctx) as s:
        o = find_org(s.conn, org)
        found = [a for a in addresses if suppression.entries(s.conn, o.id, address=a,
                                                             include_expired=True)]
        missing = [a for a in addresses if a not in found]
        if missing:
            fail(f"{o.name}: not on the suppression list: {', '.join(missing)}")
        what = f"remove {len(found)} address(es) from {o.name}'s suppression list"
        if dry_run:
            shown = [suppression.normalise(a) for a in found]
            say(f"would {what}: {', '.join(shown)}", dry_run=True, org=o.name, addresses=shown)
            return
        confirm(what, yes)
        with s.conn.transaction():
            for a in found:
                suppression.unsuppress(s.conn, o.id, a)
        say(f"{o.name}: removed {len(found)} address(es)", org=o.name, org_id=str(o.id),
            removed=[suppression.normalise(a) for a in found])


@suppression_group.command("purge")
@destructive
@json_flag
@click.pass_context
def purge(ctx: click.Context, yes: bool, dry_run: bool) -> None:
    """Delete expired entries and soft-bounce counts past their window (every organisation).

    Readers ignore both already; postkeep-storage runs this every
    storage.maintenance_seconds.
    """
    with session(ctx) as s:
        found = suppression.purge(s.conn, dry_run=True)
        what = (f"delete {found.expired} expired suppression(s) and {found.soft_bounces}"
                " stale soft-bounce count(s)")
        if dry_run:
            say(f"would {what}", dry_run=True, expired=found.expired,
                soft_bounces=found.soft_bounces)
            return
        confirm(what, yes)
        done = suppression.purge(s.conn)
    say(f"deleted {done.expired} expired suppression(s) and {done.soft_bounces}"
        " stale soft-bounce count(s)", expired=done.expired, soft_bounces=done.soft_bounces)


@suppression_group.command("mode")
@click.argument("org")
@click.argument("mode", type=click.Choice(suppression.MODES))
@json_flag
@click.pass_context
def mode(ctx: click.Context, org: str, mode: str) -> None:
    """enforce: refuse suppressed recipients at RCPT; shadow: log and count only."""
    with session(ctx) as s:
        o = find_org(s.conn, org)
        suppression.set_mode(s.conn, o.id, mode)
    say(f"{o.name}: suppression {mode}", org=o.name, org_id=str(o.id), mode=mode)


@suppression_group.command("tier")
@click.argument("tier")
@click.option("--days", type=Days(), default=None,
              help="Entries expire after N days ('never').")
@click.option("--soft-bounces", type=Days(), default=None,
              help="Suppress after N soft bounces in the window ('never': soft bounces"
              " never suppress).")
@click.option("--soft-window-days", type=click.IntRange(min=1), default=None)
@json_flag
@click.pass_context
def tier(ctx: click.Context, tier: str, days: int | None, soft_bounces: int | None,
         soft_window_days: int | None) -> None:
    """Show or change TIER's suppression settings."""
    changes: dict[str, int | None] = {}
    if days is not None:
        changes["suppression_days"] = days or None
    if soft_bounces is not None:
        changes["soft_bounce_limit"] = soft_bounces or None
    if soft_window_days is not None:
        changes["soft_bounce_window_days"] = soft_window_days
    with session(ctx) as s:
        if not suppression.set_tier(s.conn, tier, changes):
            fail(f"no tier {tier!r} (see `postkeep tier list`)")
        t = suppression.tier_settings(s.conn, tier)
    assert t is not None
    expiry = f"{t.suppression_days} days" if t.suppression_days else "never"
    soft = (f"after {t.soft_bounce_limit} in {t.soft_bounce_window_days} days"
            if t.soft_bounce_limit else "never")
    say(f"tier {t.tier}: entries expire {expiry}; soft bounces suppress {soft}", tier=t.tier,
        suppression_days=t.suppression_days, soft_bounce_limit=t.soft_bounce_limit,
        soft_bounce_window_days=t.soft_bounce_window_days)


COMMANDS: list[click.Group] = [suppression_group]
