"""Throughput with one host and with two, and seconds of spooling per MinIO
node failure, on the cluster stack (issue 20).

Brings up `devstack/stack.sh cluster-up` (two Postfix hosts, each its own
milter, policyd and sidecar, sharing one PostgreSQL and a MinIO of four nodes,
erasure 2+2, through a per-host HAProxy), afresh, and always takes it down.

Throughput: SENDERS clients (persistent SMTP connections, closed loop) send
for SECONDS after a warm-up, all through host a ("one host") or half through
each ("two hosts"); the runs are paired and alternated (one, two; two, one;
...) PAIRS times.  Counted: messages accepted per second in the window; after
each run every accepted message must have its row (captured), and the CPU per
message in the window of each component (both hosts' summed: milter, policyd,
sidecar, Postfix, HAProxy; the one PostgreSQL; the four MinIO nodes) and of
the whole cluster (the load generator and next-hop sinks not counted).

Failures: mail flowing through both hosts (two clients each, paced); kill -9
of one MinIO node (a different one each run), held down HOLD seconds, started
again; then two nodes at once (writes lose quorum).  For each: how long, from
the kill, the milters answered anything but a direct capture (spooled or
tempfailed), messages spooled and tempfailed, and for two nodes how long after
their return the spools took to drain.  `make bench-cluster`
(BENCH_CLUSTER_ARGS='--pairs 5 --seconds 20').
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import smtp
from support.cluster import HOSTS, Cluster, cluster
from support.pgha import Load, mail_flowing
from support.wait import until

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("milter", "policyd", "storage")
TICK = os.sysconf("SC_CLK_TCK")


def _message(domain: str, token: str) -> bytes:
    return (f"From: app@{domain}\r\nTo: r-{token}@sink.test\r\nSubject: bench {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\n"
            ).encode() + b"a line of a 3 KB message through the cluster stack, padded.....\r\n" * 45


def _procs() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and its reaped children)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d.name)] = (int(f[1]), sum(int(x) for x in f[11:15]) / TICK)
    return out


def _tree_cpu(procs: dict[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of ROOT and every live descendant (each with its reaped
    children): a child that exits between two readings moves into its
    parent's count, so differences stay right."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            total += procs[pid][1]
            todo.extend(children.get(pid, []))
    return total


def _pid(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _roots(c: Cluster) -> dict[str, list[int]]:
    """The cluster's processes by component (the next-hop sinks and the load
    generator are not the product and are left out)."""
    roots: dict[str, list[int]] = {d: [] for d in (*DAEMONS, "postfix", "postgres", "minio",
                                                    "haproxy")}
    for h in HOSTS:
        sd = Path(c.hosts[h].env["POSTKEEP_STACK_DIR"])
        for d in DAEMONS:
            roots[d].append(_pid(sd / d / f"{d}.pid"))
        roots["postfix"].append(_pid(sd / "postfix" / "spool" / "pid" / "master.pid"))
        roots["haproxy"].append(_pid(c.dir / "lb" / f"{h}.pid"))
    roots["postgres"].append(_pid(c.dir / "a" / "pg" / "data" / "postmaster.pid"))
    roots["minio"] = [_pid(c.dir / "minio" / f"node{i}.pid") for i in range(4)]
    return roots


def _cluster_cpu(c: Cluster) -> dict[str, float]:
    procs = _procs()
    return {k: sum(_tree_cpu(procs, p) for p in pids if p) for k, pids in _roots(c).items()}


@dataclass
class Throughput:
    hosts: int
    accepted_per_s: float
    accepted: int
    refused: int
    cpu_ms: dict[str, float]  # per message: each component (hosts summed), and "cluster"


def _throughput(c: Cluster, nhosts: int, senders: int, seconds: float,
                warmup: float) -> Throughput:
    hosts = HOSTS[:nhosts]
    org_id, domain = c.hosts["a"].new_org("enterprise")
    stop = threading.Event()
    stamps: list[float] = []
    refused = [0]
    lock = threading.Lock()

    def sender(h: str) -> None:
        client = smtp.Client(*c.hosts[h].smtp, timeout=120)
        try:
            while not stop.is_set():
                token = uuid.uuid4().hex
                try:
                    client.send(f"app@{domain}", [f"r-{token}@sink.test"],
                                _message(domain, token))
                    with lock:
                        stamps.append(time.monotonic())
                except smtp.SMTPError:
                    with lock:
                        refused[0] += 1
                    client.reset()
        finally:
            client.close()

    threads = [threading.Thread(target=sender, args=(hosts[i % nhosts],))
               for i in range(senders)]
    for t in threads:
        t.start()
    time.sleep(warmup)  # a warm-up, not a synchronisation: nothing waits on it
    cpu0, t0 = _cluster_cpu(c), time.monotonic()
    time.sleep(seconds)  # the measuring window
    cpu1, t1 = _cluster_cpu(c), time.monotonic()
    stop.set()
    for t in threads:
        t.join(180)
    in_window = sum(t0 <= s < t1 for s in stamps)
    with c.hosts["a"].connect() as conn:
        def rows() -> int:
            got = conn.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                               (org_id,)).fetchone()
            return int(got[0]) if got else 0
        until(lambda: rows() == len(stamps), f"{len(stamps)} accepted messages captured", 300)
    per = max(in_window, 1)
    cpu = {d: 1000 * (cpu1[d] - cpu0[d]) / per for d in cpu0}
    cpu["cluster"] = sum(cpu.values())
    return Throughput(nhosts, in_window / (t1 - t0), len(stamps), refused[0], cpu)


@dataclass
class Failure:
    nodes: list[str]
    disrupted_seconds: float  # from the kill until the last answer not a direct capture
    down_seconds: float
    drained_after_return: float  # from the start again until both spools were empty
    redundant_after_return: float  # ... until every node could be lost again
    spooled: int
    tempfailed: int
    accepted: int

    def line(self) -> str:
        return (f"{'+'.join(self.nodes)} killed for {self.down_seconds:.0f}s: spooled or"
                f" tempfailed for {self.disrupted_seconds:.1f}s ({self.spooled} spooled,"
                f" {self.tempfailed} tempfailed, {self.accepted} accepted); spools empty"
                f" {self.drained_after_return:.1f}s after the return, every node losable again"
                f" after {self.redundant_after_return:.1f}s")


def _failure(c: Cluster, nodes: list[str], hold: float) -> Failure:
    _, domain = c.hosts["a"].new_org("pro")
    loads: dict[str, Load] = {}
    with mail_flowing(c.hosts["a"], domain, 2) as la, mail_flowing(c.hosts["b"], domain, 2) as lb:
        loads = {"a": la, "b": lb}
        until(lambda: all(sum(a.accepted for a in ld.answers) >= 5 for ld in loads.values()),
              "mail flowing", 120)
        until(c.minio_redundant, "a cluster that can lose a node", 300)
        t0 = time.monotonic()
        for n in nodes:
            c.ctl("kill", n)
        time.sleep(hold)  # the outage's length is what is being varied, not awaited
        back = time.monotonic()
        for n in nodes:
            c.ctl("start", n)
        until(c.minio_writable, "write quorum", 120)
        until(c.minio_redundant, "a cluster that can lose a node again", 300)
        redundant = time.monotonic() - back

        def direct_again() -> bool:
            for h, ld in loads.items():
                outcomes = c.milter_outcomes(h)
                recent = [a for a in ld.answers if a.started > back]
                if len(recent) < 5 or not all(
                        a.accepted and outcomes.get(a.queue_id or "") == "captured"
                        for a in recent[-5:]):
                    return False
            return True

        until(direct_again, "five direct captures in a row on each host", 180)
    until(lambda: all(not c.spool(h).entries() for h in HOSTS), "the spools to drain", 300)
    drained = time.monotonic() - back
    bad_end, spooled, tempfailed, accepted = t0, 0, 0, 0
    for h, ld in loads.items():
        outcomes = c.milter_outcomes(h)
        for a in ld.answers:
            accepted += a.accepted
            if a.ended < t0:
                continue
            direct = a.accepted and outcomes.get(a.queue_id or "") == "captured"
            spooled += outcomes.get(a.queue_id or "") == "spooled"
            tempfailed += not a.accepted
            if not direct:
                bad_end = max(bad_end, a.ended)
    return Failure(nodes, bad_end - t0, back - t0, drained, redundant, spooled, tempfailed,
                   accepted)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=22025, help="the cluster's port base (+0..+43)")
    ap.add_argument("--dir", default=str(REPO / ".stack-bench-cluster"))
    ap.add_argument("--pairs", type=int, default=3, help="one-host/two-host pairs (default 3)")
    ap.add_argument("--seconds", type=float, default=15.0, help="measuring window per run")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--senders", type=int, default=12, help="SMTP clients in all (default 12)")
    ap.add_argument("--kills", type=int, default=3, help="one-node failures (default 3)")
    ap.add_argument("--double-kills", type=int, default=2, help="two-node failures (default 2)")
    ap.add_argument("--hold", type=float, default=10.0, help="seconds a killed node stays down")
    args = ap.parse_args()
    runs: dict[int, list[Throughput]] = {1: [], 2: []}
    failures: list[Failure] = []
    with cluster(Path(args.dir), args.port) as c:
        for p in range(args.pairs):
            for n in ((1, 2) if p % 2 == 0 else (2, 1)):
                r = _throughput(c, n, args.senders, args.seconds, args.warmup)
                runs[n].append(r)
                print(f"{n} host(s): {r.accepted_per_s:.1f} msg/s accepted and captured"
                      f" ({r.accepted} in all, {r.refused} refused); CPU ms/msg "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_ms.items()), flush=True)
        for k in range(args.kills):
            failures.append(_failure(c, [f"minio{k % 4}"], args.hold))
            print(failures[-1].line(), flush=True)
        for k in range(args.double_kills):
            failures.append(_failure(c, [f"minio{(2 * k) % 4}", f"minio{(2 * k + 1) % 4}"],
                                     args.hold))
            print(failures[-1].line(), flush=True)
    print()
    parts = list(runs[1][0].cpu_ms) if runs[1] else []
    print("| hosts | runs | accepted and captured, msg/s (median) | each run | "
          + " | ".join(f"{k} ms/msg" for k in parts) + " |")
    print("|---|---|---|---|" + "---|" * len(parts))
    for n, rs in runs.items():
        med = {k: statistics.median(r.cpu_ms[k] for r in rs) for k in parts}
        print(f"| {n} | {len(rs)} | {statistics.median(r.accepted_per_s for r in rs):.1f} | "
              + ", ".join(f"{r.accepted_per_s:.1f}" for r in rs) + " | "
              + " | ".join(f"{med[k]:.2f}" for k in parts) + " |")
    ratios = [b.accepted_per_s / a.accepted_per_s for a, b in zip(runs[1], runs[2], strict=True)]
    print(f"\ntwo hosts / one host, per pair: {', '.join(f'{x:.2f}' for x in ratios)}"
          f" (median {statistics.median(ratios):.2f})")
    print()
    print("| MinIO nodes killed | runs | spooled/tempfailed for (median) | each run (s) |"
          " spooled (each) | tempfailed (each) | spools empty after return (median) |"
          " redundant again after return (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (1, 2):
        fs = [f for f in failures if len(f.nodes) == size]
        if not fs:
            continue
        print(f"| {size} of 4, {fs[0].down_seconds:.0f} s down | {len(fs)} |"
              f" {statistics.median(f.disrupted_seconds for f in fs):.1f} s | "
              + ", ".join(f"{f.disrupted_seconds:.1f}" for f in fs) + " | "
              + ", ".join(str(f.spooled) for f in fs) + " | "
              + ", ".join(str(f.tempfailed) for f in fs)
              + f" | {statistics.median(f.drained_after_return for f in fs):.1f} s"
              f" | {statistics.median(f.redundant_after_return for f in fs):.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
