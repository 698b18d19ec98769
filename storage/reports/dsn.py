"""Delivery reports: what a DSN or a bounce says about which recipient.

Plain functions from the bytes of a report (and the LMTP envelope it came
with) to a `Report`: which postkeep message it is about and one `Outcome` per
recipient.  Nothing here touches a database or the network.

- RFC 3464 DSNs (Postfix's own notices, and remote servers' that follow the
  standard): per-recipient Action, Status, Remote-MTA, Diagnostic-Code.
- Anything else that arrives at a return path (remote servers that accepted
  and bounced later, in their own formats): failed recipients found by
  Mailman's flufl.bounce.

The message is found only by the return path the report was sent to, and
only if that return path verifies (postkeep/envelope.py: a MAC under the
platform's key over the id, expiry and bounce domain).  A DSN's
Original-Envelope-Id and an X-Postkeep-Id in the returned headers are in
every recipient's copy of the message, so anyone can quote them: alone they
attribute nothing, and a report whose return path does not verify is kept
unmatched with the reason.  What cannot be matched or parsed is still a
`Report` (kind "unparsable" or a reason), so the caller keeps it.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import Message
from email.utils import parsedate_to_datetime

from postkeep.envelope import ReturnPath, parse_return_path, verify_return_path

STATUSES = ("relayed", "delivered", "deferred", "bounced", "expired")
_STATUS_CODE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_ID_HEADER = re.compile(rb"^X-Postkeep-Id:[ \t]*([0-9a-fA-F-]{32,36})[ \t]*\r?$",
                        re.IGNORECASE | re.MULTILINE)
# Field values are cut to this many characters when stored.
TEXT_MAX = 998


@dataclass(frozen=True)
class Outcome:
    """One recipient's outcome as a report states it."""

    recipient: str         # Final-Recipient (the address delivered to)
    original: str | None   # Original-Recipient, when given
    status: str            # one of STATUSES
    dsn_status: str | None  # e.g. "5.1.1"
    remote_mta: str | None
    diagnostic: str | None  # the remote server's reply, as reported
    event_at: datetime


@dataclass(frozen=True)
class Report:
    """A received report: what it is, which message, which outcomes."""

    sha256: bytes
    size: int
    kind: str                      # dsn, async_bounce, unparsable
    message_id: uuid.UUID | None
    # The message's metadata expiry (to the second) when the return path
    # carries it: the lookup then touches one partition.
    expires_at: datetime | None = None
    outcomes: tuple[Outcome, ...] = ()
    reason: str | None = None      # why it cannot be matched (None: it can)
    subject: str | None = None
    envelope_from: str | None = None
    envelope_to: str | None = None
    failure: bool = False          # reports a failure (forwarding candidate)
    # The reported message's Postfix queue id (a Postfix DSN's X-Postfix-Queue-ID),
    # logged beside pk_id so one grep finds the message in every log.
    queue_id: str | None = None


def _text(value: object, limit: int = TEXT_MAX) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).replace("\x00", "\ufffd").split())
    return text[:limit] or None


def _typed(value: object) -> str | None:
    """`rfc822; addr` / `dns; host` / `smtp; 550 ...` → the part after ';'."""
    text = _text(value)
    if text is None:
        return None
    _kind, sep, rest = text.partition(";")
    return (rest.strip() or None) if sep else text


def status_of(action: str, dsn_status: str | None) -> str | None:
    """postkeep's status for a DSN Action (and Status), or None if unknown.

    A failure with a 4.x.x status is Postfix giving up on a message that only
    ever deferred: the queue lifetime ran out, so it is 'expired'.
    """
    action = action.strip().lower()
    if action == "failed":
        return "expired" if dsn_status and dsn_status.startswith("4") else "bounced"
    return {"delivered": "delivered", "expanded": "delivered", "relayed": "relayed",
            "delayed": "deferred"}.get(action)


