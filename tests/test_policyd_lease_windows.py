"""Lease mode and window roll-over with real postkeep-policyd processes and PostgreSQL.

Lease mode's bound, with two processes and 50 concurrent clients against one
organisation: never more than the limit admitted, at least the limit minus
one block per other process before the first refusal, unspent blocks back in
the shared counter once idle, and then exactly the limit in all.  Window
roll-over in real time: the stack's PostgreSQL clock decides the windows,
shortened to a few seconds (policyd.message_window_seconds) so the test can
watch one close; the deferral names the limit, and the next window admits
again, in exact and in lease mode alike.

The lease books (`LeaseBook`, one per process) are also driven directly
against the real `rate_lease()` and `rate_release()` and the counters they
leave in `rate_counters`, never a copy of those functions in the test; and
the in-memory counting (degraded mode's `LocalCounters`, lease mode's books)
is held to `rate_consume()`'s decisions over one long random sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import TestOrg
from support.policyd import PolicyClient, config_with, hammer, policyds, request

from postkeep.config import Config
from postkeep.policyd.decide import DUNNO as DUNNO_ACTION
from postkeep.policyd.decide import LeaseBook, LocalCounters
from postkeep.policyd.service import PgBackend, PolicyService
from postkeep.storage.metadata import limits
from postkeep.storage.metadata.limits import Grant, OrgLimits, Outcome, Want
from postkeep.windows import Windows

pytestmark = pytest.mark.stack

DUNNO = b"action=DUNNO\n\n"


def lease_requests(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    m = re.search(rb"^postkeep_policyd_lease_requests_total (\S+)$", text, re.M)
    assert m, "no lease-request metric"
    return float(m.group(1))


def used(db: psycopg.Connection, org: TestOrg, kind: str) -> list[int]:
    rows = db.execute("SELECT used FROM rate_counters WHERE org_id = %s AND kind = %s"
                      " ORDER BY window_start", (org.id, kind)).fetchall()
    return [r[0] for r in rows]


def test_lease_mode_two_processes_fifty_clients_stay_within_the_bound(
        config: Config, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        tmp_path: Path) -> None:
    org = make_org("enterprise")
    limit, fraction = 500, 0.02  # blocks of 10 messages
    block = 10
    db.execute("UPDATE organisations SET messages_per_hour = %s WHERE id = %s", (limit, org.id))
    source = config_with(config.source, tmp_path / "lease.toml", "policyd",
                         lease_tiers=["enterprise"], lease_fraction=fraction,
                         lease_idle_seconds=0.5, directory_cache_seconds=0.2)
    with policyds(source, 2) as procs:
        ports = [port for port, _ in procs]
        # within the limit: about one round trip per block, not one per decision
        replies = asyncio.run(hammer(ports, org.domain, clients=50, per_client=8))
        assert replies == [DUNNO] * 400
        trips = sum(lease_requests(m) for _, m in procs)
        assert trips <= 400 / block + 2, trips
        # over it, 50 clients still racing
        replies += asyncio.run(hammer(ports, org.domain, clients=50, per_client=4))
        admitted = sum(r == DUNNO for r in replies)
        deferred = [r for r in replies if r.startswith(b"action=DEFER_IF_PERMIT 4.7.1 ")]
        assert admitted + len(deferred) == 600
        # never more than the limit; at most one unspent block per other process short
        assert limit - (2 - 1) * block <= admitted <= limit, admitted
        assert b"messages per hour limit of the enterprise tier reached" in deferred[0]
        assert f"of {limit})".encode() in deferred[0]
        # idle blocks go back: the shared counter then holds exactly what was admitted
        deadline = time.monotonic() + 30  # lease_idle_seconds is 0.5
        while used(db, org, "messages") != [admitted] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert used(db, org, "messages") == [admitted]
        # ... so the rest of the limit is admissible again, and not one more
        more = asyncio.run(hammer(ports, org.domain, clients=10, per_client=3))
        assert admitted + sum(r == DUNNO for r in more) == limit
    # stopping gives back whatever was still leased
    assert used(db, org, "messages") == [limit]


def test_lease_mode_counts_a_message_once_and_settles_bytes(
        config: Config, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        tmp_path: Path) -> None:
    org = make_org("enterprise")
    db.execute("UPDATE organisations SET messages_per_hour = 1000, recipients_per_day = 1000,"
               " bytes_per_day = 100000 WHERE id = %s", (org.id,))
    source = config_with(config.source, tmp_path / "lease.toml", "policyd",
                         lease_tiers=["enterprise"], lease_fraction=0.1)
    sender = f"app@{org.domain}"
    with policyds(source, 1) as [(port, _)]:
        client = PolicyClient(port)
        for i in range(3):
            for state, size in (("RCPT", 0), ("DATA", 0), ("END-OF-MESSAGE", 30000)):
                assert client.ask(request(state, sender, f"m{i}", 2, size)) == "DUNNO"
        # the fourth message's 30,000 bytes are over the day's 100,000
        assert client.ask(request("DATA", sender, "m3", 2)) == "DUNNO"
        over = client.ask(request("END-OF-MESSAGE", sender, "m3", 2, 30000))
        assert over.startswith("DEFER_IF_PERMIT 4.7.1 ") and "bytes per day" in over, over
        client.close()
    # given back on stop: the counters hold what was admitted, each message once
    assert used(db, org, "messages") == [3]
    assert used(db, org, "recipients") == [6]
    assert used(db, org, "bytes") == [90000]


def _sleep_into_next_window(seconds: int, margin: float = 0.3) -> None:
    # The one fixed sleep kept on purpose: a window rolling over in real time is
    # what the test is about, and this is the least that gets there (at most
    # one window; the burst after it has the window's length minus MARGIN).
    time.sleep(seconds - time.time() % seconds + margin)


def test_windows_roll_over_in_real_time(
        config: Config, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        tmp_path: Path) -> None:
    window = 6
    exact, leased = make_org("pro"), make_org("enterprise")
    for org in (exact, leased):
        db.execute("UPDATE organisations SET messages_per_hour = 2 WHERE id = %s", (org.id,))
    source = config_with(config.source, tmp_path / "short.toml", "policyd",
                         message_window_seconds=window, lease_tiers=["enterprise"])
    with policyds(source, 1) as [(port, _)]:
        client = PolicyClient(port)

        def burst(org: TestOrg) -> list[str]:
            return [client.ask(request("DATA", f"app@{org.domain}", uuid.uuid4().hex))
                    for _ in range(3)]

        _sleep_into_next_window(window)
        first = {org.name: burst(org) for org in (exact, leased)}
        _sleep_into_next_window(window)
        second = {org.name: burst(org) for org in (exact, leased)}
        client.close()
    for answers in (*first.values(), *second.values()):
        assert answers[:2] == ["DUNNO", "DUNNO"], answers
        assert answers[2].startswith("DEFER_IF_PERMIT 4.7.1 "), answers
        assert "messages per hour limit" in answers[2] and "(2 of 2)" in answers[2]
        assert "retry after" in answers[2]
    for org in (exact, leased):
        rows = db.execute("SELECT window_start, used FROM rate_counters WHERE org_id = %s"
                          " AND kind = 'messages' ORDER BY window_start", (org.id,)).fetchall()
        assert [u for _, u in rows] == [2, 2], (org.tier, rows)
        assert (rows[1][0] - rows[0][0]).total_seconds() == window
        assert int(rows[0][0].timestamp()) % window == 0


# --- the lease books against the real rate_lease() and rate_release() -------

T0 = datetime(2026, 11, 25, 10, 59, 30, tzinfo=UTC)


def pg_lease(db: psycopg.Connection, org: OrgLimits, wants: list[Want]) -> list[Grant]:
    """rate_lease() on the stack's PostgreSQL, as PgBackend.lease calls it."""
    return [Grant(*row) for row in
            db.execute(limits.LEASE, limits.lease_params(org, wants)).fetchall()]


