"""The outage spool through real Postfix, MinIO and PostgreSQL, killed for real.

About a thousand messages flow through Postfix while MinIO is stopped, then
PostgreSQL too, then MinIO comes back, then PostgreSQL.  The sidecar
(postkeep-storage, which drains the spool) and the milter are `kill -9`ed
mid-drain while mail flows, and both are started again.  Each phase ends on
what happened (messages answered, entries spooled, entries drained), never
after a fixed time, and the kill lands mid-drain because the test holds a
row the drain must insert.  In the end every message the client saw
accepted is stored exactly once (one `messages` row, one row per recipient,
an object restoring byte for byte to what the next hop received); every
other one got the reply meant for it (Postfix's 451 4.7.1 while the killed
milter was down) and left nothing stored, but for the few the milter was in
the middle of when it was killed.

Also: the spool's fill level reached, or its write failing, tempfails; a
sender PostgreSQL never resolved tempfails while a known one spools; damaged
entries are quarantined and named, never dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from support import smtp
from support.daemon_settings import daemon_settings
from support.refused import assert_refused_left_nothing, stored_for
from support.smtp import Sent
from support.stack import Stack, strip_received
from support.wait import until

from postkeep.storage.content.spool import Spool
from postkeep.storage.metadata.messages import record_capture

pytestmark = pytest.mark.outage

RCPTS = ["r1@sink.test", "r2@sink.test"]
SENDERS = 8  # client threads in the outage run
# Postfix's answer while the milter cannot be reached (milter_default_action = tempfail).
MILTER_UNAVAILABLE = (451, "4.7.1 Service unavailable - try again later")
# The milter's reply when MinIO is down and the spool cannot take the message.
SPOOL_REFUSED_S3 = ("4.3.0 postkeep: content store (s3) unavailable and the outage spool"
                    " cannot take the message ")
TOKEN_RE = re.compile(rb"\r\nX-Test-Token: ([0-9a-f]{32})\r\n")


def _message(domain: str, token: str, n: int) -> bytes:
    return (f"From: out@{domain}\r\nTo: r1@sink.test, r2@sink.test\r\n"
            f"Subject: spool {n}\r\nMessage-ID: <{token}@{domain}>\r\n"
            f"X-Test-Token: {token}\r\n\r\n").encode() + (b"line %d\r\n" % n) * 40


def _venv_bin(stack: Stack, name: str) -> str:
    venv = stack.env.get("POSTKEEP_STACK_VENV") or str(Path(__file__).parents[1] / ".venv")
    return str(Path(venv) / "bin" / name)


def _spool(stack: Stack) -> Spool:
    return Spool(stack.config.milter.outage_spool_directory)


def _kill9(stack: Stack, service: str) -> None:
    """kill -9 one of the stack's daemons (milter, storage) and wait until it is dead.

    Its parent is PID 1, which may leave it a zombie for a while; a zombie
    still answers `kill -0`, so its stale pid file goes too (or stack.sh
    would think it runs)."""
    pidfile = Path(stack.env["POSTKEEP_STACK_DIR"], service, f"{service}.pid")
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGKILL)

    def dead() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"
        except FileNotFoundError:
            return True

    _wait(f"{service} pid {pid} to die", dead, 10)
    pidfile.unlink()


def _sender(stack: Stack, domain: str, stop: threading.Event, out: list[Sent]) -> None:
    """One client: up to 50 messages per connection, a new one after any error."""
    client: smtp.Client | None = None
    n = 0
    while not stop.is_set():
        token = uuid.uuid4().hex
        try:
            if client is None:
                client = smtp.Client(*stack.smtp, timeout=120)
            reply = client.send(f"out@{domain}", RCPTS, _message(domain, token, n))
            out.append(Sent(token, True, reply.code, reply.text, reply.queue_id))
        except smtp.SMTPError as exc:
            out.append(Sent(token, False, exc.reply.code, exc.reply.text, None))
            try:
                client.reset()  # type: ignore[union-attr]
            except (OSError, smtp.SMTPError):
                client = None
        except OSError:
            # Connection trouble before an answer: not accepted; count it as such.
            out.append(Sent(token, False, 0, "connection lost", None))
            client = None
        n += 1
        if client is not None and n % 50 == 0:
            client.close()
            client = None
    if client is not None:
        client.close()


def _wait(what: str, cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _sink_index(stack: Stack, tokens: set[str], timeout: float) -> dict[str, Path]:
    """token -> the sink file that carries it, for every token in TOKENS."""
    found: dict[str, Path] = {}
    seen: set[Path] = set()
    deadline = time.monotonic() + timeout
    while True:
        for path in stack.sink_dir.glob("*.eml"):
            if path in seen or not path.with_suffix(".json").exists():
                continue
            seen.add(path)
            m = TOKEN_RE.search(path.read_bytes())
            if m:
                found[m.group(1).decode()] = path
        missing = tokens - set(found)
        if not missing:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} accepted messages never reached the sink,"
                                 f" e.g. {sorted(missing)[:3]}")
        time.sleep(0.5)


def _assert_stored_exactly_once(stack: Stack, org_id: uuid.UUID, accepted: list[Sent]) -> None:
    index = _sink_index(stack, {s.token for s in accepted}, timeout=300)
    with stack.connect() as conn:
        nrcpts = dict(conn.execute(
            "SELECT message_id, count(*) FROM message_recipients WHERE org_id = %s"
            " GROUP BY message_id", (org_id,)).fetchall())
        rows = [(q, key, sha, mid, nrcpts.get(i, 0), i) for i, q, key, sha, mid in conn.execute(
            "SELECT id, queue_id, object_key, sha256, message_id_header FROM messages"
            " WHERE org_id = %s", (org_id,)).fetchall()]
    by_queue: dict[str, list[tuple[object, ...]]] = {}
    for row in rows:
        by_queue.setdefault(row[0], []).append(row)
    for s in accepted:
        assert s.queue_id, s.text
        found = by_queue.get(s.queue_id, [])
        assert len(found) == 1, f"accepted {s.queue_id} ({s.token}) has {len(found)} rows"
        _, key, sha, message_id, nrcpt, row_id = found[0]
        assert message_id == f"<{s.token}@{message_id.split('@')[1]}", message_id  # type: ignore[union-attr]
        assert nrcpt == len(RCPTS)
        # Parts and dictionary included: the sidecar may have trained the
        # organisation a dictionary while thousands of its messages flowed.
        stored = stack.restored(str(key), row_id)  # type: ignore[arg-type]  # a pack: by id
        assert hashlib.sha256(stored).digest() == bytes(sha)  # type: ignore[arg-type]
        assert stored == strip_received(index[s.token].read_bytes()), s.token


def _wait_until_captured(stack: Stack, domain: str, timeout: float = 120) -> None:
    """Send until a message is captured directly (row present at once), then
    drain whatever the probes spooled: after PostgreSQL restarts, the milter's
    pool takes a while to reconnect (psycopg_pool backs off), and meanwhile
    the spool takes the mail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = smtp.send(*stack.smtp, f"out@{domain}", RCPTS,
                              _message(domain, uuid.uuid4().hex, 0))
            with stack.connect() as conn:
                if conn.execute("SELECT 1 FROM messages WHERE queue_id = %s",
                                (reply.queue_id,)).fetchone():
                    break
        except smtp.SMTPError:
            pass
        assert time.monotonic() < deadline, "the milter never captured directly again"
        time.sleep(1)
    if _spool(stack).entries():
        result = _cli(stack, "spool", "drain", "--yes", "--wait", "60")
        assert result.returncode == 0, result.stderr


