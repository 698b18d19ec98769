"""`postkeep stats`: an organisation's statistics by day, campaign, type, direction or
the values of a tag; `postkeep stats-tags list|add|remove`: which tag keys are counted.

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

from postkeep.cli.common import (
    confirm,
    destructive,
    fail,
    find_org,
    json_flag,
    parse_since,
    say,
    session,
)
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
              help="What to sum by: campaign is outbound mail with a campaign_id tag; tag is"
                   " the values of --tag KEY (see `postkeep stats-tags`).")
@click.option("--tag", "tag_key", metavar="KEY",
              help="With --by tag: the tag key (one `postkeep stats-tags list` shows).")
@click.option("--direction", type=click.Choice(["outbound", "inbound"]),
              help="Only this direction.")
@click.option("--json", "as_json", is_flag=True, help="JSON: a list of groups with rates.")
@click.pass_context
def stats_command(ctx: click.Context, org_name: str, since: str | None, until: str | None,
                  by: str, tag_key: str | None, direction: str | None, as_json: bool) -> None:
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
    if (by == "tag") != (tag_key is not None):
        fail("--by tag needs --tag KEY, and --tag goes with --by tag")
    with session(ctx) as s:
        if tag_key is not None and tag_key not in stats.tag_keys(s.conn):
            fail(f"--tag {tag_key}: not a counted tag key (`postkeep stats-tags add {tag_key}`)")
        org = find_org(s.conn, org_name)
        stats.rollup(s.conn, first, last)
        rows = stats.grouped(s.conn, org.id, first, last, by, direction, tag_key)
    if as_json:
        click.echo(json.dumps({"org": org.name, "since": first.isoformat(),
                               "until": last.isoformat(), "by": by, "tag": tag_key,
                               "groups": [g.as_dict() for g in rows]}, indent=2))
    else:
        click.echo(format_groups(tag_key or by, rows))


@click.group("stats-tags")
def stats_tags_group() -> None:
    """The tag keys whose values get daily statistics (besides campaign_id)."""


@stats_tags_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def stats_tags_list(ctx: click.Context, as_json: bool) -> None:
    """The tag keys counted."""
    with session(ctx) as s:
        keys = stats.tag_keys(s.conn)
    if as_json:
        click.echo(json.dumps(keys))
    else:
        click.echo("\n".join(keys) if keys else "no tag keys counted (campaign_id always is)")


@stats_tags_group.command("add")
@click.argument("key")
@json_flag
@click.pass_context
def stats_tags_add(ctx: click.Context, key: str) -> None:
    """Count the values of tag KEY per day (name keys with few values: a template,
    a stream; never one per message or recipient).  Counting covers the rows
    present at the next rollup and everything after; rows already expired
    were counted by no one."""
    with session(ctx) as s:
        try:
            added = stats.add_tag_key(s.conn, key)
        except ValueError as exc:
            fail(str(exc))
    say(f"tag key {key} {'counted from now on' if added else 'was counted already'}",
        tag_key=key, added=added)


@stats_tags_group.command("remove")
@click.argument("key")
@destructive
@json_flag
@click.pass_context
def stats_tags_remove(ctx: click.Context, key: str, yes: bool, dry_run: bool) -> None:
    """Stop counting tag KEY and delete its statistics."""
    with session(ctx) as s:
        rows = stats.remove_tag_key(s.conn, key, dry_run=True)
        if rows is None:
            fail(f"tag key {key!r} is not counted (see `postkeep stats-tags list`)")
        what = f"stop counting tag key {key} and delete its {rows} statistics row(s)"
        if dry_run:
            say(f"would {what}", dry_run=True, tag_key=key, rows=rows)
            return
        confirm(what, yes)
        deleted = stats.remove_tag_key(s.conn, key)
    say(f"tag key {key} no longer counted; {deleted} statistics row(s) deleted",
        tag_key=key, rows=deleted)


COMMANDS: list[click.Command] = [stats_command, stats_tags_group]
