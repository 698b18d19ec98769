"""The envelope postkeep gives captured mail, so outcomes come back to it.

A captured message leaves with
- the return path `pk-<message id, 32 hex digits>-<metadata expiry, Unix
  seconds in hex>-<MAC, 16 hex digits>@<bounce domain>`, so a DSN or a
  remote server's late bounce names the message it is about, and the
  partition its rows are in (the tables are partitioned by metadata expiry:
  a lookup by id alone would plan over every partition).  The MAC is
  HMAC-SHA256 under the platform's return-path key (`return_path.key`) over
  the id, the expiry and the bounce domain, cut to 64 bits: postkeep-storage
  records a report only if it arrived at a return path whose MAC verifies,
  so knowing a message's id (it is in `X-Postkeep-Id`) is not enough to
  forge its reports, nor is a return path moved to another domain.  Hex
  survives MTAs that change the case of local parts, and the whole local
  part stays within 64 octets;
- with Postfix's own VERP (`XVERP` on MAIL FROM, added by the command
  filter; default `verp_delimiter_filter` `+=`), each recipient's copy
  leaves from `pk-<id>-<expiry>-<MAC>+<rcpt local part>=<rcpt domain>@<bounce
  domain>`, so a report tells which recipient it is about by where it
  arrives, whatever its format.  Postfix inserts the recipient after the
  milter changed the sender (the VERP delimiters are a queue-file record of
  their own, which smfi_chgfrom does not touch), so the MAC cannot cover the
  recipient: `verify_return_path` checks the id, expiry and domain as before,
  and postkeep-storage accepts the recipient part only if it is one of the
  message's recipients in the database.  A recipient can so name another
  recipient of the same message, which it could already do by writing a
  DSN naming that recipient to the plain return path;
- `RET=HDRS ENVID=<message id>` on MAIL FROM, so Postfix's DSNs carry the id
  in `Original-Envelope-Id` and only the headers of the message;
- `NOTIFY=SUCCESS,DELAY,FAILURE` on every recipient, set at SMTP time by the
  bundle's `smtpd_command_filter` (postfix-conf/command-filter.pcre): a NOTIFY
  added by a milter is recorded but never yields a success notice
  (FIELD-NOTES).

The command filter also tells the milter what the client itself asked for,
in the case of the three keywords it writes: upper case for a keyword the
client asked for, lower case for one it did not (all lower case: the client
said NEVER), and the order FAILURE,DELAY,SUCCESS when the client gave no
NOTIFY at all.  Postfix reads keywords in any case and order, so the
encoding costs nothing on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

RETURN_PATH_PREFIX = "pk-"
MAC_HEX_DIGITS = 16
# Also the forms from before the MAC (pk-<id>-<expiry>@, pk-<id>@): they parse,
# so a report to one is recognised and kept, but they never verify.
_RETURN_PATH = re.compile(
    r"^pk-([0-9a-f]{32})(?:-([0-9a-f]{1,12}))?(?:-([0-9a-f]{16}))?"
    r"(?:\+([^@\s<>]*=[^@=\s<>]+))?@([^@\s<>]+)$",
    re.IGNORECASE)
# Postfix's default verp_delimiter_filter/verp_delimiters: '+' then '='.
VERP_DELIMITERS = "+="
_KEYWORDS = ("SUCCESS", "DELAY", "FAILURE")


def _mac(key: bytes, message_id: uuid.UUID, expiry: int, domain: str) -> str:
    text = f"postkeep-return-path-1:{message_id.hex}:{expiry:x}:{domain.lower().rstrip('.')}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:MAC_HEX_DIGITS]


def return_path(message_id: uuid.UUID, metadata_expires_at: datetime,
                bounce_domain: str, key: bytes) -> str:
    """The return path that carries MESSAGE_ID (and its partition) back in bounces."""
    if not key:
        raise ValueError("a return path needs the return-path key (return_path.key)")
    expiry = int(metadata_expires_at.timestamp())
    mac = _mac(key, message_id, expiry, bounce_domain)
    return f"{RETURN_PATH_PREFIX}{message_id.hex}-{expiry:x}-{mac}@{bounce_domain}"


@dataclass(frozen=True)
class ReturnPath:
    """What a postkeep return path says, verified or not (see `verify_return_path`)."""

    message_id: uuid.UUID
    # The expiry as written (Unix seconds), None in the oldest form.
    expiry: int | None
    mac: str | None
    domain: str
    # The recipient Postfix's VERP wrote into the address (not covered by the
    # MAC: check it against the message's recipients), None without VERP.
    recipient: str | None = None

    @property
    def expires_at(self) -> datetime | None:
        """The message's metadata expiry to the second (floor), if the path has it."""
        if self.expiry is None:
            return None
        try:
            return datetime.fromtimestamp(self.expiry, UTC)
        except (OverflowError, ValueError, OSError):
            return None


