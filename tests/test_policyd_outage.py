"""PostgreSQL stopped and started under a running postkeep-policyd.

Requests keep flowing on one connection: every one is answered without
waiting for PostgreSQL (the decision timeout cuts the wait short; never a
hang), decisions taken while PostgreSQL is down
are degraded (counted in /metrics) and stay within this process's share,
and once PostgreSQL is back the daemon counts there again by itself.
"""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from conftest import TestOrg
from support.policyd import PolicyClient, config_with, policyds, request
from support.stack import Stack

from postkeep.config import Config

pytestmark = pytest.mark.outage


def degraded_count(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    m = re.search(rb'^postkeep_policyd_degraded_decisions_total\{mode="share"\} (\S+)$', text,
                  re.M)
    assert m, "no degraded-decision metric"
    return float(m.group(1))


def counted(stack: Stack, org: TestOrg) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT coalesce(sum(used), 0) FROM rate_counters"
                           " WHERE org_id = %s AND kind = 'messages'", (org.id,)).fetchone()
    assert row is not None
    return int(row[0])


# A decision that waited for PostgreSQL's pool instead of the decision timeout
# would take this long while PostgreSQL is down: far from any scheduling noise.
POOL_WAIT = 60


def test_postgres_stopped_and_restarted_mid_run(
        stack: Stack, config: Config, db: psycopg.Connection,
        make_org: Callable[..., TestOrg], tmp_path: Path) -> None:
    org = make_org("enterprise")
    # 40 per hour: 20 per process while degraded (policyd.degraded_processes = 2)
    db.execute("UPDATE organisations SET messages_per_hour = 40 WHERE id = %s", (org.id,))
    db.close()
    sender = f"app@{org.domain}"
    source = config_with(config.source, tmp_path / "pool-wait.toml", "postgres",
                         connect_timeout_seconds=POOL_WAIT)
    with policyds(source, 1) as [(port, mport)]:
        client = PolicyClient(port)

        def ask() -> tuple[str, float]:
            started = time.monotonic()
            answer = client.ask(request("DATA", sender, uuid.uuid4().hex))
            return answer, time.monotonic() - started

        before = [ask() for _ in range(5)]
        assert [a for a, _ in before] == ["DUNNO"] * 5
        assert counted(stack, org) == 5
        degraded_before = degraded_count(mport)
        stack.stack_ctl("stop", "postgres")
        try:
            during = [ask() for _ in range(30)]
        finally:
            stack.stack_ctl("start", "postgres")
        # every answer came, none waited for PostgreSQL (the decision timeout
        # cut it short): the bound is half the pool's wait, not a speed check
        assert max(t for _, t in during) < POOL_WAIT / 2
        assert [a for a, _ in during].count("DUNNO") == 20  # the process's share
        assert all(a.startswith("DEFER_IF_PERMIT 4.7.1") and "host share" in a
                   for a, _ in during[20:])
        assert degraded_count(mport) == degraded_before + 30  # each one counted, once
        # back by itself: decisions are counted in PostgreSQL again
        deadline = time.monotonic() + 30
        while counted(stack, org) == 5 and time.monotonic() < deadline:
            ask()
            time.sleep(0.2)
        assert counted(stack, org) > 5, "policyd never went back to PostgreSQL"
        client.close()
