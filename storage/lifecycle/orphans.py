"""Message objects that no row names: found and deleted once they are old enough.

The milter puts a message's object before it writes its rows; a milter killed
between the two, or a message given up by the commit timeout after its upload
(milter/committer.py), leaves an object no `messages` row names.  Nothing
else would ever delete it: the retention sweeper and erasure walk rows, and a
lifecycle rule reaches it only at its class's expiry (never for `keep` or
`hold`, or the layout before classes).  Such an object holds a customer's
mail that postkeep cannot show, hold, erase or account for.

`sweep_orphans` lists the message objects written in the last `window_days`
UTC days (keys carry their day: messages/<class>/<org>/<yyyy>/<mm>/<dd>/<id>,
so listing stays bounded by days, not by the bucket), keeps those younger
than `min_age` (a commit may still be under way; min_age must exceed
milter.commit_timeout_seconds by far), those whose message id has a row, and
those still in the outage spool (its drain will write the rows), and deletes
the rest, audited.  Run hourly by postkeep-storage and as `postkeep retention
orphans`; the window must cover the longest the sidecar may be down.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
import urllib3
from minio.error import MinioException

from postkeep.storage.content.packs import is_pack_key
from postkeep.storage.lifecycle.rules import S3Retention
from postkeep.storage.metadata.audit import audit
from postkeep.storage.metadata.db import BackendError

log = logging.getLogger("postkeep.storage")

DEFAULT_MIN_AGE = timedelta(hours=1)
DEFAULT_WINDOW_DAYS = 3
_CLASS_DIR = re.compile(r"^messages/(\d+d|keep|hold)/$")
_ORG_DIR = re.compile(r"^messages/(?:(?:\d+d|keep|hold)/)?[0-9a-f-]{36}/$")
_MESSAGE = re.compile(r"/\d{4}/\d{2}/\d{2}/([0-9a-f]{8}-[0-9a-f-]{27})\.eml\.zst$")
_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


@dataclass
class OrphanSweep:
    """What one sweep saw and did."""

    examined: int = 0
    orphans: list[str] = field(default_factory=list)
    deleted: int = 0
    failed: list[str] = field(default_factory=list)


def message_id_of(key: str) -> uuid.UUID | None:
    """The message id a message object's key ends in, or None for another key."""
    m = _MESSAGE.search(key)
    if m is None:
        return None
    try:
        return uuid.UUID(m.group(1))
    except ValueError:
        return None


def _list(store: S3Retention, prefix: str,
          recursive: bool) -> Iterator[tuple[str, datetime | None]]:
    try:
        for obj in store.client.list_objects(  # type: ignore[attr-defined]
                store.bucket, prefix=prefix, recursive=recursive):
            yield obj.object_name, obj.last_modified
    except _ERRORS as exc:
        raise BackendError("s3", f"list {prefix}: {exc}") from exc


def day_prefixes(store: S3Retention, days: list[datetime]) -> Iterator[str]:
    """messages/[<class>/]<org>/<yyyy>/<mm>/<dd>/ for every organisation directory and DAYS."""
    for top, _ in _list(store, "messages/", recursive=False):
        orgs = [top] if _ORG_DIR.match(top) else (
            [d for d, _ in _list(store, top, recursive=False) if _ORG_DIR.match(d)]
            if _CLASS_DIR.match(top) else [])
        for org in orgs:
            for day in days:
                yield f"{org}{day:%Y/%m/%d}/"


def sweep_orphans(conn: psycopg.Connection, store: S3Retention,
                  spooled: Callable[[uuid.UUID], bool], *, now: datetime | None = None,
                  min_age: timedelta = DEFAULT_MIN_AGE, window_days: int = DEFAULT_WINDOW_DAYS,
                  dry_run: bool = False) -> OrphanSweep:
    """Delete message objects of the last WINDOW_DAYS that no row names (see above)."""
    now = now or datetime.now(UTC)
    days = [now - timedelta(days=i) for i in range(window_days)]
    result = OrphanSweep()
    candidates: dict[uuid.UUID, str] = {}
    pack_keys: list[str] = []  # packs (storage/content/packs.py): named by their row
    for prefix in day_prefixes(store, days):
        for key, modified in _list(store, prefix, recursive=True):
            result.examined += 1
            if modified is None or modified > now - min_age:
                continue
            if is_pack_key(key):
                pack_keys.append(key)
                continue
            mid = message_id_of(key)
            if mid is None:
                continue
            candidates[mid] = key
    if candidates:
        named = {r[0] for r in conn.execute("SELECT id FROM messages WHERE id = ANY(%s)",
                                            (list(candidates),))}
        result.orphans = sorted(k for mid, k in candidates.items()
                                if mid not in named and not spooled(mid))
    if pack_keys:
        known = {r[0] for r in conn.execute(
            "SELECT object_key FROM packs WHERE object_key = ANY(%s)", (pack_keys,))}
        result.orphans = sorted(result.orphans + [k for k in pack_keys if k not in known])
    if result.orphans and not dry_run:
        result.failed = store.delete_many(result.orphans)
        result.deleted = len(result.orphans) - len(result.failed)
        audit(conn, None, "orphans_swept", result.deleted, None, None,
              {"examined": result.examined, "failed": len(result.failed),
               "keys": result.orphans[:20]})
        for key in result.orphans:
            if key not in result.failed:
                log.warning("orphan object deleted key=%s message=%s (no row named it)",
                            key, message_id_of(key))
    return result
