"""Policy-protocol load generator: postkeep-policyd against postfwd2.

Speaks the policy protocol directly (no Postfix): C connections, each sending
R DATA-stage requests one after another (as a Postfix smtpd does), every
request a new message (new `instance`), so every postkeep decision is the
counting path: one `rate_consume()` round trip to PostgreSQL.  The peer is
Debian's postfwd2 with the equivalent rule, a rate limit per sender domain
(`rate(sender_domain/LIMIT/3600/...)`), kept in postfwd's own memory.

Three servers, alternated run by run for `--repetitions` rounds: postkeep-policyd
counting exactly (one `rate_consume()` round trip per decision), postkeep-policyd
in lease mode (the organisation's tier in `policyd.lease_tiers`: one round trip
per block of units), and postfwd2.  `--processes N` runs N policyd processes
sharing the counters, the connections spread over them.  Each round has two
runs per server:
- closed loop: C connections each sending the next request as soon as the
  reply came (as fast as the server answers): decisions/s;
- paced: the same connections sending at a fixed total rate (`--rate`,
  2,000/s by default, the issue's target), each connection at most one request
  in flight: the rate achieved and p50/p99 latency from send to reply.

Both get limits too high to trip, so what is measured is the decision
itself.  Prints markdown tables: medians over the rounds and the ratios
against postfwd2.

Usage (the stack must be up; `make bench-policyd` does all of it):
    python bench/policyd_bench.py --config DIR/postkeep.toml [--connections 20]
        [--rate 2000] [--seconds 5] [--repetitions 5] [--processes 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from postkeep.storage.metadata import directory

# The loopback helpers the policyd tests use (tests/, never the repository
# root: the root's milter/ folder would shadow pymilter's `milter`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.policyd import config_with, free_port, wait_listening

LIMIT = 2_000_000_000


def request(domain: str) -> bytes:
    return (f"request=smtpd_access_policy\nprotocol_state=DATA\nprotocol_name=ESMTP\n"
            f"client_address=127.0.0.1\nclient_name=localhost\nhelo_name=bench\n"
            f"sender=app@{domain}\nrecipient=\nrecipient_count=1\n"
            f"queue_id={uuid.uuid4().hex[:12].upper()}\ninstance={uuid.uuid4().hex}\n"
            f"size=0\nsasl_username=\n\n").encode()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, domain: str,
              lat: list[float], actions: dict[str, int]) -> None:
    """One request on an open connection: its latency to LAT, its action counted."""
    raw = request(domain)
    started = time.perf_counter()
    writer.write(raw)
    reply = await reader.readuntil(b"\n\n")
    lat.append(time.perf_counter() - started)
    action = reply.decode().removeprefix("action=").split(" ", 1)[0].strip()
    actions[action] = actions.get(action, 0) + 1


async def closed_loop(ports: list[int], domains: list[str], connections: int, seconds: float,
                      ) -> tuple[float, list[float], dict[str, int]]:
    """CONNECTIONS clients, each asking again as soon as answered, for SECONDS."""
    lat: list[float] = []
    actions: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
        while time.perf_counter() < stop:
            await ask(reader, writer, domains[i % len(domains)], lat, actions)
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(connections)))
    return time.perf_counter() - started, lat, actions


async def paced(ports: list[int], domains: list[str], connections: int, rate: float,
                seconds: float,
                ) -> tuple[float, list[float], dict[str, int]]:
    """RATE requests/s in all over CONNECTIONS clients, each on its own schedule and with
    at most one request in flight (as a Postfix smtpd); latency from send to reply."""
    lat: list[float] = []
    actions: dict[str, int] = {}
    per = max(1, int(rate * seconds / connections))
    gap = connections / rate
    t0 = time.perf_counter() + 0.2

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
        for k in range(per):
            due = t0 + i / rate + k * gap
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await ask(reader, writer, domains[i % len(domains)], lat, actions)
        writer.close()

    await asyncio.gather(*(client(i) for i in range(connections)))
    return time.perf_counter() - t0, lat, actions


def histogram(metrics_port: int) -> dict[float, float]:
    """policyd's decision-latency histogram: cumulative count by upper bound (s)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    out = {}
    for m in re.finditer(rb'^postkeep_policyd_decision_duration_seconds_bucket\{le="([^"]+)"\}'
                         rb" (\S+)$", text, re.M):
        out[float(m.group(1))] = float(m.group(2))
    return out


