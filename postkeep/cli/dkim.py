"""`postkeep dkim`: DKIM keys per domain: create, publish, rotate.

A click adapter over `postkeep.storage.dkim_keys`, in the shape of
`postkeep.cli.common`: each command loads the configuration, opens one connection,
calls the store and prints with a small pure formatter defined here.  Only
`keygen` needs the master key; listing and DNS output read public data only.

Rotation without restarting the milter: `keygen --selector new` stages a key
(publish its record), `activate DOMAIN new --at T` makes it sign from T and
keeps the previous key published for `--grace`; the milter reloads its key
ring when `dkim_key_changes` moves and picks the active key by time.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from postkeep.cli.common import (
    check_domain,
    confirm,
    destructive,
    fail,
    find_org,
    iso,
    json_flag,
    say,
    session,
)
from postkeep.signing_keys import Algorithm
from postkeep.storage.metadata import directory, dkim_keys
from postkeep.storage.metadata.dkim_keys import DkimKey, DkimKeyError, State

_ALGORITHMS: dict[str, Algorithm] = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "": "days"}
DEFAULT_GRACE = "7d"

# --- pure helpers -----------------------------------------------------------


def parse_time(option: str, text: str, now: datetime) -> datetime:
    """'now' or an ISO 8601 time (UTC if no offset); ValueError naming OPTION."""
    if text.strip().lower() == "now":
        return now
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{option} {text!r}: expected 'now' or ISO 8601 (2026-03-01T12:00:00Z)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def parse_duration(option: str, text: str) -> timedelta:
    """A duration like 7d, 12h, 30m, 2w or 0; ValueError naming OPTION."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{option} {text!r}: expected a duration like 7d, 12h, 30m, 2w or 0")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


_SELECTOR_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def check_selector(text: str) -> str:
    """The selector lower-cased if every dot-separated label is a DNS label."""
    name = text.strip().lower()
    if not name or not all(_SELECTOR_LABEL.match(label) for label in name.split(".")):
        raise ValueError(
            f"selector {text!r}: expected DNS labels of letters, digits and hyphens"
            " (e.g. s2026, mail-2026-03)"
        )
    return name


def key_to_json(key: DkimKey, state: State) -> dict[str, Any]:
    """A key (public data only) as a JSON-ready dict."""
    return {
        "domain": key.domain,
        "selector": key.selector,
        "algorithm": key.algorithm,
        "state": state,
        "created_at": iso(key.created_at),
        "active_from": iso(key.active_from),
        "retire_after": iso(key.retire_after),
        "dns_name": dkim_keys.dns_name(key.domain, key.selector),
        "dns_txt": key.txt_value,
    }


def format_keys(states: list[tuple[DkimKey, State]]) -> str:
    """A fixed-width table of keys and their states."""

    def t(when: datetime | None) -> str:
        return "-" if when is None else f"{when.astimezone(UTC):%Y-%m-%d %H:%M}"

    lines = [
        f"{'DOMAIN':32}  {'SELECTOR':16}  {'ALGORITHM':14}  {'STATE':7}"
        f"  {'ACTIVE FROM (UTC)':17}  RETIRE AFTER (UTC)"
    ]
    lines += [
        f"{k.domain:32}  {k.selector:16}  {k.algorithm:14}  {state:7}"
        f"  {t(k.active_from):17}  {t(k.retire_after)}"
        for k, state in states
    ]
    return "\n".join(lines)


# --- the click adapter ------------------------------------------------------


def _domain_arg(text: str) -> str:
    try:
        return check_domain(text)
    except ValueError as exc:
        fail(str(exc))


def _known_domain(conn: Any, name: str) -> None:
    if directory.find_by_domain(conn, name) is None:
        fail(f"unknown domain {name!r} (add it with `postkeep domain add ORG {name}`)")


@click.group()
def dkim() -> None:
    """DKIM signing keys per domain: keygen, list, dns, activate, retire."""


@dkim.command("keygen")
@click.argument("domain_name", metavar="DOMAIN")
@click.option("--selector", required=True, help="DNS selector, e.g. s2026.")
@click.option(
    "--algorithm", type=click.Choice(sorted(_ALGORITHMS)), default="rsa", show_default=True,
    help="rsa (2048 bits) or ed25519 (RFC 8463, as a second signature).",
)
@click.option(
    "--active-from", metavar="ISO|now",
    help="Activate at this time (default: staged until `postkeep dkim activate`).",
)
@click.option(
    "--grace", default=DEFAULT_GRACE, show_default=True,
    help="With --active-from: how long the key it replaces stays published.",
)
@json_flag
@click.pass_context
def keygen(
    ctx: click.Context, domain_name: str, selector: str, algorithm: str,
    active_from: str | None, grace: str,
) -> None:
    """Create a key for DOMAIN and print the DNS TXT record to publish."""
    name = _domain_arg(domain_name)
    now = datetime.now(UTC)
    try:
        sel = check_selector(selector)
        at = parse_time("--active-from", active_from, now) if active_from else None
        grace_period = parse_duration("--grace", grace)
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        master = dkim_keys.load_master_key(s.cfg.dkim)
        _known_domain(s.conn, name)
        try:
            key = dkim_keys.create_key(s.conn, master, name, sel, _ALGORITHMS[algorithm])
            if at is not None:
                key = dkim_keys.activate(s.conn, name, sel, at, grace_period).key
        except DkimKeyError as exc:
            fail(str(exc))
    when = "staged" if at is None else f"active from {iso(at)}"
    say(key.zone_record, domain=name, selector=sel, algorithm=key.algorithm,
        dns_name=dkim_keys.dns_name(name, sel) + ".", zone_record=key.zone_record,
        active_from=None if at is None else iso(at))
    click.echo(
        f"postkeep: created {key.algorithm} key {sel} for {name} ({when}); publish the"
        " record above" + ("" if at else f", then `postkeep dkim activate {name} {sel}`"),
        err=True,
    )


