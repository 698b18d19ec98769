"""postkeep-policyd's counters in the stack's PostgreSQL.

rate_consume() with explicit times (reserve once, settle, expiry, roll-over),
then the exactness proof with real processes: two postkeep-policyd processes
on loopback ports and 50 concurrent clients against one organisation admit
exactly its limit, not one more.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import TestOrg
from support.policyd import hammer, policyds

from postkeep.config import Config
from postkeep.storage.metadata import limits
from postkeep.storage.metadata.limits import OrgLimits

pytestmark = pytest.mark.stack

T0 = datetime(2026, 11, 25, 10, 59, 0, tzinfo=UTC)


def org_limits(org: TestOrg, msgs: int | None = 3, rcpts: int | None = 10,
               nbytes: int | None = 1000) -> OrgLimits:
    return OrgLimits(org.id, org.name, org.tier, msgs, rcpts, nbytes)


def test_message_counted_once_and_settled(db: psycopg.Connection,
                                          make_org: Callable[..., TestOrg]) -> None:
    lim = org_limits(make_org())
    assert limits.consume(db, "check", lim, "", 0, 0, 900, T0).result == "ok"
    assert limits.consume(db, "reserve", lim, "m1", 4, 0, 900, T0).result == "ok"
    assert limits.consume(db, "reserve", lim, "m1", 4, 0, 900, T0).result == "dup"
    assert limits.consume(db, "settle", lim, "m1", 4, 600, 900, T0).result == "ok"
    assert limits.consume(db, "settle", lim, "m1", 4, 600, 900, T0).result == "dup"
    # END-OF-MESSAGE without DATA reserves and settles at once
    assert limits.consume(db, "settle", lim, "m2", 2, 300, 900, T0).result == "ok"
    over = limits.consume(db, "reserve", lim, "m3", 5, 0, 900, T0)
    assert (over.result, over.kind, over.used, over.limit) == ("over", "recipients", 6, 10)
    over = limits.consume(db, "reserve", lim, "m4", 1, 200, 900, T0)
    assert (over.result, over.kind, over.used) == ("over", "bytes", 900)


def test_a_batch_decides_each_as_if_alone_in_order(
        config: Config, make_org: Callable[..., TestOrg]) -> None:
    """The same sequence as above, sent as one rate_consume_many round trip."""
    lim = org_limits(make_org())
    asks = [limits.Ask("check", "", 0, 0), limits.Ask("reserve", "m1", 4, 0),
            limits.Ask("reserve", "m1", 4, 0), limits.Ask("settle", "m1", 4, 600),
            limits.Ask("settle", "m1", 4, 600), limits.Ask("settle", "m2", 2, 300),
            limits.Ask("reserve", "m3", 5, 0), limits.Ask("reserve", "m4", 1, 200)]

    async def run() -> list[limits.Outcome]:
        async with await psycopg.AsyncConnection.connect(config.postgres.conninfo(),
                                                         autocommit=True) as conn:
            return await limits.consume_many_async(conn, lim, asks, 900, T0)

    got = [(o.result, o.kind, o.used) for o in asyncio.run(run())]
    assert got == [("ok", None, None), ("ok", None, None), ("dup", None, None),
                   ("ok", None, None), ("dup", None, None), ("ok", None, None),
                   ("over", "recipients", 6), ("over", "bytes", 900)]


def test_window_roll_over_and_expired_reservation(db: psycopg.Connection,
                                                  make_org: Callable[..., TestOrg]) -> None:
    lim = org_limits(make_org(), msgs=2, rcpts=100, nbytes=None)
    assert limits.consume(db, "reserve", lim, "a", 1, 0, 900, T0).result == "ok"
    assert limits.consume(db, "reserve", lim, "b", 1, 0, 60, T0).result == "ok"  # never completes
    assert limits.consume(db, "reserve", lim, "c", 1, 0, 900, T0).result == "over"
    assert limits.consume(db, "check", lim, "", 0, 0, 900, T0).result == "over"
    # 10:59:50 — b's reservation (60 s) has not expired yet
    t = T0 + timedelta(seconds=50)
    assert limits.consume(db, "reserve", lim, "c", 1, 0, 900, t).result == "over"
    # 11:00:01 — a new hour: room again
    t = T0 + timedelta(seconds=61)
    assert limits.consume(db, "reserve", lim, "c", 1, 0, 900, t).result == "ok"
    # b expired and gave back its recipient: 2 counted today, not 3
    row = db.execute(
        "SELECT used FROM rate_counters WHERE org_id = %s AND kind = 'recipients'",
        (lim.org_id,)).fetchone()
    assert row == (2,)


def test_expired_reservations_go_back_without_a_table_scan(
        db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    """Expired reservations all go back in the call that finds them, through
    the index, even when the statistics claim that nearly every row has
    expired: the table churns, so they always lag.  A
    scan of the whole table per decision (8-11 ms each on a stack that had
    taken 200,000 messages) grew with traffic."""
    lim = org_limits(make_org(), msgs=None, rcpts=None, nbytes=None)
    hour, day = T0.replace(minute=0, second=0), T0.replace(hour=0, minute=0, second=0)
    rows = ("INSERT INTO rate_reservations (org_id, instance, hour_start, day_start,"
            " recipients, settled, expires_at)"
            " SELECT %s, %s || i, %s, %s, 1, %s, %s FROM generate_series(1, %s) i")
    try:
        # Live reservations, analysed while they looked expired.
        db.execute(rows, (lim.org_id, "live-", hour, day, True, T0 - timedelta(hours=1), 20000))
        db.execute("ANALYZE rate_reservations")
        db.execute("UPDATE rate_reservations SET expires_at = %s WHERE org_id = %s",
                   (T0 + timedelta(days=1), lim.org_id))
        # 1,200 messages that never completed, expired: their units still count.
        db.execute(rows, (lim.org_id, "lost-", hour, day, False, T0 - timedelta(minutes=1),
                          1200))
        db.execute("INSERT INTO rate_counters (org_id, kind, window_start, used) VALUES"
                   " (%s, 'messages', %s, 1200), (%s, 'recipients', %s, 1200)",
                   (lim.org_id, hour, lim.org_id, day))
        # The setup's own scans are still pending in this backend's statistics:
        # flush them, so that the transaction below sees only its own.
        db.execute("SELECT pg_stat_force_next_flush()")
        with db.transaction():
            assert limits.consume(db, "reserve", lim, "new", 1, 0, 900, T0).result == "ok"
            scans = db.execute("SELECT seq_scan FROM pg_stat_xact_user_tables"
                               " WHERE relname = 'rate_reservations'").fetchone()
        assert scans == (0,)
        used = dict(db.execute("SELECT kind, used FROM rate_counters WHERE org_id = %s",
                               (lim.org_id,)).fetchall())
        assert used["messages"] == 1 and used["recipients"] == 1
        left = db.execute("SELECT count(*) FROM rate_reservations WHERE org_id = %s",
                          (lim.org_id,)).fetchone()
        assert left == (20001,)
    finally:
        db.execute("DELETE FROM rate_reservations WHERE org_id = %s", (lim.org_id,))


def test_bytes_over_at_end_of_message_gives_the_reservation_back(
        db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    lim = org_limits(make_org(), msgs=5, rcpts=100, nbytes=1000)
    assert limits.consume(db, "reserve", lim, "big", 3, 0, 900, T0).result == "ok"
    over = limits.consume(db, "settle", lim, "big", 3, 5000, 900, T0)
    assert (over.result, over.kind) == ("over", "bytes")
    used = dict(db.execute(
        "SELECT kind, used FROM rate_counters WHERE org_id = %s", (lim.org_id,)).fetchall())
    assert used == {"messages": 0, "recipients": 0, "bytes": 0}


def test_organisations_do_not_share_counters(db: psycopg.Connection,
                                             make_org: Callable[..., TestOrg]) -> None:
    a, b = org_limits(make_org(), msgs=1), org_limits(make_org(), msgs=1)
    assert limits.consume(db, "reserve", a, "x", 1, 0, 900, T0).result == "ok"
    assert limits.consume(db, "reserve", a, "y", 1, 0, 900, T0).result == "over"
    assert limits.consume(db, "reserve", b, "x", 1, 0, 900, T0).result == "ok"


@pytest.fixture
def two_policyds(config: Config, _migrated: None) -> Iterator[list[int]]:
    """Two postkeep-policyd processes on the stack's PostgreSQL; yields their ports."""
    with policyds(config.source, 2) as ports:
        yield [port for port, _ in ports]