def merged(histograms: list[dict[float, float]]) -> dict[float, float]:
    """Several processes' cumulative buckets added up."""
    out: dict[float, float] = {}
    for h in histograms:
        for bound, count in h.items():
            out[bound] = out.get(bound, 0) + count
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


def start_postfwd(workdir: Path) -> tuple[int, int, list[str]]:
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
    wait_listening(cache_port)
    return port, cache_port, [*args, "--kill"]


def make_orgs(conn: psycopg.Connection, tag: str, count: int,
              ) -> dict[str, list[tuple[str, object]]]:
    """COUNT organisations per policyd mode: 'exact' (tier pro) and 'lease' (tier
    enterprise, listed in policyd.lease_tiers); limits overridden too high to trip."""
    out: dict[str, list[tuple[str, object]]] = {}
    for mode, tier in (("exact", "pro"), ("lease", "enterprise")):
        for n in range(count):
            name = f"bench-policyd-{tag}-{mode}-{n}"
            oid = directory.add_organisation(conn, name, tier)
            directory.add_domain(conn, oid, f"{name}.bench.test")
            conn.execute("UPDATE organisations SET messages_per_hour = %s,"
                         " recipients_per_day = %s, bytes_per_day = %s WHERE id = %s",
                         (LIMIT, LIMIT, LIMIT * 1000, oid))
            out.setdefault(mode, []).append((f"{name}.bench.test", oid))
    return out