@dkim.command("list")
@click.option("--domain", "domain_name", metavar="DOMAIN", help="Only this domain's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_(ctx: click.Context, domain_name: str | None, as_json: bool) -> None:
    """List keys with their state now: staged, active, grace or retired."""
    name = _domain_arg(domain_name) if domain_name else None
    now = datetime.now(UTC)
    with session(ctx) as s:
        if name:
            _known_domain(s.conn, name)
        states = dkim_keys.key_states(dkim_keys.list_keys(s.conn, name), now)
    if as_json:
        click.echo(json.dumps([key_to_json(k, st) for k, st in states], indent=2))
    else:
        click.echo(format_keys(states))


@dkim.command("dns")
@click.argument("domain_name", metavar="DOMAIN")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of records.")
@click.pass_context
def dns(ctx: click.Context, domain_name: str, as_json: bool) -> None:
    """Print every TXT record DOMAIN must publish now (active, staged and grace keys)."""
    name = _domain_arg(domain_name)
    now = datetime.now(UTC)
    with session(ctx) as s:
        _known_domain(s.conn, name)
        keys = dkim_keys.published(dkim_keys.list_keys(s.conn, name), now)
    if not keys:
        fail(f"no key to publish for {name} (create one with `postkeep dkim keygen {name}`)")
    if as_json:
        click.echo(json.dumps([{"name": dkim_keys.dns_name(k.domain, k.selector) + ".",
                                "type": "TXT", "selector": k.selector,
                                "algorithm": k.algorithm, "value": k.txt_value,
                                "zone_record": k.zone_record} for k in keys], indent=2))
        return
    for k in keys:
        click.echo(k.zone_record)


@dkim.command("activate")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("selector")
@click.option("--at", "at_text", default="now", show_default=True, metavar="ISO|now",
              help="When the key starts signing.")
@click.option("--grace", default=DEFAULT_GRACE, show_default=True,
              help="How long the replaced key stays published after --at (7d, 12h, 0).")
@json_flag
@click.pass_context
def activate(
    ctx: click.Context, domain_name: str, selector: str, at_text: str, grace: str
) -> None:
    """Make SELECTOR sign DOMAIN's mail from --at; the key it replaces retires after --grace."""
    name = _domain_arg(domain_name)
    try:
        at = parse_time("--at", at_text, datetime.now(UTC))
        grace_period = parse_duration("--grace", grace)
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        _known_domain(s.conn, name)
        try:
            done = dkim_keys.activate(s.conn, name, selector.lower(), at, grace_period)
        except DkimKeyError as exc:
            fail(str(exc))
    lines = [f"{name} {done.key.selector} ({done.key.algorithm}): active from {iso(at)}"]
    lines += [f"{name} {old.selector} ({old.algorithm}): replaced at {iso(at)},"
              f" published until {iso(old.retire_after)}" for old in done.superseded]
    say("\n".join(lines), domain=name, selector=done.key.selector, active_from=iso(at),
        superseded=[{"selector": old.selector, "retire_after": iso(old.retire_after)}
                    for old in done.superseded])


@dkim.command("retire")
@click.argument("domain_name", metavar="DOMAIN")
@click.argument("selector")
@click.option("--at", "at_text", default="now", show_default=True, metavar="ISO|now",
              help="When the key stops signing and its record may be removed.")
@destructive
@json_flag
@click.pass_context
def retire(ctx: click.Context, domain_name: str, selector: str, at_text: str, yes: bool,
           dry_run: bool) -> None:
    """Stop using SELECTOR for DOMAIN at --at; its DNS record may go after that."""
    name = _domain_arg(domain_name)
    try:
        at = parse_time("--at", at_text, datetime.now(UTC))
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        _known_domain(s.conn, name)
        found = [k for k in dkim_keys.list_keys(s.conn, name) if k.selector == selector.lower()]
        if found and (dry_run or not yes):
            what = (f"retire {name} {found[0].selector} ({found[0].algorithm}) from {iso(at)}:"
                    " it stops signing then")
            if dry_run:
                say(f"would {what}", dry_run=True, domain=name, selector=found[0].selector,
                    retire_at=iso(at))
                return
            confirm(what, yes)
        try:
            key = dkim_keys.retire(s.conn, name, selector.lower(), at)
        except DkimKeyError as exc:
            fail(str(exc))
    say(f"{name} {key.selector} ({key.algorithm}): retired from {iso(at)}", domain=name,
        selector=key.selector, retire_at=iso(at))


@dkim.command("missing-key")
@click.argument("org_name", metavar="ORG")
@click.argument("policy", type=click.Choice(["tempfail", "unsigned"]))
@json_flag
@click.pass_context
def missing_key(ctx: click.Context, org_name: str, policy: str) -> None:
    """What ORG's mail does when it cannot be signed: with 'tempfail' (the
    default) its domain without an active key gets 451 4.7.5 and a From: domain
    that is not ORG's gets 550 5.7.1; with 'unsigned' both go out unsigned
    (logged and counted)."""
    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        dkim_keys.set_missing_key_policy(s.conn, target.id, policy)
    say(f"{target.name}: mail without an active DKIM key is {policy}", org=target.name,
        org_id=str(target.id), missing_key=policy)


COMMANDS: list[click.Group] = [dkim]
