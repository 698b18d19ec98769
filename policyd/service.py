"""One policy request in, one action out: plan, look up, count, answer.

The counters live behind `Backend` (PostgreSQL in production: `PgBackend`).
Every backend call is bounded by `policyd.decision_timeout_ms`; a failure or
timeout switches this process to degraded mode for
`policyd.degraded_retry_seconds`, after which PostgreSQL is tried again, so
it recovers by itself and never hangs a Postfix smtpd.  Organisation lookups
are cached for `policyd.directory_cache_seconds`; a stale entry is still used
while PostgreSQL is down.  Organisations of `policyd.lease_tiers` are counted
in memory against leased blocks (`LeaseBook`): PostgreSQL is asked only when
a block runs out, and idle blocks are given back by `lease_upkeep`.

At RCPT a recipient on its organisation's suppression list (issue 17,
storage/metadata/suppression.py) is refused with 550 5.7.1 naming why, or
only logged and counted for an organisation in shadow mode, before anything
is counted.  Answers (on the list or not) are cached per organisation and
address for `policyd.suppression_cache_seconds`: an address suppressed now
is refused at the latest that long after.  If PostgreSQL cannot answer, a
stale cached answer is used, else the recipient passes unchecked (counted in
postkeep_policyd_suppression_unchecked_total): suppression never makes mail
wait on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from postkeep.config import Config
from postkeep.policyd import metrics
from postkeep.policyd.decide import (
    DUNNO,
    Invalid,
    LeaseBook,
    LocalCounters,
    Plan,
    invalid,
    plan,
    unknown_login_action,
    verdict,
)
from postkeep.storage.metadata import limits, suppression
from postkeep.storage.metadata.db import READ_ONLY_REASON, RECONNECT_TIMEOUT_SECONDS
from postkeep.storage.metadata.limits import Grant, OrgLimits, Outcome, Unspent, Want
from postkeep.ttlcache import TtlCache

log = logging.getLogger("postkeep.policyd")
T = TypeVar("T")


class Backend(Protocol):
    async def recover(self) -> None: ...

    async def find(self, lookup: str, key: str) -> OrgLimits | None: ...

    async def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int,
                      size: int, ttl_seconds: int) -> Outcome: ...

    async def lease(self, org: OrgLimits, wants: list[Want]) -> list[Grant]: ...

    async def release(self, org_id: uuid.UUID, unspent: list[Unspent]) -> None: ...


class SuppressionBackend(Protocol):
    async def suppressed(self, org_id: uuid.UUID, address: str) -> suppression.Hit | None: ...


@dataclass
class _Queued:
    ask: limits.Ask
    org: OrgLimits
    ttl_seconds: int
    done: asyncio.Future[Outcome]


class PgBackend:
    """Counters and organisations in PostgreSQL, through an asyncio pool.

    Decisions for one organisation are sent one round trip at a time: those
    that arrive while one is in flight queue and go together in the next
    (rate_consume_many, up to `MAX_BATCH`), each decided exactly as if alone,
    in arrival order.  At low load that is one decision per round trip; under
    load it spares the database one transaction and row lock per decision.
    """

    MAX_BATCH = 64

    def __init__(self, cfg: Config) -> None:
        pg = cfg.postgres
        self._synchronous_commit = cfg.policyd.synchronous_commit
        self._windows = cfg.policyd.windows
        self._queues: dict[uuid.UUID, list[_Queued]] = {}
        self._senders: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            # one connection per concurrent decision: keep a few warm
            pg.conninfo(), min_size=max(pg.pool_min, 4), max_size=max(pg.pool_max, 4),
            timeout=pg.connect_timeout_seconds, open=False,
            reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,  # see storage/metadata/db.py
            kwargs={"autocommit": True, "prepare_threshold": 0}, name="postkeep-policyd",
            configure=self._configure,
        )

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Per new connection: policyd.synchronous_commit (see config.py)."""
        await conn.execute(
            sql.SQL("SET synchronous_commit = {}").format(sql.Literal(self._synchronous_commit)))

    async def open(self) -> None:
        """Open the pool, waiting (bounded) for its first connections.

        Cold connections take tens of milliseconds each; a burst of first
        requests against an empty pool would time out and degrade.  If
        PostgreSQL is down the daemon starts anyway, degraded.
        """
        await self.pool.open(wait=False)
        try:
            await self.pool.wait(timeout=self.pool.timeout)
        except PoolTimeout:
            log.warning("postgres not reachable at start: deciding in degraded mode until"
                        " it is")

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; closed (so the pool discards it) if PostgreSQL
        refused a write as read-only, and that reported as a broken connection
        so `_attempt` retries on a new one (storage/metadata/db.py,
        dropped_if_read_only: target_session_attrs is only checked at connect)."""
        async with self.pool.connection() as conn:
            try:
                yield conn
            except psycopg.errors.ReadOnlySqlTransaction as exc:
                log.warning("postgres: %s", READ_ONLY_REASON)
                await conn.close()
                raise psycopg.OperationalError(READ_ONLY_REASON) from exc

    async def recover(self) -> None:
        """Drop broken idle connections (after PostgreSQL restarted)."""
        with contextlib.suppress(psycopg.Error):
            await self.pool.check()

    async def find(self, lookup: str, key: str) -> OrgLimits | None:
        async with self._connection() as conn:
            return await limits.find_limits_async(conn, lookup, key)

    async def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int,
                      size: int, ttl_seconds: int) -> Outcome:
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        ask = limits.Ask(stage, instance, recipients, size)
        self._queues.setdefault(org.org_id, []).append(_Queued(ask, org, ttl_seconds, done))
        if org.org_id not in self._senders:
            self._senders[org.org_id] = asyncio.create_task(self._send(org.org_id))
        return await done

    async def _send(self, org_id: uuid.UUID) -> None:
        """Send ORG_ID's queued decisions, a batch per round trip, until none are left."""
        try:
            while queue := self._queues.get(org_id):
                batch = queue[:self.MAX_BATCH]
                del queue[:self.MAX_BATCH]
                if not queue:
                    del self._queues[org_id]
                batch = [q for q in batch if not q.done.done()]  # callers that gave up
                if not batch:
                    continue
                last = batch[-1]  # the freshest limits, if the cache refreshed meanwhile
                try:
                    async with self._connection() as conn:
                        outcomes = await limits.consume_many_async(
                            conn, last.org, [q.ask for q in batch], last.ttl_seconds,
                            windows=self._windows)
                except Exception as exc:
                    for q in batch:
                        if not q.done.done():
                            q.done.set_exception(exc)
                    continue
                for q, outcome in zip(batch, outcomes, strict=True):
                    if not q.done.done():
                        q.done.set_result(outcome)
        finally:
            del self._senders[org_id]

    async def lease(self, org: OrgLimits, wants: list[Want]) -> list[Grant]:
        async with self._connection() as conn:
            return await limits.lease_async(conn, org, wants)

    async def release(self, org_id: uuid.UUID, unspent: list[Unspent]) -> None:
        async with self._connection() as conn:
            await limits.release_async(conn, org_id, unspent)

    async def suppressed(self, org_id: uuid.UUID, address: str) -> suppression.Hit | None:
        """ADDRESS's live suppression entry for ORG_ID (a primary-key probe), or None."""
        async with self._connection() as conn:
            return await suppression.lookup_async(conn, org_id, address)