@contextmanager
def _sidecar_stopped(stack: Stack) -> Iterator[None]:
    """Without postkeep-storage, so that only `postkeep spool drain` drains."""
    stack.stack_ctl("stop", "storage")
    try:
        yield
    finally:
        stack.stack_ctl("start", "storage")


# The sidecar drains in batches of this many entries (drain_forever's default).
DRAIN_BATCH = 256


@contextmanager
def _drain_held_at(stack: Stack, entry: Path) -> Iterator[None]:
    """The rows of spool ENTRY inserted in a transaction of the test's own, kept
    open (then rolled back): a drain reaching ENTRY waits on them (ON CONFLICT
    DO NOTHING waits for the other insert to end), so it cannot finish it."""
    message = _spool(stack).open_entry(entry).message
    with psycopg.connect(stack.config.postgres.conninfo()) as conn:
        record_capture(conn, message)
        try:
            yield
        finally:
            conn.rollback()


def test_outages_with_kills_lose_and_duplicate_nothing(stack: Stack) -> None:
    org_id, domain = stack.new_org("pro")  # basic's 1,000 messages an hour is too few
    spool = _spool(stack)
    _wait_until_captured(stack, domain)
    assert spool.entries() == [], "spool not empty before the test: a previous run left entries"
    phases: dict[str, int] = {}

    def spooled(more: int) -> Callable[[], bool]:
        target = len(spool.entries()) + more
        return lambda: len(spool.entries()) >= target

    def accepted_from(since: int, more: int) -> Callable[[], bool]:
        return lambda: sum(s.accepted for s in sent[since:]) >= more

    with smtp.senders(lambda stop, out: _sender(stack, domain, stop, out), SENDERS,
                      300) as sent:
        until(accepted_from(0, 200), "mail flowing before the outage", 180)
        phases["minio stopped"] = len(sent)
        stack.stack_ctl("stop", "minio")
        until(spooled(300), "300 messages spooled with MinIO down", 240)
        phases["postgres stopped"] = len(sent)
        stack.stack_ctl("stop", "postgres")
        until(spooled(300), "300 more spooled with PostgreSQL down too", 240)
        phases["minio started"] = len(sent)
        stack.stack_ctl("start", "minio")
        # one batch at a time waits on PostgreSQL, the rest spool at once
        until(spooled(100), "100 more spooled with only PostgreSQL down", 240)
        # When PostgreSQL is back, the sidecar drains; once it has done some
        # but not all (it waits on the newest entry's rows, which the test
        # holds), kill -9 it and the milter (mail still flowing), then start
        # both again.
        phases["postgres started"] = len(sent)
        entries = spool.entries()
        depth = len(entries)
        assert depth > DRAIN_BATCH, f"only {depth} messages spooled: less than one drain batch"
        # Nothing may drain before the test holds the row.  kill -9, not a stop:
        # with PostgreSQL down the sidecar takes longer than stack.sh's 10 s to
        # stop, and a kill anywhere is what the drain must survive anyway.
        _kill9(stack, "storage")
        stack.stack_ctl("start", "postgres")
        with _drain_held_at(stack, entries[-1]):
            stack.stack_ctl("start", "storage")
            until(lambda: not entries[0].exists(), "the sidecar to drain a first batch", 180)
            _kill9(stack, "storage")
            _kill9(stack, "milter")
            left = len(spool.entries())
            assert entries[-1].exists() and left > 0, "the drain finished before the kill"
        killed = phases["sidecar and milter killed"] = len(sent)
        until(lambda: any(not s.accepted for s in sent[killed:]),
              "mail tempfailed while the milter was dead", 120)
        stack.stack_ctl("start", "milter")
        stack.stack_ctl("start", "storage")
        until(accepted_from(len(sent), 300), "mail accepted again after the restarts", 240)
    _wait("the spool to drain", lambda: not spool.entries(), 300)
    accepted = [s for s in sent if s.accepted]
    refused = [s for s in sent if not s.accepted]
    why = Counter(f"{s.code} {s.text[:60]}" for s in refused)
    print(f"sent {len(sent)}: accepted {len(accepted)}, tempfailed {len(refused)}; "
          f"phases (messages sent when): {phases}; tempfails: {dict(why)}")
    _assert_refused_as_meant(stack, org_id, sent, phases["postgres started"], spool)
    # Spooling accepted mail while MinIO and PostgreSQL were down.
    during = sent[phases["minio stopped"] + 50:phases["postgres started"]]
    assert sum(s.accepted for s in during) > 0.8 * len(during), (
        "most mail during the outage should have been accepted into the spool")
    # Mail is accepted again after the restarts: shown above by waiting for 300
    # accepted messages (accepted_from).  Which of the 8 senders' last messages
    # came back first is timing, not an outcome.
    _assert_stored_exactly_once(stack, org_id, accepted)
    assert list(spool.quarantine_dir.iterdir()) == []
    log = Path(stack.env["POSTKEEP_STACK_DIR"], "storage", "storage.log").read_text()
    assert "spool drain pass: drained" in log


