"""`postkeep retention run` as real processes: two at once, and killed mid-way.

The workload: three expired weeks of one organisation's mail, 200 messages a
week with objects in MinIO, swept 25 objects per batch so a run takes long
enough to be caught in the act.  Whatever happens to the processes, the end
state must be exact: every partition dropped once (one audit row each),
every object gone, the daily statistics counting each message once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import StackEnv, TestOrg
from support.retention import PastWeek, audit_rows, exists, past_week, put_message, stats_row

from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import rules
from postkeep.storage.metadata import messages

pytestmark = pytest.mark.stack

PER_WEEK = 200
WEEKS = 3
SCRIPT = Path(sys.executable).with_name("postkeep")
# Progress lines to kill at: some objects deleted, not all; one week dropped.
MID_SWEEP = r"messages checked, [1-9]\d{2,} objects deleted"
MID_DROPS = r"^retention: dropped messages_e"


@pytest.fixture
def slow_config(stack_env: StackEnv, tmp_path: Path) -> Path:
    """The stack's configuration with small sweep batches, sweeping everything."""
    text = Path(stack_env.config_path).read_text()
    path = tmp_path / "postkeep.toml"
    path.write_text(text + "\n[retention]\ncontent_expiry = 'sweep'\nsweep_batch = 25\n")
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
        slow_config: Path) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    weeks, stored = _workload(db, objects, org)
    since = (min(w.monday for w in weeks) - timedelta(days=60)).isoformat()
    first = _start(slow_config, "--sweep-from", since)
    _wait_for(first, MID_SWEEP)  # the first run holds the lock and is sweeping
    second = _start(slow_config)
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    # The first dropped the weeks; the second, let in after it, found them gone.
    assert f"partitions_dropped={WEEKS}" in out1 or f"partitions_dropped={WEEKS}" in out2
    assert "messages_dropped=0" in out2
    assert "waiting for another retention run" in err2
    _assert_exact_end_state(db, objects, org, weeks, stored, started)


@pytest.mark.parametrize("kill_at", [MID_SWEEP, MID_DROPS])
def test_a_run_killed_mid_way_is_finished_by_the_next(
        db: psycopg.Connection, objects: S3ObjectStore, make_org: Callable[..., TestOrg],
        slow_config: Path, kill_at: str) -> None:
    started = datetime.now(UTC)
    org = make_org("free")
    weeks, stored = _workload(db, objects, org)
    since = (min(w.monday for w in weeks) - timedelta(days=60)).isoformat()
    victim = _start(slow_config, "--sweep-from", since)
    _wait_for(victim, kill_at)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    store = rules.S3Retention(objects.client, objects.bucket)
    left = sum(1 for m in stored if store.exists(m.object_key))
    dropped = [w for w in weeks if not exists(db, w.messages)]
    if kill_at == MID_SWEEP:
        assert 0 < left < len(stored), "the kill did not land mid-sweep"
        assert dropped == []
    else:
        assert left == 0 and 1 <= len(dropped) < WEEKS, "the kill did not land mid-drops"

    rerun = _start(slow_config)  # no rewind: it carries on from the watermark
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"partitions_dropped={WEEKS - len(dropped)} " in out
    _assert_exact_end_state(db, objects, org, weeks, stored, started)
