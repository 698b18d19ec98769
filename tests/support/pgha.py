"""A PostgreSQL that fails over (devstack/pgha.sh), a stack pointed at it, and
a bounded load through that stack's Postfix that records what each message got.

`tests/test_pgha_failover.py` and `bench/pgha_bench.py` share it: the
primary's host killed (kill -9 of its Patroni and PostgreSQL) or a switchover,
mail flowing all along, and the seconds it took until the milter captured
directly again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from postkeep.config import load
from postkeep.storage.content.spool import Spool
from support import smtp
from support.stack import Stack
from support.wait import until

REPO = Path(__file__).resolve().parents[2]
PGHA = REPO / "devstack" / "pgha.sh"
STACK = REPO / "devstack" / "stack.sh"
NODES = ("node1", "node2")
# The milter's log line for each message it accepted: captured directly, or
# into the outage spool (drained by postkeep-storage later).
OUTCOME_RE = re.compile(r" (captured|spooled) pk_id=[0-9a-f]+ queue_id=([0-9A-Za-z]+) ")


def read_env(path: Path) -> dict[str, str]:
    """The `export K='V'` lines of a stack.sh/pgha.sh env file."""
    env = {}
    for line in path.read_text().splitlines():
        m = re.match(r"export ([A-Z0-9_]+)='(.*)'$", line)
        if m:
            env[m.group(1)] = m.group(2)
    return env


@dataclass
class Cluster:
    """pgha.sh's two nodes and etcd in PGHA_DIR, and the stack using them."""

    pgha_dir: Path
    stack: Stack

    def pgha(self, command: str, *args: str, check: bool = True) -> str:
        done = subprocess.run(["bash", str(PGHA), command, str(self.pgha_dir), *args],
                              capture_output=True, text=True, timeout=300, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"pgha.sh {command} {' '.join(args)}: exit {done.returncode}:"
                                 f" {done.stderr.strip()}")
        return done.stdout.strip()

    def leader(self) -> str | None:
        return self.pgha("leader", check=False) or None

    def sync_replica(self) -> bool:
        """Is the replica Patroni's synchronous standby (again)?"""
        sync = self.pgha("sync", check=False)
        return sync in NODES and sync != self.leader()

    def connect_admin(self) -> psycopg.Connection:
        return psycopg.connect(self.stack.config.postgres.conninfo(), autocommit=True)

    def spool(self) -> Spool:
        return Spool(self.stack.config.milter.outage_spool_directory)

    def milter_outcomes(self) -> dict[str, str]:
        """queue id -> 'captured' or 'spooled', from the milter's log."""
        log = Path(self.stack.env["POSTKEEP_STACK_DIR"], "milter", "milter.log").read_text()
        return {m.group(2): m.group(1) for m in OUTCOME_RE.finditer(log)}


