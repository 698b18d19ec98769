"""Seconds of spooling or tempfail per PostgreSQL failover (issue 20), a few runs.

Brings up devstack/pgha.sh (etcd, two PostgreSQL nodes under Patroni,
synchronous replication) and a stack pointed at it (its own Postfix, MinIO
and daemons), sends mail from three clients throughout, and RUNS times each:
kill -9 the primary's Patroni and PostgreSQL (then start it again, back as
the synchronous replica), and `patronictl switchover`.  For each it prints
when the other node led and how long, from the kill or the switchover, the
milter answered with anything but a direct capture (spooled, or tempfailed),
then the medians.  `make bench-pgha` (BENCH_PGHA_ARGS='--runs 5').
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.pgha import Cluster, Disruption, cluster, fail_over, mail_flowing
from support.wait import until

REPO = Path(__file__).resolve().parents[1]


def _one(c: Cluster, kind: str) -> Disruption:
    until(c.sync_replica, "a synchronous replica", 300)
    _, domain = c.stack.new_org("pro")
    with mail_flowing(c.stack, domain) as load:
        d = fail_over(c, load, kind)
    if kind == "kill":
        c.pgha("start", d.old_leader)  # back, as the replica
    print(d.line(), flush=True)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="failovers of each kind (default 3)")
    ap.add_argument("--port", type=int, default=22025,
                    help="the stack's port base (+0..+12); pgha.sh gets +50..+55")
    ap.add_argument("--dir", default=str(REPO / ".stack-bench-pgha"))
    args = ap.parse_args()
    results: dict[str, list[Disruption]] = {"kill": [], "switchover": []}
    with cluster(Path(args.dir), args.port, args.port + 50) as c:
        for _ in range(args.runs):
            for kind in results:
                results[kind].append(_one(c, kind))
    print()
    print("| failover | runs | new leader after (median) | spooled/tempfailed for (median)"
          " | each run (s) | messages spooled (each run) | slowest answer (median) |")
    print("|---|---|---|---|---|---|---|")
    for kind, runs in results.items():
        led = statistics.median(d.leader_seconds for d in runs)
        disrupted = statistics.median(d.disrupted_seconds for d in runs)
        slowest = statistics.median(d.slowest_seconds for d in runs)
        each = ", ".join(f"{d.disrupted_seconds:.1f}" for d in runs)
        spooled = ", ".join(str(d.spooled) for d in runs)
        print(f"| {kind} | {len(runs)} | {led:.1f} s | {disrupted:.1f} s | {each} | {spooled}"
              f" | {slowest:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
