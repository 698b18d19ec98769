"""Policy-protocol load generator: postkeep-policyd against postfwd2.

Speaks the policy protocol directly (no Postfix): C connections, each sending
R DATA-stage requests one after another (as a Postfix smtpd does), every
request a new message (new `instance`), so every postkeep decision is the
counting path: one `rate_consume()` round trip to PostgreSQL.  The peer is
Debian's postfwd2 with the equivalent rule, a rate limit per sender domain
(`rate(sender_domain/LIMIT/3600/...)`), kept in postfwd's own memory.

Both get limits too high to trip, so what is measured is the decision
itself.  Prints a markdown table: decisions/s, p50 and p99 latency.

Usage (the stack must be up; `make bench-policyd` does all of it):
    python bench/policyd_bench.py --config DIR/postkeep.toml [--connections 1,20]
        [--requests 3000] [--warmup 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg

from postkeep.config import load
from postkeep.storage import directory

# The loopback helpers the policyd tests use (tests/, never the repository
# root: the root's milter/ folder would shadow pymilter's `milter`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.policyd import free_port, wait_listening

LIMIT = 2_000_000_000


def request(domain: str) -> bytes:
    return (f"request=smtpd_access_policy\nprotocol_state=DATA\nprotocol_name=ESMTP\n"
            f"client_address=127.0.0.1\nclient_name=localhost\nhelo_name=bench\n"
            f"sender=app@{domain}\nrecipient=\nrecipient_count=1\n"
            f"queue_id={uuid.uuid4().hex[:12].upper()}\ninstance={uuid.uuid4().hex}\n"
            f"size=0\nsasl_username=\n\n").encode()


async def one_connection(port: int, domain: str, count: int, lat: list[float],
                         actions: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        raw = request(domain)
        started = time.perf_counter()
        writer.write(raw)
        reply = await reader.readuntil(b"\n\n")
        lat.append(time.perf_counter() - started)
        action = reply.decode().removeprefix("action=").split(" ", 1)[0].strip()
        actions[action] = actions.get(action, 0) + 1
    writer.close()


async def run_load(port: int, domains: list[str], connections: int, per_connection: int,
                   ) -> tuple[float, list[float], dict[str, int]]:
    """CONNECTIONS clients, client i sending for domains[i % len(domains)]."""
    lat: list[float] = []
    actions: dict[str, int] = {}
    started = time.perf_counter()
    await asyncio.gather(*(one_connection(port, domains[i % len(domains)], per_connection,
                                          lat, actions) for i in range(connections)))
    return time.perf_counter() - started, lat, actions


def histogram(metrics_port: int) -> dict[float, float]:
    """policyd's decision-latency histogram: cumulative count by upper bound (s)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    out = {}
    for m in re.finditer(rb'^postkeep_policyd_decision_duration_seconds_bucket\{le="([^"]+)"\}'
                         rb" (\S+)$", text, re.M):
        out[float(m.group(1))] = float(m.group(2))
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float],
                       q: float) -> float:
    """Q of the decisions between two scrapes, linear inside a bucket (as Prometheus)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0) for b in bounds]
    total = counts[-1]
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cum - below, 1e-9)
        lower, below = bound, cum
    return lower


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_postfwd(workdir: Path) -> tuple[int, list[str]]:
    binary = shutil.which("postfwd2") or "/usr/sbin/postfwd2"
    port, cache_port = free_port(), free_port()
    rules = workdir / "postfwd.cf"
    rules.write_text(f"id=RATE; action=rate(sender_domain/{LIMIT}/3600/"
                     "450 4.7.1 rate limit exceeded)\n")
    os.chmod(workdir, 0o755)
    os.chmod(rules, 0o644)
    args = [binary, "--file", str(rules), "--server_socket", f"tcp:127.0.0.1:{port}",
            "--cache_socket", f"tcp:127.0.0.1:{cache_port}", "--pidfile",
            str(workdir / "postfwd.pid"), "--nodns", "--perfmon", "-u", "nobody", "-g",
            "nogroup"]
    subprocess.run(args, check=True, timeout=30)
    wait_listening(port)
    return port, [*args, "--kill"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.environ.get("POSTKEEP_CONFIG"))
    ap.add_argument("--connections", default="1,20")
    ap.add_argument("--requests", type=int, default=3000, help="per run, all connections")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--skip-postfwd", action="store_true")
    ap.add_argument("--orgs", type=int, default=1,
                    help="organisations the connections spread over (1: all on one hot row)")
    opts = ap.parse_args()
    cfg = load(opts.config)
    tag = uuid.uuid4().hex[:8]
    domains, oids = [], []
    with psycopg.connect(cfg.postgres.conninfo(), autocommit=True) as conn:
        for i in range(opts.orgs):
            name = f"bench-policyd-{tag}-{i}"
            oid = directory.add_organisation(conn, name, "enterprise")
            directory.add_domain(conn, oid, f"{name}.bench.test")
            conn.execute("UPDATE organisations SET messages_per_hour = %s,"
                         " recipients_per_day = %s WHERE id = %s", (LIMIT, LIMIT, oid))
            domains.append(f"{name}.bench.test")
            oids.append(oid)
    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    stop_postfwd: list[str] | None = None
    try:
        pport, mport = free_port(), free_port()
        policyd = str(Path(sys.executable).with_name("postkeep-policyd"))
        procs.append(subprocess.Popen(
            [policyd, "--config", cfg.source, "--listen", f"127.0.0.1:{pport}",
             "--metrics", f"127.0.0.1:{mport}"], cwd="/tmp",
            stdout=subprocess.DEVNULL, stderr=open(workdir / "policyd.log", "wb")))  # noqa: SIM115
        wait_listening(pport)
        targets = [("postkeep-policyd", pport)]
        if not opts.skip_postfwd:
            fport, stop_postfwd = start_postfwd(workdir)
            targets.append(("postfwd2 1.35", fport))
        rows = []
        for conns in (int(c) for c in opts.connections.split(",")):
            for label, port in targets:
                asyncio.run(run_load(port, domains, min(conns, opts.warmup),
                                 max(1, opts.warmup // conns)))
                per = max(1, opts.requests // conns)
                before = histogram(mport) if port == pport else {}
                elapsed, lat, actions = asyncio.run(run_load(port, domains, conns, per))
                inside = "-"
                if port == pport:
                    after = histogram(mport)
                    inside = (f"{histogram_quantile(before, after, 0.5) * 1000:.2f} /"
                              f" {histogram_quantile(before, after, 0.99) * 1000:.2f}")
                rows.append((label, conns, len(lat), len(lat) / elapsed,
                             statistics.median(lat) * 1000, percentile(lat, 0.99) * 1000,
                             inside, actions))
        print("| server | connections | decisions | decisions/s | p50 ms | p99 ms"
              " | in policyd p50 / p99 ms | answers |")
        print("|---|---|---|---|---|---|---|---|")
        for label, conns, n, rate, p50, p99, inside, actions in rows:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(actions.items()))
            print(f"| {label} | {conns} | {n} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {inside}"
                  f" | {shown} |")
        print(f"\norganisations: {opts.orgs};"
              f" load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
              f" cores: {os.cpu_count()}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        if stop_postfwd:
            subprocess.run(stop_postfwd, check=False, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with psycopg.connect(cfg.postgres.conninfo(), autocommit=True) as conn:
            conn.execute("DELETE FROM rate_counters WHERE org_id = ANY(%s)", (oids,))
            conn.execute("DELETE FROM rate_reservations WHERE org_id = ANY(%s)", (oids,))
            conn.execute("DELETE FROM organisations WHERE id = ANY(%s)", (oids,))


if __name__ == "__main__":
    main()