def parse_return_path(address: str) -> ReturnPath | None:
    """What a postkeep return path says (unverified), or None if ADDRESS is not one."""
    m = _RETURN_PATH.match(address.strip().strip("<>"))
    if not m:
        return None
    expiry = int(m.group(2), 16) if m.group(2) else None
    mac = m.group(3).lower() if m.group(3) else None
    recipient = None
    if m.group(4):
        # The recipient's local part may hold '=' itself; its domain cannot.
        local, _, domain = m.group(4).rpartition("=")
        recipient = f"{local}@{domain}" if local and domain else None
    return ReturnPath(uuid.UUID(m.group(1)), expiry, mac, m.group(5).lower().rstrip("."),
                      recipient)


def verify_return_path(path: ReturnPath, key: bytes) -> str | None:
    """None if PATH was made by postkeep with KEY; otherwise why it is not trusted."""
    if not key:
        return "no return-path key is configured (return_path.key)"
    if path.mac is None or path.expiry is None:
        return "the return path carries no MAC (forged, or made before return paths were signed)"
    if not hmac.compare_digest(path.mac, _mac(key, path.message_id, path.expiry, path.domain)):
        return "the return path's MAC does not verify (forged or altered)"
    return None


def mail_from_params(message_id: uuid.UUID) -> str:
    """ESMTP parameters of the rewritten MAIL FROM."""
    return f"RET=HDRS ENVID={message_id}"


def _notify_words(params: Iterable[str]) -> list[str] | None:
    """The keywords of the (last) NOTIFY parameter, as written; None: no NOTIFY."""
    words = None
    for param in params:
        name, sep, value = param.partition("=")
        if sep and name.upper() == "NOTIFY":
            words = value.split(",")
    return words


def _is_filter_encoding(words: list[str]) -> bool:
    """Is this the command filter's NOTIFY (the three keywords, some case)?"""
    return sorted(w.upper() for w in words) == sorted(_KEYWORDS)


def _decode(words: list[str]) -> str | None:
    if _is_filter_encoding(words):
        if [w.upper() for w in words] == list(reversed(_KEYWORDS)):
            return None  # the filter's mark for "no NOTIFY given"
        asked = [w.upper() for w in words if w.isupper()]
        return ",".join(k for k in _KEYWORDS if k in asked) or "NEVER"
    upper = {w.upper() for w in words}
    if upper == {"NEVER"}:
        return "NEVER"
    return ",".join(k for k in _KEYWORDS if k in upper) or ",".join(words).upper()


def client_notify(params: Iterable[str]) -> str | None:
    """What the client asked for in NOTIFY, from a RCPT's ESMTP parameters.

    Returns None when the client gave no NOTIFY (or nothing is known, as for
    mail from sendmail without -N), "NEVER", or the keywords asked for in
    canonical order ("SUCCESS,FAILURE").  A NOTIFY that is not the command
    filter's encoding is taken as the client's own (filter not installed, or
    sendmail -N).
    """
    words = _notify_words(params)
    return None if words is None else _decode(words)


def restored_params(params: Iterable[str]) -> str | None:
    """ESMTP parameters that give a recipient back the client's own NOTIFY.

    For mail whose outcome postkeep does not track (system mail, mail passed
    uncaptured): returns the parameters to add the recipient back with (its
    ORCPT kept, NOTIFY as the client asked, or none), or None when nothing
    needs changing (the client asked for success notices itself, or the
    command filter did not touch this recipient).
    """
    params = list(params)
    words = _notify_words(params)
    if words is None or not _is_filter_encoding(words):
        return None  # no NOTIFY, or the client's own: leave it
    if words == list(_KEYWORDS):
        return None  # the client asked for all three itself
    asked = _decode(words)
    kept = [p for p in params if p.partition("=")[0].upper() != "NOTIFY"]
    if asked is not None:
        kept.append(f"NOTIFY={asked}")
    return " ".join(kept)
