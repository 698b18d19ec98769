"""What a refused message must not leave behind: a row, an object or a spool entry.

A message the client saw tempfailed or refused is sent again (by the client,
or by Postfix from its queue); if the first attempt had left a `messages`
row, its object, or an outage-spool entry that a later drain turns into one,
the retry stores it a second time.

The client never learns postkeep's id of a refused message, so this is
checked per organisation, by the token the test put in each message
(X-Test-Token:, and in its Message-ID: or Subject:) and by what lies under
the organisation's object prefixes, independently of the milter's own
bookkeeping:

- no `messages` row of the organisation carries a refused message's token;
- every message object of the organisation (`messages/<class>/<org>/…`,
  `messages/<org>/…`) has its `messages` row: a refused message's object
  would have none (it is restored to name the message it holds);
- no outage-spool entry (waiting or quarantined) carries a refused token.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from postkeep.storage.content.layout import MESSAGES
from postkeep.storage.content.objects import read_all
from postkeep.storage.content.packs import is_pack_key
from postkeep.storage.content.restore import decompress_stream
from postkeep.storage.content.spool import Spool, SpoolFormatError, waiting_entries
from postkeep.storage.metadata.db import BackendError
from support.stack import Stack

TOKEN = re.compile(r"[0-9a-f]{32}")
_TEST_TOKEN = re.compile(rb"\r\nX-Test-Token: ([0-9a-f]{32})\r\n")
_OBJECT_ID = re.compile(r"/([0-9a-f-]{36})\.eml\.zst$")


def _tokens(*texts: str | None) -> set[str]:
    return {t for text in texts if text for t in TOKEN.findall(text)}


@dataclass
class Stored:
    """Everything stored for one organisation, by the test token it carries."""

    rows: dict[str, list[str]] = field(default_factory=dict)  # token -> messages ids
    # Objects no row points at: key -> the token of the message inside ('' if none).
    orphans: dict[str, str] = field(default_factory=dict)
    # Sealed packs no row names (cut by a kill before their rows): unreadable
    # by design, their data keys never committed with rows that use them.
    sealed_orphans: list[str] = field(default_factory=list)
    spooled: dict[str, list[Path]] = field(default_factory=dict)  # token -> spool files

    def left_by(self, tokens: Iterable[str]) -> dict[str, list[str]]:
        """token -> what is stored for it, for each of TOKENS that left anything."""
        out: dict[str, list[str]] = {}
        for token in tokens:
            what = [f"messages row {i}" for i in self.rows.get(token, [])]
            what += [f"object {k}" for k, t in self.orphans.items() if t == token]
            what += [f"spool entry {p}" for p in self.spooled.get(token, [])]
            if what:
                out[token] = what
        return out


def object_keys(stack: Stack, org_id: uuid.UUID) -> dict[str, str]:
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
            if is_pack_key(obj.object_name):
                # A pack (storage/content/packs.py): its messages by its index;
                # one with no index row is listed by its own key.
                with stack.connect() as conn:
                    members = [str(r[0]) for r in conn.execute(
                        "SELECT message_id FROM message_packs WHERE pack_key = %s",
                        (obj.object_name,))]
                for mid in members or [obj.object_name]:
                    found[mid] = obj.object_name
                continue
            m = _OBJECT_ID.search(obj.object_name)
            assert m, f"unexpected object {obj.object_name} under {under}"
            found[m.group(1)] = obj.object_name
    return found


def _whole_pack(stack: Stack, key: str) -> bytes:
    return b"".join(decompress_stream(iter([read_all(stack.objects(), key)])))


def stored_for(stack: Stack, org_id: uuid.UUID, spool: Spool | None = None) -> Stored:
    """What is stored for ORG_ID: rows, objects without a row, spool entries."""
    stored = Stored()
    with stack.connect() as conn:
        rows = conn.execute("SELECT id, message_id_header, subject FROM messages"
                            " WHERE org_id = %s", (org_id,)).fetchall()
    for row_id, message_id, subject in rows:
        for token in _tokens(message_id, subject):
            stored.rows.setdefault(token, []).append(str(row_id))
    with_row = {str(r[0]) for r in rows}
    for mid, key in object_keys(stack, org_id).items():
        if mid not in with_row:
            # A pack nothing indexes: its frames, all of them (plain zstd
            # unless sealed: then nothing here can read it).
            try:
                content = (_whole_pack(stack, key) if mid == key else
                           stack.restored(key, uuid.UUID(mid)) if is_pack_key(key)
                           else stack.restored(key))
            except BackendError as exc:
                if mid != key or stack.config.storage.master_key_bytes() is None:
                    raise
                print(f"sealed pack {key} with no row: unreadable ({exc})")
                stored.sealed_orphans.append(key)
                continue
            m = _TEST_TOKEN.search(content)
            stored.orphans[key] = m.group(1).decode() if m else ""
    if spool is not None:
        quarantined = (list(spool.quarantine_dir.iterdir()) if spool.quarantine_dir.is_dir()
                       else [])
        held = [(e.path, e.message) for e in waiting_entries(spool)]
        for path in quarantined:
            try:
                held.append((path, spool.open_entry(path).message))
            except (SpoolFormatError, FileNotFoundError):
                continue  # damaged on purpose by a test, or journal bytes set aside
        for path, message in held:
            if message.org_id == org_id:
                for token in _tokens(message.message_id_header, message.subject):
                    stored.spooled.setdefault(token, []).append(path)
    return stored


def assert_refused_left_nothing(stack: Stack, org_id: uuid.UUID, refused: Iterable[str],
                                spool: Spool | None = None) -> None:
    """No row, no object and no spool entry for any of the REFUSED tokens of ORG_ID,
    and no object of ORG_ID without its row."""
    stored = stored_for(stack, org_id, spool)
    left = stored.left_by(refused)
    assert not left, f"{len(left)} refused messages left something stored: {left}"
    assert not stored.orphans, f"message objects with no row: {stored.orphans}"
