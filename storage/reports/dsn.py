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

import base64
import binascii
import email
import email.policy
import hashlib
import html
import quopri
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import Message
from email.utils import parsedate_to_datetime

from postkeep.envelope import ReturnPath, parse_return_path, verify_return_path

STATUSES = ("relayed", "delivered", "deferred", "bounced", "expired", "complained")
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
    # The recipient named by the VERP return path the report arrived at
    # (unverified: `attribute_to` once it is one of the message's recipients).
    verp_recipient: str | None = None
    # What a failure notice says that names no recipient we could read (its
    # recipient left empty): whose it is, the return path may still tell.
    anonymous: Outcome | None = None


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


# An addr-spec as bounces write it (dot-atom local part, a dotted domain).
# Linear on hostile text: a match starts only where a run of local-part
# characters starts, and the groups are atomic (no backtracking into them).
_LOCAL_CHARS = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ADDRESS = re.compile(
    rf"(?<![{_LOCAL_CHARS}.])(?>[{_LOCAL_CHARS}]+(?:\.[{_LOCAL_CHARS}]+)*)"
    r"@(?>[A-Za-z0-9-]+)(?:\.(?>[A-Za-z0-9-]+))+")
# At most this many failed recipients are read from one notice.
MAX_RECIPIENTS = 100
# An enhanced status code in free text: not part of an IP address or a version.
_TEXT_CODE = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)(?!\w)")
_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_RECIPIENT_FIELDS = ("Final-Recipient", "Original-Recipient", "X-Actual-Recipient")
# Where the human-readable notice ends and the returned message begins.
_RETURNED = re.compile(
    r"^(?>[ \t>]*)(?>-+ ?)?(?:this is a copy of|below this line is a copy|below is a copy of"
    r"|a copy of the original message|original message (?:headers|follows)"
    r"|original message|returned message|the original message|start of returned"
    r"|unsent message below|message headers follow)"
    r"|^(?:Return-Path|Received|Message-ID|DKIM-Signature):[ \t]",
    re.IGNORECASE | re.MULTILINE)
# Addresses that are never the failed recipient.
_NOT_RECIPIENT = re.compile(
    r"^(?:mailer-daemon|postmaster|double-bounce|no-?reply|bounces?)(?:[+-].*)?@",
    re.IGNORECASE)
_ENVELOPE_SENDER = re.compile(r"MAIL FROM:\s*<[^<>]*>", re.IGNORECASE)
# A failure notice rather than an auto-reply or a human answer.
_FAILURE_WORDS = re.compile(
    r"undeliver|not (?:be )?deliver|could not be delivered|delivery (?:status )?(?:notification"
    r" )?\(?fail|delivery has failed|failure notice|returned mail|returning message|mail"
    r" delivery (?:failed|system|subsystem)|permanent (?:error|fatal)|user unknown|unknown"
    r" user|no such (?:user|mailbox|recipient)|does not exist|mailbox (?:unavailable|full|"
    r"not found)|rejected|recipient (?:address )?rejected|address not found|bounce|"
    r"(?<![\w.])5\.\d{1,3}\.\d{1,3}(?![\w.])|^[ \t]*5\d\d[ -]", re.IGNORECASE | re.MULTILINE)
_AUTO_REPLY = re.compile(
    r"out of (?:the )?office|automatic reply|auto(?:matic)?[- ]?(?:reply|response|antwort)"
    r"|vacation|abwesenheit|absence", re.IGNORECASE)
# A notice that the sender's server is still trying: a delay, not a failure.
_STILL_TRYING = re.compile(
    r"will (?:continue to |keep )?(?:be )?retr|still (?:be )?trying|has been delayed|delivery"
    r" (?:is )?delayed|not yet been delivered|will try again|delivery temporarily",
    re.IGNORECASE)


# An enhanced code right after an SMTP reply code: the remote server's own.
_REPLY_CODE = re.compile(r"(?<!\d)[245]\d\d[ -]['\"#(]?([245]\.\d{1,3}\.\d{1,3})(?!\.?\d)(?!\w)")


