"""Two Postfix hosts on a shared PostgreSQL and a distributed MinIO (issue 20).

`devstack/stack.sh cluster-up` (ports POSTKEEP_SMTP_PORT+55..+98): hosts a and
b, each its own Postfix, postkeep-milter, -policyd and -storage, sharing a
PostgreSQL that fails over (Patroni with etcd, a primary and a synchronous
replica, reached with a libpq multi-host string) and a MinIO of four server
processes with one drive each
(erasure 2+2: a write needs three nodes), which each host reaches through its
own HAProxy.  Through it, with every node killable (kill -9):

- one organisation sending through both hosts at once is admitted exactly its
  limit (the policy daemons count in the one database);
- mail through either host is captured byte for byte, and a delivery report is
  applied whichever host's sidecar receives it;
- one MinIO node killed under load: no tempfail, nothing accepted lost;
- two killed: writes fail, mail goes to the outage spool (or is tempfailed),
  nothing accepted is lost, and the spool drains when the nodes return;
- one whole host killed: the other keeps accepting, and the dead host's spool
  drains when it returns;
- the PostgreSQL primary killed (kill -9) while both hosts take mail: the
  replica takes over, both hosts' daemons reconnect by themselves, every
  message a client saw accepted has its row (the seconds of spooling or
  tempfail are printed).
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest
from support import smtp
from support.cluster import HOSTS, Cluster, cluster
from support.pgha import Answer, Load, mail_flowing
from support.pgha import Cluster as Patroni
from support.reports import block, dsn
from support.stack import Stack, strip_received
from support.wait import until

from postkeep.storage.content.objects import BackendError, S3ObjectStore

pytestmark = pytest.mark.outage

ROOT = Path(__file__).resolve().parents[1] / ".stack-cluster-test"
OFFSET = 55  # clear of the test stack (+0..+12) and test_pgha_failover's (+100..+155)


@pytest.fixture(scope="module")
def c() -> Iterator[Cluster]:
    with cluster(ROOT, int(os.environ["POSTKEEP_SMTP_PORT"]) + OFFSET) as cl:
        yield cl


def _message(domain: str, token: str, lines: int = 20) -> bytes:
    return (f"From: app@{domain}\r\nTo: r-{token}@sink.test\r\nSubject: cluster {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\n"
            ).encode() + b"a line of a message through the cluster\r\n" * lines


def _send(host: Stack, domain: str) -> tuple[str, smtp.Reply]:
    token = uuid.uuid4().hex
    return token, smtp.send(*host.smtp, f"app@{domain}", [f"r-{token}@sink.test"],
                            _message(domain, token))


def _rows(c: Cluster, org_id: uuid.UUID) -> dict[str, list[tuple[str, bytes, uuid.UUID]]]:
    """queue id -> the organisation's message rows (object key, sha256, id)."""
    rows: dict[str, list[tuple[str, bytes, uuid.UUID]]] = {}
    with c.hosts["a"].connect() as conn:
        for qid, key, sha, mid in conn.execute(
                "SELECT queue_id, object_key, sha256, id FROM messages WHERE org_id = %s",
                (org_id,)).fetchall():
            rows.setdefault(qid, []).append((key, bytes(sha), mid))
    return rows


