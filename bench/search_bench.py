"""Search benchmark: `messages search` query shapes as organisations' dashboard roles.

Fills a private stack's database with generated rows (server-side INSERT ...
SELECT generate_series, not captured): --messages messages and --recipients
recipient rows, created over the last 90 days (metadata kept 90 days, so
weekly partitions over the next ~13 weeks), across --orgs organisations of
Zipf-skewed sizes (s = 1.1: the largest holds about a fifth).  Each
organisation gets a dashboard login (tenant_roles, migration 0012).  Then,
logged in as the dashboard role of the organisation a sampled message
belongs to, it runs every query shape --runs times with parameters drawn
from real rows (storage.metadata.messages.list_messages, a page of 50):
p50/p95 per shape as a markdown table on stdout, and EXPLAIN (ANALYZE,
BUFFERS) of one run per shape into --explain.

Usage (the stack must be up; `make bench-search` does all of it):
    python bench/search_bench.py --config DIR/postkeep.toml [--messages 200000]
        [--recipients 400000] [--orgs 50] [--runs 200] [--explain FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

from postkeep.config import load
from postkeep.storage.metadata import directory, messages, migrate, tenants
from postkeep.storage.metadata.search import MessageFilter

CHUNK = 200_000
PAGE = 50

# One row per message; recipients per message: K (the --recipients ratio).
# Organisation by slot (a 1000-slot array filled by Zipf weights: a lookup,
# not a search per row).  Outbound 90 %, inbound replies/auto-replies/bounces
# /complaints the rest; recipient status delivered 85 %, bounced 5 % ...
# Recipient addresses: about a million per k, distinct within a message.
_GENERATE = """
WITH m AS (
    INSERT INTO messages (id, org_id, domain, direction, message_type, queue_id,
        envelope_from, header_from, subject, size, object_key, compressed_size, sha256,
        content_expires_at, metadata_expires_at, status, recipient_count, created_at,
        accepted_at, tags, campaign_id)
    SELECT gen_random_uuid(), o, 'bench.example', dir, mtype,
        upper(substr(md5(i::text), 1, 10)),
        'sender' || (i %% 200) || '@bench.example', 'sender@bench.example',
        (ARRAY['Invoice', 'Your order', 'Welcome to', 'Reset code for', 'Newsletter',
               'Re: question about', 'Shipping update', 'Receipt'])[1 + i %% 8]
            || ' ' || substr(md5(i::text || 's'), 1, 8) || ' #' || (i %% 100000),
        2000 + i %% 5000, 'messages/90d/' || i || '.eml.zst', 900 + i %% 2000,
        decode(md5(i::text) || md5(i::text), 'hex'),
        c + interval '30 days', c + interval '90 days', 'relayed', %(k)s, c, c,
        jsonb_build_object('campaign_id', 'c-' || (i %% 500), 'lead_id', (i %% 100000)::text),
        'c-' || (i %% 500)
    FROM generate_series(%(a)s::bigint, %(b)s::bigint) AS i,
        LATERAL (SELECT (%(slots)s::uuid[])[1 + (hashint8(i) & 1023) %% 1000] AS o,
                 now() - interval '90 days' * random() AS c,
                 CASE WHEN i %% 10 = 0 THEN 'inbound' ELSE 'outbound' END AS dir,
                 CASE WHEN i %% 10 <> 0 THEN 'email'
                      ELSE (ARRAY['reply', 'reply', 'auto_reply', 'bounce', 'complaint',
                                  'email'])[1 + (i / 10) %% 6] END AS mtype) AS x
    RETURNING id, org_id, metadata_expires_at, created_at
)
INSERT INTO message_recipients (message_id, org_id, recipient, status, metadata_expires_at,
    created_at, updated_at)
SELECT m.id, m.org_id, 'u' || ((hashtext(m.id::text) & 1048575) * 16 + k) || '@example.net',
    CASE WHEN r < 0.85 THEN 'delivered' WHEN r < 0.90 THEN 'bounced'
         WHEN r < 0.93 THEN 'deferred' WHEN r < 0.935 THEN 'complained' ELSE 'relayed' END,
    m.metadata_expires_at, m.created_at, m.created_at
