"""pymilter glue: Postfix's milter callbacks mapped onto `CaptureService`.

Thin on purpose: every callback hands plain data to the service and turns the
service's verdict into milter actions.  Callbacks the MTA need not wait for
are declared `noreply`, the ones never used are not overridden (so Postfix is
never asked), and header values arrive as raw bytes with their leading space
(`header_leading_space`), which the byte-exact capture needs.

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

from postkeep.milter.service import CaptureService, Transaction

log = logging.getLogger("postkeep.milter")


@Milter.header_leading_space
class CaptureMilter(Milter.Base):  # type: ignore[misc]
    """One instance per SMTP connection (one libmilter thread)."""

    service: CaptureService  # set on the class by the daemon before it runs

    def __init__(self) -> None:
        super().__init__()
        self.tx: Transaction | None = None
        self.client_addr: str | None = None

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> Any:
        # inet: (ip, port); inet6: (ip, port, flow, scope); mail from sendmail
        # (non_smtpd_milters) arrives with no address at all.
        if isinstance(hostaddr, tuple) and hostaddr:
            self.client_addr = str(hostaddr[0])
        return Milter.CONTINUE

    def _reset(self) -> None:
        if self.tx is not None:
            self.tx.capture.discard()
            self.tx = None

    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> Any:
        self._reset()
        # Postfix names the submitting service in {daemon_name}: "pickup" for
        # local sendmail(1) submissions, which are trusted like a local user.
        local = self.getsymval("{daemon_name}") == "pickup" or self.client_addr is None
        self.tx = self.service.begin(mailfrom, self.getsymval("{auth_authen}"),
                                     self.client_addr, local)
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
        verdict = self.service.end_of_message(tx, queue_id)
        if verdict.reply is not None:
            r = verdict.reply
            self.setreply(r.code, r.enhanced, r.text)
            return Milter.REJECT if verdict.reject else Milter.TEMPFAIL
        # Client-sent copies of our id header are removed: only ours counts.
        # Last first, so earlier indexes stay valid.
        for index in range(tx.own_headers_removed, 0, -1):
            self.chgheader(self.service.cfg.id_header, index, "")
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