def pids_listening(*ports: int) -> list[int]:
    """The processes listening on these loopback TCP ports (from `ss -ltnp`)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    pids = set()
    for line in out.splitlines():
        if any(f"127.0.0.1:{port} " in line for port in ports):
            pids.update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return sorted(pids)


def machine_cpu_seconds() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of PIDS so far (seconds)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.environ.get("POSTKEEP_CONFIG"))
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--rate", type=float, default=2000, help="paced runs: requests/s in all")
    ap.add_argument("--seconds", type=float, default=5, help="length of each run")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--processes", type=int, default=1, help="policyd processes")
    ap.add_argument("--orgs", type=int, default=1,
                    help="organisations the connections spread over (1: one hot counter row)")
    ap.add_argument("--skip-postfwd", action="store_true")
    opts = ap.parse_args()
    cfg = load(opts.config)
    tag = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    with psycopg.connect(cfg.postgres.conninfo(), autocommit=True) as conn:
        orgs = make_orgs(conn, tag, opts.orgs)
    domains = {mode: [d for d, _ in made] for mode, made in orgs.items()}
    source = config_with(cfg.source, workdir / "postkeep.toml", "policyd",
                         lease_tiers=["enterprise"])
    procs: list[subprocess.Popen[bytes]] = []
    stop_postfwd: list[str] | None = None
    try:
        ports, metrics_ports = [], []
        policyd = str(Path(sys.executable).with_name("postkeep-policyd"))
        for n in range(opts.processes):
            pport, mport = free_port(), free_port()
            procs.append(subprocess.Popen(
                [policyd, "--config", source, "--listen", f"127.0.0.1:{pport}",
                 "--metrics", f"127.0.0.1:{mport}"], cwd="/tmp", stdout=subprocess.DEVNULL,
                stderr=open(workdir / f"policyd{n}.log", "wb")))  # noqa: SIM115
            ports.append(pport)
            metrics_ports.append(mport)
        for port in ports:
            wait_listening(port)
        # (label, ports, domain, pids whose CPU is the server's)
        servers = [("postkeep-policyd exact", ports, domains["exact"], [p.pid for p in procs]),
                   ("postkeep-policyd lease", ports, domains["lease"], [p.pid for p in procs])]
        if not opts.skip_postfwd:
            fport, cport, stop_postfwd = start_postfwd(workdir)
            servers.append(("postfwd2 1.35", [fport], domains["exact"],
                            pids_listening(fport, cport)))
        for _, sports, domain, _ in servers:  # warm up: connections, caches, first blocks
            asyncio.run(closed_loop(sports, domain, opts.connections, 1.0))
        results: dict[str, dict[str, list[float]]] = {s[0]: {} for s in servers}
        for rep in range(opts.repetitions):
            order = servers if rep % 2 == 0 else servers[::-1]
            for label, sports, domain, pids in order:
                r = results[label]
                cpu0, machine0 = cpu_seconds(pids), machine_cpu_seconds()
                elapsed, lat, actions = asyncio.run(
                    closed_loop(sports, domain, opts.connections, opts.seconds))
                n = max(1, len(lat))
                r.setdefault("closed_rate", []).append(len(lat) / elapsed)
                r.setdefault("cpu_ms", []).append((cpu_seconds(pids) - cpu0) * 1000 / n)
                r.setdefault("machine_ms", []).append(
                    (machine_cpu_seconds() - machine0) * 1000 / n)
                r.setdefault("closed_p99", []).append(percentile(lat, 0.99) * 1000)
                inside = label.startswith("postkeep")
                before = [histogram(m) for m in metrics_ports] if inside else []
                elapsed, lat, actions2 = asyncio.run(
                    paced(sports, domain, opts.connections, opts.rate, opts.seconds))
                r.setdefault("paced_rate", []).append(len(lat) / elapsed)
                r.setdefault("paced_p50", []).append(statistics.median(lat) * 1000)
                r.setdefault("paced_p99", []).append(percentile(lat, 0.99) * 1000)
                r.setdefault("paced_max", []).append(max(lat) * 1000)
                if inside:
                    b, a = merged(before), merged([histogram(m) for m in metrics_ports])
                    r.setdefault("inside_p99", []).append(
                        histogram_quantile(b, a, 0.99) * 1000)
                for k, v in (*actions.items(), *actions2.items()):
                    if k != "DUNNO":
                        raise SystemExit(f"{label}: unexpected answers {k} x{v}")
            print(f"round {rep + 1}/{opts.repetitions} done;"
                  f" load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        med = {label: {k: statistics.median(v) for k, v in r.items()}
               for label, r in results.items()}
        print(f"\n{opts.connections} connections over {opts.orgs} organisation(s),"
              f" {opts.processes} policyd process(es),"
              f" {opts.repetitions} rounds alternated, {opts.seconds:g} s per run;"
              f" paced at {opts.rate:,.0f}/s. Medians (min-max):\n")
        print("| server | closed loop decisions/s | closed p99 ms | server CPU ms/decision"
              " | machine CPU ms/decision | paced: achieved/s | paced p50 ms | paced p99 ms"
              " | paced max ms | paced p99 in policyd ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def cell(label: str, key: str, fmt: str) -> str:
            v = results[label].get(key)
            if not v:
                return "-"
            return (f"{format(statistics.median(v), fmt)}"
                    f" ({format(min(v), fmt)}-{format(max(v), fmt)})")

        for label in results:
            print(f"| {label} | {cell(label, 'closed_rate', ',.0f')}"
                  f" | {cell(label, 'closed_p99', '.2f')} | {cell(label, 'cpu_ms', '.3f')}"
                  f" | {cell(label, 'machine_ms', '.3f')} | {cell(label, 'paced_rate', ',.0f')}"
                  f" | {cell(label, 'paced_p50', '.2f')} | {cell(label, 'paced_p99', '.2f')}"
                  f" | {cell(label, 'paced_max', '.1f')} | {cell(label, 'inside_p99', '.2f')} |")
        if not opts.skip_postfwd:
            base = med["postfwd2 1.35"]["closed_rate"]
            print("\nclosed-loop throughput against postfwd2 (ratio of medians): " + ", ".join(
                f"{label} {med[label]['closed_rate'] / base:.2f}" for label in results
                if label != "postfwd2 1.35"))
        lease_trips = sum(lease_requests(m) for m in metrics_ports)
        print(f"\nlease mode: {lease_trips:.0f} round trips to PostgreSQL in all;"
              f" load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
              f" cores: {os.cpu_count()}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        if stop_postfwd:
            subprocess.run(stop_postfwd, check=False, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        oids = [oid for made in orgs.values() for _, oid in made]
        with psycopg.connect(cfg.postgres.conninfo(), autocommit=True) as conn:
            conn.execute("DELETE FROM rate_counters WHERE org_id = ANY(%s)", (oids,))
            conn.execute("DELETE FROM rate_reservations WHERE org_id = ANY(%s)", (oids,))
            conn.execute("DELETE FROM organisations WHERE id = ANY(%s)", (oids,))


def lease_requests(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    m = re.search(rb"^postkeep_policyd_lease_requests_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


if __name__ == "__main__":
    main()
