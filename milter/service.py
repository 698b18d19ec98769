"""The capture service: one message's way from milter events to a verdict.

`Transaction` is the plain state of one SMTP transaction as the adapter saw it
(envelope, client, headers of interest, the streaming `MessageCapture`).
`CaptureService.refuse_login` is asked at MAIL FROM: a SASL login that is no
registered submitter is refused there (by default).
`CaptureService.end_of_message` classifies it (system mail, customer mail,
mail of no organisation), DKIM-signs what it should, makes customer mail
durable (object + rows, the stored object being the signed message) and
returns the verdict: accept (with the headers to add) or a reply to refuse or
tempfail with.  It logs one line per message carrying both postkeep's id and
Postfix's queue id, and counts outcomes in metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

from postkeep.config import DkimConfig, MilterConfig, TagsConfig
from postkeep.envelope import (
    client_notify,
    mail_from_params,
    parse_return_path,
    restored_params,
    return_path,
    verify_return_path,
)
from postkeep.ids import uuid7
from postkeep.milter import metrics
from postkeep.milter.capture import MessageCapture
from postkeep.milter.committer import GroupCommitter
from postkeep.milter.decide import (
    Action,
    Decision,
    Reply,
    UnreadableHeader,
    address_domain,
    choose_bounce_domain,
    classify,
    header_from_address,
    inbound,
    internal_error_reply,
    refusal_reply,
    strip_brackets,
    system_mail,
    system_mix_reply,
    tempfail_reply,
    unreadable_reply,
    unregistered_login,
)
from postkeep.milter.directory import Directory
from postkeep.milter.keys import KeyRingRefresher
from postkeep.milter.linger import InFlight
from postkeep.milter.longlines import SMTP_LINE_LIMIT
from postkeep.milter.signing import (
    Network,
    Signature,
    customer_keys,
    is_trusted,
    sign_all,
)
from postkeep.milter.spool import SPOOLABLE_BACKENDS, OutageSpooler
from postkeep.milter.tags import TagError, is_tag_header, read_tags
from postkeep.signing_keys import DkimError, PrivateKey
from postkeep.storage.content.dictionaries import DictionaryCache
from postkeep.storage.content.objects import message_key
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.directory import Organisation
from postkeep.storage.metadata.dkim_keys import DkimKeyError
from postkeep.storage.metadata.inbound import ParentClues
from postkeep.storage.metadata.messages import CapturedMessage, expiry_dates
from postkeep.storage.reports import classify as kinds

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
    rcpt_params: list[tuple[str, ...]] = field(default_factory=list)  # ESMTP, per recipient
    header_from: str | None = None
    subject: str | None = None
    message_id_header: str | None = None
    own_headers_removed: int = 0  # client-sent copies of our id header
    from_count: int = 0
    from_address: str = ""  # first address of From:, parsed once at end of message
    client_addr: str | None = None  # None: Postfix knows no address for the client
    local: bool = False  # local submission, as {daemon_name} says
    # Application tags: the tag headers as sent (name, raw value), in order,
    # and, with [tags] strip, (name, index among headers of that name) of
    # each, for the adapter to delete; the tags read from them at end of message.
    tag_headers: list[tuple[str, bytes]] = field(default_factory=list)
    strip_headers: list[tuple[str, int]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    header_counts: dict[str, int] = field(default_factory=dict)  # lower-case name -> seen
    counted: bool = False  # in CaptureService.in_flight's captures until released


@dataclass(frozen=True)
class Verdict:
    """What the adapter tells Postfix: accept (adding headers) or reply."""

    reply: Reply | None
    add_headers: tuple[tuple[str, str], ...] = ()
    reject: bool = False  # reply is permanent (5xx) rather than temporary
    signatures: tuple[Signature, ...] = ()  # inserted on top, in this order
    # The rewritten envelope sender and its ESMTP parameters (outcome tracking).
    change_from: tuple[str, str] | None = None
    # Recipients to delete and add back with these ESMTP parameters: mail
    # whose outcome postkeep does not track gets the client's own NOTIFY
    # back in place of the command filter's (no success notices to senders
    # that never asked for them).
    readd_recipients: tuple[tuple[str, str], ...] = ()
    # The body to replace Postfix's with (its long lines broken as Postfix's
    # smtp client would, [milter] long_lines = "fold"); the adapter closes it.
    body: BinaryIO | None = None


def _untracked(tx: Transaction) -> tuple[tuple[str, str], ...]:
    """Recipients whose NOTIFY must go back to the client's own request."""
    out = []
    for rcpt, params in zip(tx.recipients, tx.rcpt_params, strict=False):
        restored = restored_params(params)
        if restored is not None:
            out.append((rcpt, restored))
    return tuple(out)