def test_two_processes_fifty_clients_admit_exactly_the_limit(
        db: psycopg.Connection, make_org: Callable[..., TestOrg],
        two_policyds: list[int]) -> None:
    org = make_org("enterprise")  # unlimited but for the override below
    db.execute("UPDATE organisations SET recipients_per_day = 137 WHERE id = %s", (org.id,))
    other = make_org("enterprise")
    db.execute("UPDATE organisations SET recipients_per_day = 5 WHERE id = %s", (other.id,))
    replies = asyncio.run(hammer(two_policyds, org.domain, clients=50, per_client=8))
    admitted = sum(r == b"action=DUNNO\n\n" for r in replies)
    deferred = [r for r in replies if r.startswith(b"action=DEFER_IF_PERMIT 4.7.1 ")]
    assert admitted == 137
    assert len(deferred) == 400 - 137
    assert b"recipients per day limit of the enterprise tier reached (137 of 137)" in deferred[0]
    row = db.execute("SELECT used FROM rate_counters WHERE org_id = %s AND kind = 'recipients'",
                     (org.id,)).fetchone()
    assert row == (137,)
    # the other organisation's limit is its own
    replies = asyncio.run(hammer(two_policyds, other.domain, clients=4, per_client=2))
    assert sum(r == b"action=DUNNO\n\n" for r in replies) == 5


