"""Lease mode and window roll-over with real postkeep-policyd processes and PostgreSQL.

Lease mode's bound, with two processes and 50 concurrent clients against one
organisation: never more than the limit admitted, at least the limit minus
one block per other process before the first refusal, unspent blocks back in
the shared counter once idle, and then exactly the limit in all.  Window
roll-over in real time: the stack's PostgreSQL clock decides the windows,
shortened to a few seconds (policyd.message_window_seconds) so the test can
watch one close; the deferral names the limit, and the next window admits
again, in exact and in lease mode alike.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from conftest import TestOrg
from support.policyd import PolicyClient, config_with, hammer, policyds, request

from postkeep.config import Config

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