def _assert_refused_as_meant(stack: Stack, org_id: uuid.UUID, sent: list[Sent],
                             killed_after: int, spool: Spool) -> None:
    """Every refusal is Postfix's for the killed milter, none before it was killed
    (sent[killed_after:]), and left nothing stored, but for the transactions the
    milter was in when it was killed (one per client at most): those may have
    their row, object or spool entry though Postfix never got the answer."""
    refused = [(i, s) for i, s in enumerate(sent) if not s.accepted]
    for i, s in refused:
        assert (s.code, s.text) == MILTER_UNAVAILABLE, f"{s.token}: {s.code} {s.text}"
        assert i >= killed_after, f"{s.token}: refused before the milter was killed"
    stored = stored_for(stack, org_id, spool)
    left = stored.left_by(s.token for _, s in refused)
    assert len(left) <= SENDERS, f"{len(left)} refused messages left something: {left}"
    # A pack the kill cut before its rows were written, whose messages the
    # outage spool then stored under their own rows, is garbage for the orphan
    # sweep (retention orphans): its token has a row, nothing is lost.
    stored_again = {t for t in stored.orphans.values() if t in stored.rows}
    assert set(stored.orphans.values()) <= set(left) | stored_again, (
        f"message objects with no row, not of a message the kill cut: {stored.orphans}")
    # Sealed, such a pack cannot even be read to say whose it is.  Two cuts
    # leave them: the kill, and PostgreSQL stopping under the rows' INSERT
    # (the connection broke with the statement sent: the milter keeps those
    # objects, the rows may have committed, and spools the messages).  Each
    # cuts at most the messages then in flight, one per client: at most one
    # pack per message, so 2 x SENDERS.  (A fresh-clone run had 12: 5 packs
    # kept from one INSERT when PostgreSQL stopped, 7 from the kill.)
    assert len(stored.sealed_orphans) <= 2 * SENDERS, stored.sealed_orphans


