"""postkeep-storage's webhook worker: event_outbox -> each endpoint, at least once.

One asyncio task per endpoint, so a slow or failing endpoint (or
organisation) only ever holds up itself: each POST has a timeout
(webhooks.request_timeout_seconds) and runs on a thread pool of
webhooks.concurrency threads, and an endpoint has at most one POST in flight.
Each task sends its endpoint's pending deliveries strictly in event id order
(head of line: a failing event holds back the later ones, so one message's
events arrive in order), retries with exponential backoff and jitter, and
dead-letters an event webhooks.give_up_after_seconds after it was written.
A delivery is marked delivered only after a 2xx: a crash between the POST
and that commit sends it again, with the same Postkeep-Event-Id and
Idempotency-Key.

Tasks wake on LISTEN postkeep_events (the outbox trigger's NOTIFY: only
the endpoints of the organisation named in it) and postkeep_webhooks
(endpoints added, removed, replayed: all), and poll every
webhooks.poll_seconds as a safety net (a lost connection loses notifies).
A task woken by an event waits COALESCE_SECONDS before it looks, so that
under load one pass (its fan-out and queue queries) serves the events of
that moment rather than each its own; the 2xx of one pass are recorded in
one statement at its end (a crash before that sends them again: at least
once, as ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from prometheus_client import Counter, Gauge, Histogram

from postkeep import webhooks as signing
from postkeep.config import Config
from postkeep.storage.metadata import webhooks as store
from postkeep.storage.metadata.db import Database
from postkeep.storage.metadata.dkim_keys import MasterKey

log = logging.getLogger("postkeep.storage")
T = TypeVar("T")

DELIVERED = Counter("postkeep_webhook_events_delivered_total",
                    "Events delivered (answered 2xx), by event type", ["type"])
ATTEMPTS = Counter("postkeep_webhook_attempts_total",
                   "Delivery attempts, by result (ok, http_4xx, http_5xx, http_other,"
                   " timeout, connection)", ["result"])
DEAD = Counter("postkeep_webhook_dead_lettered_total", "Deliveries dead-lettered")
QUEUE_DEPTH = Gauge("postkeep_webhook_queue_depth_events",
                    "Pending deliveries per endpoint", ["endpoint"])
OLDEST = Gauge("postkeep_webhook_oldest_pending_age_seconds",
               "Age of the oldest pending event per endpoint", ["endpoint"])
LAG = Histogram("postkeep_webhook_delivery_lag_seconds",
                "From the event's creation to the endpoint's 2xx",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 86400))

USER_AGENT = "postkeep-webhook/1"
# After a wake-up by an event, how long a task lets more gather before it looks
# (bench/webhook_lag.py: per-event queries made the worker the bottleneck at
# ~150 events/s on 2 cores; this adds at most this much to an event's lag).
COALESCE_SECONDS = 0.05


def body_of(payload: dict[str, Any]) -> bytes:
    """The bytes sent (and signed) for an event."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def headers_for(secrets_: list[str], event_id: int, body: bytes, attempt: int) -> dict[str, str]:
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT,
            signing.SIGNATURE_HEADER: signing.signature_header(secrets_, int(time.time()), body),
            signing.EVENT_ID_HEADER: str(event_id), "Idempotency-Key": f"evt-{event_id}",
            "Postkeep-Attempt": str(attempt)}


