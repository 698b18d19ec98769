"""The cluster stack of issue 20 (devstack/cluster.sh): two Postfix hosts, each a
whole stack (Postfix, postkeep-milter, -policyd, -storage), sharing one
PostgreSQL (Patroni: a primary and a synchronous replica, devstack/pgha.sh) and
a distributed MinIO of four nodes (erasure 2+2) that each host reaches through
its own HAProxy.

`tests/test_cluster.py` and `bench/cluster_bench.py` share it: bring the
cluster up afresh, kill -9 and restart its nodes (`stack.sh cluster-kill`,
`cluster-start`), and read what each host's milter did with each message.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from postkeep.config import load
from postkeep.storage.content.spool import Spool
from support.pgha import OUTCOME_RE, read_env
from support.stack import Stack

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "devstack" / "stack.sh"
HOSTS = ("a", "b")
MINIO_NODES = 4


@dataclass
class Cluster:
    """The running cluster in DIR: its hosts by name, and its MinIO nodes' ports."""

    dir: Path
    hosts: dict[str, Stack]
    minio_ports: list[int]
    pg_dir: Path | None = None  # devstack/pgha.sh's (CLUSTER_PG=patroni), else None

    def ctl(self, action: str, node: str) -> None:
        """ACTION 'kill' (kill -9) or 'start' for NODE: 'minio0'..'minio3', 'a' or 'b'."""
        done = subprocess.run(["bash", str(STACK), f"cluster-{action}", str(self.dir), node],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise AssertionError(f"stack.sh cluster-{action} {node}: exit {done.returncode}:"
                                 f" {done.stderr.strip()}")

    def minio_live(self, i: int) -> bool:
        """Node I answers its liveness check (by port: a killed process stays a
        zombie here, PID 1 does not reap)."""
        return _http_ok(f"http://127.0.0.1:{self.minio_ports[i]}/minio/health/live")

    def minio_writable(self) -> bool:
        """Some live node reports write quorum for the cluster."""
        return any(_http_ok(f"http://127.0.0.1:{p}/minio/health/cluster")
                   for p in self.minio_ports)

    def minio_redundant(self) -> bool:
        """Every node up and sure the cluster keeps write quorum without it
        (MinIO's maintenance check): one node may be lost now.  A node that
        just came back is not counted on by its peers for a moment."""
        return all(_http_ok(f"http://127.0.0.1:{p}/minio/health/cluster?maintenance=true")
                   for p in self.minio_ports)

    def spool(self, host: str) -> Spool:
        return Spool(self.hosts[host].config.milter.outage_spool_directory)

    def milter_outcomes(self, host: str) -> dict[str, str]:
        """queue id -> 'captured' or 'spooled', from HOST's milter log."""
        log = Path(self.hosts[host].env["POSTKEEP_STACK_DIR"], "milter", "milter.log")
        return {m.group(2): m.group(1) for m in OUTCOME_RE.finditer(log.read_text())}


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextmanager
def cluster(root: Path, port: int) -> Iterator[Cluster]:
    """stack.sh cluster-up ROOT PORT (ports PORT..PORT+43), made afresh; always
    cluster-down afterwards, even if the up failed half way."""
    _down(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        subprocess.run(["bash", str(STACK), "cluster-up", str(root), str(port)],
                       check=True, timeout=600, stdout=subprocess.DEVNULL)
        env = read_env(root / "cluster.env")
        hosts = {}
        for h in HOSTS:
            host_env = read_env(root / h / "env")
            hosts[h] = Stack(host_env, load(host_env["POSTKEEP_CONFIG"]))
        ports = [int(env[f"POSTKEEP_CLUSTER_MINIO_PORT_{i}"]) for i in range(MINIO_NODES)]
        pg_dir = env.get("POSTKEEP_CLUSTER_PG_DIR")
        yield Cluster(root, hosts, ports, Path(pg_dir) if pg_dir else None)
    finally:
        _down(root)


def _down(root: Path) -> None:
    subprocess.run(["bash", str(STACK), "cluster-down", str(root)], timeout=300, check=False,
                   stdout=subprocess.DEVNULL)
