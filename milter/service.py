"""The capture service: one message's way from milter events to a verdict.

`Transaction` is the plain state of one SMTP transaction as the adapter saw it
(envelope, headers of interest, the streaming `MessageCapture`).
`CaptureService.end_of_message` classifies it, makes it durable
(object + rows) and returns the verdict: accept (with the headers to add) or a
reply to refuse or tempfail with.  It logs one line per message carrying both
postkeep's id and Postfix's queue id, and counts outcomes in metrics.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from postkeep.config import MilterConfig
from postkeep.ids import uuid7
from postkeep.milter import metrics
from postkeep.milter.capture import MessageCapture
from postkeep.milter.committer import GroupCommitter
from postkeep.milter.decide import (
    Action,
    Decision,
    Reply,
    classify,
    header_from_address,
    internal_error_reply,
    refusal_reply,
    strip_brackets,
    tempfail_reply,
)
from postkeep.milter.directory import Directory
from postkeep.storage.db import BackendError
from postkeep.storage.messages import CapturedMessage, expiry_dates
from postkeep.storage.objects import message_key

log = logging.getLogger("postkeep.milter")

# Header values kept as metadata are cut to this many characters.
METADATA_TEXT_MAX = 998


@dataclass
class Transaction:
    """One SMTP transaction (MAIL FROM to end of message)."""

    id: uuid.UUID
    created: datetime
    envelope_from: str
    auth_user: str | None
    capture: MessageCapture
    recipients: list[str] = field(default_factory=list)
    header_from: str | None = None
    subject: str | None = None
    message_id_header: str | None = None
    own_headers_removed: int = 0  # client-sent copies of our id header


@dataclass(frozen=True)
class Verdict:
    """What the adapter tells Postfix: accept (adding headers) or reply."""

    reply: Reply | None
    add_headers: tuple[tuple[str, str], ...] = ()
    reject: bool = False  # reply is permanent (5xx) rather than temporary


def _text(value: bytes, limit: int = METADATA_TEXT_MAX) -> str:
    """Header bytes as metadata text: unfolded, NUL-free, valid UTF-8, bounded."""
    text = value.decode("utf-8", "replace").replace("\x00", "\ufffd")
    text = " ".join(text.split())
    return text[:limit]


class CaptureService:
    """Shared by every milter connection of the process (thread-safe)."""

    def __init__(self, cfg: MilterConfig, committer: GroupCommitter,
                 directory: Directory) -> None:
        self.cfg = cfg
        self.committer = committer
        self.directory = directory

    def begin(self, envelope_from: str, auth_user: str | None) -> Transaction:
        """A new transaction at MAIL FROM; its id goes in the id header."""
        tid = uuid7()
        capture = MessageCapture(level=self.cfg.zstd_level, spill_bytes=self.cfg.spill_bytes,
                                 spool_dir=self.cfg.spool_directory)
        capture.add_own_header(self.cfg.id_header, str(tid))
        return Transaction(tid, datetime.now(UTC), strip_brackets(envelope_from),
                           auth_user or None, capture)

    def header(self, tx: Transaction, name: str, value: bytes) -> None:
        """Record a header field; note the ones kept as metadata."""
        lname = name.lower()
        if lname == self.cfg.id_header.lower():
            tx.own_headers_removed += 1  # the adapter deletes it; not stored
            return
        tx.capture.add_header(name, value)
        if lname == "from" and tx.header_from is None:
            tx.header_from = _text(value)
        elif lname == "subject" and tx.subject is None:
            tx.subject = _text(value)
        elif lname == "message-id" and tx.message_id_header is None:
            tx.message_id_header = _text(value)

    def end_of_message(self, tx: Transaction, queue_id: str) -> Verdict:
        """Classify, persist, and decide the reply.  Never raises."""
        started = time.perf_counter()
        try:
            verdict = self._finish(tx, queue_id)
        except Exception:
            log.exception("internal error id=%s queue_id=%s", tx.id, queue_id)
            metrics.MESSAGES.labels("tempfailed").inc()
            verdict = Verdict(internal_error_reply())
        finally:
            tx.capture.discard()
        metrics.EOM_SECONDS.observe(time.perf_counter() - started)
        return verdict

    def _finish(self, tx: Transaction, queue_id: str) -> Verdict:
        try:
            decision = classify(
                auth_user=tx.auth_user,
                envelope_from=tx.envelope_from,
                header_from=tx.header_from,
                by_submitter=self.directory.by_submitter,
                by_domain=self.directory.by_domain,
                unknown_sender=self.cfg.unknown_sender,
            )
        except BackendError as exc:
            return self._tempfail(tx, queue_id, exc)
        if decision.action is Action.REJECT:
            metrics.MESSAGES.labels("refused").inc()
            log.info("refused id=%s queue_id=%s from=<%s> reason=%r", tx.id, queue_id,
                     tx.envelope_from, decision.reason)
            return Verdict(refusal_reply(decision), reject=True)
        if decision.action is Action.PASS:
            metrics.MESSAGES.labels("passed").inc()
            log.info("passed uncaptured queue_id=%s from=<%s> reason=%r", queue_id,
                     tx.envelope_from, decision.reason)
            return Verdict(None)
        return self._capture(tx, queue_id, decision)

    def _capture(self, tx: Transaction, queue_id: str, decision: Decision) -> Verdict:
        org = decision.org
        assert org is not None
        content = tx.capture.finish()
        content_exp, metadata_exp = expiry_dates(tx.created, org.content_days, org.metadata_days)
        message = CapturedMessage(
            id=tx.id,
            org_id=org.id,
            domain=decision.domain,
            queue_id=queue_id,
            envelope_from=tx.envelope_from,
            recipients=tuple(tx.recipients),
            size=content.size,
            sha256=content.sha256,
            object_key=message_key(str(org.id), str(tx.id), tx.created),
            compressed_size=content.compressed_size,
            created_at=tx.created,
            content_expires_at=content_exp,
            metadata_expires_at=metadata_exp,
            message_id_header=tx.message_id_header,
            header_from=header_from_address(tx.header_from) or tx.header_from,
            subject=tx.subject,
        )
        try:
            self.committer.commit(message, content)
        except BackendError as exc:
            return self._tempfail(tx, queue_id, exc)
        finally:
            content.close()
        metrics.MESSAGES.labels("captured").inc()
        metrics.RECEIVED_BYTES.inc(content.size)
        metrics.STORED_BYTES.inc(content.compressed_size)
        log.info(
            "captured id=%s queue_id=%s org=%s from=<%s> nrcpt=%d size=%d stored=%d key=%s",
            tx.id, queue_id, org.name, tx.envelope_from, len(tx.recipients), content.size,
            content.compressed_size, message.object_key,
        )
        return Verdict(None, add_headers=((self.cfg.id_header, str(tx.id)),))

    def _tempfail(self, tx: Transaction, queue_id: str, exc: BackendError) -> Verdict:
        metrics.BACKEND_ERRORS.labels(exc.backend).inc()
        metrics.MESSAGES.labels("tempfailed").inc()
        log.warning("tempfailed id=%s queue_id=%s from=<%s> backend=%s reason=%r", tx.id,
                    queue_id, tx.envelope_from, exc.backend, exc.reason)
        return Verdict(tempfail_reply(exc.backend))
