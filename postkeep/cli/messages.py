"""`postkeep messages list|show|raw`: captured messages, their recipients and content.

`raw` restores the stored object to the exact bytes Postfix passed the milter
and checks them against the recorded size and sha256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import click
import psycopg

from postkeep.cli.common import fail, find_org, iso, parse_since, session
from postkeep.config import TAG_KEY
from postkeep.storage.content import restore
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.metadata import inbound, messages
from postkeep.storage.metadata import search as search_sql
from postkeep.storage.reports import outcomes

CONTENT_EXPIRED = messages.CONTENT_EXPIRED

def message_to_json(m: messages.MessageRow, now: datetime) -> dict[str, Any]:
    """A message row as a JSON-ready dict, with content_available derived at NOW."""
    return {
        "id": str(m.id),
        "org_id": str(m.org_id),
        "domain": m.domain,
        "direction": m.direction,
        "message_type": m.message_type,
        "parent_message_id": str(m.parent_message_id) if m.parent_message_id else None,
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
        "created_at": iso(m.created_at),
        "accepted_at": iso(m.accepted_at),
        "content_expires_at": iso(m.content_expires_at),
        "metadata_expires_at": iso(m.held_metadata_expires_at or m.metadata_expires_at),
        "legal_hold": m.held_metadata_expires_at is not None or m.object_key.startswith(
            "messages/hold/"),
        "content_erased_at": iso(m.content_erased_at),
        "content_available": messages.content_available(m, now),
        "tags": dict(m.tags),
    }


def recipient_to_json(r: messages.RecipientRow) -> dict[str, Any]:
    """A recipient row as a JSON-ready dict."""
    return {
        "recipient": r.recipient,
        "status": r.status,
        "dsn_status": r.dsn_status,
        "remote_mta": r.remote_mta,
        "diagnostic": r.diagnostic,
        "updated_at": iso(r.updated_at),
    }


def event_to_json(e: outcomes.Event) -> dict[str, Any]:
    return {"status": e.status, "dsn_status": e.dsn_status, "remote_mta": e.remote_mta,
            "diagnostic": e.diagnostic, "event_at": iso(e.event_at),
            "recorded_at": iso(e.recorded_at), "report": e.report_kind, "applied": e.applied}


def child_to_json(c: inbound.Child) -> dict[str, Any]:
    return {"id": str(c.id), "message_type": c.message_type, "envelope_from": c.envelope_from,
            "header_from": c.header_from, "subject": c.subject, "created_at": iso(c.created_at)}


def detail_to_json(d: messages.MessageDetail, now: datetime,
                   history: Sequence[outcomes.Event] = (),
                   thread: Sequence[inbound.Child] = ()) -> dict[str, Any]:
    """`messages show --json`: the row plus its recipients and their histories,
    and the replies and complaints linked to it (thread)."""
    out = message_to_json(d.message, now)
    out["thread"] = [child_to_json(c) for c in thread]
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
                          history: Sequence[outcomes.Event] = (),
                          thread: Sequence[inbound.Child] = ()) -> str:
    """`messages show`: the row as aligned key/value lines, then each recipient
    with its outcome and the history of reports about it."""
    data = message_to_json(d.message, now)
    lines = [f"{key + ':':21}{'' if value is None else value}" for key, value in data.items()]
    reason = messages.content_unavailable_reason(d.message, now)
    if reason is not None:
        lines.append(f"{'content:':21}{reason}")
    lines.append(f"recipients ({len(d.recipients)}):")
    for r in d.recipients:
        lines.append(f"  {r.recipient}  {r.status}  updated {iso(r.updated_at)}")
        for key in ("dsn_status", "remote_mta", "diagnostic"):
            value = getattr(r, key)
            if value is not None:
                lines.append(f"    {key}: {value}")
        for e in history:
            if e.recipient == r.recipient:
                shown = "" if e.applied else " (superseded)"
                lines.append(f"    {iso(e.event_at)}  {e.status}{shown}  {e.dsn_status or '-'}"
                             f"  {e.diagnostic or ''}  [{e.report_kind}]".rstrip())
    if thread:
        lines.append(f"thread ({len(thread)}):")
        lines += [f"  {c.id}  {iso(c.created_at)}  {c.message_type:10}  {c.envelope_from or '<>'}"
                  f"  {c.subject or ''}".rstrip() for c in thread]
    return "\n".join(lines)


def encode_cursor(m: messages.MessageRow) -> str:
    """The opaque `--cursor` token for the page after row M (pure)."""
    raw = f"{m.created_at.astimezone(UTC).isoformat()}|{m.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_tag_filter(text: str) -> tuple[str, str]:
    """(key, value) from `--tag key=value`, or ValueError naming it (pure)."""
    key, sep, value = text.partition("=")
    if not sep or not TAG_KEY.fullmatch(key) or not value:
        raise ValueError(f"--tag {text!r}: expected KEY=VALUE, KEY of lower-case letters,"
                         " digits and _")
    return key, value


def decode_cursor(token: str) -> tuple[datetime, uuid.UUID]:
    """(created_at, id) from a `--cursor` token, or ValueError naming it (pure)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        when, _, ident = raw.partition("|")
        at = datetime.fromisoformat(when)
        if at.tzinfo is None:
            raise ValueError(when)
        return at, uuid.UUID(ident)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"--cursor {token!r}: not a cursor printed by"
                         " `postkeep messages list`") from None