def _assert_stored(c: Cluster, org_id: uuid.UUID, sent: dict[str, list[Answer]],
                   sample: int = 6) -> None:
    """Every message a client saw accepted (per host) has exactly one row, and a
    sample's stored content restores to what that host's next hop received."""
    rows = _rows(c, org_id)
    for h, answers in sent.items():
        accepted = [a for a in answers if a.accepted]
        assert accepted, f"no message accepted through host {h}"
        missing = [a.queue_id for a in accepted if len(rows.get(a.queue_id or "", [])) != 1]
        assert not missing, (f"host {h}: {len(missing)} of {len(accepted)} accepted messages"
                             f" have no row (or several): {missing[:5]}")
        for a in accepted[:: max(1, len(accepted) // sample)]:
            key, sha, mid = rows[a.queue_id or ""][0]
            stored = until(lambda key=key, mid=mid, h=h: _read(c.hosts[h], key, mid),
                           f"{key} readable", 60, interval=0.5)
            assert hashlib.sha256(stored).digest() == sha
            assert stored == strip_received(c.hosts[h].sink_copy(a.token, timeout=120)), a.token


def _read(host: Stack, key: str, mid: uuid.UUID) -> bytes | None:
    """The message's stored bytes, or None while MinIO cannot say: a node back
    from a kill, seeing read quorum, answered NoSuchKey for an object on the
    three other drives a few times (the object held, and read through
    another node); HAProxy's leastconn sends the next try elsewhere."""
    try:
        return host.restored(key, mid)
    except BackendError as exc:
        if "NoSuchKey" not in str(exc):
            raise
        print(f"transient NoSuchKey for {key}")
        return None


def _accepted(load: Load) -> int:
    return sum(a.accepted for a in load.answers)


# ---------------------------------------------------------------- shared state
def test_one_org_through_both_hosts_at_once_gets_exactly_its_limit(c: Cluster) -> None:
    org_id, domain = c.hosts["a"].new_org("pro")
    limit, per_host, threads = 24, 24, 4
    with c.hosts["a"].connect() as conn:
        conn.execute("UPDATE organisations SET messages_per_hour = %s WHERE id = %s",
                     (limit, org_id))
    replies: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(2 * threads)

    def sender(h: str) -> None:
        start.wait(60)
        for _ in range(per_host // threads):
            try:
                code, text = _send(c.hosts[h], domain)[1].code, ""
            except smtp.SMTPError as exc:
                code, text = exc.reply.code, exc.reply.text
            with lock:
                replies.append((h, code, text))

    workers = [threading.Thread(target=sender, args=(h,)) for h in HOSTS for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    assert len(replies) == 2 * per_host
    admitted = [r for r in replies if r[1] == 250]
    assert len(admitted) == limit, sorted({(h, code) for h, code, _ in replies})
    # both hosts took part, and every refusal is the limit's
    assert {h for h, _, _ in admitted} == set(HOSTS)
    refused = [r for r in replies if r[1] != 250]
    assert all(code == 450 and "messages per hour" in text for _, code, text in refused), refused
    with c.hosts["b"].connect() as conn:
        used = conn.execute("SELECT sum(used) FROM rate_counters WHERE org_id = %s"
                            " AND kind = 'messages'", (org_id,)).fetchone()
        stored = conn.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                              (org_id,)).fetchone()
    assert used is not None and used[0] == limit
    assert stored is not None and stored[0] == limit


def test_mail_through_either_host_is_captured_byte_for_byte(c: Cluster) -> None:
    org_id, domain = c.hosts["a"].new_org("pro")
    sent: dict[str, list[Answer]] = {}
    for h in HOSTS:
        sent[h] = []
        for _ in range(3):
            t0 = time.monotonic()
            token, reply = _send(c.hosts[h], domain)
            sent[h].append(Answer(token, True, reply.code, reply.text, reply.queue_id, t0,
                                  time.monotonic()))
    _assert_stored(c, org_id, sent, sample=3)


@pytest.mark.parametrize(("via", "report_to"), [("a", "b"), ("b", "a")])
def test_a_report_is_applied_whichever_host_receives_it(c: Cluster, via: str,
                                                        report_to: str) -> None:
    _, domain = c.hosts[via].new_org("pro")
    token, reply = _send(c.hosts[via], domain)
    rcpt = f"r-{token}@sink.test"
    mid, rpath = c.hosts[via].sent(reply.queue_id)
    c.hosts[via].sink_copy(token)  # relayed first; the report is the later event
    report = dsn(mid, [block(rcpt, "failed", "5.1.1", "550 5.1.1 no such user")],
                 date=formatdate(time.time() + 5, usegmt=True))
    before = _storage_log(c, report_to)
    smtp.send(*c.hosts[report_to].smtp, "", [rpath], report)

    def status() -> tuple[str, str | None] | None:
        with c.hosts[report_to].connect() as conn:
            got = conn.execute("SELECT status, dsn_status FROM message_recipients"
                               " WHERE message_id = %s AND recipient = %s", (mid, rcpt)).fetchone()
        return (str(got[0]), got[1]) if got and got[0] == "bounced" else None

    assert until(status, f"the report through host {report_to} to bounce {rcpt}", 60) == (
        "bounced", "5.1.1")
    # It was that host's sidecar (its log grew), not a copy of the other's.
    assert len(_storage_log(c, report_to)) > len(before)


def _storage_log(c: Cluster, h: str) -> str:
    return Path(c.hosts[h].env["POSTKEEP_STACK_DIR"], "storage", "storage.log").read_text()


# ---------------------------------------------------------------- MinIO nodes lost
def test_one_minio_node_killed_under_load_no_tempfail_nothing_lost(c: Cluster) -> None:
    org_id, domain = c.hosts["a"].new_org("pro")
    with mail_flowing(c.hosts["a"], domain, 2) as la, mail_flowing(c.hosts["b"], domain, 2) as lb:
        until(lambda: _accepted(la) >= 5 and _accepted(lb) >= 5, "mail flowing", 120)
        until(c.minio_redundant, "a cluster that can lose a node", 120)
        c.ctl("kill", "minio0")
        until(lambda: not c.minio_live(0), "node 0 down", 30)
        killed = time.monotonic()

        # Three of four drives keep write quorum, and each host's balancer
        # sends requests to the live nodes: mail is captured directly with the
        # node down (pointed at node 0 alone, a host spools all of it).  MinIO
        # answers 503 for some seconds after a node's loss now and then
        # (BENCHMARKS.md, "Two hosts"): those messages go to the spool.
        def captured_with_node_down(h: str, load: Load) -> bool:
            outcomes = c.milter_outcomes(h)
            return sum(a.started > killed and outcomes.get(a.queue_id or "") == "captured"
                       for a in load.answers) >= 10

        until(lambda: captured_with_node_down("a", la) and captured_with_node_down("b", lb),
              "ten messages through each host captured directly with node 0 down", 180)
        assert not c.minio_live(0)
        S3ObjectStore(c.hosts["b"].config.s3).put(f"cluster-test/{uuid.uuid4().hex}",
                                                  io.BytesIO(b"x"), 1)
    c.ctl("start", "minio0")
    until(lambda: c.minio_live(0), "node 0 back", 60)
    refused = [(a.code, a.text) for a in la.answers + lb.answers if not a.accepted]
    assert not refused, refused
    spooled = {h: sum(c.milter_outcomes(h).get(a.queue_id or "") == "spooled"
                      for a in load.answers) for h, load in (("a", la), ("b", lb))}
    print(f"one MinIO node down: {len(la.answers) + len(lb.answers)} accepted,"
          f" spooled {spooled}")
    for h in HOSTS:
        until(lambda h=h: not c.spool(h).entries(), f"host {h}'s spool to drain", 300)
    _assert_stored(c, org_id, {"a": la.answers, "b": lb.answers})


def test_two_minio_nodes_killed_mail_spooled_and_drained_on_return(c: Cluster) -> None:
    org_id, domain = c.hosts["a"].new_org("pro")
    before = {h: set(c.milter_outcomes(h)) for h in HOSTS}

    def spooled_since(h: str) -> int:
        return sum(o == "spooled" and q not in before[h]
                   for q, o in c.milter_outcomes(h).items())

    with mail_flowing(c.hosts["a"], domain, 2) as la, mail_flowing(c.hosts["b"], domain, 2) as lb:
        until(lambda: _accepted(la) >= 5 and _accepted(lb) >= 5, "mail flowing", 120)
        c.ctl("kill", "minio2")
        c.ctl("kill", "minio3")
        until(lambda: not c.minio_live(2) and not c.minio_live(3), "nodes 2 and 3 down", 30)
        # Below write quorum a PUT hangs rather than fails: each message waits
        # two s3.timeout_seconds (5 s) before the spool takes it.
        until(lambda: spooled_since("a") >= 2 and spooled_since("b") >= 2,
              "two messages spooled by each host", 180)
        # Writes fail: two of four drives are below write quorum.
        with pytest.raises(BackendError):
            S3ObjectStore(c.hosts["a"].config.s3).put(
                f"cluster-test/{uuid.uuid4().hex}", io.BytesIO(b"x"), 1)
        assert not c.minio_writable()
        c.ctl("start", "minio2")
        c.ctl("start", "minio3")
        until(c.minio_writable, "write quorum back", 120)
        until(c.minio_redundant, "every node counted on again", 120)
        for h, load in (("a", la), ("b", lb)):
            n = len(load.answers)
            until(lambda load=load, n=n, h=h: sum(
                c.milter_outcomes(h).get(a.queue_id or "") == "captured"
                for a in load.answers[n:]) >= 5, f"host {h} capturing directly again", 180)
    for h in HOSTS:
        until(lambda h=h: not c.spool(h).entries(), f"host {h}'s spool to drain", 300)
    refused = [a for a in la.answers + lb.answers if not a.accepted]
    assert all(a.code == 451 for a in refused), {(a.code, a.text) for a in refused}
    _assert_stored(c, org_id, {"a": la.answers, "b": lb.answers})


# ---------------------------------------------------------------- a host lost
def test_a_host_killed_the_other_keeps_going_its_spool_drains_on_return(c: Cluster) -> None:
    org_id, domain = c.hosts["a"].new_org("pro")
    # Host b's spool gets mail: writes fail while two nodes are down.
    c.ctl("kill", "minio2")
    c.ctl("kill", "minio3")
    until(lambda: not c.minio_writable(), "write quorum lost", 60)
    on_b: list[Answer] = []

    def send_b() -> None:  # each waits ~10 s for the PUT to fail: in parallel
        t0 = time.monotonic()
        token, reply = _send(c.hosts["b"], domain)
        on_b.append(Answer(token, True, reply.code, reply.text, reply.queue_id, t0,
                           time.monotonic()))

    senders = [threading.Thread(target=send_b) for _ in range(3)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    assert len(on_b) == 3, "host b did not accept its three messages"
    until(lambda: len(c.spool("b").entries()) >= 3, "host b's three messages spooled", 60)
    # Host b dies: its Postfix (every process), milter, policyd, sidecar and balancer.
    c.ctl("kill", "b")
    until(lambda: not _port_open(c.hosts["b"].smtp[1]), "host b's smtpd gone", 30)
    c.ctl("start", "minio2")
    c.ctl("start", "minio3")
    # Every node counted on again before host b's milter starts: its start-up
    # probe (put, then get) failed with NoSuchKey while a returning node was
    # not yet seen by all its peers (read through another node).
    until(c.minio_redundant, "every node counted on again", 120)
    with mail_flowing(c.hosts["a"], domain, 2) as la:
        until(lambda: _accepted(la) >= 6, "host a accepting with host b dead", 120)
        until(lambda: not c.spool("a").entries(), "host a's spool empty", 120)
        # Nobody drains a dead host's spool: its three messages wait there.
        assert len(c.spool("b").entries()) >= 3
        c.ctl("start", "b")
        until(lambda: not c.spool("b").entries(), "host b's spool to drain on its return", 300)
    refused = [(a.code, a.text) for a in la.answers if not a.accepted]
    assert not refused, refused
    _assert_stored(c, org_id, {"a": la.answers, "b": on_b})


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 2).close()
        return True
    except OSError:
        return False


def test_postgres_primary_killed_under_load_through_both_hosts_nothing_lost(
        c: Cluster) -> None:
    assert c.pg_dir is not None, "the cluster runs without Patroni (CLUSTER_PG=single)"
    pg = Patroni(c.pg_dir, c.hosts["a"])
    until(pg.sync_replica, "a synchronous replica before the kill", 180)
    org_id, domain = c.hosts["a"].new_org("pro")
    old = pg.leader()
    assert old in ("node1", "node2"), old
    with mail_flowing(c.hosts["a"], domain, 2) as la, \
            mail_flowing(c.hosts["b"], domain, 2) as lb:
        until(lambda: _accepted(la) >= 5 and _accepted(lb) >= 5,
              "mail flowing through both hosts", 120)
        t0 = time.monotonic()
        pg.pgha("kill", old)
        new = until(lambda: (lead := pg.leader()) not in (None, old) and lead,
                    "the replica to take over", 120)
        print(f"{new} leads {time.monotonic() - t0:.1f}s after the kill of {old}")
        for h, load in (("a", la), ("b", lb)):
            def direct(h: str = h, load: Load = load) -> bool:
                # The host's daemons reconnect by themselves: its latest
                # messages are captured directly again, not spooled.
                outcomes = c.milter_outcomes(h)
                after = [a for a in load.answers if a.started > t0 and a.accepted]
                return len(after) >= 8 and all(
                    outcomes.get(a.queue_id or "") == "captured" for a in after[-5:])
            until(direct, f"host {h} capturing directly again", 180)
        for h, load in (("a", la), ("b", lb)):
            outcomes = c.milter_outcomes(h)
            late = [a.ended for a in load.answers if a.ended >= t0 and (
                not a.accepted or outcomes.get(a.queue_id or "") != "captured")]
            print(f"host {h}: spooled or tempfailed for"
                  f" {max(late, default=t0) - t0:.1f}s after the kill ({len(late)} messages)")
    for h in HOSTS:
        until(lambda h=h: not c.spool(h).entries(), f"host {h}'s outage spool drained", 300)
    refused = [(a.code, a.text) for a in la.answers + lb.answers if not a.accepted]
    assert all(code == 451 for code, _ in refused), refused  # a tempfail, never a 5xx
    _assert_stored(c, org_id, {"a": la.answers, "b": lb.answers})
    pg.pgha("start", old)  # back as the synchronous replica, for whatever runs next
    until(pg.sync_replica, f"{old} back as the synchronous replica", 180)
