"""The PostgreSQL primary lost under load, and a switchover: nothing accepted is lost.

A second stack (its own Postfix, MinIO and daemons, ports POSTKEEP_SMTP_PORT
+100..+112) runs against devstack/pgha.sh (etcd and two PostgreSQL nodes under
Patroni, synchronous replication; ports +150..+155), connecting with a libpq
multi-host string (target_session_attrs=read-write).  Mail flows through
Postfix from three clients while the primary's host is killed (kill -9 of its
Patroni and PostgreSQL), then, once it is back as the replica, while Patroni
switches over.  Each time the replica takes over; the milter spools (or
tempfails) until the new primary answers and then captures directly again
with no restart of anything; postkeep-storage drains the spool into the new
primary; postkeep-policyd counts in it again.  In the end every message the
client saw accepted has exactly one row, and its object restores to what the
next hop received.  The seconds of spooling or tempfail are printed (and
measured again, a few runs, by `make bench-pgha`).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pgha import Cluster, Disruption, Load, cluster, fail_over, mail_flowing
from support.stack import strip_received
from support.wait import until

pytestmark = pytest.mark.outage

ROOT = Path(__file__).resolve().parents[1] / ".stack-pgha-test"
STACK_OFFSET, PGHA_OFFSET = 100, 150


@pytest.fixture(scope="module")
def pgha() -> Iterator[Cluster]:
    base = int(os.environ["POSTKEEP_SMTP_PORT"])
    with cluster(ROOT, base + STACK_OFFSET, base + PGHA_OFFSET) as c:
        yield c


def _degraded_decisions(c: Cluster) -> float:
    """postkeep-policyd's decisions taken without PostgreSQL, all modes."""
    with urllib.request.urlopen(c.stack.env["POSTKEEP_POLICYD_METRICS"], timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(
        r"^postkeep_policyd_degraded_decisions_total\{[^}]*\} (\S+)$", text, re.M))


def _counted(c: Cluster, org_id: uuid.UUID) -> int:
    with c.connect_admin() as conn:
        row = conn.execute("SELECT coalesce(sum(used), 0) FROM rate_counters"
                           " WHERE org_id = %s AND kind = 'messages'", (org_id,)).fetchone()
    return int(row[0]) if row else 0


def _assert_policyd_counts_again(c: Cluster, org_id: uuid.UUID, load: Load) -> None:
    """Mail after the failover is decided by PostgreSQL (the new primary), not
    in degraded mode: the counters grow and the degraded count does not."""
    def ten_decided_by_postgres() -> bool:
        degraded, counted, n = _degraded_decisions(c), _counted(c, org_id), len(load.answers)
        until(lambda: sum(a.accepted for a in load.answers[n:]) >= 10,
              "ten more messages accepted", 120)
        return _degraded_decisions(c) == degraded and _counted(c, org_id) > counted

    until(ten_decided_by_postgres, "policyd deciding with PostgreSQL (the new primary) again",
          120)


def _assert_every_accepted_stored(c: Cluster, org_id: uuid.UUID, load: Load) -> None:
    spool = c.spool()
    until(lambda: not spool.entries(), "postkeep-storage to drain the outage spool", 300)
    accepted = [a for a in load.answers if a.accepted]
    refused = [a for a in load.answers if not a.accepted]
    # A tempfail is allowed (the client retries); a 5xx or no answer never.
    assert all(a.code == 451 for a in refused), {(a.code, a.text) for a in refused}
    with c.connect_admin() as conn:
        rows: dict[str, list[tuple[str, bytes, uuid.UUID]]] = {}
        for qid, key, sha, mid in conn.execute(
                "SELECT queue_id, object_key, sha256, id FROM messages WHERE org_id = %s",
                (org_id,)).fetchall():
            rows.setdefault(qid, []).append((key, bytes(sha), mid))
    missing = [a.queue_id for a in accepted if len(rows.get(a.queue_id or "", [])) != 1]
    assert not missing, (f"{len(missing)} of {len(accepted)} accepted messages have no row"
                         f" (or several): {missing[:5]}")
    # Content too, for a sample spread over the run (every one costs a restore).
    for a in accepted[:: max(1, len(accepted) // 20)]:
        key, sha, mid = rows[a.queue_id or ""][0]
        stored = c.stack.restored(key, mid)  # messages accepted together share a pack
        assert hashlib.sha256(stored).digest() == sha
        assert stored == strip_received(c.stack.sink_copy(a.token, timeout=120)), a.token


def _failover_under_load(c: Cluster, kind: str) -> Disruption:
    org_id, domain = c.stack.new_org("pro")
    with mail_flowing(c.stack, domain) as load:
        disruption = fail_over(c, load, kind)
        print(disruption.line())
        _assert_policyd_counts_again(c, org_id, load)
    assert disruption.new_leader != disruption.old_leader
    _assert_every_accepted_stored(c, org_id, load)
    return disruption


def test_primary_killed_under_load_replica_takes_over_nothing_lost(pgha: Cluster) -> None:
    _failover_under_load(pgha, "kill")
    # The lost host comes back as the synchronous replica (pg_rewind if needed).
    killed = "node1" if pgha.leader() == "node2" else "node2"
    pgha.pgha("start", killed)
    until(pgha.sync_replica, f"{killed} back as the synchronous replica", 180)


def test_switchover_under_load_nothing_lost(pgha: Cluster) -> None:
    until(pgha.sync_replica, "a synchronous replica before the switchover", 180)
    _failover_under_load(pgha, "switchover")