# Inbound mail is read this far to classify and link it (a report's copy of
# the original comes early; message_size_limit bounds the rest anyway).
INBOUND_READ_MAX = 4 << 20


def inbound_clues(tx: Transaction, key: bytes) -> tuple[str, ParentClues]:
    """What inbound mail is (classify.py) and what it names of the sent message."""
    body = tx.capture.folded_body()
    try:
        raw = tx.capture.header_block + body.read(INBOUND_READ_MAX)
    finally:
        body.close()
    msg = kinds.parse(raw)
    kind = kinds.message_type(msg, tx.envelope_from)
    paths = []
    for text in kinds.quoted_return_paths(raw):
        path = parse_return_path(text)
        if path is not None and path.expires_at is not None \
                and verify_return_path(path, key) is None:
            paths.append((path.message_id, path.expires_at))
    message_ids = kinds.references(msg)
    complained = feedback = None
    if kind in (kinds.COMPLAINT, kinds.BOUNCE):
        # A report names the sent message by the copy of it that it carries.
        orig = kinds.original(msg)
        carried = (orig.get("Message-ID") if orig is not None else None) or ""
        message_ids = ([" ".join(str(carried).split())] if carried else []) + message_ids
    if kind == kinds.COMPLAINT:
        complained, feedback = kinds.complained_recipient(msg), kinds.feedback_type(msg)
    return kind, ParentClues(tuple(paths), tuple(i for i in kinds.quoted_ids(raw) if i != tx.id),
                             tuple(message_ids), complained, feedback)


def _text(value: bytes, limit: int = METADATA_TEXT_MAX) -> str:
    """Header bytes as metadata text: unfolded, NUL-free, valid UTF-8, bounded."""
    text = value.decode("utf-8", "replace").replace("\x00", "\ufffd")
    text = " ".join(text.split())
    return text[:limit]


@dataclass(frozen=True)
class SystemSigning:
    """The platform's own key for system mail (never from the database)."""

    domains: frozenset[str]
    selector: str
    key: PrivateKey
    algorithm: str


def system_signing(cfg: DkimConfig) -> SystemSigning | None:
    """The system-mail signer from [dkim], or None if not configured."""
    if not cfg.system_domains:
        return None
    from postkeep.signing_keys import algorithm_of, load_private_key

    key = load_private_key(cfg.system_key.encode())
    return SystemSigning(frozenset(d.lower().rstrip(".") for d in cfg.system_domains),
                         cfg.system_selector, key, algorithm_of(key))


