"""A pooled connection whose server turned read-only is dropped, not reused.

libpq's target_session_attrs=read-write (what a multi-host DSN relies on to
find the primary after a failover) is checked when a connection is made,
never afterwards: a connection kept in a pool to a server that is read-only
now (a demoted primary, a standby reached some other way) would fail every
write for as long as it lives.  Here one pooled connection is made read-only
for the rest of its session (`SET default_transaction_read_only`, what such a
server answers with 25006 read_only_sql_transaction), and the next write
must go through anyway: postkeep's Database (milter, sidecar, CLI) and
postkeep-policyd's pool each drop it and retry on a new connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import psycopg
import pytest
from conftest import TestOrg

from postkeep.config import Config
from postkeep.storage.metadata.db import Database

pytestmark = pytest.mark.stack

WRITE = "CREATE TEMP TABLE IF NOT EXISTS pk_read_only_probe (x int)"


def test_database_drops_a_read_only_connection_and_writes_on_a_new_one(config: Config) -> None:
    db = Database(dataclasses.replace(config.postgres, pool_min=1, pool_max=1))
    try:
        with db.connection() as conn:
            conn.execute("SET default_transaction_read_only = on")
            read_only_pid = conn.info.backend_pid

        def write(conn: psycopg.Connection) -> int:
            conn.execute(WRITE)
            return conn.info.backend_pid

        # The pool has that one connection only: the first attempt gets it.
        assert db.run(write) != read_only_pid
        with db.connection() as conn:  # and it is gone for good
            assert conn.info.backend_pid != read_only_pid
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
    finally:
        db.close()


def test_policyd_drops_a_read_only_connection_and_counts_on_a_new_one(
        config: Config, db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    from postkeep.policyd.service import PgBackend, PolicyService

    org = make_org("enterprise")
    cfg = dataclasses.replace(config, postgres=dataclasses.replace(
        config.postgres, pool_min=1, pool_max=1))

    def counted() -> int:
        row = db.execute("SELECT coalesce(sum(used), 0) FROM rate_counters"
                         " WHERE org_id = %s AND kind = 'messages'", (org.id,)).fetchone()
        return int(row[0]) if row else 0

    def request(instance: str) -> dict[str, str]:
        return {"protocol_state": "DATA", "sender": f"a@{org.domain}", "instance": instance,
                "recipient_count": "1"}

    async def decide() -> tuple[str, int, list[int], int]:
        backend = PgBackend(cfg)
        await backend.open()
        try:
            service = PolicyService(cfg, backend)
            # First a decision that looks the organisation up (cached after), so
            # that the next one's only use of a connection is the counting.
            assert await service.decide(request("ro0")) == "DUNNO"
            before = counted()
            # Every pooled connection out at once, the read-only one given back
            # first: the pool hands them out in the order they came back.
            size = backend.pool.min_size
            conns = [await backend.pool.getconn() for _ in range(size)]
            await conns[0].execute("SET default_transaction_read_only = on")
            read_only_pid = conns[0].info.backend_pid
            for conn in conns:
                await backend.pool.putconn(conn)
            answer = await service.decide(request("ro1"))
            pids = [c.info.backend_pid for c in conns if not c.closed]
            return answer, read_only_pid, pids, before
        finally:
            await backend.close()

    answer, read_only_pid, still_open, before = asyncio.run(decide())
    assert answer == "DUNNO"
    assert counted() > before, "decided without counting (degraded mode)"
    assert read_only_pid not in still_open, "the read-only connection is still in the pool"