def _refused_while_minio_is_down(stack: Stack, domain: str, token: str) -> smtp.Reply:
    """Send one message (carrying TOKEN) with MinIO stopped for real; the refusal it gets."""
    stack.stack_ctl("stop", "minio")
    try:
        with pytest.raises(smtp.SMTPError) as err:
            smtp.send(*stack.smtp, f"out@{domain}", RCPTS, _message(domain, token, 1))
    finally:
        stack.stack_ctl("start", "minio")
    return err.value.reply


def test_spool_fill_level_reached_tempfails(stack: Stack) -> None:
    org_id, domain = stack.new_org("basic")
    token = uuid.uuid4().hex
    with daemon_settings(stack, "milter", {"outage_spool_max_fill_percent": 0.001}):
        _wait_until_captured(stack, domain)
        reply = _refused_while_minio_is_down(stack, domain, token)
    assert reply.code == 451 and reply.enhanced == "4.3.0", reply
    assert reply.text.startswith(SPOOL_REFUSED_S3 + "(spool filesystem "), reply.text
    assert "limit milter.outage_spool_max_fill_percent = 0.001)" in reply.text, reply.text
    assert _spool(stack).entries() == []
    assert_refused_left_nothing(stack, org_id, [token], _spool(stack))


def test_spool_write_failing_tempfails(stack: Stack, tmp_path: Path) -> None:
    org_id, domain = stack.new_org("basic")
    token = uuid.uuid4().hex
    where = tmp_path / "spool"
    with daemon_settings(stack, "milter", {"outage_spool_directory": str(where)}):
        _wait_until_captured(stack, domain)
        os.rename(where, tmp_path / "moved-away")
        where.write_bytes(b"not a directory")
        reply = _refused_while_minio_is_down(stack, domain, token)
    assert reply.code == 451 and reply.enhanced == "4.3.0"
    assert reply.text.startswith(SPOOL_REFUSED_S3 + "(spool write failed: "), reply.text
    assert_refused_left_nothing(stack, org_id, [token], Spool(tmp_path / "moved-away"))


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_venv_bin(stack, "postkeep"), "--config",
                           stack.env["POSTKEEP_CONFIG"], *args],
                          cwd="/", capture_output=True, text=True, timeout=300)


