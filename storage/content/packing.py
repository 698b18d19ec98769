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

import psycopg

from postkeep.storage.content import packs, sealing
from postkeep.storage.content.objects import ObjectStore, put_content
from postkeep.storage.metadata.db import BackendError, Database


def store_packs(db: Database, objects: ObjectStore, entries: list[packs.Entry]
                ) -> tuple[list[packs.Pack], dict[uuid.UUID, BackendError]]:
    """ENTRIES sealed (when a master key is installed), packed and put:
    (the packs now in the store, the error of each message that is not)."""
    if not entries:
        return [], {}
    keys = None
    failed: dict[uuid.UUID, BackendError] = {}
    ring = sealing.keyring()
    if ring is not None:  # sealed: a fresh data key per message
        # Each organisation's key on its own: one that cannot be read fails
        # its own messages only, not the rest of the batch.
        for org in sorted(ring.missing_orgs({e.org_id for e in entries})):
            try:  # once per organisation and process
                db.run(functools.partial(ring.ensure_orgs, org_ids={org}))
            except (BackendError, psycopg.Error) as exc:
                err = exc if isinstance(exc, BackendError) else BackendError("postgres", str(exc))
                failed.update({e.message_id: err for e in entries if e.org_id == org})
        entries = [e for e in entries if e.message_id not in failed]
        keys = {k.message_id: k for k in ring.new_data_keys(
            [(e.message_id, e.org_id, e.content_expires_at) for e in entries])}
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
