"""pymilter glue: Postfix's milter callbacks mapped onto `CaptureService`.

Thin on purpose: every callback hands plain data to the service and turns the
service's verdict into milter actions.  Callbacks the MTA need not wait for
are declared `noreply`, the ones never used are not overridden (so Postfix is
never asked), and header values arrive as raw bytes with their leading space
(`header_leading_space`), which the byte-exact capture needs.  MAIL FROM is
answered: it is where a SASL login that is no registered submitter is refused.

There is no connect callback, on purpose: for a client whose address Postfix
does not know (XCLIENT ADDR=[UNAVAILABLE], a failed peer lookup) Postfix sends
SMFIC_CONNECT as an IPv4 connection with the address "unknown", which
libmilter cannot parse, so it drops the connection and Postfix tempfails
every such message.  The client address comes from the {client_addr} macro
instead (milter_connect_macros, sent even though the event itself is not):
"unknown" or absent means no address, and such a client is untrusted.

Every PostgreSQL and S3 call runs on threads Python created (the group
committer's workers, the directory's lookup pool), never on libmilter's own
threads.  Debian's libmilter hands one connection's
callbacks to whichever worker thread is free, while pymilter binds the
connection to one Python thread state; C extensions that re-enter Python from
a callback (psycopg's notice receiver takes the GIL through PyGILState) would
then find another connection's thread state.
"""

from __future__ import annotations

import logging
from typing import Any

import Milter

from postkeep.milter.decide import Reply
from postkeep.milter.service import CaptureService, Transaction

log = logging.getLogger("postkeep.milter")


# Postfix takes a replaced body in pieces of this size (SMFIR_REPLBODY).
BODY_PIECE = 65535


def reply_text(text: str) -> str:
    """TEXT for setreply: libmilter reads it as a format, so every % is doubled.

    pymilter raises ValueError on a single % (a login such as mal%lory named in
    a refusal), which became a 451 from an untrapped exception.
    """
    return text.replace("%", "%%")


def client_address(macro: str | None) -> str | None:
    """The client's address from Postfix's {client_addr}; None when it has none."""
    if not macro or macro == "unknown":
        return None
    return macro


@Milter.header_leading_space
class CaptureMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (one libmilter thread)."""

    service: CaptureService  # set on the class by the daemon before it runs

    def __init__(self) -> None:
        super().__init__()
        self.tx: Transaction | None = None

    def _reset(self) -> None:
        if self.tx is not None:
            self.service.release(self.tx)
            self.tx.capture.discard()
            self.tx = None

    def _setreply(self, reply: Reply) -> None:
        self.setreply(reply.code, reply.enhanced, reply_text(reply.text))

    def envfrom(self, mailfrom: str, *params: str) -> Any:
        self._reset()
        client_addr = client_address(self.getsymval("{client_addr}"))
        auth_user = self.getsymval("{auth_authen}") or None
        refusal = self.service.refuse_login(mailfrom, auth_user, client_addr)
        if refusal is not None:
            self._setreply(refusal)
            return Milter.REJECT
        # {daemon_name} "pickup" marks local submission where the operator
        # names it so (milter_macro_daemon_name); by default Postfix presents
        # sendmail(1) mail as from localhost/127.0.0.1, a trusted network.
        local = self.getsymval("{daemon_name}") == "pickup"
        self.tx = self.service.begin(mailfrom, auth_user, client_addr, local)
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, to: str, *params: str) -> Any:
        if self.tx is not None:
            self.tx.recipients.append(to.strip().removeprefix("<").removesuffix(">"))
            self.tx.rcpt_params.append(tuple(str(p) for p in params))
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name: str | bytes, value: bytes) -> Any:
        if self.tx is not None:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "surrogateescape")
            self.service.header(self.tx, name, value)
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self) -> Any:
        if self.tx is not None:
            self.tx.capture.end_of_headers()
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> Any:
        if self.tx is not None:
            self.tx.capture.add_body(chunk)
        return Milter.CONTINUE

    def eom(self) -> Any:
        tx, self.tx = self.tx, None
        if tx is None:  # MAIL FROM never reached us: nothing to capture
            return Milter.CONTINUE
        queue_id = self.getsymval("i") or "-"
        try:
            verdict = self.service.end_of_message(tx, queue_id)
        finally:
            self.service.release(tx)  # committed or not: no longer in flight
        if verdict.reply is not None:
            self._setreply(verdict.reply)
            return Milter.REJECT if verdict.reject else Milter.TEMPFAIL
        if verdict.body is not None:
            # Long lines broken as Postfix's smtp client would break them: what
            # was signed and stored.  pymilter asks Postfix for every action it
            # offers (no set_flags), SMFIF_CHGBODY included.
            with verdict.body as body:
                while piece := body.read(BODY_PIECE):
                    self.replacebody(piece)
        # Client-sent copies of our id header are removed: only ours counts.
        # Last first, so earlier indexes stay valid.
        for index in range(tx.own_headers_removed, 0, -1):
            self.chgheader(self.service.cfg.id_header, index, "")
        # Tag headers with [tags] strip: never signed, stored or delivered.
        # Indexes count per name, so the last of each name goes first.
        for name, index in reversed(tx.strip_headers):
            self.chgheader(name, index, "")
        # With leading space negotiated, Postfix writes our value verbatim after
        # the colon; the capture stored it as "Name: value", so match that.
        lead = " " if self._protocol & Milter.P_HDR_LEADSPC else ""
        for name, value in verdict.add_headers:
            self.addheader(name, lead + value)
        # DKIM signatures go on top, just below Postfix's own Received: (index
        # 0 would be above it); the last inserted ends up first.
        for sig in reversed(verdict.signatures):
            self.addheader("DKIM-Signature", lead + sig.milter_value, 1)
        # Outcome tracking: the return path carrying our id, RET and ENVID.
        if verdict.change_from is not None:
            self.chgfrom(*verdict.change_from)
        for rcpt, params in verdict.readd_recipients:
            self.delrcpt(f"<{rcpt}>")
            self.addrcpt(f"<{rcpt}>", params or None)
        return Milter.CONTINUE

    def abort(self) -> Any:
        self._reset()
        return Milter.CONTINUE

    def close(self) -> Any:
        self._reset()
        return Milter.CONTINUE
