"""`postkeep db|org|domain|submitter|messages`: the operator's admin commands.

The click layer is an adapter only: each command loads the configuration,
opens one autocommit connection, calls a reader or writer in
`postkeep.storage` and hands the plain values to a small pure formatting or
parsing function defined here (`format_*`, `parse_since`, `check_domain`),
which the unit tests exercise without any server.

Failures are one line on stderr and exit status 1: a backend failure as
`postkeep: postgres: …` (or `s3`), anything the operator typed wrong as
`postkeep: …` naming the offending value.  Configuration errors propagate to
`postkeep.cli.main`, which reports them with exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import click
import psycopg
from psycopg import errors

from postkeep import config as config_mod
from postkeep.storage import content, directory, messages, migrate, outcomes
from postkeep.storage.db import BackendError, connect
from postkeep.storage.objects import S3ObjectStore

CONTENT_EXPIRED = messages.CONTENT_EXPIRED

# --- pure helpers: parsing and formatting -----------------------------------

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_since(text: str, now: datetime) -> datetime:
    """An absolute UTC time from ISO 8601 or a relative age like 1h, 2d, 30m."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected ISO 8601 (2026-03-01T12:00:00Z) or an age"
            " like 30m, 1h, 2d, 1w"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def check_domain(text: str) -> str:
    """The domain lower-cased if it is a valid DNS name, else ValueError saying why."""
    name = text.strip().lower().removesuffix(".")
    if not name:
        raise ValueError(f"domain {text!r}: empty")
    if len(name) > 253:
        raise ValueError(f"domain {text!r}: longer than 253 characters")
    labels = name.split(".")
    if len(labels) < 2:
        raise ValueError(f"domain {text!r}: needs at least two labels (example.com)")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(
                f"domain {text!r}: label {label!r} must be 1-63 letters, digits or"
                " hyphens, not starting or ending with a hyphen"
            )
    if labels[-1].isdigit():
        raise ValueError(f"domain {text!r}: the top-level label cannot be numeric")
    return name


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


