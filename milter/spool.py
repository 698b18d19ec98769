"""The milter's side of the outage spool: accept a message its backends cannot take.

When the group committer cannot make a message durable because MinIO or
PostgreSQL is down or too slow (`BackendError` naming `s3` or `postgres`),
and `[milter] outage_spool` is on, the service asks `OutageSpooler.store` to
write the very object and rows it tried to store into the local spool
(storage/content/spool.py: temp file, fsync, rename, fsync of the directory).  Only a
spool write that completed lets Postfix accept the message; the drain stores
it later.  The spooler refuses, and the message is tempfailed as before, when

- the spool's filesystem would pass `outage_spool_max_fill_percent` with the
  message written (a full disk must never be where accepted mail ends), or
- the write itself fails (I/O error, directory gone, disk full after all).

What cannot be spooled, by design (README "Outage spool"): a message whose
organisation cannot be resolved at all (PostgreSQL down and the sender in no
cached lookup) is tempfailed, since its object key, expiry dates and rows
depend on the organisation; so is an internal error (not an outage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import BinaryIO

from postkeep.milter import metrics
from postkeep.milter.capture import StoredContent
from postkeep.milter.decide import Reply
from postkeep.storage.content.journal import JournalWriter
from postkeep.storage.content.spool import Spool, fill_percent
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

log = logging.getLogger("postkeep.milter")

# Backends whose failure is an outage worth spooling through.
SPOOLABLE_BACKENDS = frozenset({"s3", "postgres"})


def spool_refused_reply(backend: str, why: str) -> Reply:
    """451 4.3.0 when the backend is down and the spool cannot take the message."""
    what = {"s3": "content store", "postgres": "metadata database"}.get(backend, backend)
    return _cannot_take(f"{what} ({backend}) unavailable and the outage spool", why)


def _cannot_take(what: str, why: str) -> Reply:
    """451 4.3.0: WHAT cannot take the message, WHY."""
    why = why.replace("%", " percent")  # libmilter refuses a lone '%' in a reply
    return Reply("451", "4.3.0", f"postkeep: {what} cannot take the message ({why});"
                 " try again later")


# The reason a journaled entry carries (`postkeep spool status` shows it).
JOURNAL_REASON = "journal: milter.accept_after = 'journal'"


def journal_refused_reply(why: str) -> Reply:
    """451 4.3.0 when the journal (the spool directory) cannot take the message."""
    return _cannot_take("the journal (milter.outage_spool_directory)", why)


def over_fill_level(used_percent: float, max_percent: float) -> bool:
    """True when writing would leave the spool's filesystem fuller than allowed."""
    return not used_percent <= max_percent  # NaN (unknown) counts as over


def _rewound(content: StoredContent) -> BinaryIO:
    """CONTENT's object from its first byte (the failed upload may have read some)."""
    if content.reopen is not None:
        return content.reopen()
    content.stream.seek(0)
    return content.stream


class OutageSpooler:
    """Writes messages the backends could not take into the spool (thread-safe)."""

    def __init__(self, spool: Spool, max_fill_percent: float,
                 fill: Callable[[str, int], float] | None = None,
                 journal: JournalWriter | None = None) -> None:
        self.spool = spool
        # accept_after = "journal": messages appended to segments, group-fsync'd
        # (storage/content/journal.py); outages always write entry files.
        self._journal_write = journal.append if journal is not None else spool.write
        self.max_fill_percent = max_fill_percent
        self._fill = fill or (lambda path, extra: fill_percent(path, extra))

    def store(self, message: CapturedMessage, content: StoredContent,
              exc: BackendError) -> Reply | None:
        """Spool MESSAGE after EXC; None once it is durable, else the tempfail reply.

        Callers pass only outages (EXC.backend in SPOOLABLE_BACKENDS).
        """
        why = self._write(message, content, f"{exc.backend}: {exc.reason}",
                          self.spool.write)
        if why is not None:
            metrics.SPOOL_REFUSED.inc()
            log.error("spool refused pk_id=%s queue_id=%s backend=%s reason=%r", message.id.hex,
                      message.queue_id, exc.backend, why)
            return spool_refused_reply(exc.backend, why)
        log.warning("spool write pk_id=%s queue_id=%s backend=%s reason=%r", message.id.hex,
                    message.queue_id, exc.backend, exc.reason)
        return None

    def journal(self, message: CapturedMessage, content: StoredContent) -> Reply | None:
        """`accept_after = 'journal'`: write MESSAGE into the spool whatever the
        backends do; None once it is durable, else the tempfail reply (the
        service logs the one line per message either way)."""
        why = self._write(message, content, JOURNAL_REASON, self._journal_write)
        if why is None:
            return None
        metrics.SPOOL_REFUSED.inc()
        return journal_refused_reply(why)

    def _write(self, message: CapturedMessage, content: StoredContent, reason: str,
               write: Callable[[CapturedMessage, BinaryIO, str], object]) -> str | None:
        """Write MESSAGE durably with WRITE; None once it is, else why it was not."""
        started = time.perf_counter()
        try:
            used = self._fill(str(self.spool.dir), content.compressed_size)
        except OSError as err:
            return f"spool filesystem unreadable: {err}"
        if over_fill_level(used, self.max_fill_percent):
            return (f"spool filesystem {used:.1f}% full, limit"
                    f" milter.outage_spool_max_fill_percent = {self.max_fill_percent:g}")
        try:
            write(message, _rewound(content), reason)
        except OSError as err:
            return f"spool write failed: {err}"
        metrics.SPOOL_WRITE_SECONDS.observe(time.perf_counter() - started)
        return None
