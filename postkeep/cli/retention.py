"""`postkeep retention|erase|hold`: retention runs, erasure on request, legal holds.

Adapters only: each command loads the configuration, opens one connection and
the object store, and calls storage.retention / storage.erasure /
storage.holds.  Progress goes to stderr as lines (`retention: ...`), results
to stdout; refusals are one `postkeep: ...` line and exit 1.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import click

from postkeep.cli.common import (
    EXIT_UNAVAILABLE,
    backend_failure,
    backend_message,
    confirm,
    destructive,
    fail,
    find_org,
    json_flag,
    json_mode,
    parse_since,
    say,
    session,
)
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import erasure, holds, orphans, rules, stats
from postkeep.storage.lifecycle.retention import RetentionSettings, run_retention, settings_of
from postkeep.storage.metadata import audit, legal_holds
from postkeep.storage.metadata.db import BackendError


def _store(cfg_s3: object) -> rules.S3Retention:
    s3 = S3ObjectStore(cfg_s3)  # type: ignore[arg-type]
    return rules.S3Retention(s3.client, s3.bucket, s3.locks_objects)


def _progress(line: str) -> None:
    click.echo(f"retention: {line}", err=True)


@click.group()
def retention() -> None:
    """Expire metadata and content, roll up statistics (see README, Retention)."""


@retention.command("run")
@click.option("--content-expiry", type=click.Choice(["auto", "lifecycle", "sweep"]),
              help="Override retention.content_expiry for this run.")
@click.option("--sweep-from", metavar="TIME",
              help="Rewind the content sweeper to TIME (ISO 8601 or an age like 30d), e.g."
                   " after draining a spool of old mail.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def retention_run(ctx: click.Context, content_expiry: str | None, sweep_from: str | None,
                  as_json: bool) -> None:
    """One retention pass: partitions ahead, holds, content sweep, drops, statistics.

    Safe to run twice at once (the second waits) and after a crash.  Exit 1
    if any step reported an error (the others still ran).
    """
    now = datetime.now(UTC)
    try:
        since = parse_since(sweep_from, now) if sweep_from else None
    except ValueError as exc:
        fail(str(exc).replace("--since", "--sweep-from"))
    with session(ctx) as s:
        settings = settings_of(s.cfg.retention)
        if content_expiry:
            settings = RetentionSettings(**{**settings.__dict__,
                                            "content_expiry": content_expiry})
        report = run_retention(s.conn, _store(s.cfg.s3), None, _progress, settings, since)
    if as_json:
        out = {k: (str(v) if k in ("run_id", "started") else v)
               for k, v in report.__dict__.items()}
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(report.summary())
        for err in report.errors:
            click.echo(f"  error: {err}")
    if report.errors:
        raise click.exceptions.Exit(1)


@retention.group("lifecycle")
def lifecycle_group() -> None:
    """The S3 lifecycle rules that expire content (one per retention class)."""


@lifecycle_group.command("apply")
@json_flag
@click.pass_context
def lifecycle_apply(ctx: click.Context) -> None:
    """Install postkeep's rules on the bucket, keeping any other rules there."""
    with session(ctx) as s:
        store = _store(s.cfg.s3)
        try:
            # Versioned buckets also get the noncurrent-version rule; under
            # Object Lock there are no class rules (see rules.planned_rules).
            wanted = rules.planned_rules(store.object_lock or store.versioned(),
                                         store.object_lock)
            total = store.apply_rules(wanted)
        except BackendError as exc:
            backend_failure(exc)
        audit.audit(s.conn, None, "lifecycle_applied", len(wanted), None,
                    None, {"bucket_rules": total})
    say(f"installed {len(wanted)} postkeep rules; the bucket has {total} rules",
        installed=len(wanted), bucket_rules=total)


