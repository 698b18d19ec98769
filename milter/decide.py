"""What to do with a message: pure decisions, no I/O.

`classify` decides from the envelope (SASL login, senders) and a directory
lookup function whether a message is captured for an organisation, refused,
or passed through uncaptured.  A SASL login decides alone: a registered
submitter's organisation, else `unknown_login` (refused, or passed uncaptured),
never the organisation of the sender domain the client claims.
`tempfail_reply` and friends turn outcomes into the SMTP replies Postfix
gives the client, each naming its cause with an enhanced status code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses
from enum import Enum

from postkeep.storage.metadata.directory import Organisation


class Action(Enum):
    CAPTURE = "capture"
    REJECT = "reject"
    PASS = "pass"


@dataclass(frozen=True)
class Decision:
    action: Action
    org: Organisation | None = None
    domain: str = ""
    reason: str = ""
    # The organisation came from the client's SASL login (a registered
    # submitter): the client is vouched for, wherever it connects from.
    via_login: bool = False


@dataclass(frozen=True)
class Reply:
    """An SMTP reply for Postfix to give the client."""

    code: str
    enhanced: str
    text: str


_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}\.)*[a-z0-9-]{1,63}$")


def strip_brackets(address: str) -> str:
    """`<a@b>` → `a@b`; Postfix passes envelope addresses in angle brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def address_domain(address: str) -> str:
    """The lower-cased domain of an address, or '' if it has none usable."""
    address = strip_brackets(address)
    _, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not _DOMAIN.match(domain):
        return ""
    return domain


class UnreadableHeader(ValueError):
    """A header the milter needs that cannot be parsed at all."""


def header_from_address(value: str | None) -> str:
    """The first address of a From: header value, or ''.

    UnreadableHeader if the parser gives up on the whole value: the email
    package recurses once per nested comment or group, so a From: nesting a
    few hundred of them (hostile; 998 characters allow it) exceeds Python's
    recursion limit.
    """
    if not value:
        return ""
    try:
        pairs = getaddresses([value])
    except (ValueError, IndexError):  # the email package chokes on some garbage
        return ""
    except RecursionError:
        raise UnreadableHeader("the From: header nests comments or groups too deeply"
                               " to be read") from None
    for _, addr in pairs:
        if "@" in addr:
            return addr
    return ""


def shown_login(login: str) -> str:
    """A SASL login as it may appear in a reply or log line (printable ASCII, bounded)."""
    text = "".join(c if " " < c < "\x7f" else "?" for c in login)
    return text[:64] + ("..." if len(text) > 64 else "")


def unregistered_login(login: str, domain: str, mode: str) -> Decision:
    """LOGIN is no registered submitter: refused, or passed uncaptured if MODE is 'pass'."""
    reason = f"SASL login {shown_login(login)} is not a registered submitter"
    action = Action.PASS if mode == "pass" else Action.REJECT
    return Decision(action, None, domain, reason)


def system_mail(*, trusted: bool, login: str | None, envelope_domain: str, from_domain: str,
                system_domains: frozenset[str]) -> str:
    """Is this the platform's own mail: 'system', 'customer' or 'mixed' (refuse).

    Chosen by the envelope sender's domain, as Postfix's system lane
    (sender_dependent_default_transport_maps) and postkeep-policyd choose it,
    so the three always agree: system mail skips storage and limits and takes
    the priority lane, and only the platform may have that.  Only from trusted
    networks, never with a SASL login (a submitter is a customer), and the
    From: domain must be a system domain too (the platform key signs it).  A
    null envelope sender (<>) is decided by the From: domain alone.  A mix of
    a system domain and anything else is refused rather than guessed.
    """
    env_system = envelope_domain in system_domains
    from_system = from_domain in system_domains
    if not (env_system or (from_system and trusted)):
        return "customer"
    if not trusted and login is None:
        return "customer"  # an outside client: attributed (or refused) like any sender
    if login is not None:
        return "mixed" if env_system else "customer"
    if env_system and (from_system or not from_domain):
        return "system"
    if from_system and not envelope_domain:
        return "system"
    return "mixed"