def _code_in(*texts: str | None) -> str | None:
    """The first enhanced status code of TEXTS, the one in an SMTP reply first."""
    for text in texts:
        m = _REPLY_CODE.search(text or "")
        if m:
            return m.group(1)
        m = _TEXT_CODE.search(text or "")
        if m:
            return m.group(0)
    return None


def _status_code(status_field: object, *texts: str | None) -> str | None:
    """The report's status code: its Status field, else the enhanced code in
    the Diagnostic-Code or the text.  A generic X.0.0 in Status gives way to a
    specific code of the same class in the server's own reply."""
    m = _STATUS_CODE.search(_text(status_field) or "")
    stated = m.group(0) if m else None
    quoted = _code_in(*texts)
    if stated is None:
        return quoted
    if quoted and stated.endswith(".0.0") and quoted[0] == stated[0]:
        return quoted
    return stated


def _action(value: object) -> str | None:
    """The Action keyword, without a comment or anything else after it."""
    text = _text(value)
    if not text:
        return None
    m = re.match(r"[A-Za-z]+", text.strip())
    return m.group(0).lower() if m else None


def _address_in(text: str | None) -> str | None:
    m = _ADDRESS.search(text or "")
    return m.group(0) if m else None


def _mailbox(value: object) -> str | None:
    """The mail address of `rfc822; <user@host>` (or of another address type
    that holds one: x400, a path ending '#user@host'); None if there is none,
    as for a local spool path."""
    text = _text(value)
    if not text:
        return None
    kind, sep, rest = text.partition(";")
    if not sep:
        rest = text
    rest = rest.strip()
    bare = rest.strip("<>").strip()
    if (not sep or kind.strip().lower() == "rfc822") and (
            _ADDRESS.fullmatch(bare) or re.fullmatch(r"[^\s@<>/|]+@[^\s@<>]+", bare)):
        return bare  # (an address of an rfc822 type: a dotless domain is one too)
    return _address_in(rest)


def _decoded(part: Message) -> str:
    """The text of a non-multipart part, transfer encoding and charset undone."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:
        text = payload.decode("latin-1")
    if part.get_content_type() == "text/html":
        text = html.unescape(re.sub(r"<[^<>]*>", " ", re.sub(
            r"(?is)<(?:br|p|div|tr)\b[^<>]*>", "\n", text)))
    return text


def _field_text(part: Message) -> str:
    """The text of a delivery-status part, however it was sent (some encode it)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        text = "\n".join(b.as_string() for b in payload if isinstance(b, Message))
    else:
        text = payload if isinstance(payload, str) else ""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if cte == "quoted-printable":
            text = quopri.decodestring(text.encode("utf-8", "replace")).decode("utf-8", "replace")
        elif cte == "base64" and isinstance(payload, str):
            text = base64.b64decode(text).decode("utf-8", "replace")
    except (ValueError, binascii.Error):
        pass
    return text.replace("\r\n", "\n")


def _blocks(text: str) -> list[Message]:
    """Field blocks (separated by blank lines) of a delivery-status text."""
    out = []
    for chunk in re.split(r"\n[ \t]*\n", text.strip()):
        if chunk.strip():
            out.append(email.message_from_string(chunk.strip() + "\n\n",
                                                 policy=email.policy.compat32))
    return out


def _delivery_status(msg: Message) -> list[Message] | None:
    """The field blocks of a DSN's delivery-status part (per-message first), or None."""
    for part in msg.walk():
        if part.get_content_type() in _DSN_TYPES:
            blocks = _blocks(_field_text(part))
            if blocks:
                return blocks
    return None


