"""`postkeep stats`: an organisation's statistics by day, campaign, type or direction.

A click adapter over `postkeep.storage.lifecycle.stats`.  The days asked for
are first recomputed (the same exact, idempotent rollup the retention run
does: rows present plus the counts of rows already expired), so the figures
include the last minute's outcomes and replies, and stay after the
messages' metadata has expired.  Rates are per recipient sent.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import click

from postkeep.cli.common import fail, find_org, parse_since, session
from postkeep.storage.lifecycle import stats
from postkeep.storage.lifecycle.stats import Group

DEFAULT_DAYS = 30


def _day(text: str | None, now: datetime, default: date) -> date:
    return default if text is None else parse_since(text, now).astimezone(UTC).date()


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def format_groups(by: str, rows: list[Group]) -> str:
    """The table `postkeep stats` prints (pure)."""
    if not rows:
        return "no mail in this period"
    head = (f"{by.upper():24}  {'MESSAGES':>8}  {'SENT':>6}  {'DELIVERED':>9}  {'BOUNCED':>7}"
            f"  {'COMPLAINED':>10}  {'REPLIED':>7}  {'AUTO':>5}  {'DELIV%':>6}  {'BOUNCE%':>7}"
            f"  {'COMPL%':>6}  {'REPLY%':>6}")
    lines = [head]
    for g in rows:
        lines.append(
            f"{(g.key or '-'):24}  {g.messages:>8}  {g.sent:>6}  {g.delivered:>9}"
            f"  {g.bounced:>7}  {g.complained:>10}  {g.replied:>7}  {g.auto_replied:>5}"
            f"  {_pct(g.rate(g.delivered)):>6}  {_pct(g.rate(g.bounced)):>7}"
            f"  {_pct(g.rate(g.complained)):>6}  {_pct(g.rate(g.replied)):>6}")
    return "\n".join(lines)


@click.command("stats")
@click.option("--org", "org_name", required=True, help="Organisation name or id.")
@click.option("--since", help=f"First day: ISO 8601 date or an age (7d, 4w);"
                              f" default {DEFAULT_DAYS} days ago.")
@click.option("--until", help="Last day (inclusive): ISO 8601 date or an age; default today.")
@click.option("--by", type=click.Choice(sorted(stats.BY)), default="day", show_default=True,
              help="What to sum by: campaign is outbound mail with a campaign_id tag.")
@click.option("--direction", type=click.Choice(["outbound", "inbound"]),
              help="Only this direction.")
@click.option("--json", "as_json", is_flag=True, help="JSON: a list of groups with rates.")
@click.pass_context
def stats_command(ctx: click.Context, org_name: str, since: str | None, until: str | None,
                  by: str, direction: str | None, as_json: bool) -> None:
    """Messages, recipients sent, delivered, bounced, complained and replied in ORG,
    with delivery, bounce, complaint and reply rates (per recipient sent)."""
    now = datetime.now(UTC)
    today = now.date()
    try:
        first = _day(since, now, today - timedelta(days=DEFAULT_DAYS))
        last = _day(until, now, today)
    except ValueError as exc:
        fail(str(exc).replace("--since", "--since/--until"))
    if last < first:
        fail(f"--until {last} is before --since {first}")
    with session(ctx) as s:
        org = find_org(s.conn, org_name)
        stats.rollup(s.conn, first, last)
        rows = stats.grouped(s.conn, org.id, first, last, by, direction)
    if as_json:
        click.echo(json.dumps({"org": org.name, "since": first.isoformat(),
                               "until": last.isoformat(), "by": by,
                               "groups": [g.as_dict() for g in rows]}, indent=2))
    else:
        click.echo(format_groups(by, rows))


COMMANDS = [stats_command]