class Worker:
    def __init__(self, cfg: Config, master: MasterKey) -> None:
        self.cfg = cfg.webhooks
        self.master = master
        # Its own pool: webhook work never waits behind reports, nor they behind it.
        self.db = Database(cfg.postgres, min_size=1)
        self.conninfo = cfg.postgres.conninfo()
        self.http = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="webhook-http")
        self.dbpool = ThreadPoolExecutor(4, thread_name_prefix="webhook-db")
        # endpoint id -> (its task, its wake-up, its organisation)
        self.tasks: dict[uuid.UUID, tuple[asyncio.Task[None], asyncio.Event, uuid.UUID]] = {}
        self.changed = asyncio.Event()

    async def _db(self, work: Callable[[psycopg.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.dbpool, self.db.run, work)

    async def run(self, stop: asyncio.Event) -> None:
        self.db.open()
        listener = asyncio.create_task(self._listen(stop), name="webhook-listen")
        try:
            while not stop.is_set():
                try:
                    await self._sync_endpoints(stop)
                    await self._gauges()
                    await self._db(lambda c: store.purge_delivered(c, self.cfg.keep_delivered_days))
                except Exception as exc:
                    log.warning("webhooks: %s", exc)
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(stop, self.changed), self.cfg.poll_seconds)
        finally:
            listener.cancel()
            for task, _, _ in self.tasks.values():
                task.cancel()
            await asyncio.gather(listener, *(t for t, _, _ in self.tasks.values()),
                                 return_exceptions=True)
            self.http.shutdown(wait=False, cancel_futures=True)
            self.dbpool.shutdown(wait=False, cancel_futures=True)
            self.db.close()

    async def _sync_endpoints(self, stop: asyncio.Event) -> None:
        endpoints = {e.id: e for e in await self._db(store.list_endpoints)}
        for eid in set(self.tasks) - set(endpoints):
            task, _, _ = self.tasks.pop(eid)
            task.cancel()
            with contextlib.suppress(ValueError, KeyError):
                QUEUE_DEPTH.remove(str(eid))
                OLDEST.remove(str(eid))
        for eid, ep in endpoints.items():
            if eid not in self.tasks:
                wake = asyncio.Event()
                task = asyncio.create_task(self._endpoint_loop(ep, wake, stop),
                                           name=f"webhook-{eid}")
                self.tasks[eid] = (task, wake, ep.org_id)

    async def _gauges(self) -> None:
        for q in await self._db(store.queue_stats):
            QUEUE_DEPTH.labels(str(q.endpoint_id)).set(q.pending)
            OLDEST.labels(str(q.endpoint_id)).set(q.oldest_pending_seconds)

    def _wake(self, notice: str | None) -> None:
        """Wake the endpoints of the organisation of NOTICE ('org_id:id'), or every
        endpoint (and the endpoint list) for None or a notice that does not parse."""
        org: uuid.UUID | None = None
        if notice is not None:
            with contextlib.suppress(ValueError):
                org = uuid.UUID(notice.partition(":")[0])
        for _task, wake, ep_org in self.tasks.values():
            if org is None or ep_org == org:
                wake.set()
        if notice is None:
            self.changed.set()

    async def _listen(self, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.conninfo, autocommit=True) as conn:
                    await conn.execute("LISTEN postkeep_events")
                    await conn.execute("LISTEN postkeep_webhooks")
                    delay = 0.5
                    self._wake(None)  # whatever was written while we were not listening
                    async for n in conn.notifies():
                        self._wake(None if n.channel == "postkeep_webhooks" else n.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("webhooks: LISTEN connection lost (%s); again in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)

    async def _endpoint_loop(self, ep: store.Endpoint, wake: asyncio.Event,
                             stop: asyncio.Event) -> None:
        idle = self.cfg.poll_seconds
        while not stop.is_set():
            wake.clear()
            try:
                sleep = await self._step(ep)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PostgreSQL away: try again after a poll interval
                log.warning("webhooks: endpoint %s: %s", ep.id, exc)
                sleep = idle
            if sleep > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(stop, wake), min(sleep, idle))
                if wake.is_set() and not stop.is_set():
                    await asyncio.sleep(COALESCE_SECONDS)

    async def _step(self, ep: store.Endpoint) -> float:
        """Deliver what is due, in order; seconds until there may be more (0: at once)."""
        await self._db(lambda c: store.fan_out(c, ep.id))
        batch = await self._db(lambda c: store.pending_heads(c, ep.id))
        if not batch:
            return self.cfg.poll_seconds
        fresh = await self._db(lambda c: store.get_endpoint(c, ep.id))
        if fresh is None:
            return self.cfg.poll_seconds
        secrets_ = store.secrets_of(self.master, fresh, datetime.now(UTC))
        started = time.monotonic()
        done: list[tuple[int, int, datetime]] = []  # 2xx of this pass, recorded at its end
        try:
            for head in batch:
                # Each one is due by the database's clock when the batch was read.
                due_in = (head.next_attempt_at - head.now).total_seconds() \
                    - (time.monotonic() - started)
                if due_in > 0:
                    return due_in
                retry = await self._attempt(fresh, secrets_, head, done)
                if retry is not None:
                    return retry  # head of line: nothing after it goes before it
            return 0
        finally:
            if done:
                for kind, lag in await self._db(
                        lambda c: store.record_successes(c, ep.id, done)):
                    DELIVERED.labels(kind).inc()
                    LAG.observe(max(lag, 0.0))

    async def _attempt(self, ep: store.Endpoint, secrets_: list[str], head: store.Pending,
                       done: list[tuple[int, int, datetime]]) -> float | None:
        """One POST of HEAD; None if it is done with (a 2xx, appended to DONE, or
        dead), else the seconds until its retry."""
        if head.payload is None:
            await self._db(lambda c: store.dead_letter(c, ep.id, head.event_id,
                                                       "the event left the outbox"))
            DEAD.inc()
            return None
        body = body_of(head.payload)
        headers = headers_for(secrets_, head.event_id, body, head.attempts + 1)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.http, signing.post, ep.url, body, headers,
                                            self.cfg.request_timeout_seconds)
        ATTEMPTS.labels(result.result).inc()
        if result.ok:
            assert result.status is not None
            done.append((head.event_id, result.status, datetime.now(UTC)))
            return None
        retry = signing.retry_delay(head.attempts + 1, self.cfg.retry_initial_seconds,
                                    self.cfg.retry_max_seconds)
        error = result.error or f"HTTP {result.status}"
        state = await self._db(lambda c: store.record_failure(
            c, ep.id, head.event_id, result.status, error, retry, self.cfg.give_up_after_seconds))
        if state == "dead":
            DEAD.inc()
            log.warning("webhooks: endpoint %s: event %d dead-lettered after %d attempts (%s)",
                        ep.id, head.event_id, head.attempts + 1, error)
            return None
        log.info("webhooks: endpoint %s: event %d attempt %d failed (%s); again in %.1fs",
                 ep.id, head.event_id, head.attempts + 1, error, retry)
        return retry


async def _first(*events: asyncio.Event) -> None:
    """Return when any of EVENTS is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def start(cfg: Config, stop: asyncio.Event) -> asyncio.Task[None] | None:
    """The worker's task, or None (said in the log) if it is off or has no master key."""
    from postkeep.config import ConfigError
    from postkeep.storage.metadata.dkim_keys import load_master_key

    for result in ("ok", "http_4xx", "http_5xx", "http_other", "timeout", "connection"):
        ATTEMPTS.labels(result)
    if not cfg.webhooks.enabled:
        log.info("webhooks: not delivered (webhooks.enabled = false)")
        return None
    try:
        master = load_master_key(cfg.dkim)
    except ConfigError as exc:
        log.warning("webhooks: not delivered: endpoint secrets need the master key: %s", exc)
        return None
    log.info("webhooks: delivering events (LISTEN postkeep_events, poll every %gs)",
             cfg.webhooks.poll_seconds)
    return asyncio.create_task(Worker(cfg, master).run(stop), name="webhooks")