def system_mix_reply(envelope_domain: str, from_domain: str) -> Reply:
    """550 5.7.1 for mail that mixes a system domain with a customer's or a login."""
    return Reply("550", "5.7.1",
                 f"postkeep: envelope sender domain {envelope_domain or '<>'} and From: domain"
                 f" {from_domain or '(none)'} mix a system domain with another or with a"
                 " SASL login; system mail needs both in [dkim] system_domains and no login")


def classify(
    *,
    auth_user: str | None,
    envelope_from: str,
    header_from: str | None,
    by_submitter: Callable[[str], Organisation | None],
    by_domain: Callable[[str], Organisation | None],
    unknown_sender: str,
    unknown_login: str = "reject",
) -> Decision:
    """Resolve the organisation: the SASL login's, else the envelope sender's domain's.

    A login that is no registered submitter is refused or passed uncaptured
    ([milter].unknown_login); the domain it claims is never looked at.
    Without a login, a null envelope sender (<>) falls back to the From:
    header's domain, and mail from a domain of no organisation is refused or
    passed uncaptured, as [milter].unknown_sender says.  Lookups may raise
    BackendError.
    """
    domain = address_domain(envelope_from) or address_domain(
        header_from_address(header_from)
    )
    if auth_user:
        org = by_submitter(auth_user)
        if org is None:
            return unregistered_login(auth_user, domain, unknown_login)
        return Decision(Action.CAPTURE, org, domain or "-", via_login=True)
    if domain:
        org = by_domain(domain)
        if org is not None:
            return Decision(Action.CAPTURE, org, domain)
    shown = domain or strip_brackets(envelope_from) or "<>"
    reason = f"sender domain {shown} belongs to no organisation"
    if unknown_sender == "pass":
        return Decision(Action.PASS, None, domain, reason)
    return Decision(Action.REJECT, None, domain, reason)


def choose_bounce_domain(org: Organisation, from_domain: str, envelope_domain: str,
                         default: str) -> str:
    """Where the message's bounces go: the From: domain's own bounce domain,
    else the envelope sender domain's, else the platform's DEFAULT."""
    own = dict(org.bounce_domains)
    return own.get(from_domain) or own.get(envelope_domain) or default


def refusal_reply(decision: Decision) -> Reply:
    """550 5.7.1 for mail that no organisation sends."""
    return Reply("550", "5.7.1", f"postkeep: {decision.reason}")


def tempfail_reply(backend: str) -> Reply:
    """451 4.3.0 when a backend cannot make the message durable right now."""
    what = {"s3": "content store", "postgres": "metadata database"}.get(backend, backend)
    return Reply(
        "451", "4.3.0", f"postkeep: {what} ({backend}) unavailable, message not accepted; "
        "try again later",
    )


def unreadable_reply(exc: UnreadableHeader) -> Reply:
    """550 5.6.0 for a message whose headers cannot be read: sending it again cannot help."""
    return Reply("550", "5.6.0", f"postkeep: {exc}")


def internal_error_reply() -> Reply:
    return Reply("451", "4.3.0", "postkeep: internal error, message not accepted; try again later")


def inbound(
    *,
    auth_user: str | None,
    trusted: bool,
    recipients: list[str],
    by_inbound_domain: Callable[[str], Organisation | None],
) -> Decision | None:
    """Is this mail for an organisation arriving from outside?  Its decision, or None.

    Inbound: no SASL login (not a submission), a client off the trusted
    networks and not local, and every recipient at a domain that takes
    inbound mail (`postkeep domain set-inbound`), all of ONE organisation.
    Anything else (a submission, a client of ours, mail to several
    organisations or to the wider world) is classified as outgoing mail.
    The decision's domain is the first recipient's.  Lookups may raise
    BackendError.
    """
    if auth_user or trusted or not recipients:
        return None
    org: Organisation | None = None
    first = ""
    for rcpt in recipients:
        domain = address_domain(rcpt)
        owner = by_inbound_domain(domain) if domain else None
        if owner is None or (org is not None and owner.id != org.id):
            return None
        org, first = owner, first or domain
    return Decision(Action.CAPTURE, org, first)