@contextmanager
def cluster(root: Path, stack_port: int, pgha_port: int) -> Iterator[Cluster]:
    """pgha.sh up in ROOT/pgha (ports PGHA_PORT..+5), stack.sh up in ROOT/stack
    (STACK_PORT..+12) pointed at it; both made afresh, both down afterwards."""
    pgha_dir, stack_dir = root / "pgha", root / "stack"
    _down(pgha_dir, stack_dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        subprocess.run(["bash", str(PGHA), "up", str(pgha_dir), str(pgha_port)],
                       check=True, timeout=600, stdout=subprocess.DEVNULL)
        env = {**os.environ, **read_env(pgha_dir / "env")}
        subprocess.run(["bash", str(STACK), "up", str(stack_dir), str(stack_port)],
                       check=True, timeout=600, env=env)
        stack_env = read_env(stack_dir / "env")
        yield Cluster(pgha_dir, Stack(stack_env, load(stack_env["POSTKEEP_CONFIG"])))
    finally:
        _down(pgha_dir, stack_dir)


def _down(pgha_dir: Path, stack_dir: Path) -> None:
    for script, where in ((STACK, stack_dir), (PGHA, pgha_dir)):
        subprocess.run(["bash", str(script), "down", str(where)], timeout=300, check=False,
                       stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- the load
@dataclass
class Answer:
    """One message sent: its token, how the client saw it end, and when."""

    token: str
    accepted: bool
    code: int
    text: str
    queue_id: str | None
    started: float  # time.monotonic()
    ended: float


@dataclass
class Load:
    """What the senders saw, in the order they were answered."""

    answers: list[Answer] = field(default_factory=list)

    def accepted_since(self, t: float) -> int:
        return sum(a.accepted for a in self.answers if a.started >= t)


def _message(domain: str, token: str) -> bytes:
    return (f"From: out@{domain}\r\nTo: r@sink.test\r\nSubject: failover {token}\r\n"
            f"Message-ID: <{token}@{domain}>\r\nX-Test-Token: {token}\r\n\r\n"
            ).encode() + b"body line of a failover test\r\n" * 40


def _sender(stack: Stack, domain: str, stop: threading.Event, load: Load) -> None:
    while not stop.is_set():
        token = uuid.uuid4().hex
        started = time.monotonic()
        try:
            reply = smtp.send(*stack.smtp, f"out@{domain}", ["r@sink.test"],
                              _message(domain, token), timeout=180)
            answer = Answer(token, True, reply.code, reply.text, reply.queue_id, started,
                            time.monotonic())
        except smtp.SMTPError as exc:
            answer = Answer(token, False, exc.reply.code, exc.reply.text, None, started,
                            time.monotonic())
        except OSError as exc:  # no answer at all: counted as not accepted
            answer = Answer(token, False, 0, f"no reply: {exc!r}", None, started,
                            time.monotonic())
        load.answers.append(answer)
        time.sleep(0.02)  # pacing: a bounded load on two shared cores


@contextmanager
def mail_flowing(stack: Stack, domain: str, senders: int = 3) -> Iterator[Load]:
    """SENDERS clients sending one message per connection until the block ends."""
    load = Load()
    stop = threading.Event()
    threads = [threading.Thread(target=_sender, args=(stack, domain, stop, load))
               for _ in range(senders)]
    for t in threads:
        t.start()
    try:
        yield load
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=240)


@dataclass
class Disruption:
    """How one failover looked to the senders."""

    kind: str
    old_leader: str
    new_leader: str
    leader_seconds: float  # from the kill/switchover until the other node led
    disrupted_seconds: float  # from it until the last message not captured directly
    slowest_seconds: float  # the longest a message answered after it waited for its reply
    spooled: int
    tempfailed: int
    accepted: int

    def line(self) -> str:
        return (f"{self.kind}: {self.old_leader} -> {self.new_leader}: new leader after"
                f" {self.leader_seconds:.1f}s; spooled or tempfailed for"
                f" {self.disrupted_seconds:.1f}s ({self.spooled} spooled, {self.tempfailed}"
                f" tempfailed, {self.accepted} accepted in all); slowest answer"
                f" {self.slowest_seconds:.1f}s")


def fail_over(c: Cluster, load: Load, kind: str) -> Disruption:
    """KIND 'kill' (kill -9 the leader's Patroni and PostgreSQL) or 'switchover';
    returns once the other node leads and mail is captured directly again."""
    old = c.leader()
    assert old in NODES, f"no leader before the {kind}: {old!r}"
    until(lambda: load.accepted_since(time.monotonic() - 30) >= 5, "mail flowing before", 120)
    t0 = time.monotonic()
    if kind == "kill":
        c.pgha("kill", old)
    else:
        c.pgha("switchover")
    new = until(lambda: (lead := c.leader()) not in (None, old) and lead, "the other node"
                " to lead", 120)
    led = time.monotonic() - t0
    outcomes: dict[str, str] = {}

    def captured_again() -> bool:
        outcomes.update(c.milter_outcomes())
        recent = [a for a in load.answers if a.started > t0 + led]
        return len(recent) >= 10 and all(
            a.accepted and outcomes.get(a.queue_id or "") == "captured" for a in recent[-10:])

    until(captured_again, "ten messages in a row captured directly after the failover", 180)
    outcomes.update(c.milter_outcomes())
    after = [a for a in load.answers if a.ended >= t0]
    bad = [a for a in after
           if not a.accepted or outcomes.get(a.queue_id or "") != "captured"]
    return Disruption(kind, str(old), str(new), led,
                      max((a.ended for a in bad), default=t0) - t0,
                      max((a.ended - a.started for a in after), default=0.0),
                      sum(outcomes.get(a.queue_id or "") == "spooled" for a in after),
                      sum(not a.accepted for a in after),
                      sum(a.accepted for a in load.answers))