@lifecycle_group.command("show")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object (rules: null when the server has no lifecycle support).")
@click.pass_context
def lifecycle_show(ctx: click.Context, as_json: bool) -> None:
    """Show postkeep's rules as installed, and the classes they expire."""
    with session(ctx) as s:
        try:
            installed = _store(s.cfg.s3).rules()
        except BackendError as exc:
            backend_failure(exc)
    if as_json:
        click.echo(json.dumps({"lifecycle_supported": installed is not None, "rules": None
                               if installed is None else
                               [{"id": r.rule_id, "prefix": r.prefix, "days": r.days}
                                for r in sorted(installed, key=lambda r: r.days)]}, indent=2))
        return
    if installed is None:
        click.echo("this S3 server has no lifecycle support: the sweeper deletes all content")
        return
    if not installed:
        click.echo("no postkeep lifecycle rules installed (`postkeep retention lifecycle apply`)")
    for r in sorted(installed, key=lambda r: r.days):
        click.echo(f"{r.rule_id:28}  prefix {r.prefix:20}  expires after {r.days} days")


@retention.command("orphans")
@click.option("--min-age", "min_age_minutes", type=click.IntRange(min=1), default=60,
              show_default=True, metavar="MINUTES",
              help="Only objects older than this (a commit may still be under way).")