FROM m CROSS JOIN generate_series(1, %(k)s) AS k,
    -- per row (an uncorrelated random() would be drawn once per statement)
    LATERAL (SELECT (hashtext(m.id::text || k) & 65535) / 65536.0 AS r) AS rr
"""


def say(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def zipf_slots(orgs: list[uuid.UUID], s: float = 1.1, n: int = 1000) -> list[uuid.UUID]:
    """N slots, organisation i (1-based) holding a share proportional to 1/i^S."""
    weights = [1 / (i + 1) ** s for i in range(len(orgs))]
    total = sum(weights)
    slots: list[uuid.UUID] = []
    for org, w in zip(orgs, weights, strict=True):
        slots += [org] * max(1, round(n * w / total))
    return (slots + [orgs[0]] * n)[:n]


def generate(conn: psycopg.Connection, slots: list[uuid.UUID], count: int, k: int) -> None:
    done = 0
    while done < count:
        n = min(CHUNK, count - done)
        t0 = time.monotonic()
        conn.execute(_GENERATE, {"a": done, "b": done + n - 1, "slots": slots, "k": k})
        done += n
        say(f"{done}/{count} messages (+{k * n} recipients) in {time.monotonic() - t0:.1f}s")


def dashboard_logins(conn: psycopg.Connection, orgs: list[uuid.UUID],
                     tag: str) -> dict[uuid.UUID, tuple[str, str]]:
    """A LOGIN role per organisation, granted as its dashboard role."""
    logins = {}
    for i, org in enumerate(orgs):
        role, password = f"bench_dash_{tag}_{i}", uuid.uuid4().hex
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)))
        tenants.grant_role(conn, org, role)
        logins[org] = (role, password)
    return logins


@dataclass(frozen=True)
class Sample:
    """One real (message, recipient) row: the parameters of a run."""

    org_id: uuid.UUID
    envelope_from: str
    subject: str
    campaign_id: str
    lead_id: str
    created_at: datetime
    recipient: str


Shape = Callable[[Sample], MessageFilter]

# Each shape from one sampled row (its org's dashboard runs it: no org_id in
# the filter, list_messages finds the login's organisation).
SHAPES: dict[str, Shape] = {
    "recipient exact": lambda r: MessageFilter(recipient=r.recipient.upper()),
    "sender": lambda r: MessageFilter(sender=r.envelope_from),
    "subject substring": lambda r: MessageFilter(subject=r.subject.split()[-2]),
    "tag campaign_id": lambda r: MessageFilter(tags=(("campaign_id", r.campaign_id),)),
    "tag lead_id": lambda r: MessageFilter(tags=(("lead_id", r.lead_id),)),
    "status complained": lambda r: MessageFilter(status="complained"),
    "status bounced": lambda r: MessageFilter(status="bounced"),
    "inbound complaint": lambda r: MessageFilter(direction="inbound", message_type="complaint"),
    "time range (1 day)": lambda r: MessageFilter(
        since=r.created_at - timedelta(hours=12), until=r.created_at + timedelta(hours=12)),
    "combined": lambda r: MessageFilter(
        sender=r.envelope_from, status="delivered", tags=(("campaign_id", r.campaign_id),),
        since=r.created_at - timedelta(days=7)),
}


def samples(conn: psycopg.Connection, n: int) -> list[Sample]:
    """N real (message, one recipient) rows, organisations weighted by size."""
    cur = conn.execute(
        "SELECT m.org_id, m.envelope_from, m.subject, m.campaign_id, m.tags ->> 'lead_id',"
        " m.created_at, r.recipient FROM messages m TABLESAMPLE BERNOULLI (1)"
        " JOIN message_recipients r ON r.message_id = m.id"
        " AND r.metadata_expires_at = m.metadata_expires_at"
        " ORDER BY random() LIMIT %s", (n,))
    return [Sample(*row) for row in cur]


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(
        values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.environ.get("POSTKEEP_CONFIG"))
    ap.add_argument("--messages", type=int, default=10_000_000)
    ap.add_argument("--recipients", type=int, default=None, help="default: 2 per message")
    ap.add_argument("--orgs", type=int, default=50)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--explain", default="search-explain.txt")
    args = ap.parse_args()
    if not args.config:
        raise SystemExit("--config or $POSTKEEP_CONFIG is required")
    k = max(1, round((args.recipients or 2 * args.messages) / args.messages))
    cfg = load(args.config)
    conn = psycopg.connect(cfg.postgres.conninfo(), autocommit=True)
    conn.execute("SET statement_timeout = 0")
    migrate.apply_migrations(conn)
    conn.execute("SELECT ensure_partitions(now() + interval '100 days')")
    tag = uuid.uuid4().hex[:6]
    orgs = [directory.add_organisation(conn, f"bench-{tag}-{i}", "basic")
            for i in range(args.orgs)]
    say(f"generating {args.messages} messages, {k} recipients each, {args.orgs} organisations")
    t0 = time.monotonic()
    generate(conn, zipf_slots(orgs), args.messages, k)
    gen_s = time.monotonic() - t0
    say(f"generated in {gen_s:.0f}s; VACUUM ANALYZE ...")
    conn.execute("VACUUM ANALYZE messages")
    conn.execute("VACUUM ANALYZE message_recipients")
    logins = dashboard_logins(conn, orgs, tag)
    rows = samples(conn, args.runs)
    pg = cfg.postgres
    conns: dict[uuid.UUID, psycopg.Connection] = {}

    def as_dashboard(org: uuid.UUID) -> psycopg.Connection:
        if org not in conns:
            role, password = logins[org]
            conns[org] = psycopg.connect(host=pg.host, port=pg.port, dbname=pg.dbname,
                                         user=role, password=password, autocommit=True)
        return conns[org]

    sizes: dict[uuid.UUID, int] = dict(
        conn.execute("SELECT org_id, count(*) FROM messages GROUP BY org_id").fetchall())
    results: dict[str, list[float]] = {}
    explain: list[str] = []
    for name, shape in SHAPES.items():
        times = []
        for row in rows:
            dash = as_dashboard(row.org_id)
            f = replace(shape(row), limit=PAGE)
            t1 = time.perf_counter()
            messages.list_messages(dash, f)
            times.append((time.perf_counter() - t1) * 1000)
        results[name] = times
        # EXPLAIN the largest organisation's run: the worst case of a shape.
        big = max(rows, key=lambda r: sizes.get(r.org_id, 0))
        dash = as_dashboard(big.org_id)
        f = replace(shape(big), limit=PAGE, org_id=messages.tenant_org(dash))
        query, params = messages.search_query(f)
        plan = dash.execute("EXPLAIN (ANALYZE, BUFFERS) " + query, params).fetchall()
        explain += [f"=== {name} (organisation of {sizes.get(big.org_id)} messages,"
                    f" as its dashboard role)", *[p[0] for p in plan], ""]
        say(f"{name}: p50 {pct(times, 50):.1f} ms, p95 {pct(times, 95):.1f} ms")
    Path(args.explain).write_text("\n".join(explain))
    total = sum(sizes.values())
    rcpt = conn.execute("SELECT count(*) FROM message_recipients").fetchone()
    parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent ="
                         " 'messages'::regclass").fetchone()
    biggest = max(sizes.values())
    print(f"\n{total} messages, {rcpt[0] if rcpt else 0} recipient rows, {args.orgs}"
          f" organisations (largest {biggest}), {parts[0] if parts else 0} message partitions;"
          f" generated in {gen_s:.0f}s; {len(rows)} runs per shape as the dashboard role,"
          f" page of {PAGE}\n")
    print("| shape | p50 ms | p95 ms | max ms |\n|---|---:|---:|---:|")
    for name, times in results.items():
        print(f"| {name} | {pct(times, 50):.1f} | {pct(times, 95):.1f} | {max(times):.1f} |")
    print(f"\nEXPLAIN (ANALYZE, BUFFERS): {args.explain}")


if __name__ == "__main__":
    main()
