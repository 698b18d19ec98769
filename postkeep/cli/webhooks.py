"""`postkeep webhook add|list|remove|rotate-secret|deliveries|replay|test`.

Endpoints and their deliveries live in PostgreSQL (storage/metadata/webhooks.py,
migration 0018); postkeep-storage delivers (storage/sidecar/webhooks.py).  A
secret is printed once, by `add` and `rotate-secret`, and stored sealed under
the DKIM master key, so these commands need [dkim] master_key_file.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import click

from postkeep import webhooks as signing
from postkeep.cli.common import confirm, destructive, fail, find_org, iso, json_flag, say, session
from postkeep.config import Config
from postkeep.storage.metadata import webhooks as store
from postkeep.storage.metadata.dkim_keys import MasterKey, load_master_key


def _master(cfg: Config) -> MasterKey:
    return load_master_key(cfg.dkim)  # ConfigError names dkim.master_key: exit 2


def _endpoint_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        fail(f"endpoint {text!r}: expected an endpoint id (see `postkeep webhook list`)")


def _find(conn: Any, text: str) -> store.Endpoint:
    ep = store.get_endpoint(conn, _endpoint_id(text))
    if ep is None:
        fail(f"no webhook endpoint {text!r} (see `postkeep webhook list`)")
    return ep


def endpoint_json(ep: store.Endpoint) -> dict[str, Any]:
    return {"id": str(ep.id), "org_id": str(ep.org_id), "url": ep.url,
            "events": list(ep.event_types) if ep.event_types else None,
            "created_at": iso(ep.created_at),
            "previous_secret_expires_at": iso(ep.previous_expires_at)}


def delivery_json(d: store.Delivery) -> dict[str, Any]:
    return {"endpoint_id": str(d.endpoint_id), "event_id": d.event_id,
            "type": d.event_type, "message_id": str(d.message_id) if d.message_id else None,
            "state": d.state, "attempts": d.attempts,
            "next_attempt_at": iso(d.next_attempt_at), "last_attempt_at": iso(d.last_attempt_at),
            "last_status": d.last_status, "last_error": d.last_error,
            "event_created_at": iso(d.event_created_at), "delivered_at": iso(d.delivered_at)}


def _check_url(url: str) -> str:
    if not (url.startswith("https://") or url.startswith("http://")):
        fail(f"URL {url!r}: expected https://... (http:// only for testing)")
    return url


@click.group("webhook")
def webhook_group() -> None:
    """Signed event deliveries to an organisation's HTTPS endpoints."""


@webhook_group.command("add")
@click.argument("org_name", metavar="ORG")
@click.argument("url")
@click.option("--events", "events", multiple=True, metavar="TYPE[,TYPE...]",
              help=f"Only these event types (default: all): {', '.join(store.EVENT_TYPES)}.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def add(ctx: click.Context, org_name: str, url: str, events: tuple[str, ...],
        as_json: bool) -> None:
    """Deliver ORG's events from now on to URL; prints the signing secret ONCE."""
    try:
        types = store.check_event_types(events)
    except ValueError as exc:
        fail(str(exc))
    _check_url(url)
    with session(ctx) as s:
        master = _master(s.cfg)
        org = find_org(s.conn, org_name)
        secret = signing.new_secret()
        ep = store.add_endpoint(s.conn, master, org.id, url, types, secret)
    if as_json:
        click.echo(json.dumps({**endpoint_json(ep), "secret": secret}, indent=2))
    else:
        click.echo(f"endpoint {ep.id} for organisation {org.name}: {url}"
                   f" ({', '.join(types) if types else 'all events'})")
        click.echo(f"secret: {secret}")
        click.echo("(shown once: keep it where the receiver verifies Postkeep-Signature)")


