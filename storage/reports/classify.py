"""What an inbound message is, and what it names of the mail it answers.

Plain functions over the parsed message, no I/O:

- `message_type`: `complaint` (an ARF feedback report, RFC 5965: a
  multipart/report with report-type=feedback-report, or a
  message/feedback-report part), `bounce` (an out-of-band delivery failure
  notice: a multipart/report of delivery-status, or a failure notice from a
  mailer daemon), `auto_reply` (RFC 3834 `Auto-Submitted` other than `no`,
  and the marks that real out-of-office systems put on their replies), `reply`
  (`In-Reply-To`/`References`), else `email`.  The order matters: a feedback
  report or a bounce quotes the original, and an auto-reply carries
  In-Reply-To too.
- `references`: the Message-IDs the message answers, nearest first.
- `quoted_ids`: postkeep ids (`X-Postkeep-Id: <uuid>`) and return paths quoted
  anywhere in it (a bounce's or feedback report's copy of the original, an
  auto-reply quoting headers): candidates only, checked by the caller.
- `complained_recipient`: whom a feedback report is about.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import re
import uuid
from email.message import Message

from postkeep.envelope import RETURN_PATH_PREFIX
from postkeep.storage.reports.dsn import is_failure_notice

EMAIL, REPLY, AUTO_REPLY, BOUNCE, COMPLAINT = (
    "email", "reply", "auto_reply", "bounce", "complaint")
MESSAGE_TYPES = (EMAIL, REPLY, AUTO_REPLY, BOUNCE, COMPLAINT)

# Headers that out-of-office and autoresponder systems set on what they send.
# Exchange/Outlook: X-Auto-Response-Suppress is set on its automatic replies
# (together with X-MS-Exchange-Inbox-Rules-Loop / -Generated-Message-Source),
# but Outlook also sets it on some ordinary mail, so it counts only with the
# Exchange markers or an automatic-reply subject.  Gmail's and Yahoo's vacation
# responders use RFC 3834 Auto-Submitted; older systems Precedence: auto_reply,
# X-Autoreply, X-Autorespond, X-Vacation.
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-vacation",
                 "x-ms-exchange-inbox-rules-loop")
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:automatic reply|auto(?:matic)?[- ]?(?:reply|response|respons)|autorespons|"
    r"out of (?:the )?office|ooo\b|abwesenheit|automatische antwort|r[ée]ponse automatique|"
    r"respuesta autom[áa]tica|risposta automatica|absence|vacation|away from)",
    re.IGNORECASE)
_FAILURE_SUBJECT = re.compile(
    r"undeliver|delivery (?:status notification \(failure\)|failure|has failed|failed)|"
    r"returned mail|failure notice|mail delivery (?:failed|system)|"
    r"could not be delivered|non[- ]?delivery|failure delivery|delivery status notification",
    re.IGNORECASE)
_DAEMON = re.compile(r"mailer-daemon|^\W*postmaster\b|<postmaster@"
                     r"|mail[ .]delivery[ .]s(?:ub)?system",
                     re.IGNORECASE)
_MSGID = re.compile(r"<[^<>\s]+@[^<>\s]+>")
_QUOTED_ID = re.compile(
    rb"X-Postkeep-Id:[ \t]*(?:\r?\n[ \t]+)?<?([0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?"
    rb"[0-9a-f]{4}-?[0-9a-f]{12})", re.IGNORECASE)
_QUOTED_PATH = re.compile(
    rb"\b" + RETURN_PATH_PREFIX.encode() + rb"[0-9a-f]{32}(?:-[0-9a-f]{1,12})?(?:-[0-9a-f]{16})?"
    rb"(?:\+[^@\s<>]*=[^@=\s<>]+)?@[A-Za-z0-9.-]+", re.IGNORECASE)


def parse(raw: bytes) -> Message:
    """The message, parsed leniently (compat32: never raises on bad headers)."""
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    return " ".join(str(value).split()) if value is not None else ""


def _parts(msg: Message) -> list[Message]:
    return [p for p in msg.walk() if isinstance(p, Message)]


def is_complaint(msg: Message) -> bool:
    """An ARF feedback report (RFC 5965)."""
    if msg.get_content_type() == "multipart/report" and \
            (msg.get_param("report-type") or "").lower() == "feedback-report":  # type: ignore[union-attr]
        return True
    return any(p.get_content_type() == "message/feedback-report" for p in _parts(msg)[1:])


def is_bounce(msg: Message, envelope_from: str) -> bool:
    """An out-of-band delivery failure notice (a DSN, or a daemon's failure notice)."""
    if msg.get_content_type() == "multipart/report" and \
            (msg.get_param("report-type") or "").lower() == "delivery-status":  # type: ignore[union-attr]
        return True
    if any(p.get_content_type() == "message/delivery-status" for p in _parts(msg)[1:]):
        return True
    subject = _decoded_header(msg, "Subject")
    if _DAEMON.search(_header(msg, "From")) or _DAEMON.search(envelope_from):
        # A mailer daemon's notice (some mark theirs Auto-Submitted too).
        return bool(_FAILURE_SUBJECT.search(subject)) or is_failure_notice(msg, _first_text(msg))
    return not envelope_from.strip("<>") and bool(_FAILURE_SUBJECT.search(subject)) \
        and not is_auto_reply(msg)


def _decoded_header(msg: Message, name: str) -> str:
    """A header's text with RFC 2047 encoded words decoded (best effort)."""
    raw = _header(msg, name)
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, UnicodeError):
        return raw


