"""`postkeep retention run` as real processes: two at once, and killed mid-way.

The workload: three expired weeks of one organisation's mail, 200 messages a
week with objects in MinIO, swept 25 objects per batch.  The test stops a run
at a known point by holding a lock it needs (never by hoping to be quick):
the sweep's watermark row, so the run has deleted one batch of objects and
waits to record it; or the later weeks' partitions, so it has dropped the
first week and waits for the second.  Whatever happens to the processes, the
end state must be exact: every partition dropped once (one audit row each),
every object gone, the daily statistics counting each message once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import StackEnv, TestOrg
from support.retention import PastWeek, audit_rows, exists, past_week, put_message, stats_row
from support.wait import until

from postkeep.config import Config
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import rules
from postkeep.storage.metadata import messages

pytestmark = pytest.mark.stack

PER_WEEK = 200
WEEKS = 3
SWEEP_BATCH = 25
SCRIPT = Path(sys.executable).with_name("postkeep")
ZERO_ID = uuid.UUID(int=0)


@pytest.fixture
def slow_config(stack_env: StackEnv, tmp_path: Path) -> Path:
    """The stack's configuration with small sweep batches, sweeping everything."""
    text = Path(stack_env.config_path).read_text()
    path = tmp_path / "postkeep.toml"
    path.touch(0o600)  # it holds the stack's inline S3 secret: owner-only, or refused
    path.write_text(text + "\n[retention]\ncontent_expiry = 'sweep'\n"
                    f"sweep_batch = {SWEEP_BATCH}\n")
    return path


def _workload(db: psycopg.Connection, objects: S3ObjectStore, org: TestOrg
              ) -> tuple[list[PastWeek], list[messages.CapturedMessage]]:
    weeks = [past_week(db) for _ in range(WEEKS)]
    stored = [put_message(db, objects, org.id, org.domain, w,
                          recipients=(("a@example.net", "delivered"),
                                      ("b@example.net", "bounced")))
              for w in weeks for _ in range(PER_WEEK)]
    return weeks, stored


def _start(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(SCRIPT), "--config", str(config), "retention", "run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen[str], needle: str, timeout: float = 120) -> list[str]:
    """Read PROC's stderr lines until one matches the regex NEEDLE; return them all."""
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"process ended before {needle!r}: {''.join(seen)}")
        seen.append(line)
        if re.search(needle, line):
            return seen
    raise AssertionError(f"no {needle!r} within {timeout}s: {''.join(seen)}")


@contextmanager
def _holding(config: Config, statement: str, params: Sequence[object] = ()) -> Iterator[int]:
    """STATEMENT (taking a lock) in a transaction of the test's own, kept open
    until the block ends, then rolled back; yields its backend pid."""
    with psycopg.connect(config.postgres.conninfo()) as conn:
        conn.execute(statement, params)
        try:
            yield conn.info.backend_pid
        finally:
            conn.rollback()


def _blocked_behind(db: psycopg.Connection, holder: int, proc: subprocess.Popen[str]) -> bool:
    """Whether a backend waits for a lock HOLDER has; fails if PROC ended meanwhile."""
    if proc.poll() is not None:
        assert proc.stderr is not None
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it waited"
                             f" on the test's lock: {proc.stderr.read()}")
    row = db.execute("SELECT count(*) FROM pg_stat_activity"
                     " WHERE %s = ANY(pg_blocking_pids(pid))", (holder,)).fetchone()
    return bool(row and row[0])


def _sweep_from(db: psycopg.Connection, stored: list[messages.CapturedMessage]) -> None:
    """Put the sweep's watermark just before the first of STORED (what `--sweep-from`
    does, done here so that a run never writes the row before its first batch)."""
    first = min(m.content_expires_at for m in stored)
    db.execute("INSERT INTO retention_state (name, at, id) VALUES ('sweep', %s, %s)"
               " ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at, id = EXCLUDED.id,"
               " updated_at = now()", (first, ZERO_ID))


# A run that has deleted a batch of objects waits here to move the watermark past it.
SWEEP_ROW = "SELECT 1 FROM retention_state WHERE name = 'sweep' FOR UPDATE"