@webhook_group.command("list")
@click.option("--org", "org_name", help="Only this organisation's endpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_cmd(ctx: click.Context, org_name: str | None, as_json: bool) -> None:
    """Webhook endpoints (never their secrets)."""
    with session(ctx) as s:
        org_id = find_org(s.conn, org_name).id if org_name else None
        eps = store.list_endpoints(s.conn, org_id)
    if as_json:
        click.echo(json.dumps([endpoint_json(e) for e in eps], indent=2))
        return
    click.echo(f"{'ENDPOINT':36}  {'ORG ID':36}  {'EVENTS':20}  URL")
    for e in eps:
        click.echo(f"{e.id!s:36}  {e.org_id!s:36}  "
                   f"{','.join(e.event_types) if e.event_types else 'all':20}  {e.url}")


@webhook_group.command("remove")
@click.argument("endpoint")
@destructive
@json_flag
@click.pass_context
def remove(ctx: click.Context, endpoint: str, yes: bool, dry_run: bool) -> None:
    """Stop delivering to ENDPOINT (its pending and past deliveries go too)."""
    with session(ctx) as s:
        ep = _find(s.conn, endpoint)
        what = f"remove webhook endpoint {ep.id} ({ep.url})"
        if dry_run:
            say(f"would {what}", dry_run=True, endpoint=str(ep.id), url=ep.url)
            return
        confirm(what, yes)
        store.remove_endpoint(s.conn, ep.id)
    say(f"removed webhook endpoint {ep.id}", endpoint=str(ep.id), url=ep.url)


@webhook_group.command("rotate-secret")
@click.argument("endpoint")
@click.option("--overlap", "overlap_hours", type=click.FloatRange(0, 24 * 30), default=24.0,
              show_default=True, help="Hours the old secret still signs (v1= twice).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def rotate_secret(ctx: click.Context, endpoint: str, overlap_hours: float,
                  as_json: bool) -> None:
    """A new signing secret for ENDPOINT, shown once; the old one keeps signing too
    until the overlap ends."""
    with session(ctx) as s:
        master = _master(s.cfg)
        ep = _find(s.conn, endpoint)
        secret = signing.new_secret()
        try:
            until = store.rotate_secret(s.conn, master, ep.id, secret, overlap_hours * 3600)
        except store.WebhookError as exc:
            fail(str(exc))
    if as_json:
        click.echo(json.dumps({"id": str(ep.id), "secret": secret,
                               "previous_secret_expires_at": iso(until)}, indent=2))
    else:
        click.echo(f"secret: {secret}")
        click.echo(f"(shown once; the previous secret also signs until {iso(until)})")


@webhook_group.command("deliveries")
@click.argument("endpoint")
@click.option("--state", type=click.Choice(["pending", "dead", "delivered"]), default=None,
              help="Only deliveries in this state.")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def deliveries_cmd(ctx: click.Context, endpoint: str, state: str | None, limit: int,
                   as_json: bool) -> None:
    """ENDPOINT's deliveries, newest event first."""
    with session(ctx) as s:
        ep = _find(s.conn, endpoint)
        rows = store.deliveries(s.conn, ep.id, state, limit)
    if as_json:
        click.echo(json.dumps([delivery_json(d) for d in rows], indent=2))
        return
    click.echo(f"{'EVENT':>10}  {'TYPE':10}  {'STATE':9}  {'TRIES':>5}  {'LAST':>4}  NEXT / ERROR")
    for d in rows:
        tail = iso(d.delivered_at) if d.state == "delivered" else (
            f"{iso(d.next_attempt_at)} {d.last_error or ''}".strip())
        click.echo(f"{d.event_id:>10}  {d.event_type:10}  {d.state:9}  {d.attempts:>5}  "
                   f"{d.last_status or '-':>4}  {tail}")


@webhook_group.command("replay")
@click.argument("endpoint")
@click.option("--from", "from_id", type=int, default=None, help="From this event id.")
@click.option("--to", "to_id", type=int, default=None, help="Up to this event id.")
@click.option("--all", "everything", is_flag=True,
              help="Delivered ones too (default: only dead-lettered ones).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def replay(ctx: click.Context, endpoint: str, from_id: int | None, to_id: int | None,
           everything: bool, as_json: bool) -> None:
    """Queue ENDPOINT's dead-lettered deliveries again (or, with --all, every one in
    --from/--to): tried now, with backoff as new."""
    with session(ctx) as s:
        ep = _find(s.conn, endpoint)
        n = store.replay(s.conn, ep.id, dead_only=not everything, from_id=from_id, to_id=to_id)
    if as_json:
        click.echo(json.dumps({"id": str(ep.id), "requeued": n}))
    else:
        click.echo(f"{n} deliveries queued again for endpoint {ep.id}")


@webhook_group.command("test")
@click.argument("endpoint")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=10.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def test_cmd(ctx: click.Context, endpoint: str, timeout: float, as_json: bool) -> None:
    """POST one signed `test` event to ENDPOINT now (not queued, not retried);
    exit 1 unless it answers 2xx."""
    with session(ctx) as s:
        master = _master(s.cfg)
        ep = _find(s.conn, endpoint)
        try:
            keys = store.secrets_of(master, ep, datetime.now(UTC))
        except store.WebhookError as exc:
            fail(str(exc))
    event_id = 0
    payload: dict[str, object] = {
        "id": f"test-{uuid.uuid4()}", "type": "test", "org_id": str(ep.org_id),
        "message_id": None, "created_at": iso(datetime.now(UTC)), "schema_version": 1}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "postkeep-webhook/1",
               signing.SIGNATURE_HEADER: signing.signature_header(keys, int(time.time()), body),
               signing.EVENT_ID_HEADER: str(event_id), "Idempotency-Key": str(payload["id"])}
    result = signing.post(ep.url, body, headers, timeout)
    if as_json:
        click.echo(json.dumps({"id": str(ep.id), "url": ep.url, "status": result.status,
                               "error": result.error, "ok": result.ok,
                               "seconds": round(result.seconds, 3)}))
    else:
        click.echo(f"{ep.url}: {result.status or result.error} ({result.seconds:.2f}s)")
    if not result.ok:
        fail(f"endpoint {ep.id}: the test event was not accepted"
             f" ({result.status or result.error})")


COMMANDS: list[click.Group] = [webhook_group]