def pg_give_back(db: psycopg.Connection, book: LeaseBook, now: datetime,
                 everything: bool = False) -> None:
    """BOOK's unspent units back to the shared counters through rate_release()."""
    for oid, unspent in book.unspent(now, everything).items():
        db.execute(limits.RELEASE, (oid, [u.kind for u in unspent],
                                    [u.window for u in unspent], [u.units for u in unspent]))


def leased_decision(db: psycopg.Connection, book: LeaseBook, stage: str, org: OrgLimits,
                    instance: str, recipients: int, size: int, now: datetime) -> Outcome:
    """One decision as PolicyService._leased takes it: lease what is short, then decide."""
    wants = book.shortfall(stage, org, instance, recipients, size, now)
    if wants:
        for g in pg_lease(db, org, wants):
            book.grant(org.org_id, g.kind, g.window, g.granted, now)
    return book.consume(stage, org, instance, recipients, size, now)


def shared(db: psycopg.Connection, org: OrgLimits, kind: str, window: datetime) -> int:
    """The shared counter of ORG's KIND in WINDOW, as rate_counters holds it (0: no row)."""
    row = db.execute("SELECT used FROM rate_counters WHERE org_id = %s AND kind = %s"
                     " AND window_start = %s", (org.org_id, kind, window)).fetchone()
    return int(row[0]) if row else 0


