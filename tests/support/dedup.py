"""Capturing and committing a message in-process, as the milter does (no Postfix).

For tests and the storage benchmark that drive the real GroupCommitter against
the stack's PostgreSQL and MinIO.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime

from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content.dictionaries import LoadedDictionary
from postkeep.storage.content.objects import message_key
from postkeep.storage.metadata.messages import CapturedMessage, expiry_dates
from support.feed import fed


def capture_and_commit(committer: GroupCommitter, org_id: uuid.UUID, domain: str,
                       data: bytes, *, created: datetime, content_days: int = 7,
                       threshold: int = 128 * 1024, dictionary: LoadedDictionary | None = None,
                       dictionary_max: int = 64 * 1024) -> CapturedMessage:
    """DATA captured and committed as the milter does (no Postfix)."""
    cap = fed(data)
    content = cap.finish(split_threshold=threshold, dictionary=dictionary,
                         dictionary_max=dictionary_max)
    mid = uuid.uuid4()
    c_exp, m_exp = expiry_dates(created, content_days, 30)
    m = CapturedMessage(
        id=mid, org_id=org_id, domain=domain, queue_id=mid.hex[:10].upper(),
        envelope_from=f"news@{domain}", recipients=("r@sink.test",), size=content.size,
        sha256=content.sha256, object_key=message_key(str(org_id), str(mid), created),
        compressed_size=content.compressed_size, created_at=created,
        content_expires_at=c_exp, metadata_expires_at=m_exp)
    try:
        committer.commit(m, content)
    finally:
        content.close()
        cap.discard()
    # as recorded: the committer counts the manifest it puts in front
    return dataclasses.replace(m, compressed_size=content.compressed_size)
