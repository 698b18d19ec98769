"""Writing packs: messages sealed under fresh data keys and put, one PUT per pack.

What the milter's group commit (milter/committer.py) and the outage spool's
drain (storage/content/spool.py) both do with the small messages of a
batch, so drained mail ends up stored exactly as live mail: a data key per
message when a master key is configured (storage/content/sealing.py; the
organisations' keys read once per process), the entries grouped into packs
(storage/content/packs.py), each pack put once, under Object Lock retained
until its latest member's expiry.  The caller records the packs' rows
(packs.record, which also records the data keys) in the transaction that
records the messages' rows.
"""

from __future__ import annotations

import functools
import io
import uuid
from datetime import datetime

import psycopg

from postkeep.storage.content import packs, sealing
from postkeep.storage.content.objects import ObjectStore, put_content
from postkeep.storage.metadata.db import BackendError, Database


def new_keys(db: Database, wanted: list[tuple[uuid.UUID, uuid.UUID, datetime]]
             ) -> tuple[dict[uuid.UUID, sealing.DataKey] | None, dict[uuid.UUID, BackendError]]:
    """(a fresh data key per (message id, org id, content expiry) of WANTED, by
    message id, or None when sealing is off; the error of each message whose
    organisation's key could not be read).  Each organisation's key is read on
    its own (once per process): one that cannot be read fails its own
    messages only, never the rest of a batch."""
    ring = sealing.keyring()
    if ring is None:
        return None, {}
    failed: dict[uuid.UUID, BackendError] = {}
    for org in sorted(ring.missing_orgs({w[1] for w in wanted})):
        try:
            db.run(functools.partial(ring.ensure_orgs, org_ids={org}))
        except (BackendError, psycopg.Error) as exc:
            err = exc if isinstance(exc, BackendError) else BackendError("postgres", str(exc))
            failed.update({w[0]: err for w in wanted if w[1] == org})
    keys = ring.new_data_keys([w for w in wanted if w[0] not in failed])
    return {k.message_id: k for k in keys}, failed


def store_packs(db: Database, objects: ObjectStore, entries: list[packs.Entry]
                ) -> tuple[list[packs.Pack], dict[uuid.UUID, BackendError]]:
    """ENTRIES sealed (when a master key is installed), packed and put:
    (the packs now in the store, the error of each message that is not)."""
    if not entries:
        return [], {}
    keys, failed = new_keys(db, [(e.message_id, e.org_id, e.content_expires_at)
                                 for e in entries])
    entries = [e for e in entries if e.message_id not in failed]
    stored: list[packs.Pack] = []
    for pack in packs.build(entries, keys=keys):
        try:
            # Under Object Lock retained until its latest member's expiry.
            put_content(objects, pack.key, io.BytesIO(pack.body.getvalue()), pack.length,
                        pack.expires_at)
        except BackendError as exc:
            failed.update({mid: exc for mid in pack.members})
            continue
        stored.append(pack)
    return stored, failed