def _text_parts(msg: Message) -> Iterator[Message]:
    """The notice's own text parts: not the returned message or its headers."""
    ctype = msg.get_content_type()
    if ctype in ("message/rfc822", "text/rfc822-headers", "message/global",
                 "message/global-headers", *_DSN_TYPES):
        return
    if msg.is_multipart():
        for sub in msg.get_payload():
            if isinstance(sub, Message):
                yield from _text_parts(sub)
    elif msg.get_content_maintype() in ("text", "multipart") or not msg.get("Content-Type"):
        yield msg  # (a multipart without parts: its body is the notice)


def _notice(msg: Message) -> str:
    """The human-readable notice, cut where a returned copy of the message starts."""
    texts = []
    for part in _text_parts(msg):
        text = _decoded(part).replace("\r\n", "\n")
        m = _RETURNED.search(text)
        texts.append(text[:m.start()] if m and m.start() > 0 else text)
    return "\n".join(texts)[:200_000]


def _header_addresses(msg: Message, names: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for name in names:
        for value in msg.get_all(name) or []:
            found.update(a.lower() for a in _ADDRESS.findall(str(value)))
    return found


def _returned_headers(msg: Message) -> Message | None:
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if ctype in ("text/rfc822-headers", "message/global-headers"):
            return email.message_from_string(_decoded(part), policy=email.policy.compat32)
    return None


def _untyped(address: str) -> str:
    """ADDRESS without an address-type prefix: Exchange's notices write
    "smtp=user@host" (or "SMTP:user@host"), which an address pattern takes whole."""
    return re.sub(r"^(?:smtp|rfc822)[=:;]\s*", "", address, flags=re.I).strip("<>")


def _candidates(msg: Message, notice: str, envelope_to: Sequence[str]) -> list[str]:
    """Addresses the notice names as failed, in order: its own X-Failed-Recipients,
    then any address in the notice that is not the sender, the report's own
    parties, a mailer daemon or a return path."""
    exclude = {a.strip("<>").lower() for a in envelope_to}
    exclude |= _header_addresses(msg, ("From", "To", "Cc", "Reply-To", "Sender", "Return-Path"))
    returned = _returned_headers(msg)
    if returned is not None:
        exclude |= _header_addresses(returned, ("From", "Sender", "Return-Path", "Reply-To"))
    out: list[str] = []

    def add(address: str) -> None:
        a = _untyped(address.strip(".").lower())
        if (len(out) >= MAX_RECIPIENTS or a in exclude or a in out or _NOT_RECIPIENT.match(a)
                or parse_return_path(a)):
            return
        out.append(a)

    for value in msg.get_all("X-Failed-Recipients") or []:
        for a in _ADDRESS.findall(str(value)):
            add(a)
    if out:
        return out
    text = _ENVELOPE_SENDER.sub(" ", notice)
    text = re.sub(r"(?im)^(?:message-id|in-reply-to|references):.*$", " ", text)
    for a in _ADDRESS.findall(text):
        add(a)
    if not out and returned is not None:
        # The notice names no address: the returned message's own recipient.
        to = sorted(_header_addresses(returned, ("To",)) - exclude)
        if len(to) == 1:
            out = to
    return out


def _reply_near(notice: str, address: str, others: Sequence[str]) -> tuple[str | None, str | None]:
    """(status code, the server's reply line) that the notice gives for ADDRESS:
    the first after its first mention and before the next other recipient's,
    else the first in the notice."""
    lower = notice.lower()
    at = lower.find(address.lower())
    windows = []
    if at >= 0:
        end = len(notice)
        for other in others:
            if other != address:
                nxt = lower.find(other.lower(), at + len(address))
                if nxt >= 0:
                    end = min(end, nxt)
        windows.append((at, min(end, at + 2000)))
    windows.append((0, len(notice)))
    for lo, hi in windows:
        # A code in the server's reply ("550 5.1.1 ...") before one in prose;
        # never a 2.x.x (a version number, a transcript's "250 2.1.5 Ok").
        found = [(m, m.group(1)) for m in _REPLY_CODE.finditer(notice, lo, hi)]
        found += [(m, m.group(0)) for m in _TEXT_CODE.finditer(notice, lo, hi)]
        for m, code in found:
            if code.startswith("2"):
                continue
            line_start = notice.rfind("\n", 0, m.start()) + 1
            line_end = notice.find("\n\n", m.end())
            line = notice[line_start:line_end if line_end >= 0 else len(notice)]
            return code, _text(line, 300)
    return None, None


def _failure_status(code: str | None, notice: str, temporary: bool) -> str | None:
    """postkeep's status for a recipient a non-DSN notice names (None: not a failure)."""
    if code is not None and code.startswith("2"):
        return None
    if temporary or (code is not None and code.startswith("4")):
        return "deferred" if temporary or _STILL_TRYING.search(notice) else "expired"
    return "bounced"


def _dsn_outcome(block: Message, when: datetime, notice: str = "") -> Outcome | None:
    """One recipient's outcome from its DSN fields, read leniently."""
    diagnostic = _typed(block.get("Diagnostic-Code"))
    original = _mailbox(block.get("Original-Recipient"))
    recipient = (_mailbox(block.get("Final-Recipient")) or original
                 or _mailbox(block.get("X-Actual-Recipient")) or _address_in(diagnostic))
    if recipient is None:
        return None
    code = _status_code(block.get("Status"), diagnostic)
    if notice and (code is None or code.endswith(".0.0")):
        # Only a generic code in the fields: the notice's text may say more.
        near, reply = _reply_near(notice, recipient, [])
        if near and (code is None or near[0] == code[0]):
            code, diagnostic = near, diagnostic or reply
    action = _action(block.get("Action"))
    if action is None and code is not None:
        # No Action: the status class says what happened.
        action = {"2": "delivered", "4": "delayed", "5": "failed"}[code[0]]
    status = status_of(action or "", code)
    if status is None:
        return None
    return Outcome(recipient=recipient, original=original, status=status, dsn_status=code,
                   remote_mta=_typed(block.get("Remote-MTA")), diagnostic=diagnostic,
                   event_at=_date(block.get("Last-Attempt-Date")) or when)


def _dsn_outcomes(blocks: Sequence[Message], when: datetime,
                  notice: str = "") -> list[Outcome]:
    outcomes = []
    for i, block in enumerate(blocks):
        if i == 0 and not any(block.get(f) for f in _RECIPIENT_FIELDS):
            continue  # the per-message fields
        # (A first block with recipient fields: the MTA left out the blank line.)
        outcome = _dsn_outcome(block, when, notice)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def _text_fields(notice: str, when: datetime) -> list[Outcome]:
    """DSN fields written in a notice's text (a report that is not multipart/report)."""
    if not re.search(r"(?im)^(?:final|original)-recipient:", notice):
        return []
    fields = "\n".join(line for line in notice.replace("\r\n", "\n").split("\n")
                       if re.match(r"[ \t]|[\w-]+:|$", line))
    return _dsn_outcomes(_blocks("X: per-message\n\n" + fields), when)


def _bounce_outcomes(msg: Message, notice: str, envelope_to: Sequence[str], subject: str | None,
                     when: datetime) -> tuple[list[Outcome], str | None]:
    """Failed recipients of a notice in an MTA's own format: flufl.bounce's
    detectors, then the addresses the notice itself names; each with the code
    and reply the notice gives next to it.  (outcomes, why the scanners failed)"""
    from flufl.bounce import all_failures

    def addresses(found: Iterable[bytes | str]) -> list[str]:
        out = []
        for a in sorted(found):
            text = a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a)
            text = text.strip().strip("<>").lower()
            text = _untyped(text)
            if text and "@" in text and not parse_return_path(text):
                out.append(text)
        return out

    error = None
    temporary: Iterable[bytes | str] = ()
    permanent: Iterable[bytes | str] = ()
    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # flufl's heuristics on hostile input
        error = f"{type(exc).__name__}: {exc}"
    found = [(a, False) for a in addresses(permanent)]
    found += [(a, True) for a in addresses(temporary) if a not in dict(found)]
    if not found:
        found = [(a, False) for a in _candidates(msg, notice, envelope_to)]
    found = found[:MAX_RECIPIENTS]
    names = [a for a, _ in found]
    outcomes = []
    for address, temporary_failure in found:
        code, reply = _reply_near(notice, address, names)
        status = _failure_status(code, notice, temporary_failure)
        if status is None:
            continue
        what = reply or subject
        diagnostic = f"asynchronous bounce: {what}" if what else "asynchronous bounce"
        outcomes.append(Outcome(address, None, status, code, None, _text(diagnostic), when))
    return outcomes, error


