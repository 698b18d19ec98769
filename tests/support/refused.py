"""What a refused message must not leave behind: a row, an object or a spool entry.

A message the client saw tempfailed or refused is sent again (by the client,
or by Postfix from its queue); if the first attempt had left a `messages`
row, its object, or an outage-spool entry that a later drain turns into one,
the retry stores it a second time.

The client never learns postkeep's id of a refused message, so this is
checked per organisation, by what the test put in the message (a token in
its Message-ID: or Subject:) and by what lies under the organisation's
object prefixes, independently of the milter's own bookkeeping:

- no `messages` row of the organisation carries a refused message's token;
- every message object of the organisation (`messages/<class>/<org>/…`,
  `messages/<org>/…`) has its `messages` row: a refused message's object
  would have none;
- no outage-spool entry (nor a quarantined one) carries a refused token.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from pathlib import Path

from postkeep.storage.content.layout import MESSAGES
from postkeep.storage.content.spool import Spool, SpoolFormatError
from support.stack import Stack

TOKEN = re.compile(r"[0-9a-f]{32}")
_OBJECT_ID = re.compile(r"/([0-9a-f-]{36})\.eml\.zst$")


def _tokens(*texts: str | None) -> set[str]:
    return {t for text in texts if text for t in TOKEN.findall(text)}


def object_ids(stack: Stack, org_id: uuid.UUID) -> dict[str, str]:
    """message id -> key of every message object stored for ORG_ID, in every class."""
    objects = stack.objects()
    # messages/<class>/ for every class in use, and messages/<org>/ (the old layout)
    prefixes = [o.object_name for o in objects.client.list_objects(objects.bucket,
                                                                   prefix=MESSAGES)
                if o.is_dir]
    found: dict[str, str] = {}
    for prefix in prefixes:
        under = prefix if prefix == f"{MESSAGES}{org_id}/" else f"{prefix}{org_id}/"
        for obj in objects.client.list_objects(objects.bucket, prefix=under, recursive=True):
            m = _OBJECT_ID.search(obj.object_name)
            assert m, f"unexpected object {obj.object_name} under {under}"
            found[m.group(1)] = obj.object_name
    return found


def _spooled_tokens(spool: Spool, org_id: uuid.UUID) -> dict[str, Path]:
    """token -> spool file, for every entry of ORG_ID waiting or quarantined."""
    out: dict[str, Path] = {}
    quarantined = list(spool.quarantine_dir.glob("*")) if spool.quarantine_dir.is_dir() else []
    for path in [*spool.entries(), *quarantined]:
        try:
            message = spool.open_entry(path).message
        except (SpoolFormatError, FileNotFoundError):
            continue  # damaged on purpose by a test, or drained meanwhile
        if message.org_id == org_id:
            for token in _tokens(message.message_id_header, message.subject):
                out[token] = path
    return out


def assert_refused_left_nothing(stack: Stack, org_id: uuid.UUID, refused: Iterable[str],
                                spool: Spool | None = None) -> None:
    """No row, no object and no spool entry for any of the REFUSED tokens of ORG_ID."""
    refused = set(refused)
    with stack.connect() as conn:
        rows = conn.execute("SELECT id, message_id_header, subject FROM messages"
                            " WHERE org_id = %s", (org_id,)).fetchall()
    row_ids = {str(r[0]) for r in rows}
    stored_refused = sorted(str(r[0]) for r in rows if _tokens(r[1], r[2]) & refused)
    assert not stored_refused, (
        f"{len(stored_refused)} refused messages have a messages row (a retry stores them"
        f" twice), e.g. {stored_refused[:3]}")
    orphans = sorted(key for mid, key in object_ids(stack, org_id).items()
                     if mid not in row_ids)
    assert not orphans, (
        f"{len(orphans)} message objects have no messages row (left by refused"
        f" messages), e.g. {orphans[:3]}")
    if spool is not None:
        waiting = {t: p for t, p in _spooled_tokens(spool, org_id).items() if t in refused}
        assert not waiting, f"refused messages left spool entries: {sorted(waiting.values())}"