def _date(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        when = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        # OverflowError: a field too large for a C long (found by fuzzing:
        # "Date: ... 10:00111...1:00"), which raised out of parse_report and
        # answered every retry of that report with an internal error.
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


def _delivery_status(msg: Message) -> tuple[Message, list[Message]] | None:
    """(per-message fields, per-recipient field blocks) of a DSN, or None."""
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and payload:
            blocks = [p for p in payload if isinstance(p, Message)]
            if len(blocks) == len(payload):
                return blocks[0], blocks[1:]
    return None


def _queue_id(value: object) -> str | None:
    """A Postfix queue id as reported (letters and digits only; anything else: None)."""
    text = _text(value, 32)
    return text if text and text.isascii() and text.isalnum() else None


def _returned_id(raw: bytes) -> uuid.UUID | None:
    m = _ID_HEADER.search(raw)
    if not m:
        return None
    try:
        return uuid.UUID(m.group(1).decode())
    except ValueError:
        return None


def _envid(value: object) -> uuid.UUID | None:
    text = _text(value)
    if not text:
        return None
    try:
        return uuid.UUID(text.strip("<>"))
    except ValueError:
        return None


def trusted_return_path(envelope_to: Sequence[str],
                        key: bytes) -> tuple[ReturnPath | None, str | None]:
    """(the first recipient that is a return path verifying under KEY, None) or
    (None, why none did: None if no recipient is a postkeep return path at all)."""
    refusals = []
    for address in envelope_to:
        path = parse_return_path(address)
        if path is None:
            continue
        why = verify_return_path(path, key)
        if why is None:
            return path, None
        refusals.append(f"<{address.strip('<>')}>: {why}")
    return None, "; ".join(refusals) or None


def _unattributed(refused: str | None, claimed: uuid.UUID | None, names: str) -> str:
    """The reason a report names no message we trust."""
    if refused:
        return refused
    reason = "not sent to a postkeep return path"
    if claimed is not None:
        reason += f"; it names message {claimed} ({names}), which alone is not trusted"
    return reason


def parse_report(raw: bytes, envelope_from: str, envelope_to: Sequence[str],
                 received_at: datetime, key: bytes = b"") -> Report:
    """Everything a report says, matched to a message if its return path verifies under KEY."""
    digest = hashlib.sha256(raw).digest()
    to = ", ".join(envelope_to)
    base = Report(sha256=digest, size=len(raw), kind="unparsable", message_id=None,
                  envelope_from=envelope_from or None, envelope_to=to or None)
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as exc:  # the parser is lenient; this is a last resort
        return replace(base, kind="unparsable", message_id=None,
                      reason=f"not a parseable message: {exc}")
    subject = _text(msg.get("Subject"))
    if not raw.strip() or (not msg.keys() and not msg.get_payload()):
        return replace(base, kind="unparsable", message_id=None, subject=subject,
                      reason="empty report")
    when = _date(msg.get("Date")) or received_at

    path, refused = trusted_return_path(envelope_to, key)
    mid = path.message_id if path else None
    base = replace(base, expires_at=path.expires_at if path else None)
    dsn = _delivery_status(msg)
    if dsn is not None:
        per_message, blocks = dsn
        outcomes = []
        for block in blocks:
            final = _typed(block.get("Final-Recipient"))
            action = _text(block.get("Action"))
            if not final or not action:
                continue
            code = _STATUS_CODE.search(_text(block.get("Status")) or "")
            dsn_status = code.group(0) if code else None
            status = status_of(action, dsn_status)
            if status is None:
                continue
            outcomes.append(Outcome(
                recipient=final, original=_typed(block.get("Original-Recipient")),
                status=status, dsn_status=dsn_status,
                remote_mta=_typed(block.get("Remote-MTA")),
                diagnostic=_typed(block.get("Diagnostic-Code")),
                event_at=_date(block.get("Last-Attempt-Date")) or when))
        reason = None
        if mid is None:
            claimed = _envid(per_message.get("Original-Envelope-Id")) or _returned_id(raw)
            reason = _unattributed(refused, claimed, "Original-Envelope-Id, X-Postkeep-Id")
        elif not outcomes:
            reason = "a DSN with no usable per-recipient fields (Final-Recipient, Action)"
        return replace(base, kind="dsn", message_id=mid, outcomes=tuple(outcomes), reason=reason,
                      subject=subject, queue_id=_queue_id(per_message.get("X-Postfix-Queue-ID")),
                      failure=any(o.status in ("bounced", "expired")
                                                   for o in outcomes))

    # Not a DSN: a remote server's own bounce format.
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # flufl's heuristics on hostile input
        return replace(base, kind="async_bounce", message_id=mid, subject=subject,
                      reason=f"bounce scanners failed: {type(exc).__name__}: {exc}")

    def addresses(found: Iterable[bytes | str]) -> list[str]:
        out = []
        for a in sorted(found):
            text = a.decode("utf-8", "replace").strip().strip("<>") if isinstance(
                a, bytes) else str(a).strip().strip("<>")
            if text and "@" in text:
                out.append(text)
        return out

    diagnostic = f"asynchronous bounce: {subject}" if subject else "asynchronous bounce"
    outcomes = [Outcome(a, None, "bounced", None, None, _text(diagnostic), when)
                for a in addresses(permanent)]
    outcomes += [Outcome(a, None, "deferred", None, None, _text(diagnostic), when)
                 for a in addresses(temporary) if a not in {o.recipient for o in outcomes}]
    reason = None
    if mid is None:
        reason = _unattributed(refused, _returned_id(raw), "X-Postkeep-Id")
    elif not outcomes:
        reason = "no failed recipient found in the bounce (flufl.bounce)"
    return replace(base, kind="async_bounce", message_id=mid, outcomes=tuple(outcomes),
                  reason=reason, subject=subject, failure=bool(permanent))
