"""`postkeep reports ...`: delivery reports postkeep-storage could not match.

Every DSN or bounce that arrives at a return path is recorded; the ones that
name no known message, or no recipient of it, or cannot be parsed, are kept
(bytes in object storage, a row in unmatched_reports with the reason).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click

from postkeep.cli.common import backend_failure, fail, iso, parse_since, session
from postkeep.storage.content import restore
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.reports import outcomes


def unmatched_to_json(u: outcomes.Unmatched) -> dict[str, object]:
    return {"sha256": u.sha256.hex(), "kind": u.kind, "reason": u.reason,
            "envelope_from": u.envelope_from, "envelope_to": u.envelope_to,
            "subject": u.subject, "object_key": u.object_key, "size": u.size,
            "received_at": iso(u.received_at)}


def format_unmatched(rows: list[outcomes.Unmatched]) -> str:
    lines = [f"{'RECEIVED (UTC)':19}  {'REPORT':16}  {'KIND':12}  {'SIZE':>8}  REASON"]
    lines += [f"{u.received_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {u.sha256.hex()[:16]}"
              f"  {u.kind:12}  {u.size:>8}  {u.reason}" for u in rows]
    return "\n".join(lines)


@click.group()
def reports() -> None:
    """Delivery reports (DSNs, bounces) that could not be matched to a message."""


@reports.command("unmatched")
@click.option("--since", help="ISO 8601 time, or an age: 30m, 1h, 2d, 1w.")
@click.option("--limit", type=click.IntRange(min=1, max=10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def reports_unmatched(ctx: click.Context, since: str | None, limit: int, as_json: bool) -> None:
    """List unmatched reports, newest first, with the reason for each."""
    try:
        since_at = parse_since(since, datetime.now(UTC)) if since else None
    except ValueError as exc:
        fail(str(exc))
    with session(ctx) as s:
        rows = outcomes.list_unmatched(s.conn, limit, since_at)
    if as_json:
        click.echo(json.dumps([unmatched_to_json(u) for u in rows], indent=2))
    else:
        click.echo(format_unmatched(rows))


@reports.command("raw")
@click.argument("report", metavar="SHA256")
@click.pass_context
def reports_raw(ctx: click.Context, report: str) -> None:
    """Write an unmatched report's bytes (by its sha256, or a prefix of 8+ hex) to stdout."""
    if len(report) < 8 or any(c not in "0123456789abcdef" for c in report.lower()):
        fail(f"SHA256 {report!r}: expected at least 8 hex digits")
    with session(ctx) as s:
        rows = outcomes.list_unmatched(s.conn, 2, sha256_prefix=report)
        if len(rows) != 1:
            fail(f"{len(rows)} unmatched reports match {report!r}")
        try:
            for chunk in restore.restore_object(s.conn, S3ObjectStore(s.cfg.s3),
                                                rows[0].object_key):
                sys.stdout.buffer.write(chunk)
        except BackendError as exc:
            backend_failure(exc)
    sys.stdout.buffer.flush()


COMMANDS: list[click.Group] = [reports]