def postkeep_cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("postkeep")), "--config",
                           config.source, *args], cwd="/tmp", capture_output=True, text=True,
                          timeout=30)


def test_cli_show_reset_and_shadow_take_effect_without_restart(
        config: Config, db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    import dataclasses

    from postkeep.policyd.service import PgBackend, PolicyService

    org = make_org("enterprise")
    db.execute("UPDATE organisations SET messages_per_hour = 2 WHERE id = %s", (org.id,))
    cfg = dataclasses.replace(config, policyd=dataclasses.replace(
        config.policyd, directory_cache_seconds=0))

    def req(i: int) -> dict[str, str]:
        return {"protocol_state": "DATA", "sender": f"a@{org.domain}",
                "instance": f"cli{i}", "recipient_count": "1"}

    async def answers(first: int, n: int) -> list[str]:
        backend = PgBackend(cfg)
        await backend.open()
        try:
            service = PolicyService(cfg, backend)
            return [await service.decide(req(i)) for i in range(first, first + n)]
        finally:
            await backend.close()

    got = asyncio.run(answers(0, 3))
    assert got[:2] == ["DUNNO", "DUNNO"] and got[2].startswith("DEFER_IF_PERMIT 4.7.1")
    shown = postkeep_cli(config, "limits", "show", org.name)
    assert shown.returncode == 0, shown.stderr
    assert "messages   this hour" in shown.stdout and "used 2, limit 2, remaining 0" in shown.stdout
    assert postkeep_cli(config, "limits", "shadow", org.name, "on").returncode == 0
    assert asyncio.run(answers(3, 2)) == ["DUNNO", "DUNNO"]  # decided, logged, not deferred
    assert postkeep_cli(config, "limits", "shadow", org.name, "inherit").returncode == 0
    assert asyncio.run(answers(5, 1))[0].startswith("DEFER_IF_PERMIT 4.7.1")
    assert postkeep_cli(config, "limits", "reset", "--yes", org.name).returncode == 0
    assert asyncio.run(answers(6, 1)) == ["DUNNO"]
    missing = postkeep_cli(config, "limits", "show", "no-such-org")
    assert missing.returncode == 1 and "no organisation 'no-such-org'" in missing.stderr