def test_postgres_down_known_sender_spools_unknown_one_tempfails(stack: Stack) -> None:
    known_id, known = stack.new_org("basic")
    never_seen_id, never_seen = stack.new_org("basic")
    _wait_until_captured(stack, known)
    token, refused = uuid.uuid4().hex, uuid.uuid4().hex
    with _sidecar_stopped(stack):
        reply, err = _known_and_unknown_while_postgres_is_down(stack, known, never_seen, token,
                                                               refused)
        drained = _cli(stack, "spool", "drain", "--yes")
    assert err.value.reply.code == 451 and err.value.reply.text == (
        "4.3.0 postkeep: metadata database (postgres) unavailable, message not accepted;"
        " try again later")
    assert drained.returncode == 0, drained.stderr
    assert "drained 1," in drained.stdout
    _assert_stored_exactly_once(stack, known_id, [Sent(token, True, 250, "", reply.queue_id)])
    assert_refused_left_nothing(stack, never_seen_id, [refused], _spool(stack))


def _known_and_unknown_while_postgres_is_down(
        stack: Stack, known: str, never_seen: str, token: str, refused: str
) -> tuple[smtp.Reply, pytest.ExceptionInfo[smtp.SMTPError]]:
    stack.stack_ctl("stop", "postgres")
    try:
        reply = smtp.send(*stack.smtp, f"out@{known}", RCPTS, _message(known, token, 1))
        with pytest.raises(smtp.SMTPError) as err:
            smtp.send(*stack.smtp, f"out@{never_seen}", RCPTS,
                      _message(never_seen, refused, 2))
        status = json.loads(_cli(stack, "spool", "status", "--json").stdout)
        assert status["entries"] == 1 and status["enabled"] is True
        down = _cli(stack, "spool", "drain", "--yes")
        assert down.returncode == 3 and "postgres unavailable" in down.stderr, down.stderr
    finally:
        stack.stack_ctl("start", "postgres")
    return reply, err


def test_damaged_entries_are_quarantined_and_named(stack: Stack) -> None:
    org_id, domain = stack.new_org("basic")
    spool = _spool(stack)
    tokens = [uuid.uuid4().hex for _ in range(3)]
    _wait_until_captured(stack, domain)
    with _sidecar_stopped(stack):
        _damage_and_drain(stack, spool, domain, tokens, org_id)


def _damage_and_drain(stack: Stack, spool: Spool, domain: str, tokens: list[str],
                      org_id: uuid.UUID) -> None:
    stack.stack_ctl("stop", "minio")
    try:
        replies = [smtp.send(*stack.smtp, f"out@{domain}", RCPTS, _message(domain, t, i))
                   for i, t in enumerate(tokens)]
    finally:
        stack.stack_ctl("start", "minio")
    entries = spool.entries()
    assert len(entries) == 3
    victim = entries[1]
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    garbage = spool.dir / f"{uuid.uuid4()}.spool"
    garbage.write_bytes(b"\x00" * 17)
    result = _cli(stack, "spool", "drain", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"file={victim}" in result.stderr and f"file={garbage}" in result.stderr
    assert "quarantined" in result.stderr
    assert spool.entries() == []
    kept = {p.name for p in spool.quarantine_dir.iterdir()}
    assert {victim.name, garbage.name} <= kept
    status = json.loads(_cli(stack, "spool", "status", "--json").stdout)
    assert status["quarantined"] >= 2 and status["entries"] == 0
    ok = [Sent(t, True, 250, "", r.queue_id) for i, (t, r) in enumerate(zip(tokens, replies,
                                                                          strict=True))
          if i != 1]
    _assert_stored_exactly_once(stack, org_id, ok)
    for p in spool.quarantine_dir.iterdir():  # inspected: clear for later runs
        p.unlink()