def _iso(when: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return None if when is None else when.astimezone(UTC).isoformat()


def message_to_json(m: messages.MessageRow, now: datetime) -> dict[str, Any]:
    """A message row as a JSON-ready dict, with content_available derived at NOW."""
    return {
        "id": str(m.id),
        "org_id": str(m.org_id),
        "domain": m.domain,
        "direction": m.direction,
        "queue_id": m.queue_id,
        "message_id_header": m.message_id_header,
        "envelope_from": m.envelope_from,
        "header_from": m.header_from,
        "subject": m.subject,
        "size": m.size,
        "object_key": m.object_key,
        "compressed_size": m.compressed_size,
        "sha256": m.sha256.hex(),
        "status": m.status,
        "recipient_count": m.recipient_count,
        "created_at": _iso(m.created_at),
        "accepted_at": _iso(m.accepted_at),
        "content_expires_at": _iso(m.content_expires_at),
        "metadata_expires_at": _iso(m.held_metadata_expires_at or m.metadata_expires_at),
        "legal_hold": m.held_metadata_expires_at is not None or m.object_key.startswith(
            "messages/hold/"),
        "content_erased_at": _iso(m.content_erased_at),
        "content_available": messages.content_available(m, now),
    }


def recipient_to_json(r: messages.RecipientRow) -> dict[str, Any]:
    """A recipient row as a JSON-ready dict."""
    return {
        "recipient": r.recipient,
        "status": r.status,
        "dsn_status": r.dsn_status,
        "remote_mta": r.remote_mta,
        "diagnostic": r.diagnostic,
        "updated_at": _iso(r.updated_at),
    }


def event_to_json(e: outcomes.Event) -> dict[str, Any]:
    return {"status": e.status, "dsn_status": e.dsn_status, "remote_mta": e.remote_mta,
            "diagnostic": e.diagnostic, "event_at": _iso(e.event_at),
            "recorded_at": _iso(e.recorded_at), "report": e.report_kind, "applied": e.applied}


def detail_to_json(d: messages.MessageDetail, now: datetime,
                   history: Sequence[outcomes.Event] = ()) -> dict[str, Any]:
    """`messages show --json`: the row plus its recipients and their histories."""
    out = message_to_json(d.message, now)
    out["recipients"] = [
        recipient_to_json(r) | {"history": [event_to_json(e) for e in history
                                            if e.recipient == r.recipient]}
        for r in d.recipients]
    reason = messages.content_unavailable_reason(d.message, now)
    if reason is not None:
        out["content_note"] = reason
    return out


def format_message_list(rows: list[messages.MessageRow]) -> str:
    """A fixed-width table of messages, newest first."""
    lines = [f"{'ID':36}  {'CREATED (UTC)':19}  {'STATUS':9}  {'RCPT':>4}  {'SIZE':>9}  FROM"]
    lines += [
        f"{m.id!s:36}  {m.created_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {m.status:9}"
        f"  {m.recipient_count:>4}  {m.size:>9}  {m.envelope_from}"
        for m in rows
    ]
    return "\n".join(lines)


def format_message_detail(d: messages.MessageDetail, now: datetime,
                          history: Sequence[outcomes.Event] = ()) -> str:
    """`messages show`: the row as aligned key/value lines, then each recipient
    with its outcome and the history of reports about it."""
    data = message_to_json(d.message, now)
    lines = [f"{key + ':':21}{'' if value is None else value}" for key, value in data.items()]
    reason = messages.content_unavailable_reason(d.message, now)
    if reason is not None:
        lines.append(f"{'content:':21}{reason}")
    lines.append(f"recipients ({len(d.recipients)}):")
    for r in d.recipients:
        lines.append(f"  {r.recipient}  {r.status}  updated {_iso(r.updated_at)}")
        for key in ("dsn_status", "remote_mta", "diagnostic"):
            value = getattr(r, key)
            if value is not None:
                lines.append(f"    {key}: {value}")
        for e in history:
            if e.recipient == r.recipient:
                shown = "" if e.applied else " (superseded)"
                lines.append(f"    {_iso(e.event_at)}  {e.status}{shown}  {e.dsn_status or '-'}"
                             f"  {e.diagnostic or ''}  [{e.report_kind}]".rstrip())
    return "\n".join(lines)


# --- the click adapter ------------------------------------------------------


def _fail(message: str) -> NoReturn:
    """Print one `postkeep: …` line on stderr and exit 1."""
    click.echo(f"postkeep: {message}", err=True)
    raise click.exceptions.Exit(1)


@dataclass
class _Session:
    """The configuration and connection one command works with."""

    cfg: config_mod.Config
    conn: psycopg.Connection


@contextmanager
def _session(ctx: click.Context) -> Iterator[_Session]:
    """Load the configuration, connect, and turn backend failures into one line."""
    obj = ctx.find_root().obj or {}
    cfg = config_mod.load(obj.get("config_path"))
    try:
        conn = connect(cfg.postgres)
        with conn:
            yield _Session(cfg, conn)
    except BackendError as exc:
        _fail(str(exc))
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()
        _fail(f"postgres: {text[0] if text else type(exc).__name__}")


def _org(conn: psycopg.Connection, name_or_id: str) -> directory.Organisation:
    """The organisation named or identified by NAME_OR_ID, or exit naming it."""
    org = directory.find_by_name(conn, name_or_id)
    if org is None:
        _fail(f"no organisation {name_or_id!r} (see `postkeep org list`)")
    return org


def _message_id(text: str) -> uuid.UUID:
    """A message id parsed from the command line, or exit naming it."""
    try:
        return uuid.UUID(text)
    except ValueError:
        _fail(f"{text!r} is not a message id (a UUID, see `postkeep messages list`)")


def _detail(conn: psycopg.Connection, text: str) -> messages.MessageDetail:
    """The message named by TEXT, or exit saying there is none."""
    detail = messages.get_message(conn, _message_id(text))
    if detail is None:
        _fail(f"no message with id {text} (unknown, or its metadata has expired)")
    return detail


@click.group()
def db() -> None:
    """The metadata database: schema migrations and partitions."""


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending migrations and create partitions ahead (idempotent)."""
    with _session(ctx) as s:
        applied = migrate.apply_migrations(s.conn)
        for m in applied:
            click.echo(f"applied {m.version:04d}_{m.name}")
        if not applied:
            click.echo("schema up to date")
        created = migrate.ensure_partitions(s.conn)
        click.echo(f"created {created} partition(s)")


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
    with _session(ctx) as s:
        tiers = directory.tier_names(s.conn)
        if tier not in tiers:
            _fail(f"--tier {tier!r}: unknown tier; allowed: {', '.join(tiers)}")
        if not name.strip():
            _fail("organisation name must not be empty")
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
            _fail(str(exc))
        try:
            oid = directory.add_organisation(
                s.conn, name, tier, content_days=content_days, metadata_days=metadata_days
            )
        except errors.UniqueViolation:
            _fail(f"organisation {name!r} already exists")
        if metadata_days is not None or content_days is not None:
            migrate.ensure_partitions(s.conn)  # a longer retention needs partitions ahead
        click.echo(str(oid))


@org.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def org_list(ctx: click.Context, as_json: bool) -> None:
    """List organisations with their effective retention."""
    with _session(ctx) as s:
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
        _fail(str(exc))
    with _session(ctx) as s:
        target = _org(s.conn, org_name)
        try:
            directory.add_domain(s.conn, target.id, name)
        except errors.UniqueViolation:
            owner = directory.find_by_domain(s.conn, name)
            _fail(f"domain {name!r} already belongs to {owner.name if owner else 'another org'}")
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
        _fail("give either BOUNCE_DOMAIN or --default")
    try:
        name = check_domain(domain_name)
        bounce = check_domain(bounce_domain) if bounce_domain else None
    except ValueError as exc:
        _fail(str(exc))
    with _session(ctx) as s:
        if not directory.set_bounce_domain(s.conn, name, bounce):
            _fail(f"domain {name!r} belongs to no organisation (postkeep domain add)")
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
        _fail("username must not be empty")
    with _session(ctx) as s:
        target = _org(s.conn, org_name)
        try:
            directory.add_submitter(s.conn, target.id, username)
        except errors.UniqueViolation:
            _fail(f"submitter {username!r} already exists")
        click.echo(f"{username} -> {target.name}")


@click.group("messages")
def messages_group() -> None:
    """Captured messages: metadata, delivery status and content."""


@messages_group.command("list")
@click.option("--org", "org_name", help="Organisation name or id.")
@click.option("--sender", help="Envelope sender (case-insensitive).")
@click.option("--recipient", help="A recipient address (case-insensitive).")
@click.option("--since", help="ISO 8601 time, or an age: 30m, 1h, 2d, 1w.")
@click.option("--limit", type=click.IntRange(min=1, max=10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def messages_list(
    ctx: click.Context,
    org_name: str | None,
    sender: str | None,
    recipient: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List captured messages, newest first."""
    now = datetime.now(UTC)
    try:
        since_at = parse_since(since, now) if since else None
    except ValueError as exc:
        _fail(str(exc))
    with _session(ctx) as s:
        org_id = _org(s.conn, org_name).id if org_name else None
        rows = messages.list_messages(
            s.conn, messages.MessageFilter(org_id, sender, recipient, since_at, limit)
        )
    if as_json:
        click.echo(json.dumps([message_to_json(m, now) for m in rows], indent=2))
    else:
        click.echo(format_message_list(rows))


@messages_group.command("show")
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def messages_show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """Show message ID with each recipient's delivery status."""
    now = datetime.now(UTC)
    with _session(ctx) as s:
        detail = _detail(s.conn, message_id)
        history = outcomes.recipient_history(s.conn, detail.message.id,
                                             detail.message.metadata_expires_at)
    if as_json:
        click.echo(json.dumps(detail_to_json(detail, now, history), indent=2))
    else:
        click.echo(format_message_detail(detail, now, history))


@messages_group.command("raw")
@click.argument("message_id", metavar="ID")
@click.pass_context
def messages_raw(ctx: click.Context, message_id: str) -> None:
    """Write message ID's original bytes to stdout, restored from object storage.

    The content is streamed and checked against the recorded size and sha256;
    a mismatch (truncated or corrupt object) exits 1 after the bytes.
    """
    with _session(ctx) as s:
        m = _detail(s.conn, message_id).message
        reason = messages.content_unavailable_reason(m, datetime.now(UTC))
        if reason is not None:
            _fail(f"message {m.id}: {reason}")
        out = sys.stdout.buffer
        digest, size = hashlib.sha256(), 0
        for chunk in content.restore(S3ObjectStore(s.cfg.s3), m.object_key):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        if size != m.size or digest.digest() != m.sha256:
            _fail(
                f"s3: message {m.id}: restored {size} bytes do not match the recorded"
                f" {m.size} bytes / sha256 (object {m.object_key} truncated or corrupt)"
            )


COMMANDS: list[click.Group] = [db, org, domain, submitter, messages_group]