class CaptureService:
    """Shared by every milter connection of the process (thread-safe)."""

    def __init__(self, cfg: MilterConfig, committer: GroupCommitter, directory: Directory,
                 *, networks: tuple[Network, ...] = (), system: SystemSigning | None = None,
                 keyring: KeyRingRefresher | None = None,
                 dictionaries: DictionaryCache | None = None,
                 spooler: OutageSpooler | None = None, return_path_key: bytes = b"",
                 tags: TagsConfig | None = None, in_flight: InFlight | None = None) -> None:
        self.cfg = cfg
        # Captures in flight, for the group commit's adaptive linger
        # (milter/linger.py); the daemon passes the committer's.
        self.in_flight = in_flight
        self.tags = tags or TagsConfig()
        # Signs return paths (postkeep/envelope.py); configuration requires it
        # whenever cfg.bounce_domain turns outcome tracking on.
        self.return_path_key = return_path_key
        self.dictionaries = dictionaries  # None: no dictionary compression
        self.committer = committer
        self.directory = directory
        self.networks = networks
        self.system = system
        self.keyring = keyring  # None: customer signing is off (no master key)
        self.spooler = spooler  # None: outage spool off, backend failures tempfail

    def refuse_login(self, envelope_from: str, auth_user: str | None,
                     client_addr: str | None) -> Reply | None:
        """At MAIL FROM: the 550 for a SASL login that is no registered submitter.

        Only with [milter] unknown_login = "reject"; None for anything else,
        including a lookup that fails (end of message decides that one, with
        the outage rules).  Refusing here, the first moment the milter sees the
        login, spares the client sending a message that would be refused anyway.
        """
        if not auth_user or self.cfg.unknown_login != "reject":
            return None
        try:
            if self.directory.by_submitter(auth_user) is not None:
                return None
        except BackendError:
            return None
        decision = unregistered_login(auth_user, address_domain(envelope_from), "reject")
        metrics.MESSAGES.labels("refused").inc()
        metrics.UNKNOWN_LOGINS.labels("refused").inc()
        log.info("refused at MAIL FROM client=%s from=<%s> reason=%r", client_addr or "-",
                 strip_brackets(envelope_from), decision.reason)
        return refusal_reply(decision)

    def begin(self, envelope_from: str, auth_user: str | None, client_addr: str | None = None,
              local: bool = False) -> Transaction:
        """A new transaction at MAIL FROM; its id goes in the id header."""
        tid = uuid7()
        capture = MessageCapture(level=self.cfg.zstd_level, spill_bytes=self.cfg.spill_bytes,
                                 spool_dir=self.cfg.spool_directory,
                                 dkim_body_hash=self.keyring is not None or self.system is not None,
                                 fold_lines=self.cfg.long_lines == "fold")
        capture.add_own_header(self.cfg.id_header, str(tid))
        tx = Transaction(tid, datetime.now(UTC), strip_brackets(envelope_from),
                         auth_user or None, capture, client_addr=client_addr, local=local)
        if self.in_flight is not None:
            self.in_flight.capture_started()
            tx.counted = True
        return tx

    def release(self, tx: Transaction) -> None:
        """TX is over (end of message done, aborted or its connection closed):
        it no longer counts as a capture in flight.  Idempotent."""
        if tx.counted and self.in_flight is not None:
            tx.counted = False
            self.in_flight.capture_ended()

    def header(self, tx: Transaction, name: str, value: bytes) -> None:
        """Record a header field; note the ones kept as metadata."""
        lname = name.lower()
        if lname == self.cfg.id_header.lower():
            tx.own_headers_removed += 1  # the adapter deletes it; not stored
            return
        # Postfix's chgheader counts headers of one name, whatever their case.
        index = tx.header_counts[lname] = tx.header_counts.get(lname, 0) + 1
        if is_tag_header(self.tags, name):
            tx.tag_headers.append((name, value))
            if self.tags.strip:
                # Deleted by the adapter: neither signed nor stored, so the
                # archive holds what was signed and delivered.
                tx.strip_headers.append((name, index))
                return
        tx.capture.add_header(name, value)
        if lname == "from":
            tx.from_count += 1
            if tx.header_from is None:
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
            log.exception("internal error pk_id=%s queue_id=%s", tx.id.hex, queue_id)
            metrics.MESSAGES.labels("tempfailed").inc()
            verdict = Verdict(internal_error_reply())
        finally:
            tx.capture.discard()
        metrics.EOM_SECONDS.observe(time.perf_counter() - started)
        return verdict

    def _finish(self, tx: Transaction, queue_id: str) -> Verdict:
        if tx.recipients and all(parse_return_path(r) for r in tx.recipients):
            # A remote server's late bounce to one of our return paths: not
            # customer mail; postkeep-storage records it (transport_maps).
            metrics.MESSAGES.labels("report").inc()
            log.info("report for postkeep-storage queue_id=%s from=<%s> to=<%s>", queue_id,
                     tx.envelope_from, ">,<".join(tx.recipients))
            return Verdict(None)
        if self.cfg.long_lines == "reject":
            refused = self._long_lines(tx, queue_id)
            if refused is not None:
                return refused
        if tx.tag_headers:
            try:
                tx.tags = read_tags(self.tags, tx.tag_headers)
            except TagError as exc:
                metrics.MESSAGES.labels("refused").inc()
                log.info("refused pk_id=%s queue_id=%s from=<%s> reason=%r", tx.id.hex,
                         queue_id, tx.envelope_from, str(exc))
                return Verdict(exc.reply(), reject=True)
        # The client itself: a trusted network or local submission.  A login
        # vouches for its client only as its organisation's (Decision.via_login).
        trusted = is_trusted(tx.client_addr, tx.local, self.networks)
        try:
            tx.from_address = header_from_address(tx.header_from)
        except UnreadableHeader as exc:
            return self._unreadable(tx, queue_id, exc)
        from_domain = address_domain(tx.from_address)
        login = tx.auth_user
        try:
            unknown = login is not None and self.directory.by_submitter(login) is None
        except BackendError as exc:
            return self._tempfail(tx, queue_id, exc)
        if unknown and login is not None:
            # Before anything else, system mail included: a login that is no
            # registered submitter is refused or passed, never attributed or signed.
            decision = unregistered_login(login, address_domain(tx.envelope_from),
                                          self.cfg.unknown_login)
            metrics.UNKNOWN_LOGINS.labels(
                "refused" if decision.action is Action.REJECT else "passed").inc()
            return self._no_organisation(tx, queue_id, decision)
        if self.system is not None:
            envelope_domain = address_domain(tx.envelope_from)
            lane = system_mail(trusted=trusted, login=login, envelope_domain=envelope_domain,
                               from_domain=from_domain, system_domains=self.system.domains)
            if lane == "system":
                return self._system_mail(tx, queue_id, from_domain)
            if lane == "mixed":
                metrics.MESSAGES.labels("refused").inc()
                reply = system_mix_reply(envelope_domain, from_domain)
                log.info("refused pk_id=%s queue_id=%s from=<%s> reason=%r", tx.id.hex,
                         queue_id, tx.envelope_from, reply.text)
                return Verdict(reply, reject=True)
        try:
            incoming = inbound(auth_user=login, trusted=trusted, recipients=tx.recipients,
                               by_inbound_domain=self.directory.by_inbound_domain)
        except BackendError as exc:
            return self._tempfail(tx, queue_id, exc)
        if incoming is not None:
            return self._capture(tx, queue_id, incoming, [], inbound_clues(
                tx, self.return_path_key))
        try:
            decision = classify(
                auth_user=tx.auth_user,
                envelope_from=tx.envelope_from,
                header_from=tx.header_from,
                by_submitter=self.directory.by_submitter,
                by_domain=self.directory.by_domain,
                unknown_sender=self.cfg.unknown_sender,
                unknown_login=self.cfg.unknown_login,
            )
        except BackendError as exc:
            return self._tempfail(tx, queue_id, exc)
        if decision.action is not Action.CAPTURE:
            return self._no_organisation(tx, queue_id, decision)
        signed = self._sign_customer(tx, queue_id, decision, trusted or decision.via_login,
                                     from_domain)
        if isinstance(signed, Verdict):
            return signed
        return self._capture(tx, queue_id, decision, signed)

    def _no_organisation(self, tx: Transaction, queue_id: str, decision: Decision) -> Verdict:
        """Mail no organisation sends: refused (5xx) or passed uncaptured and unsigned."""
        if decision.action is Action.REJECT:
            metrics.MESSAGES.labels("refused").inc()
            log.info("refused pk_id=%s queue_id=%s from=<%s> reason=%r", tx.id.hex, queue_id,
                     tx.envelope_from, decision.reason)
            return Verdict(refusal_reply(decision), reject=True)
        metrics.MESSAGES.labels("passed").inc()
        log.info("passed uncaptured queue_id=%s from=<%s> reason=%r", queue_id,
                 tx.envelope_from, decision.reason)
        return Verdict(None, readd_recipients=_untracked(tx))

    def _long_lines(self, tx: Transaction, queue_id: str) -> Verdict | None:
        """[milter] long_lines = "reject": 550 5.6.0 for a line over 998 octets."""
        where, longest = "body", tx.capture.longest_body_line
        if tx.capture.longest_header_line > longest:
            where, longest = "header", tx.capture.longest_header_line
        if longest <= SMTP_LINE_LIMIT:
            return None
        reason = (f"a {where} line of {longest} octets is longer than the {SMTP_LINE_LIMIT}"
                  " allowed (RFC 5322 2.1.1); relaying would break it")
        metrics.MESSAGES.labels("refused").inc()
        log.info("refused id=%s queue_id=%s from=<%s> reason=%r", tx.id, queue_id,
                 tx.envelope_from, reason)
        return Verdict(Reply("550", "5.6.0", f"postkeep: {reason}"), reject=True)

    @staticmethod
    def _replacement_body(tx: Transaction) -> BinaryIO | None:
        """The folded body when folding changed it, else None (nothing to replace)."""
        return tx.capture.folded_body() if tx.capture.lines_broken else None

    def _system_mail(self, tx: Transaction, queue_id: str, from_domain: str) -> Verdict:
        """Sign with the platform key; store nothing; one log line."""
        system = self.system
        assert system is not None
        try:
            sigs = self._sign(tx, [(from_domain or address_domain(tx.envelope_from),
                                    system.selector, system.algorithm, system.key)])
        except DkimError as exc:
            return self._unsignable(tx, queue_id, exc)
        metrics.MESSAGES.labels("system").inc()
        log.info("system mail queue_id=%s message_id=%s from=<%s> nrcpt=%d signed=%s",
                 queue_id, tx.message_id_header or "-", tx.envelope_from, len(tx.recipients),
                 system.selector)
        return Verdict(None, signatures=tuple(sigs), readd_recipients=_untracked(tx),
                       body=self._replacement_body(tx))

    def _sign(self, tx: Transaction, keys: list[tuple[str, str, str, PrivateKey]]
              ) -> list[Signature]:
        started = time.perf_counter()
        tx.capture.end_body()  # the body hash covers the whole (folded) body
        hasher = tx.capture.body_hasher
        assert hasher is not None  # made whenever a key ring or system key exists
        sigs = sign_all(tx.capture.header_block, hasher.digest(), keys,
                        int(time.time()))
        metrics.DKIM_SECONDS.observe(time.perf_counter() - started)
        for sig in sigs:
            metrics.DKIM_SIGNATURES.labels(sig.algorithm).inc()
        return sigs

    def _unreadable(self, tx: Transaction, queue_id: str, exc: UnreadableHeader) -> Verdict:
        metrics.MESSAGES.labels("refused").inc()
        log.info("refused pk_id=%s queue_id=%s from=<%s> reason=%r", tx.id.hex, queue_id,
                 tx.envelope_from, str(exc))
        return Verdict(unreadable_reply(exc), reject=True)

    def _unsignable(self, tx: Transaction, queue_id: str, exc: DkimError) -> Verdict:
        metrics.DKIM_FAILURES.labels("from_header").inc()
        metrics.MESSAGES.labels("refused").inc()
        log.info("refused pk_id=%s queue_id=%s from=<%s> reason=%r", tx.id.hex, queue_id,
                 tx.envelope_from, str(exc))
        return Verdict(Reply("550", "5.6.0", f"postkeep: {exc}"), reject=True)

    def _sign_customer(self, tx: Transaction, queue_id: str, decision: Decision,
                       trusted: bool, from_domain: str) -> list[Signature] | Verdict:
        """Signatures for customer mail, or the verdict that refuses it.

        TRUSTED: the client is on a trusted network, local, or logged in as
        one of this organisation's submitters.
        """
        org = decision.org
        assert org is not None
        if self.keyring is None:
            return []
        if not trusted:
            metrics.DKIM_FAILURES.labels("untrusted_client").inc()
            log.info("not signed pk_id=%s queue_id=%s reason='client %s neither a registered"
                     " submitter nor on a trusted network'", tx.id.hex, queue_id,
                     tx.client_addr or "without address")
            return []
        if tx.from_count != 1:
            return self._unsignable(tx, queue_id, DkimError(
                f"the message has {tx.from_count} From: headers; exactly one is required"))
        try:
            owner = self.directory.by_domain(from_domain) if from_domain else None
        except BackendError as exc:
            return self._tempfail(tx, queue_id, exc)
        if owner is None or owner.id != org.id:
            return self._foreign_from(tx, queue_id, org, from_domain)
        reason = ""
        keys = []
        try:
            ring = self.keyring() or self.keyring.reload_now()
            if ring is None:
                reason = "DKIM keys not loaded yet"
            else:
                keys = ring.signing_keys(from_domain, datetime.now(UTC))
                if not keys:  # perhaps made a moment ago: look once more
                    ring = self.keyring.reload_for(from_domain) or ring
                    keys = ring.signing_keys(from_domain, datetime.now(UTC))
                if not keys:
                    reason = f"no active DKIM key for {from_domain}"
        except BackendError as exc:
            return self._tempfail(tx, queue_id, exc)
        except DkimKeyError as exc:
            reason = f"DKIM key for {from_domain} unusable: {exc}"
        if reason:
            # The domain is the organisation's and will have a key: worth a retry.
            metrics.DKIM_FAILURES.labels("no_key").inc()
            if org.dkim_missing_key == "unsigned":
                log.info("not signed pk_id=%s queue_id=%s reason=%r", tx.id.hex, queue_id, reason)
                return []
            metrics.MESSAGES.labels("tempfailed").inc()
            log.warning("tempfailed pk_id=%s queue_id=%s reason=%r", tx.id.hex, queue_id, reason)
            return Verdict(Reply("451", "4.7.5", f"postkeep: {reason}; try again later"))
        try:
            return self._sign(tx, customer_keys(keys))
        except DkimError as exc:
            return self._unsignable(tx, queue_id, exc)

    def _foreign_from(self, tx: Transaction, queue_id: str, org: Organisation,
                      from_domain: str) -> list[Signature] | Verdict:
        """From: names a domain of another organisation or of none: never signed.

        A retry would change nothing, so it is refused for good (550 5.7.1),
        unless the organisation chose to send what it cannot sign unsigned
        (`postkeep dkim missing-key ORG unsigned`).
        """
        metrics.DKIM_FAILURES.labels("foreign_from").inc()
        what = f"From: domain {from_domain}" if from_domain else "From: address without a domain"
        reason = f"{what} is not one of {org.name}'s domains"
        if org.dkim_missing_key == "unsigned":
            log.info("not signed pk_id=%s queue_id=%s reason=%r", tx.id.hex, queue_id, reason)
            return []
        metrics.MESSAGES.labels("refused").inc()
        log.info("refused pk_id=%s queue_id=%s from=<%s> reason=%r", tx.id.hex, queue_id,
                 tx.envelope_from, reason)
        return Verdict(Reply("550", "5.7.1", f"postkeep: {reason}"), reject=True)

    def _capture(self, tx: Transaction, queue_id: str, decision: Decision,
                 signatures: list[Signature],
                 incoming: tuple[str, ParentClues] | None = None) -> Verdict:
        """Make the message durable; INCOMING: inbound mail, its type and clues
        (no return path of ours, never signed: it is not the organisation's)."""
        org = decision.org
        assert org is not None
        dictionary = None
        if self.dictionaries is not None and self.cfg.dictionary_max_bytes:
            dictionary = self.dictionaries.get(org.id)
        prefix = b"".join(s.line for s in signatures)
        # accept_after = 'journal': a journal entry is stored by the drain as
        # it is, so it uses no organisation dictionary (kept from sweeping and
        # resolved through PostgreSQL).  Mail with parts cut out takes the
        # group commit as under 'store': its parts need S3 and PostgreSQL
        # anyway, and storing each attachment once is what makes it cheap.
        journal = self.cfg.accept_after == "journal" and self.spooler is not None
        content = tx.capture.finish(prefix=prefix,
                                    split_threshold=self.cfg.part_split_bytes,
                                    dictionary=None if journal else dictionary,
                                    dictionary_max=self.cfg.dictionary_max_bytes)
        journal = journal and not content.parts
        # Taken before the commit: the upload consumes and closes the body frame.
        body = self._replacement_body(tx)
        content_exp, metadata_exp = expiry_dates(tx.created, org.content_days, org.metadata_days)
        rpath = None
        if self.cfg.bounce_domain and incoming is None:  # outcome tracking on
            bounce = choose_bounce_domain(org, address_domain(tx.from_address),
                                          decision.domain, self.cfg.bounce_domain)
            rpath = return_path(tx.id, metadata_exp, bounce, self.return_path_key)
        message = CapturedMessage(
            id=tx.id,
            org_id=org.id,
            domain=decision.domain,
            queue_id=queue_id,
            envelope_from=tx.envelope_from,
            recipients=tuple(tx.recipients),
            size=content.size,
            sha256=content.sha256,
            object_key=message_key(str(org.id), str(tx.id), tx.created,
                                   content_days=org.content_days, held=org.legal_hold),
            compressed_size=content.compressed_size,
            created_at=tx.created,
            content_expires_at=content_exp,
            metadata_expires_at=metadata_exp,
            message_id_header=tx.message_id_header,
            header_from=tx.from_address or tx.header_from,
            subject=tx.subject,
            return_path=rpath,
            notify=tuple(client_notify(p) for p in tx.rcpt_params),
            tags=tx.tags,
        )
        if incoming is not None:
            message = dataclasses.replace(message, direction="inbound",
                                          message_type=incoming[0], clues=incoming[1])
        outcome = "captured"
        try:
            if journal:
                assert self.spooler is not None
                refused = self.spooler.journal(message, content)
                if refused is not None:
                    if body is not None:
                        body.close()
                    return self._tempfail(tx, queue_id, BackendError("journal", refused.text),
                                          refused)
                outcome = "journaled"  # accepted: fsync'd on local disk, drained into packs
            else:
                self.committer.commit(message, content)
        except BackendError as exc:
            if self.spooler is None or exc.backend not in SPOOLABLE_BACKENDS:
                if body is not None:
                    body.close()
                return self._tempfail(tx, queue_id, exc)
            spooled, spooled_message = content, message
            if content.parts or content.dictionary is not None:
                # A container needs PostgreSQL (parts, dictionary) to restore:
                # the spool keeps the whole message as one plain object.
                spooled = tx.capture.plain(prefix, content.sha256)
                spooled_message = dataclasses.replace(
                    message, compressed_size=spooled.compressed_size)
            refused = self.spooler.store(spooled_message, spooled, exc)
            if refused is not None:
                if body is not None:
                    body.close()
                return self._tempfail(tx, queue_id, exc, refused)
            metrics.BACKEND_ERRORS.labels(exc.backend).inc()
            outcome = "spooled"  # accepted: durable on local disk, drained later
        finally:
            content.close()
        metrics.MESSAGES.labels(outcome).inc()
        metrics.RECEIVED_BYTES.inc(content.size)
        if outcome == "captured":
            metrics.STORED_BYTES.inc(content.compressed_size)
            if content.dictionary is not None:
                metrics.DICTIONARY_MESSAGES.inc()
        log.info(
            "%s pk_id=%s queue_id=%s org=%s from=<%s> nrcpt=%d size=%d stored=%d key=%s"
            " parts=%d dict=%s direction=%s type=%s",
            outcome, tx.id.hex, queue_id, org.name, tx.envelope_from, len(tx.recipients),
            content.size, content.compressed_size, message.object_key, len(content.parts),
            content.dictionary.version if content.dictionary else "-",
            message.direction, message.message_type,
        )
        if rpath is None:
            return Verdict(None, add_headers=((self.cfg.id_header, str(tx.id)),),
                           signatures=tuple(signatures), readd_recipients=_untracked(tx),
                           body=body)
        return Verdict(None, add_headers=((self.cfg.id_header, str(tx.id)),),
                       signatures=tuple(signatures),
                       change_from=(rpath, mail_from_params(tx.id)), body=body)

    def _tempfail(self, tx: Transaction, queue_id: str, exc: BackendError,
                  reply: Reply | None = None) -> Verdict:
        metrics.BACKEND_ERRORS.labels(exc.backend).inc()
        metrics.MESSAGES.labels("tempfailed").inc()
        log.warning("tempfailed pk_id=%s queue_id=%s from=<%s> backend=%s reason=%r", tx.id.hex,
                    queue_id, tx.envelope_from, exc.backend, exc.reason)
        return Verdict(reply or tempfail_reply(exc.backend))