def _detail(conn: psycopg.Connection, text: str) -> messages.MessageDetail:
    """The message named by TEXT (postkeep id, with or without dashes, or
    Postfix queue id), or exit saying there is none."""
    try:
        ident = uuid.UUID(text)
    except ValueError:
        ids = messages.ids_by_queue_id(conn, text.strip())
        if not ids:
            fail(f"no message with id or Postfix queue id {text!r} (unknown, or its"
                 " metadata has expired)")
        if len(ids) > 1:
            fail(f"Postfix queue id {text!r} names {len(ids)} messages (queue ids are"
                 f" reused): {', '.join(map(str, ids))}; give the postkeep id")
        ident = ids[0]
    detail = messages.get_message(conn, ident)
    if detail is None:
        fail(f"no message with id {text} (unknown, or its metadata has expired)")
    return detail


@click.group("messages")
def messages_group() -> None:
    """Captured messages: metadata, delivery status and content."""


def _filter_options(search: bool) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options `messages list` and `messages search` share; SEARCH adds
    subject, status, direction and message type."""
    options = [
        click.option("--org", "org_name", help="Organisation name or id."),
        click.option("--sender", help="Envelope sender (case-insensitive)."),
        click.option("--recipient", help="A recipient address (case-insensitive)."),
        click.option("--since", help="ISO 8601 time, or an age: 30m, 1h, 2d, 1w."),
        click.option("--until", help="Only messages created before this (ISO 8601 or an age)."),
        click.option("--limit", type=click.IntRange(min=1, max=10000), default=50,
                     show_default=True, help="Messages per page."),
        click.option("--cursor", help="Continue after the page that printed this token."),
        click.option("--tag", "tag_filters", multiple=True, metavar="KEY=VALUE",
                     help="Only messages with this application tag (repeatable: all must"
                     " match)."),
        click.option("--json", "as_json", is_flag=True,
                     help='Print {"messages": [...], "next_cursor": TOKEN or null}.'),
    ]
    if search:
        options += [
            click.option("--subject", help="A substring of the subject (case-insensitive;"
                         " % and _ match themselves)."),
            click.option("--status", type=click.Choice(search_sql.RECIPIENT_STATUSES),
                         help="A recipient's status (with --recipient: that recipient's)."),
            click.option("--direction", type=click.Choice(search_sql.DIRECTIONS)),
            click.option("--type", "message_type",
                         type=click.Choice(search_sql.MESSAGE_TYPES), help="Message type."),
        ]

    def decorate(fn: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _list_page(ctx: click.Context, org_name: str | None, since: str | None,
               until: str | None, limit: int, cursor: str | None,
               tag_filters: tuple[str, ...], as_json: bool, **criteria: Any) -> None:
    """Run one page of `list` or `search`: parse, select, print with the cursor."""
    now = datetime.now(UTC)
    try:
        since_at = parse_since(since, now) if since else None
        after = decode_cursor(cursor) if cursor else None
        tags = tuple(parse_tag_filter(t) for t in tag_filters)
    except ValueError as exc:
        fail(str(exc))
    try:
        until_at = parse_since(until, now) if until else None
    except ValueError as exc:
        fail(str(exc).replace("--since", "--until", 1))
    with session(ctx) as s:
        org_id = find_org(s.conn, org_name).id if org_name else None
        rows = messages.list_messages(
            s.conn, messages.MessageFilter(org_id, since=since_at, limit=limit + 1,
                                           until=until_at, after=after, tags=tags,
                                           **criteria))
    more, rows = len(rows) > limit, rows[:limit]
    token = encode_cursor(rows[-1]) if more else None
    if as_json:
        click.echo(json.dumps({"messages": [message_to_json(m, now) for m in rows],
                               "next_cursor": token}, indent=2))
    else:
        click.echo(format_message_list(rows))
        if token:
            click.echo(f"more: --cursor {token}", err=True)


@messages_group.command("list")
@_filter_options(search=False)
@click.pass_context
def messages_list(ctx: click.Context, /, **options: Any) -> None:
    """List captured messages, newest first, a page at a time.

    When more match, the last line (on stderr) gives the `--cursor` for the
    next page: run the same command with it, as often as needed.
    """
    _list_page(ctx, **options)


@messages_group.command("search")
@_filter_options(search=True)
@click.pass_context
def messages_search(ctx: click.Context, /, **options: Any) -> None:
    """Search captured messages, newest first, a page at a time.

    By sender, recipient, subject substring, application tag, a recipient's
    status, direction, message type and time; every criterion given must
    match.  Paging as in `messages list` (`--cursor`).
    """
    _list_page(ctx, **options)


@messages_group.command("show")
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def messages_show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """Show message ID (postkeep id, or Postfix queue id) with each recipient's status."""
    now = datetime.now(UTC)
    with session(ctx) as s:
        detail = _detail(s.conn, message_id)
        history = outcomes.recipient_history(s.conn, detail.message.id,
                                             detail.message.metadata_expires_at)
        thread = inbound.children(s.conn, detail.message.id, detail.message.org_id)
    if as_json:
        click.echo(json.dumps(detail_to_json(detail, now, history, thread), indent=2))
    else:
        click.echo(format_message_detail(detail, now, history, thread))


@messages_group.command("raw")
@click.argument("message_id", metavar="ID")
@click.pass_context
def messages_raw(ctx: click.Context, message_id: str) -> None:
    """Write message ID's original bytes to stdout, restored from object storage.

    The content is streamed and checked against the recorded size and sha256;
    a mismatch (truncated or corrupt object) exits 1 after the bytes.
    """
    with session(ctx) as s:
        m = _detail(s.conn, message_id).message
        reason = messages.content_unavailable_reason(m, datetime.now(UTC))
        if reason is not None:
            fail(f"message {m.id}: {reason}")
        out = sys.stdout.buffer
        digest, size = hashlib.sha256(), 0
        for chunk in restore.restore_message(s.conn, S3ObjectStore(s.cfg.s3), m.id,
                                               m.object_key):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        out.flush()
        if size != m.size or digest.digest() != m.sha256:
            fail(
                f"s3: message {m.id}: restored {size} bytes do not match the recorded"
                f" {m.size} bytes / sha256 (object {m.object_key} truncated or corrupt)"
            )


COMMANDS: list[click.Group] = [messages_group]