def _repaired(msg: Message) -> Message:
    """MSG, its parts found if its boundary parameter names none of them (the
    body's own delimiter lines then say what the boundary is)."""
    payload = msg.get_payload()
    if msg.get_content_maintype() != "multipart" or not isinstance(payload, str):
        return msg
    m = re.search(r"(?m)^--([^\s]{1,70})[ \t]*\r?$", payload)
    if not m:
        return msg
    try:
        msg.set_boundary(m.group(1))
        return email.message_from_bytes(msg.as_bytes(), policy=email.policy.compat32)
    except Exception:  # a message too broken to write back: as it was
        return msg


def is_failure_notice(msg: Message, notice: str) -> bool:
    """Does a report with no usable fields read as a failure notice (not an
    auto-reply)?  Only then is it taken for its return path's recipient."""
    subject = str(msg.get("Subject", ""))
    if _AUTO_REPLY.search(subject) and not _FAILURE_WORDS.search(subject):
        return False
    return bool(_FAILURE_WORDS.search(subject) or _FAILURE_WORDS.search(notice))


def parse_report(raw: bytes, envelope_from: str, envelope_to: Sequence[str],
                 received_at: datetime, key: bytes = b"") -> Report:
    """Everything a report says, matched to a message if its return path verifies under KEY.

    Read leniently: RFC 3464 fields first (an Action with a comment, an
    address in angle brackets or only in Original-Recipient, no blank line
    after the per-message fields, a quoted-printable delivery-status part),
    then DSN fields in the notice's text, then flufl.bounce's detectors and
    the addresses and replies the notice names.  A report at a VERP return
    path names its recipient by its address (`attribute_to` applies it once
    the recipient is checked against the message's)."""
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
    msg = _repaired(msg)

    path, refused = trusted_return_path(envelope_to, key)
    mid = path.message_id if path else None
    base = replace(base, expires_at=path.expires_at if path else None, subject=subject,
                   verp_recipient=path.recipient if path else None)
    blocks = _delivery_status(msg)
    try:
        notice = _notice(msg)
    except Exception:  # a part no decoder takes: the fields alone decide
        notice = ""
    if blocks is not None:
        outcomes = _dsn_outcomes(blocks, when, notice)
        if not outcomes and any(_action(b.get("Action")) == "failed" for b in blocks):
            # Failed, but no address in its fields: the notice may name it.
            outcomes, _ = _bounce_outcomes(msg, notice, envelope_to, subject, when)
        reason = None
        if mid is None:
            claimed = _envid(blocks[0].get("Original-Envelope-Id")) or _returned_id(raw)
            reason = _unattributed(refused, claimed, "Original-Envelope-Id, X-Postkeep-Id")
        elif not outcomes:
            reason = "a DSN with no usable per-recipient fields (Final-Recipient, Action)"
        failed = any(_action(b.get("Action")) == "failed" for b in blocks)
        anonymous = None
        if failed and not outcomes:
            anonymous = _anonymous(blocks, notice, subject, when)
        return replace(base, kind="dsn", message_id=mid, outcomes=tuple(outcomes), reason=reason,
                       queue_id=_queue_id(blocks[0].get("X-Postfix-Queue-ID")),
                       failure=failed or any(o.status in ("bounced", "expired")
                                             for o in outcomes), anonymous=anonymous)

    # Not a DSN: DSN fields in the text, else a remote server's own format.
    outcomes = _text_fields(notice, when)
    error = None
    if not outcomes:
        outcomes, error = _bounce_outcomes(msg, notice, envelope_to, subject, when)
    reason = None
    if mid is None:
        reason = _unattributed(refused, _returned_id(raw), "X-Postkeep-Id")
    elif not outcomes:
        reason = ("no failed recipient found in the bounce (RFC 3464 fields, flufl.bounce,"
                  " the addresses it names)")
        if error:
            reason += f"; bounce scanners failed: {error}"
    anonymous = None
    if not outcomes and is_failure_notice(msg, notice):
        anonymous = _anonymous([], notice, subject, when)
    failure = any(o.status in ("bounced", "expired") for o in outcomes) or anonymous is not None
    return replace(base, kind="async_bounce", message_id=mid, outcomes=tuple(outcomes),
                   reason=reason, failure=failure, anonymous=anonymous)


