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
from postkeep.storage.content.spool import Spool, fill_percent
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import CapturedMessage

log = logging.getLogger("postkeep.milter")

# Backends whose failure is an outage worth spooling through.
SPOOLABLE_BACKENDS = frozenset({"s3", "postgres"})


def spool_refused_reply(backend: str, why: str) -> Reply:
    """451 4.3.0 when the backend is down and the spool cannot take the message."""
    what = {"s3": "content store", "postgres": "metadata database"}.get(backend, backend)
    why = why.replace("%", " percent")  # libmilter refuses a lone '%' in a reply
    return Reply("451", "4.3.0", f"postkeep: {what} ({backend}) unavailable and the outage "
                 f"spool cannot take the message ({why}); try again later")


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
                 fill: Callable[[str, int], float] | None = None) -> None:
        self.spool = spool
        self.max_fill_percent = max_fill_percent
        self._fill = fill or (lambda path, extra: fill_percent(path, extra))

    def store(self, message: CapturedMessage, content: StoredContent,
              exc: BackendError) -> Reply | None:
        """Spool MESSAGE after EXC; None once it is durable, else the tempfail reply.

        Callers pass only outages (EXC.backend in SPOOLABLE_BACKENDS).
        """
        started = time.perf_counter()
        try:
            used = self._fill(str(self.spool.dir), content.compressed_size)
        except OSError as err:
            return self._refused(message, exc, f"spool filesystem unreadable: {err}")
        if over_fill_level(used, self.max_fill_percent):
            return self._refused(message, exc, f"spool filesystem {used:.1f}% full, limit "
                                 f"milter.outage_spool_max_fill_percent = "
                                 f"{self.max_fill_percent:g}")
        try:
            path = self.spool.write(message, _rewound(content), f"{exc.backend}: {exc.reason}")
        except OSError as err:
            return self._refused(message, exc, f"spool write failed: {err}")
        metrics.SPOOL_WRITE_SECONDS.observe(time.perf_counter() - started)
        log.warning("spool write pk_id=%s queue_id=%s backend=%s reason=%r file=%s", message.id.hex,
                    message.queue_id, exc.backend, exc.reason, path)
        return None

    def _refused(self, message: CapturedMessage, exc: BackendError, why: str) -> Reply:
        metrics.SPOOL_REFUSED.inc()
        log.error("spool refused pk_id=%s queue_id=%s backend=%s reason=%r", message.id.hex,
                  message.queue_id, exc.backend, why)
        return spool_refused_reply(exc.backend, why)