class BackendDown(Exception):
    pass


class RequestRefused(Exception):
    """PostgreSQL refused this request's values (not an outage): answer it alone."""


class PolicyService:
    """Decides one request at a time; shared by every connection of the process."""

    def __init__(self, cfg: Config, backend: Backend,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 suppressions: SuppressionBackend | None = None) -> None:
        self.cfg = cfg.policyd
        # None: recipients are not checked against suppression lists.
        self.suppressions = suppressions
        self._suppression_cache: TtlCache[tuple[uuid.UUID, str], suppression.Hit | None] = (
            TtlCache())
        self.system_domains = frozenset(d.lower() for d in cfg.dkim.system_domains)
        self.unknown_login = cfg.milter.unknown_login  # one key for milter and policyd
        self.backend = backend
        self.clock = clock
        self.wallclock = wallclock
        self.windows = self.cfg.windows
        ttl = timedelta(seconds=self.cfg.reservation_seconds)
        self.local = LocalCounters(self.cfg.degraded_processes, ttl, self.windows)
        self.lease_tiers = frozenset(self.cfg.lease_tiers)
        self.leases = LeaseBook(self.cfg.lease_fraction,
                                timedelta(seconds=self.cfg.lease_idle_seconds), ttl, self.windows)
        self._leasing: dict[uuid.UUID, asyncio.Future[None]] = {}
        self._cache: TtlCache[tuple[str, str], OrgLimits | None] = TtlCache()
        self._down_until = 0.0
        self._timeout = self.cfg.decision_timeout_ms / 1000

    @property
    def degraded(self) -> bool:
        return self.clock() < self._down_until

    async def _attempt(self, work: Callable[[], Awaitable[T]]) -> T:
        """WORK; once more if its pooled connection turned out broken.

        A PostgreSQL restart breaks every idle pooled connection at once; the
        first use of each fails although the database is back.  Dropping the
        broken ones and trying again keeps that from looking like an outage.
        (If the failed attempt had committed, the message is counted twice:
        an over-count, never an admission beyond the limit.)
        """
        try:
            return await work()
        except psycopg.OperationalError:
            await self.backend.recover()
            return await work()

    async def _bounded(self, work: Callable[[], Awaitable[T]]) -> T:
        """WORK within the decision timeout, else BackendDown (and degraded for a while)."""
        if self.degraded:
            raise BackendDown("degraded")
        try:
            return await asyncio.wait_for(self._attempt(work), self._timeout)
        except (psycopg.DataError, UnicodeError) as exc:
            # A value of this request (PostgreSQL's SQLSTATE class 22, or text
            # that is not UTF-8): the database is fine, the request is not.
            # `invalid` should have caught it; never let it degrade everyone.
            raise RequestRefused(str(exc).splitlines()[0] or type(exc).__name__) from exc
        except (TimeoutError, psycopg.Error, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else str(exc).splitlines()[0]
            if not self.degraded:
                log.warning("postgres unavailable (%s): degraded mode %s for %gs",
                            reason or type(exc).__name__, self.cfg.degraded_mode,
                            self.cfg.degraded_retry_seconds)
            metrics.BACKEND_ERRORS.inc()
            self._down_until = self.clock() + self.cfg.degraded_retry_seconds
            raise BackendDown(reason) from exc

    async def _org(self, p: Plan) -> tuple[OrgLimits | None, bool]:
        """The organisation for P, and whether it came from PostgreSQL or a fresh cache."""
        now = self.clock()
        hit = self._cache.get((p.lookup, p.key))
        if hit is not None and hit.fresh(now):
            return hit.value, True
        try:
            org = await self._bounded(lambda: self.backend.find(p.lookup, p.key))
        except BackendDown:
            return (hit.value if hit else None), False
        self._cache.put((p.lookup, p.key), org, now + self.cfg.directory_cache_seconds)
        return org, True

    async def decide(self, attrs: dict[str, str], peer: str = "") -> str:
        """The action for one request from PEER (never raises for backend trouble).

        A request with an invalid value is refused alone: it counts nothing,
        and only a real backend failure (`_bounded`) degrades.
        """
        bad = invalid(attrs)
        if bad is None:
            try:
                return await self._decide(attrs)
            except RequestRefused as exc:
                log.warning("policy request from %s: PostgreSQL refused a value: %s",
                            peer or "?", exc)
                bad = Invalid("request", "has a value PostgreSQL refused", "450 4.3.0")
        metrics.INVALID_REQUESTS.labels(bad.attribute).inc()
        log.warning("invalid policy request from %s (client_address=%s client_name=%s"
                    " sasl_username=%s): %s %s; refused %s", peer or "?",
                    ascii(attrs.get("client_address", "")), ascii(attrs.get("client_name", "")),
                    ascii(attrs.get("sasl_username", "")), bad.attribute, bad.problem,
                    bad.code)
        return bad.action

    async def _decide(self, attrs: dict[str, str]) -> str:
        p = plan(attrs, self.system_domains)
        stage = p.stage
        if stage is None:
            return DUNNO
        org, fresh = await self._org(p)
        if org is None:
            if not fresh:
                metrics.DEGRADED.labels("unknown_org").inc()
                return DUNNO  # not known to be unknown: the milter decides
            if p.lookup == "submitter":
                action = unknown_login_action(p.key, self.unknown_login)
                log.info("%s %s queue_id=%s: SASL login %r is not a registered submitter"
                         " (sender %s)", "refused" if action != DUNNO else "not counted",
                         attrs.get("protocol_state", "?"), attrs.get("queue_id") or "-", p.key,
                         attrs.get("sender", ""))
                return action
            return DUNNO  # unknown senders are the milter's to refuse
        if stage == "check" and self.suppressions is not None and attrs.get("recipient"):
            # Both are reads at RCPT (the check counts nothing): a suppression
            # lookup that misses the cache runs beside the rate check, so the
            # answer still costs one round trip, not two.
            address = suppression.normalise(attrs["recipient"])
            cached = self._suppression_cache.get((org.org_id, address))
            if cached is not None and cached.fresh(self.clock()):
                hit = cached.value
            else:
                hit, action = await asyncio.gather(
                    self._lookup_suppression(org.org_id, address),
                    self._rate(stage, org, p, fresh, attrs))
                return self._suppressed(org, address, hit, attrs) or action
            return self._suppressed(org, address, hit, attrs) or await self._rate(
                stage, org, p, fresh, attrs)
        return await self._rate(stage, org, p, fresh, attrs)

    async def _rate(self, stage: str, org: OrgLimits, p: Plan, fresh: bool,
                    attrs: dict[str, str]) -> str:
        """The rate-limit answer for this stage of ORG's message."""
        now = self.wallclock()
        degraded = False
        try:
            if org.tier in self.lease_tiers:
                outcome = await self._leased(stage, org, p, now)
            elif not fresh:
                raise BackendDown("lookup failed")
            else:
                outcome = await self._bounded(lambda: self.backend.consume(
                    stage, org, p.instance, p.recipients, p.size,
                    self.cfg.reservation_seconds))
        except BackendDown:
            degraded = True
            mode = self.cfg.degraded_mode
            metrics.DEGRADED.labels(mode).inc()
            if mode == "open":
                return DUNNO
            if mode == "closed":
                return ("DEFER_IF_PERMIT 4.7.1 Rate limit: the limits database is unavailable;"
                        " retry in a few minutes")
            outcome = self.local.consume(stage, org, p.instance, p.recipients, p.size, now)
        d = verdict(outcome, org, now, shadow=self.cfg.shadow, degraded=degraded,
                    size=p.size, windows=self.windows)
        if d.over:
            mode = "shadow" if d.shadowed else "defer"
            metrics.DEFERRALS.labels(org.tier, d.over, mode).inc()
            # queue_id as the milter and postkeep-storage log it (postkeep/logs.py); the
            # pk id does not exist yet: the milter assigns it after policyd's answers.
            log.info("%s %s queue_id=%s instance=%s sasl=%s sender=%s: %s",
                     "shadow (not deferred)" if d.shadowed else "deferred",
                     attrs.get("protocol_state", "?"), attrs.get("queue_id") or "-", p.instance,
                     attrs.get("sasl_username", ""), attrs.get("sender", ""), d.reason)
        return d.action

    async def _lookup_suppression(self, org_id: uuid.UUID,
                                  address: str) -> suppression.Hit | None:
        """The cached or fresh suppression entry; a stale one (or None) if PostgreSQL fails."""
        assert self.suppressions is not None
        backend = self.suppressions
        now = self.clock()
        key = (org_id, address)
        hit = self._suppression_cache.get(key)
        if hit is not None and hit.fresh(now):
            return hit.value
        try:
            value = await self._bounded(lambda: backend.suppressed(org_id, address))
        except BackendDown:
            if hit is None:
                metrics.SUPPRESSION_UNCHECKED.inc()
                return None
            return hit.value
        self._suppression_cache.put(key, value, now + self.cfg.suppression_cache_seconds)
        return value

    def _suppressed(self, org: OrgLimits, address: str, hit: suppression.Hit | None,
                    attrs: dict[str, str]) -> str | None:
        """The refusal for a suppressed recipient (enforce), else None (also in shadow)."""
        if hit is None:
            return None
        action = suppression.reply(hit)
        metrics.SUPPRESSED.labels(hit.reason, hit.mode).inc()
        log.info("%s RCPT queue_id=%s org=%s sender=%s recipient=%s: %s",
                 "suppressed (refused)" if hit.enforced else "suppression shadow (not refused)",
                 attrs.get("queue_id") or "-", org.name, attrs.get("sender", ""),
                 ascii(address)[1:-1], action)
        return action if hit.enforced else None

    async def _leased(self, stage: str, org: OrgLimits, p: Plan, now: datetime) -> Outcome:
        """Lease mode: decide in memory, leasing a block first if this message needs it.

        One lease per organisation at a time in this process: decisions that
        run short while one is in flight wait for it and look again, so a
        process never holds more than one unspent block per kind.
        """
        book = self.leases
        used: dict[str, int] = {}
        for _ in range(4):
            wants = book.shortfall(stage, org, p.instance, p.recipients, p.size, now)
            if not wants:
                break
            pending = self._leasing.get(org.org_id)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._leasing[org.org_id] = done
            try:
                grants = await self._bounded(lambda: self.backend.lease(org, wants))  # noqa: B023
            finally:
                del self._leasing[org.org_id]
                done.set_result(None)
            metrics.LEASES.inc()
            for g in grants:
                book.grant(org.org_id, g.kind, g.window, g.granted, now)
                used[g.kind] = g.used
                metrics.LEASED_UNITS.labels(g.kind, "granted").inc(g.granted)
            if any(g.granted < w.need for g, w in zip(grants, wants, strict=True)):
                break  # the shared counter has no room left: decide (over)
        outcome = book.consume(stage, org, p.instance, p.recipients, p.size, now)
        if outcome.result == "over" and outcome.kind is not None:
            # report the shared counter, not this process's block
            return Outcome("over", outcome.kind, used.get(outcome.kind, outcome.used),
                           org.limit(outcome.kind))
        return outcome

    async def give_back(self, everything: bool = False) -> None:
        """Return unspent leased units (idle ones, or all of them when stopping)."""
        now = self.wallclock()
        for org_id, unspent in self.leases.unspent(now, everything).items():
            assert isinstance(org_id, uuid.UUID)
            try:
                await self._bounded(lambda: self.backend.release(org_id, unspent))  # noqa: B023
            except BackendDown:
                for u in unspent:  # keep them: spent later, or given back next time
                    self.leases.grant(org_id, u.kind, u.window, u.units, now)
                continue
            for u in unspent:
                metrics.LEASED_UNITS.labels(u.kind, "returned").inc(u.units)

    async def lease_upkeep(self) -> None:
        """Forever: give back blocks idle for policyd.lease_idle_seconds."""
        while True:
            await asyncio.sleep(self.cfg.lease_idle_seconds / 2)
            try:
                await self.give_back()
            except Exception:
                log.exception("giving back leased units failed; trying again")