def _first_text(msg: Message, limit: int = 64 * 1024) -> str:
    """The first text/plain part, decoded and bounded (where a notice explains itself)."""
    for p in _parts(msg):
        if p.get_content_type() == "text/plain":
            data = p.get_payload(decode=True)
            if isinstance(data, bytes):
                return data[:limit].decode(p.get_content_charset() or "utf-8", "replace")
    return ""


def is_auto_reply(msg: Message) -> bool:
    """Sent by a machine in answer to a message: RFC 3834 or a vendor's marks."""
    auto = _header(msg, "Auto-Submitted").lower()
    if auto and auto.split(";")[0].strip() != "no":
        return True
    for name in ("Precedence", "X-Precedence"):
        if _header(msg, name).lower() == "auto_reply":
            return True
    if any(_header(msg, h) and _header(msg, h).lower() not in ("no", "false", "0")
           for h in _AUTO_HEADERS):
        return True
    if _header(msg, "X-MS-Exchange-Generated-Message-Source") or \
            "autoresponder" in _header(msg, "X-POST-MessageClass").lower():
        return True
    subject = _decoded_header(msg, "Subject")
    if _AUTO_SUBJECT.search(subject):
        return True
    return bool(_header(msg, "X-Auto-Response-Suppress")) and bool(
        re.search(r"\bauto", subject, re.IGNORECASE))


def is_unsubscribe(msg: Message) -> bool:
    """A request to unsubscribe: the subject is `unsubscribe` (any case, RFC
    2047 decoded, surrounding space ignored), as the mailto: form of
    `List-Unsubscribe` (RFC 2369, `?subject=unsubscribe`) and mail clients'
    unsubscribe buttons send it; never an auto-reply or a notice (an
    out-of-office quoting the subject is not the reader asking)."""
    subject = " ".join(_decoded_header(msg, "Subject").split()).casefold()
    return subject == "unsubscribe" and not is_auto_reply(msg) and not is_complaint(msg)


def references(msg: Message) -> list[str]:
    """The Message-IDs MSG answers, nearest first: In-Reply-To, then References
    from the last (the parent) back to the thread's start; no duplicates."""
    out: list[str] = []
    found = _MSGID.findall(_header(msg, "In-Reply-To"))
    found += reversed(_MSGID.findall(_header(msg, "References")))
    for m in found:
        if m not in out:
            out.append(m)
    return out[:32]


def message_type(msg: Message, envelope_from: str) -> str:
    """complaint, bounce, auto_reply, reply or email (see the module doc)."""
    if is_complaint(msg):
        return COMPLAINT
    if is_bounce(msg, envelope_from):
        return BOUNCE
    if is_auto_reply(msg):
        return AUTO_REPLY
    if references(msg):
        return REPLY
    return EMAIL


def quoted_ids(raw: bytes) -> list[uuid.UUID]:
    """postkeep ids quoted in RAW as X-Postkeep-Id headers, in order, no duplicates."""
    out: list[uuid.UUID] = []
    for m in _QUOTED_ID.finditer(raw[:4 << 20]):
        u = uuid.UUID(m.group(1).decode())
        if u not in out:
            out.append(u)
    return out[:8]


def quoted_return_paths(raw: bytes) -> list[str]:
    """postkeep return paths quoted in RAW (an original's Return-Path, a DSN's
    envelope), in order, no duplicates: verify each before trusting it."""
    out: list[str] = []
    for m in _QUOTED_PATH.finditer(raw[:4 << 20]):
        path = m.group(0).decode("ascii", "replace")
        if path not in out:
            out.append(path)
    return out[:8]


def _feedback_fields(msg: Message) -> Message | None:
    for p in _parts(msg)[1:]:
        if p.get_content_type() == "message/feedback-report":
            payload = p.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]  # parsed as a message/* part: its fields are the headers
            if isinstance(payload, str):
                return email.message_from_string(payload.lstrip(), policy=email.policy.compat32)
    return None


def original(msg: Message) -> Message | None:
    """The copy of the original message (or its headers) a report carries."""
    for p in _parts(msg)[1:]:
        ctype = p.get_content_type()
        if ctype == "message/rfc822":
            payload = p.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if ctype in ("text/rfc822-headers", "text/rfc822-header"):
            text = p.get_payload(decode=True)
            if isinstance(text, bytes):
                return email.message_from_bytes(text.lstrip(), policy=email.policy.compat32)
    return None


def complained_recipient(msg: Message) -> str | None:
    """Whom a feedback report is about: its Original-Rcpt-To (or
    Removal-Recipient), else the To: of the original it carries (if one plain
    address)."""
    fields = _feedback_fields(msg)
    if fields is not None:
        for name in ("Original-Rcpt-To", "Removal-Recipient"):
            rcpt = _header(fields, name).strip("<> ")
            if "@" in rcpt:
                return rcpt.lower()
    orig = original(msg)
    if orig is not None:
        addrs = email.utils.getaddresses([_header(orig, "To")])
        found = [a for _, a in addrs if "@" in a]
        if len(found) == 1:
            return found[0].lower()
    return None


def feedback_type(msg: Message) -> str | None:
    """The report's Feedback-Type (abuse, fraud, opt-out, ...), if it states one."""
    fields = _feedback_fields(msg)
    value = _header(fields, "Feedback-Type").lower() if fields is not None else ""
    return value or None
