"""`postkeep limits`: rate-limit use, reset and shadow mode.

A click adapter over `postkeep.storage.limits`.  Limits, overrides and shadow
flags are read by postkeep-policyd from PostgreSQL (cached for
`policyd.directory_cache_seconds`), so changes here take effect without a
restart.
"""

from __future__ import annotations

import json
from typing import Any

import click
import psycopg

from postkeep.cli.common import confirm, destructive, fail, iso, json_flag, say, session
from postkeep.storage.metadata import limits
from postkeep.storage.metadata.limits import OrgLimits, Usage

_WINDOW = {"messages": "hour", "recipients": "day", "bytes": "day"}


def format_usage(org: OrgLimits, rows: list[Usage]) -> str:
    """Use and remaining per window, one line each (pure)."""
    lines = [f"{org.name} ({org.org_id}) tier {org.tier}"
             f"{'  [shadow: decides and logs, never defers]' if org.shadow else ''}"]
    for u in rows:
        if u.limit is None:
            left = "unlimited"
        else:
            left = f"limit {u.limit}, remaining {max(0, u.limit - u.used)}"
        start = f"{u.window_start:%Y-%m-%d %H:%M}"
        lines.append(f"  {u.kind:<10} this {_WINDOW[u.kind]} (from {start} UTC):"
                     f" used {u.used}, {left}")
    return "\n".join(lines)


def usage_to_json(org: OrgLimits, rows: list[Usage]) -> dict[str, Any]:
    """`limits show --json` (pure)."""
    return {"org_id": str(org.org_id), "name": org.name, "tier": org.tier,
            "shadow": org.shadow,
            "windows": [{"kind": u.kind, "window": _WINDOW[u.kind],
                         "window_start": iso(u.window_start), "used": u.used,
                         "limit": u.limit,
                         "remaining": None if u.limit is None else max(0, u.limit - u.used)}
                        for u in rows]}


def _limits_of(conn: psycopg.Connection, name: str) -> OrgLimits:
    org = limits.find_by_name(conn, name)
    if org is None:
        fail(f"no organisation {name!r} (see `postkeep org list`)")
    return org


@click.group("limits")
def limits_group() -> None:
    """Rate limits: use per window, reset, shadow mode."""


@limits_group.command("show")
@click.argument("org")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def show(ctx: click.Context, org: str, as_json: bool) -> None:
    """Use and remaining of ORG (name or id) in the current windows."""
    with session(ctx) as s:
        lim = _limits_of(s.conn, org)
        rows = limits.usage(s.conn, lim, s.cfg.policyd.windows)
    click.echo(json.dumps(usage_to_json(lim, rows), indent=2) if as_json
               else format_usage(lim, rows))


@limits_group.command("reset")
@click.argument("org")
@destructive
@json_flag
@click.pass_context
def reset(ctx: click.Context, org: str, yes: bool, dry_run: bool) -> None:
    """Forget ORG's counters and open reservations (its windows start empty)."""
    with session(ctx) as s:
        lim = _limits_of(s.conn, org)
        what = f"reset the rate counters of {lim.name}"
        if dry_run:
            used = ", ".join(f"{u.kind} {u.used}" for u in
                             limits.usage(s.conn, lim, s.cfg.policyd.windows))
            say(f"would {what} (now used: {used})", dry_run=True, org=lim.name,
                org_id=str(lim.org_id))
            return
        confirm(what, yes)
        n = limits.reset(s.conn, lim.org_id)
        say(f"{lim.name}: counters reset ({n} rows removed)", org=lim.name,
            org_id=str(lim.org_id), rows_removed=n)


@limits_group.command("shadow")
@click.argument("target")
@click.argument("state", type=click.Choice(["on", "off", "inherit"]))
@click.option("--tier", "is_tier", is_flag=True, help="TARGET is a tier, not an organisation.")
@json_flag
@click.pass_context
def shadow(ctx: click.Context, target: str, state: str, is_tier: bool) -> None:
    """Shadow mode for an organisation or (--tier) a tier: decide and log, answer DUNNO.

    STATE 'inherit' (organisations only) follows the tier again.
    """
    with session(ctx) as s:
        if is_tier:
            if state == "inherit":
                fail("a tier has no 'inherit' state: use on or off")
            if not limits.set_tier_shadow(s.conn, target, state == "on"):
                fail(f"no tier {target!r}")
            say(f"tier {target}: shadow {state}", tier=target, shadow=state)
            return
        lim = _limits_of(s.conn, target)
        limits.set_org_shadow(s.conn, lim.org_id, None if state == "inherit" else state == "on")
        say(f"{lim.name}: shadow {state}", org=lim.name, org_id=str(lim.org_id), shadow=state)


COMMANDS: list[click.Group] = [limits_group]