def limits_of(org: TestOrg, msgs: int | None, rcpts: int | None,
              nbytes: int | None) -> OrgLimits:
    return OrgLimits(org.id, org.name, org.tier, msgs, rcpts, nbytes)


def test_lease_books_never_admit_more_than_the_limit_and_strand_at_most_a_block_each(
        db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    org = limits_of(make_org("enterprise"), 1000, None, None)
    books = [LeaseBook(0.05, timedelta(seconds=2)) for _ in range(3)]  # blocks of 50
    rng = random.Random(7)
    admitted, first_refusal = 0, None
    for i in range(1500):
        book = rng.choice(books)
        if leased_decision(db, book, "reserve", org, f"m{i}", 1, 0, T0).result == "ok":
            admitted += 1
        elif first_refusal is None:
            first_refusal = admitted
    assert admitted <= 1000
    assert first_refusal is not None and first_refusal >= 1000 - (3 - 1) * 50
    hour = Windows().start("messages", T0)
    assert shared(db, org, "messages", hour) == 1000  # every unit leased, some unspent
    # every unspent unit goes back when the books stop; then the counter is what was admitted
    for book in books:
        pg_give_back(db, book, T0, everything=True)
    assert shared(db, org, "messages", hour) == admitted
    # and what is left is admissible again, exactly
    for i in range(100):
        admitted += leased_decision(db, books[i % 3], "reserve", org, f"n{i}", 1, 0,
                                    T0).result == "ok"
    assert admitted == 1000
    assert shared(db, org, "messages", hour) == 1000


def test_lease_book_counts_once_gives_back_idle_units_and_forgets_ended_windows(
        db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    org = limits_of(make_org("enterprise"), 100, 1000, 10**6)
    book = LeaseBook(0.1, timedelta(seconds=2), ttl=timedelta(minutes=15))
    hour, day = datetime(2026, 11, 25, 10, tzinfo=UTC), datetime(2026, 11, 25, tzinfo=UTC)
    assert book.shortfall("reserve", org, "a", 3, 0, T0) == [
        Want("messages", hour, 1, 10), Want("recipients", day, 3, 100)]
    assert leased_decision(db, book, "reserve", org, "a", 3, 0, T0).result == "ok"
    assert (shared(db, org, "messages", hour), shared(db, org, "recipients", day)) == (10, 100)
    assert book.shortfall("reserve", org, "a", 3, 0, T0) == []  # a duplicate needs nothing
    assert leased_decision(db, book, "reserve", org, "a", 3, 0, T0).result == "dup"
    # END-OF-MESSAGE needs only the bytes
    [want] = book.shortfall("settle", org, "a", 3, 5000, T0)
    assert (want.kind, want.need, want.want) == ("bytes", 5000, 100000)
    assert leased_decision(db, book, "settle", org, "a", 3, 5000, T0).result == "ok"
    assert book.unspent(T0 + timedelta(seconds=1)) == {}  # not idle yet
    pg_give_back(db, book, T0 + timedelta(seconds=2))
    # the shared counters now hold what the one message used, and nothing more
    assert [shared(db, org, kind, w) for kind, w in
            (("messages", hour), ("recipients", day), ("bytes", day))] == [1, 3, 5000]
    # an unsettled reservation that expires gives its units back to the book, then to the
    # shared counter
    assert leased_decision(db, book, "reserve", org, "b", 2, 0, T0).result == "ok"
    pg_give_back(db, book, T0, everything=True)
    assert (shared(db, org, "messages", hour), shared(db, org, "recipients", day)) == (2, 5)
    later = T0 + timedelta(minutes=16)  # 11:15:30: a new hour; b's reservation expired
    assert leased_decision(db, book, "check", org, "", 0, 0, later).result == "ok"
    back = book.unspent(later, everything=True)[org.org_id]
    # b's 2 recipients (the day goes on) and the new hour's block; the ended hour's
    # block is forgotten, never given back
    assert {(u.kind, u.window.hour, u.units) for u in back} == {
        ("recipients", 0, 2), ("messages", 11, 10)}
    for oid, unspent in {org.org_id: back}.items():
        db.execute(limits.RELEASE, (oid, [u.kind for u in unspent],
                                    [u.window for u in unspent], [u.units for u in unspent]))
    # b still counts in the ended hour (its unit is gone with the window); the day's
    # recipients are a's 3 again; the new hour holds nothing
    assert shared(db, org, "messages", hour) == 2
    assert shared(db, org, "recipients", day) == 3
    assert shared(db, org, "messages", hour + timedelta(hours=1)) == 0


def test_service_in_lease_mode_asks_the_backend_once_per_block(
        config: Config, db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    org = make_org("enterprise")  # no tier limits: only the organisation's own below
    db.execute("UPDATE organisations SET messages_per_hour = 100 WHERE id = %s", (org.id,))
    # a generous decision timeout: this test is about round trips, not about
    # degrading when a loaded machine is slow
    cfg = dataclasses.replace(config, policyd=dataclasses.replace(
        config.policyd, lease_tiers=("enterprise",), lease_fraction=0.1,
        decision_timeout_ms=30000))

    class CountingBackend(PgBackend):
        leases = 0

        async def lease(self, org: OrgLimits, wants: list[Want]) -> list[Grant]:
            self.leases += 1
            return await super().lease(org, wants)

    async def run() -> tuple[list[str], int]:
        backend = CountingBackend(cfg)
        await backend.open()
        try:
            service = PolicyService(cfg, backend, wallclock=lambda: T0)
            answers = [await service.decide({
                "protocol_state": "DATA", "sender": f"a@{org.domain}", "instance": f"m{i}",
                "recipient_count": "1", "size": "0", "sasl_username": ""}) for i in range(101)]
            await service.give_back(everything=True)
        finally:
            await backend.close()
        return answers, backend.leases

    answers, leases = asyncio.run(run())
    assert answers[:100] == [DUNNO_ACTION] * 100
    assert answers[100].startswith(
        f"DEFER_IF_PERMIT 4.7.1 Rate limit: {org.name}: messages per hour"
        " limit of the enterprise tier reached (100 of 100)"), answers[100]
    assert leases == 11  # ten blocks of 10, and the refusal
    assert used(db, org, "messages") == [100]


# --- in-memory counting held to rate_consume() ------------------------------


def test_a_check_does_not_count_reservations_that_have_expired(
        db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    """RCPT's check must see what DATA would: reservations of messages that never
    completed give their units back once expired, even if no DATA came since to
    sweep them (a deferral at RCPT means none will: the organisation would stay
    deferred until the window ends)."""
    t = T0 - timedelta(minutes=30)  # 10:29:30
    org = limits_of(make_org(), 2, 100, None)
    for instance in ("a", "b"):  # clients that disconnect after DATA
        assert limits.consume(db, "reserve", org, instance, 1, 0, 60, t).result == "ok"
    assert limits.consume(db, "check", org, "", 0, 0, 60, t).result == "over"
    later = t + timedelta(minutes=5)  # both expired (60 s), the same hour
    assert limits.consume(db, "check", org, "", 0, 0, 60, later).result == "ok"
    assert limits.consume(db, "reserve", org, "c", 1, 0, 60, later).result == "ok"
    # ... and recipients, whose window is a whole day
    org = limits_of(make_org(), None, 4, None)
    assert limits.consume(db, "reserve", org, "a", 4, 0, 60, t).result == "ok"
    over = limits.consume(db, "check", org, "", 0, 0, 60, t)
    assert (over.result, over.kind) == ("over", "recipients")
    assert limits.consume(db, "check", org, "", 0, 0, 60, later).result == "ok"


def test_in_memory_counting_decides_as_rate_consume_does(
        db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    """One random sequence of RCPT, DATA and END-OF-MESSAGE stages over two hours
    (repeats, expiries, window roll-overs, every kind over) decided three ways:
    by rate_consume() (exact mode), by LocalCounters for one process (degraded
    mode) and by one LeaseBook leasing from rate_lease() (lease mode).  All
    three must agree on every decision."""
    lims = (5, 12, 3000)
    exact, local_org, leased = (limits_of(make_org("enterprise"), *lims) for _ in range(3))
    ttl = timedelta(minutes=15)
    # Completed messages remembered as long as the database remembers them
    # (LeaseBook's default is shorter, an over-count it documents).
    local = LocalCounters(1, ttl=ttl, settled_ttl=ttl)
    book = LeaseBook(0.2, timedelta(seconds=30), ttl=ttl, settled_ttl=ttl)
    rng = random.Random(4)
    instances: list[str] = []
    t = T0 - timedelta(minutes=20)
    decisions: list[tuple[str, ...]] = []
    disagree = []
    for i in range(400):
        t += timedelta(seconds=rng.choice([0, 5, 30, 120]))
        stage = rng.choice(["check", "reserve", "reserve", "settle", "settle"])
        if stage == "check":
            instance = ""
        elif instances and rng.random() < 0.6:
            instance = rng.choice(instances)
        else:
            instance = f"m{i}"
            instances.append(instance)
        rcpts = rng.randint(1, 4)
        size = rng.choice([0, 500, 1500]) if stage == "settle" else 0
        want = limits.consume(db, stage, exact, instance, rcpts, size, int(ttl.total_seconds()),
                              t)
        got_local = local.consume(stage, local_org, instance, rcpts, size, t)
        got_leased = leased_decision(db, book, stage, leased, instance, rcpts, size, t)
        pg_give_back(db, book, t)
        if stage == "check" and want.kind == "bytes":
            # RCPT's check in PostgreSQL also refuses once the day's bytes are used
            # up; in memory it looks at messages and recipients only, and such a
            # message is refused at END-OF-MESSAGE instead.
            want = Outcome("ok")
        decisions.append((stage, want.result))
        if not ((want.result, want.kind) == (got_local.result, got_local.kind)
                == (got_leased.result, got_leased.kind)):
            disagree.append((i, t.isoformat(), stage, instance, rcpts, size, want,
                             got_local, got_leased))
        elif want.result == "over":
            assert (got_local.used, got_local.limit) == (want.used, want.limit), (i, want)
    assert disagree == []
    # the sequence exercised what it is meant to: each outcome at each stage
    for stage in ("check", "reserve", "settle"):
        for result in ("ok", "over") + (("dup",) if stage != "check" else ()):
            assert (stage, result) in decisions, (stage, result)
