"""postkeep-storage's LMTP side: reports in, per-recipient outcomes out.

Postfix delivers every report addressed to a postkeep return path here over
LMTP (the bundle's transport_maps).  For each one the handler
1. parses it (`reports.parse_report`; a large one in a worker thread);
2. keeps its bytes in object storage when it cannot be matched or parsed;
3. hands it to the `Batcher`, which writes whatever reports are waiting in
   one transaction and one round trip (`outcomes.record_batch`); a batch
   that fails as a whole is written report by report;
4. forwards a failure notice to the original sender if its organisation
   asked (`storage.forward_relay`);
5. answers each LMTP recipient only once all that is durable: 250 when
   recorded (or kept as unmatched, or a duplicate), 451 4.3.0 naming the
   backend when PostgreSQL, S3 or the forward relay failed, so Postfix retries.
A report is never lost and never crashes the daemon: anything unexpected
becomes a 451 and a log line with the report's hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import smtplib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import zstandard
from prometheus_client import Counter, Histogram

from postkeep import build_info
from postkeep.storage.content import sealed_objects, sealing
from postkeep.storage.content.objects import ObjectStore, message_key
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.reports import returned
from postkeep.storage.reports.dsn import Report, needs_recipients, parse_report, resolve
from postkeep.storage.reports.outcomes import (
    DUPLICATE,
    DUPLICATE_UNMATCHED,
    UNMATCHED,
    forward_target,
    message_recipients,
    record_batch,
    report_key,
)

log = logging.getLogger("postkeep.storage")

# Reports up to this size are parsed on the event loop: Postfix's own notices
# (RET=HDRS, a few KB) take a fraction of a millisecond, less than the hop to
# a worker thread and back cost.  Larger ones (remote bounces quoting whole
# messages) go to a thread so that they never hold up other sessions.
INLINE_PARSE_BYTES = 64 * 1024
# How often a report waiting for the spool drain looks again.
SPOOL_POLL_SECONDS = 0.05

REPORTS = Counter("postkeep_storage_reports_total",
                  "Reports received over LMTP, by kind (dsn, async_bounce, unparsable)",
                  ["kind"])
STATUSES = Counter("postkeep_storage_statuses_total",
                   "Recipient outcomes recorded (that changed a recipient's status), by status",
                   ["status"])
UNMATCHED_REPORTS = Counter("postkeep_storage_unmatched_reports_total",
                            "Reports kept as unmatched (object + unmatched_reports row)")
DUPLICATES = Counter("postkeep_storage_duplicate_reports_total",
                     "Reports received again (same bytes); nothing changed")
FAILED = Counter("postkeep_storage_report_errors_total",
                 "Reports answered 451 because a backend failed, by backend", ["backend"])
SPOOLED_WAIT = Counter("postkeep_storage_reports_spool_wait_total",
                       "Reports answered 451 because their message was still in the outage spool")
FORWARDED = Counter("postkeep_storage_forwarded_total",
                    "Failure notices forwarded to the original sender, by result", ["result"])
ANSWERS = Counter("postkeep_storage_answers_total",
                  "Replies and auto-replies at a return path recorded as inbound messages"
                  " linked to the sent one, by message_type", ["message_type"])
LAG = Histogram("postkeep_storage_outcome_lag_seconds",
                "From the reporting MTA's time of the event to the recipient row update",
                buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600))
BATCH_SIZE = Histogram("postkeep_storage_batch_reports", "Reports per database round trip",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
BATCH_SECONDS = Histogram("postkeep_storage_batch_seconds",
                          "Time to record one batch of reports in PostgreSQL")
# Every label value these counters are incremented with exists at zero from
# start, so that rate() and increase() in alert rules see the first event.
for _kind in ("dsn", "async_bounce", "unparsable"):
    REPORTS.labels(_kind)
for _backend in ("postgres", "s3", "forward_relay", "parser", "internal"):
    FAILED.labels(_backend)
for _result in ("sent", "failed", "refused"):
    FORWARDED.labels(_result)
for _type in returned.ANSWERS:
    ANSWERS.labels(_type)
build_info.export("storage")


@dataclass
class _Pending:
    report: Report
    done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop()
                                      .create_future())


class Batcher:
    """Writes waiting reports in batches, up to WRITERS batches at a time, no linger.

    Whatever queued while the writers were busy is the next batch, so a quiet
    sidecar answers at once and a busy one makes few, large round trips.  More
    than one writer keeps one slow commit (an fsync, a thread starved of the
    GIL on a loaded host) from holding up every report behind it.
    """

    def __init__(self, write: Callable[[Sequence[Report]], list[int]], max_batch: int,
                 writers: int = 1) -> None:
        self._write = write
        self._max = max_batch
        self._writers = writers
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outcome-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writing:  # let batches being written settle their reports
            await asyncio.gather(*self._writing, return_exceptions=True)

    async def submit(self, report: Report) -> int:
        pending = _Pending(report)
        self._queue.append(pending)
        self._wake.set()
        return await pending.done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and len(self._writing) < self._writers:
                batch, self._queue = self._queue[:self._max], self._queue[self._max:]
                task = asyncio.create_task(self._write_batch(batch))
                self._writing.add(task)
                task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        self._writing.discard(task)
        self._wake.set()

    async def _write_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            codes = await asyncio.to_thread(self._write, [p.report for p in batch])
        except Exception as whole:
            if len(batch) == 1:
                _settle(batch[0], exc=whole)
            else:
                log.warning("batch of %d reports failed (%s: %s); writing each on its own",
                            len(batch), type(whole).__name__, _first_line(whole))
                await self._one_by_one(batch)
            return
        BATCH_SIZE.observe(len(batch))
        BATCH_SECONDS.observe(time.perf_counter() - started)
        for p, code in zip(batch, codes, strict=True):
            _settle(p, code=code)

    async def _one_by_one(self, batch: list[_Pending]) -> None:
        """Each report of a failed batch on its own: one bad report must not
        hold back the rest."""
        for i, p in enumerate(batch):
            try:
                _settle(p, code=(await asyncio.to_thread(self._write, [p.report]))[0])
            except BackendError as down:
                # Not this report but the backend (PostgreSQL unreachable): the
                # others would each wait out the same timeouts; all tempfail now.
                log.warning("%s; the batch's %d other report(s) tempfail without trying",
                            down, len(batch) - i - 1)
                for q in batch[i:]:
                    _settle(q, exc=down)
                return
            except Exception as exc:
                _settle(p, exc=exc)


def _settle(p: _Pending, code: int = 0, exc: BaseException | None = None) -> None:
    if p.done.done():
        return
    if exc is not None:
        p.done.set_exception(exc)
    else:
        p.done.set_result(code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "-"


def _compressed(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(raw)


class ReportHandler:
    """aiosmtpd handler: one LMTP transaction, one report, one reply per recipient."""

    def __init__(self, db: Database, objects: ObjectStore, batcher: Batcher,
                 forward_relay: tuple[str, int] | None = None,
                 return_path_key: bytes = b"",
                 spooled: Callable[[uuid.UUID], bool] | None = None,
                 drain_now: Callable[[], None] | None = None, spool_wait: float = 0.0) -> None:
        self.db = db
        # Whether a message is still in the outage spool (accepted, its rows not
        # written yet): a report for it asks the drain to run now (DRAIN_NOW)
        # and waits up to SPOOL_WAIT seconds for it; still there, it is answered
        # 451 so that Postfix brings it back later.  Under accept_after =
        # 'journal' every message passes through the spool, and a fast DSN
        # often arrives before its drain.
        self.spooled = spooled
        self.drain_now = drain_now
        self.spool_wait = spool_wait
        # Only a report at a return path that verifies under it is attributed.
        self.return_path_key = return_path_key
        self.objects = objects
        self.batcher = batcher
        self.forward_relay = forward_relay

    async def _drained(self, message_id: uuid.UUID) -> bool:
        """Whether MESSAGE_ID is out of the spool (or was never in it), after
        asking the drain to run and waiting up to spool_wait seconds."""
        spooled = self.spooled
        if spooled is None or not spooled(message_id):
            return True
        if self.drain_now is not None:
            self.drain_now()
        deadline = asyncio.get_running_loop().time() + self.spool_wait
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(SPOOL_POLL_SECONDS)
            if not spooled(message_id):
                return True
        return False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content or b""
        rcpts: list[str] = list(envelope.rcpt_tos)
        reply = await self.receive(raw, envelope.mail_from or "", rcpts)
        # LMTP answers once per recipient; aiosmtpd sends one reply after
        # DATA, so the first ones are pushed here and the last is returned.
        for _ in rcpts[1:]:
            await server.push(reply)
        return reply

    async def receive(self, raw: bytes, mail_from: str, rcpts: list[str]) -> str:
        """Record one report; the LMTP reply for it."""
        received = datetime.now(UTC)
        try:
            key = self.return_path_key
            if len(raw) <= INLINE_PARSE_BYTES:
                report = parse_report(raw, mail_from, rcpts, received, key)
            else:
                report = await asyncio.to_thread(parse_report, raw, mail_from, rcpts, received,
                                                 key)
        except Exception:  # parse_report is total; this guards against its bugs
            log.exception("report parser failed rcpt=%s size=%d", ",".join(rcpts), len(raw))
            FAILED.labels("parser").inc()
            return "451 4.3.0 postkeep-storage: internal error parsing the report; try again"
        REPORTS.labels(report.kind).inc()
        tag = report.sha256.hex()[:16]
        if report.message_id is not None and not await self._drained(report.message_id):
            SPOOLED_WAIT.inc()
            log.info("report waits for the spool drain report=%s %s", tag, _ids(report))
            return (f"451 4.3.0 postkeep-storage: message {report.message_id} is still in the"
                    " outage spool; try again later")
        try:
            answered = await self._answer(raw, mail_from, report, received, tag)
            if answered is not None:
                return answered
            if needs_recipients(report):
                # Attributed by where it arrived too: its VERP recipient, or
                # the message's only recipient (reports.resolve).
                mid, expires = report.message_id, report.expires_at
                assert mid is not None
                rcpts_of = await asyncio.to_thread(
                    self.db.run, lambda conn: message_recipients(conn, mid, expires))
                report = resolve(report, rcpts_of)
            if report.reason is not None:
                await self._keep(report, raw)
            code = await self.batcher.submit(report)
            if code in (UNMATCHED, DUPLICATE_UNMATCHED) and report.reason is None:
                await self._keep(report, raw)
            reply = self._outcome(report, code, tag)
            if code >= 0 or code == DUPLICATE:
                await self._forward(report, raw)
        except BackendError as exc:
            FAILED.labels(exc.backend).inc()
            log.warning("report tempfailed report=%s %s backend=%s reason=%r", tag,
                        _ids(report), exc.backend, exc.reason)
            return f"451 4.3.0 postkeep-storage: {exc.backend} unavailable; try again later"
        except Exception:
            FAILED.labels("internal").inc()
            log.exception("report tempfailed report=%s %s", tag, _ids(report))
            return "451 4.3.0 postkeep-storage: internal error; try again later"
        return reply

    async def _answer(self, raw: bytes, mail_from: str, report: Report, received: datetime,
                      tag: str) -> str | None:
        """A reply or auto-reply at a verified return path, recorded as an inbound
        message linked to the sent one (storage/reports/returned.py); None: not
        one (or its message is gone), so it is taken as a report."""
        kind = await asyncio.to_thread(returned.reply_type, raw, mail_from, report)
        if kind is None:
            return None
        sent = await asyncio.to_thread(self.db.run,
                                       lambda conn: returned.sent_message(conn, report))
        if sent is None:
            return None
        m, blob = returned.prepare(
            raw, mail_from, kind, sent, report, received,
            lambda org, mid, at, days, held: message_key(org, mid, at, content_days=days,
                                                         held=held))
        # Sealed under its own data key when a master key is configured
        # (storage/content/sealed_objects.py), its key row written with its row.
        keys = await asyncio.to_thread(
            self.db.run,
            lambda conn: sealing.data_keys(conn, [(m.id, m.org_id, m.content_expires_at)]))
        key = keys[m.id] if keys else None
        if key is not None:
            blob = sealed_objects.seal_bytes(key, blob)
        await asyncio.to_thread(self.objects.put, m.object_key, io.BytesIO(blob), len(blob))
        asking = returned.unsubscriber(raw, mail_from, report)
        done = await asyncio.to_thread(
            self.db.run, lambda conn: returned.record_returned(
                conn, sent, m, asking,
                None if key is None else lambda c: sealing.record(c, [key])))
        if done.duplicate_of is not None:
            dup = done.duplicate_of
            await asyncio.to_thread(self.objects.delete, m.object_key)  # no row names it
            DUPLICATES.inc()
            log.info("%s at return path already recorded pk_id=%s report=%s", kind, dup.hex,
                     tag)
            return f"250 2.0.0 {kind} {tag} already recorded as message {dup}"
        ANSWERS.labels(kind).inc()
        log.info("%s at return path recorded pk_id=%s parent=%s report=%s", kind, m.id.hex,
                 sent.id.hex, tag)
        if done.unsubscribed is not None:
            log.info("unsubscribe at return path suppressed recipient=%s org=%s parent=%s"
                     " pk_id=%s", done.unsubscribed, sent.org.id, sent.id.hex, m.id.hex)
        elif asking:
            log.warning("unsubscribe at return path names no recipient of its message"
                        " (not suppressed) parent=%s pk_id=%s", sent.id.hex, m.id.hex)
        return f"250 2.0.0 {kind} {tag} recorded as message {m.id}"

    async def _keep(self, report: Report, raw: bytes) -> None:
        data = await asyncio.to_thread(_compressed, raw)
        await asyncio.to_thread(self.objects.put, report_key(report.sha256), io.BytesIO(data),
                                len(data))

    def _outcome(self, report: Report, code: int, tag: str) -> str:
        ids = _ids(report)
        if code in (DUPLICATE, DUPLICATE_UNMATCHED):
            DUPLICATES.inc()
            log.info("report duplicate report=%s %s kind=%s", tag, ids, report.kind)
            return f"250 2.0.0 report {tag} already recorded"
        if code == UNMATCHED:
            UNMATCHED_REPORTS.inc()
            log.warning("report unmatched report=%s %s kind=%s reason=%r", tag, ids,
                        report.kind, report.reason or "see unmatched_reports")
            return f"250 2.0.0 report {tag} kept as unmatched"
        now = datetime.now(UTC)
        for o in report.outcomes:
            LAG.observe(max(0.0, (now - o.event_at).total_seconds()))
            STATUSES.labels(o.status).inc()
        log.info("report recorded report=%s %s kind=%s outcomes=%s changed=%d", tag, ids,
                 report.kind, ",".join(f"{o.recipient}:{o.status}" for o in report.outcomes),
                 code)
        return f"250 2.0.0 report {tag} recorded"

    async def _forward(self, report: Report, raw: bytes) -> None:
        """Send a failure notice on to the original sender, if its org asked.

        Done before the report is answered: if the relay cannot take it now
        (no connection, a 4xx), BackendError('forward_relay') and the report
        is answered 451, so Postfix retries it.  The outcome is recorded
        already; the retry is a duplicate that only forwards.  A notice may
        so be forwarded twice, never dropped.  A 5xx refusal is final: logged
        and counted, not retried.
        """
        if not (report.failure and self.forward_relay is not None and report.message_id):
            return
        mid, expires = report.message_id, report.expires_at
        target = await asyncio.to_thread(
            self.db.run, lambda conn: forward_target(conn, mid, expires))
        if target is None:
            return
        host, port = self.forward_relay
        try:
            await asyncio.to_thread(_send, host, port, target, raw)
        except (smtplib.SMTPException, OSError) as exc:
            code, why = _refusal(exc)
            if code >= 500:
                FORWARDED.labels("refused").inc()
                log.warning("forward refused %s to=<%s> reply=%r; not retried",
                            _ids(report), target, why)
                return
            FORWARDED.labels("failed").inc()
            log.warning("forward failed %s to=<%s> reason=%r; report tempfailed",
                        _ids(report), target, why)
            raise BackendError("forward_relay", why) from exc
        FORWARDED.labels("sent").inc()
        log.info("forwarded failure notice %s to=<%s>", _ids(report), target)


def _ids(report: Report) -> str:
    """`pk_id=<hex> queue_id=<id>` of the reported message ('-' where unknown), the
    form every postkeep log line names a message in (postkeep/logs.py)."""
    pk_id = report.message_id.hex if report.message_id else "-"
    return f"pk_id={pk_id} queue_id={report.queue_id or '-'}"


def _refusal(exc: BaseException) -> tuple[int, str]:
    """The relay's reply code (0 if it never replied) and the reason, for a failed send."""
    reply: bytes | str
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, reply = min(exc.recipients.values())
    elif isinstance(exc, smtplib.SMTPResponseException):
        code, reply = exc.smtp_code, exc.smtp_error
    else:
        return 0, str(exc) or type(exc).__name__
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return code, f"{code} {text}"


def _send(host: str, port: int, to: str, raw: bytes) -> None:
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.sendmail("", [to], raw)  # MAIL FROM:<>: notices never bounce back


def record_with(db: Database) -> Callable[[Sequence[Report]], list[int]]:
    """The batch writer over DB (retried once on a lost connection by db.run)."""
    return lambda reports: db.run(lambda conn: record_batch(conn, reports))