def _assert_exact_end_state(db: psycopg.Connection, objects: S3ObjectStore, org: TestOrg,
                            weeks: list[PastWeek], stored: list[messages.CapturedMessage],
                            since: datetime) -> None:
    store = rules.S3Retention(objects.client, objects.bucket)
    for w in weeks:
        assert not exists(db, w.messages) and not exists(db, w.recipients)
        rows = audit_rows(db, "partition_dropped", w.messages, since)
        assert [r[0] for r in rows] == [PER_WEEK], f"{w.messages}: audit {rows}"
    assert db.execute("SELECT count(*) FROM messages WHERE org_id = %s",
                      (org.id,)).fetchone() == (0,)
    assert [m.object_key for m in stored if store.exists(m.object_key)] == []
    for w in weeks:
        day = (w.monday + timedelta(days=1) - timedelta(days=30)).date()
        s = stats_row(db, org.id, day)
        assert (s["messages"], s["sent"], s["delivered"], s["bounced"]) == (
            PER_WEEK, 2 * PER_WEEK, PER_WEEK, PER_WEEK), f"day {day}: {s}"


def test_two_runs_at_once_do_the_work_once(
        db: psycopg.Connection, objects: S3ObjectStore, make_org: Callable[..., TestOrg],
        config: Config, slow_config: Path) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    weeks, stored = _workload(db, objects, org)
    _sweep_from(db, stored)
    with _holding(config, SWEEP_ROW) as holder:
        first = _start(slow_config)
        until(lambda: _blocked_behind(db, holder, first),
              "the first run to hold the retention lock and wait mid-sweep")
        second = _start(slow_config)
        _wait_for(second, "waiting for another retention run")
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    # The first dropped the weeks; the second, let in after it, found them gone.
    assert f"partitions_dropped={WEEKS}" in out1 or f"partitions_dropped={WEEKS}" in out2
    assert "messages_dropped=0" in out2
    _assert_exact_end_state(db, objects, org, weeks, stored, started)


def test_a_run_killed_mid_sweep_is_finished_by_the_next(
        db: psycopg.Connection, objects: S3ObjectStore, make_org: Callable[..., TestOrg],
        config: Config, slow_config: Path) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    weeks, stored = _workload(db, objects, org)
    _sweep_from(db, stored)
    with _holding(config, SWEEP_ROW) as holder:
        victim = _start(slow_config)
        until(lambda: _blocked_behind(db, holder, victim),
              "the run to delete a batch and wait to record it")
        _kill(victim)
    left = sum(1 for m in stored if _exists(objects, m.object_key))
    # One batch of objects deleted, its watermark never written.
    assert left == len(stored) - SWEEP_BATCH, left
    assert all(exists(db, w.messages) for w in weeks)
    _rerun_finishes(db, objects, org, weeks, stored, started, dropped=0, slow_config=slow_config)


def test_a_run_killed_between_two_drops_is_finished_by_the_next(
        db: psycopg.Connection, objects: S3ObjectStore, make_org: Callable[..., TestOrg],
        config: Config, slow_config: Path) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    weeks, stored = _workload(db, objects, org)
    since = (min(w.monday for w in weeks) - timedelta(days=60)).isoformat()
    oldest, *later = sorted(weeks, key=lambda w: w.monday)  # dropped oldest first
    locked = ", ".join(f'"{w.messages}"' for w in later)
    with _holding(config, f"LOCK TABLE {locked} IN ACCESS SHARE MODE"):
        victim = _start(slow_config, "--sweep-from", since)
        _wait_for(victim, rf"^retention: dropped {oldest.messages} ")
        _kill(victim)  # the later weeks wait for the test's lock: none can be dropped
    assert [m.object_key for m in stored if _exists(objects, m.object_key)] == []
    assert [w.messages for w in weeks if not exists(db, w.messages)] == [oldest.messages]
    _rerun_finishes(db, objects, org, weeks, stored, started, dropped=1, slow_config=slow_config)


def _exists(objects: S3ObjectStore, key: str) -> bool:
    return rules.S3Retention(objects.client, objects.bucket).exists(key)


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _rerun_finishes(db: psycopg.Connection, objects: S3ObjectStore, org: TestOrg,
                    weeks: list[PastWeek], stored: list[messages.CapturedMessage],
                    started: datetime, dropped: int, slow_config: Path) -> None:
    rerun = _start(slow_config)  # no rewind: it carries on from the watermark
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"partitions_dropped={WEEKS - dropped} " in out
    _assert_exact_end_state(db, objects, org, weeks, stored, started)