def _anonymous(blocks: Sequence[Message], notice: str, subject: str | None,
               when: datetime) -> Outcome | None:
    """The failure a notice reports without naming a recipient we can read."""
    diagnostic = next((d for b in blocks if (d := _typed(b.get("Diagnostic-Code")))), None)
    code = next((c for b in blocks if (c := _status_code(b.get("Status"), diagnostic))), None)
    reply = None
    if code is None or code.endswith(".0.0"):
        near, reply = _reply_near(notice, "", [])
        code = near if near and (code is None or near[0] == code[0]) else code
    status = _failure_status(code, notice, False) if not blocks else status_of("failed", code)
    if status is None:
        return None
    if diagnostic is None:
        what = reply or subject
        diagnostic = f"asynchronous bounce: {what}" if what else "asynchronous bounce"
    return Outcome("", None, status, code, None, _text(diagnostic), when)


def attribute_to(report: Report, recipient: str) -> Report:
    """REPORT attributed to RECIPIENT because of where it arrived (its VERP
    return path names RECIPIENT, or the message had no other recipient).

    The report as it is if it names RECIPIENT; else its first outcome, or the
    failure it states without a readable recipient (an X.400 address, a spool
    path, a plain-text notice that names nobody), as RECIPIENT's alone.  A
    report that states nothing (an auto-reply) is left as it is.
    """
    want = recipient.lower()
    named = [o for o in report.outcomes
             if want in (o.recipient.lower(), (o.original or "").lower())]
    if named:
        # It names RECIPIENT itself: it is read as it says (a DSN may report
        # other recipients of the message too, each in its own fields).
        return replace(report, reason=None)
    if report.outcomes:
        first = report.outcomes[0]
        note = f" (the report names {first.recipient})"
        chosen = replace(first, original=None,
                         diagnostic=_text((first.diagnostic or "") + note))
    elif report.anonymous is not None:
        chosen = report.anonymous
    else:
        return report
    chosen = replace(chosen, recipient=recipient)
    return replace(report, outcomes=(chosen,), reason=None,
                   failure=chosen.status in ("bounced", "expired"))


def needs_recipients(report: Report) -> bool:
    """Does attributing REPORT need its message's recipients (`resolve`)?"""
    return report.message_id is not None and (
        report.verp_recipient is not None or report.failure or report.anonymous is not None)


def resolve(report: Report, recipients: Sequence[str]) -> Report:
    """REPORT attributed by where it arrived, given its message's RECIPIENTS.

    A VERP return path's recipient part is not covered by the MAC (Postfix
    writes it after the milter signed the path): it counts only if it is one
    of the message's recipients; otherwise the report is read for what it
    says.  A failure report for a message with a single recipient concerns
    that recipient, whatever its format.
    """
    if report.message_id is None or not recipients:
        return report
    if report.verp_recipient is not None:
        want = report.verp_recipient.lower()
        match = [r for r in recipients if r.lower() == want]
        if match:
            return attribute_to(report, match[0])
    if len(recipients) == 1 and (report.failure or report.anonymous is not None):
        return attribute_to(report, recipients[0])
    return report