@click.option("--window-days", type=click.IntRange(1, 366), default=orphans.DEFAULT_WINDOW_DAYS,
              show_default=True, help="How many UTC days of objects to look at.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@destructive
@click.pass_context
def retention_orphans(ctx: click.Context, min_age_minutes: int, window_days: int,
                      dry_run: bool, as_json: bool, yes: bool) -> None:
    """Delete message objects that no row names (left by a milter killed mid-commit).

    --dry-run names the orphans and deletes nothing.
    """
    from datetime import timedelta

    from postkeep.storage.content.spool import Spool

    if not dry_run:
        confirm(f"delete message objects older than {min_age_minutes} minutes of the last"
                f" {window_days} days that no row names", yes)
    with session(ctx) as s:
        spool = Spool(s.cfg.milter.outage_spool_directory)
        try:
            result = orphans.sweep_orphans(
                s.conn, _store(s.cfg.s3), spool.holds, min_age=timedelta(minutes=min_age_minutes),
                window_days=window_days, dry_run=dry_run)
        except BackendError as exc:
            backend_failure(exc)
    if as_json:
        click.echo(json.dumps({"examined": result.examined, "orphans": result.orphans,
                               "deleted": result.deleted, "failed": result.failed,
                               "dry_run": dry_run}, indent=2))
    else:
        for key in result.orphans:
            click.echo(f"{'would delete' if dry_run else 'orphan'} {key}")
        click.echo(f"{result.examined} examined, {len(result.orphans)} orphan(s),"
                   f" {result.deleted} deleted, {len(result.failed)} failed")
    if result.failed:
        fail(f"s3: {len(result.failed)} orphan object(s) could not be deleted,"
             f" e.g. {result.failed[0]}")


@retention.command("stats")
@click.argument("org_name", metavar="ORG")
@click.option("--since", help="ISO 8601 date, or an age: 7d, 4w.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retention_stats(ctx: click.Context, org_name: str, since: str | None,
                    as_json: bool) -> None:
    """Daily delivery statistics of organisation ORG (kept after metadata expires)."""
    now = datetime.now(UTC)
    try:
        since_day = parse_since(since, now).date() if since else None
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        rows = stats.daily(s.conn, find_org(s.conn, org_name).id, since_day)
    if as_json:
        click.echo(json.dumps([{**r.__dict__, "org_id": str(r.org_id), "day": str(r.day)}
                               for r in rows], indent=2))
        return
    click.echo(f"{'DAY':10}  {'MESSAGES':>8}  {'SENT':>8}  {'DELIVERED':>9}  {'DEFERRED':>8}"
               f"  {'BOUNCED':>7}  {'EXPIRED':>7}  {'BYTES':>12}")
    for r in rows:
        click.echo(f"{r.day!s:10}  {r.messages:>8}  {r.sent:>8}  {r.delivered:>9}"
                   f"  {r.deferred:>8}  {r.bounced:>7}  {r.expired:>7}  {r.bytes:>12}")


def _still_spooled(cfg: Any, org_id: uuid.UUID, addr: str, wait: float) -> tuple[int, str]:
    """(messages of ORG_ID to or from ADDR still in this host's spool after
    waiting up to WAIT seconds for the drain, the spool directory).  None
    there (or no spool on this host): (0, directory)."""
    from postkeep.storage.content.spool import Spool, waiting

    spool = Spool(cfg.milter.outage_spool_directory)
    if not spool.dir.is_dir():
        return 0, str(spool.dir)

    def match(m: Any) -> bool:
        return bool(m.org_id == org_id and legal_holds.involves(
            m.envelope_from, m.header_from, m.recipients, addr))

    deadline = time.monotonic() + wait
    try:
        # One read of the entries; then only whether those are still there.
        left = waiting(spool, match)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = [mid for mid in left if spool.holds(mid)]
    except PermissionError as exc:
        click.echo(f"postkeep: warning: cannot read the spool {spool.dir} ({exc.strerror});"
                   f" mail of {addr} still waiting there, if any, is not erased: run erase"
                   " as the user the daemons run as", err=True)
        return 0, str(spool.dir)
    return len(left), str(spool.dir)


@click.command("erase")
@click.option("--org", "org_name", required=True, help="Organisation name or id.")
@click.option("--address", required=True, help="The address whose mail is erased.")
@click.option("--spool-wait", type=click.FloatRange(min=0), default=30.0, show_default=True,
              metavar="SECONDS", help="How long to wait for this host's spool to drain the"
              " address's mail that is accepted but not yet stored.")
@destructive
@json_flag
@click.pass_context
def erase(ctx: click.Context, org_name: str, address: str, spool_wait: float, yes: bool,
          dry_run: bool) -> None:
    """Erase (GDPR) the content of every message to or from ADDRESS in ORG.

    Objects are deleted, rows marked so readers say "content erased", and the
    address is redacted in sender, From:, recipients, subjects and DSN
    diagnostics.  Refused, naming the hold, if a legal hold covers any of it.
    Mail of the address still in this host's spool (accepted during an
    outage, or under milter.accept_after = 'journal') is waited for up to
    --spool-wait seconds; if some is still there the erasure is refused
    (exit 3), since it would miss it.  Run it where the mail hosts' spools
    are, or once they are drained.
    """
    try:
        addr = legal_holds.normalise_address(address)
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        if not dry_run:
            left, where = _still_spooled(s.cfg, target.id, addr, spool_wait)
            if left:
                fail(f"erase {addr} in org {target.name}: {left} of its messages still wait in"
                     f" the spool {where} (accepted, not yet in S3 and PostgreSQL), and the"
                     " erasure would miss them; let postkeep-storage or `postkeep spool drain"
                     " --yes` store them, then erase again", EXIT_UNAVAILABLE)
        n = erasure.messages_in_scope(s.conn, target.id, addr)
        what = f"erase the content of {n} messages to or from {addr} in org {target.name}"
        if dry_run:
            say(f"would {what} (refused if a legal hold covers any)", dry_run=True,
                org=target.name, org_id=str(target.id), messages=n)
            return
        confirm(what, yes)
        try:
            rep = erasure.erase_address(s.conn, _store(s.cfg.s3), target.id, addr,
                                        progress=_progress)
        except erasure.ErasureRefused as exc:
            fail(f"erase {addr} in org {target.name}: {exc}")
    locked = ""
    if rep.objects_locked and rep.locked_until is not None:
        locked = (f"\n  {rep.objects_locked} objects are under Object Lock (compliance): S3"
                  f" refused their delete; their bytes remain in S3 until"
                  f" {rep.locked_until:%Y-%m-%d %H:%M} UTC, when retention deletes them."
                  " The metadata is erased and no reader serves the content.")
    say(f"erased {rep.messages} messages of {addr} in org {target.name}:"
        f" {rep.objects_deleted} objects deleted, {rep.recipient_rows_redacted}"
        f" recipient rows redacted, {rep.suppressions_kept} suppression entries kept"
        f" under a pseudonym (audit: address sha256 {rep.address_sha256})" + locked,
        org=target.name, org_id=str(target.id), messages=rep.messages,
        objects_deleted=rep.objects_deleted,
        recipient_rows_redacted=rep.recipient_rows_redacted,
        suppressions_kept=rep.suppressions_kept, address_sha256=rep.address_sha256,
        objects_locked=rep.objects_locked, locked_until=rep.locked_until)


@click.group()
def hold() -> None:
    """Legal holds: what they cover is kept past retention and cannot be erased."""


@hold.command("add")
@click.option("--org", "org_name", required=True, help="Organisation name or id.")
@click.option("--address", help="Only mail to or from this address (default: all the org's).")
@click.option("--reason", required=True, help="Why, e.g. a case reference (kept and shown).")
@json_flag
@click.pass_context
def hold_add(ctx: click.Context, org_name: str, address: str | None, reason: str) -> None:
    """Place a legal hold and move what it covers out of lifecycle reach now."""
    try:
        addr = legal_holds.normalise_address(address) if address else None
    except ValueError as exc:
        fail(str(exc))
    from postkeep.storage.lifecycle.retention import EPOCH, run_lock

    with session(ctx) as s:
        target = find_org(s.conn, org_name)
        try:
            h = legal_holds.add_hold(s.conn, target.id, addr, reason)
        except legal_holds.HoldError as exc:
            fail(str(exc))
        click.echo(f"hold {h.id} on {h.scope()}: {h.reason}", err=json_mode())
        wm = s.conn.execute("SELECT at FROM retention_state WHERE name = 'sweep'").fetchone()
        try:
            with run_lock(s.conn, _progress):
                res = holds.protect(s.conn, _store(s.cfg.s3), h, wm[0] if wm else EPOCH,
                                    progress=_progress)
        except BackendError as exc:
            fail(f"hold {h.id} is active, but moving its content failed ({exc});"
                 " `postkeep retention run` retries", backend_message(exc)[1])
    say(f"{res.moved} objects moved under messages/hold/"
        + (f"; {res.gone} were already deleted" if res.gone else ""),
        hold_id=h.id, org=target.name, org_id=str(target.id), address=h.address,
        reason=h.reason, objects_moved=res.moved, objects_gone=res.gone)


@hold.command("remove")
@click.argument("hold_id", type=int)
@destructive
@json_flag
@click.pass_context
def hold_remove(ctx: click.Context, hold_id: int, yes: bool, dry_run: bool) -> None:
    """Release hold HOLD_ID; the next `postkeep retention run` applies retention again."""
    with session(ctx) as s:
        found = legal_holds.get_hold(s.conn, hold_id)
        if found is not None and found.released_at is None:
            what = (f"release hold {found.id} on {found.scope()} ({found.reason}): retention"
                    " then expires what it kept")
            if dry_run:
                say(f"would {what}", dry_run=True, hold_id=found.id)
                return
            confirm(what, yes)
        elif found is None and dry_run:
            fail(f"no legal hold {hold_id} (see `postkeep hold list --all`)")
        try:
            h = legal_holds.release_hold(s.conn, hold_id)
        except legal_holds.HoldError as exc:
            fail(str(exc))
    say(f"hold {h.id} on {h.scope()} released; `postkeep retention run` applies"
        " the retention it held back", hold_id=h.id, released=True)


@hold.command("list")
@click.option("--org", "org_name", help="Only this organisation's holds.")
@click.option("--all", "include_released", is_flag=True, help="Include released holds.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hold_list(ctx: click.Context, org_name: str | None, include_released: bool,
              as_json: bool) -> None:
    """List legal holds (active ones unless --all)."""
    with session(ctx) as s:
        org_id = find_org(s.conn, org_name).id if org_name else None
        rows = legal_holds.list_holds(s.conn, org_id, include_released)
    if as_json:
        click.echo(json.dumps([{**h.__dict__, "org_id": str(h.org_id),
                                **{k: (getattr(h, k).isoformat() if getattr(h, k) else None)
                                   for k in ("created_at", "released_at", "reconciled_at")}}
                               for h in rows], indent=2))
        return
    click.echo(f"{'ID':>5}  {'ORG':24}  {'ADDRESS':32}  {'SINCE (UTC)':16}  {'STATE':9}  REASON")
    for h in rows:
        state = "active" if h.released_at is None else (
            "released" if h.reconciled_at else "releasing")
        click.echo(f"{h.id:>5}  {h.org_name:24}  {h.address or '(all mail)':32}"
                   f"  {h.created_at.astimezone(UTC):%Y-%m-%d %H:%M}  {state:9}  {h.reason}")


COMMANDS: list[click.Command] = [retention, erase, hold]
