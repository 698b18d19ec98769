"""holds.delete_content: a held copy takes every original a move could have left.

The stack tests (test_delete_denied.py) show the leak through MinIO; these pin
the key arithmetic: each layout protect() moves from, and a refused delete of
any of them reported against the key the caller asked to delete.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from postkeep.storage.content.layout import CONTENT_CLASSES, held_key
from postkeep.storage.content.objects import message_key
from postkeep.storage.lifecycle.holds import delete_content, left_originals
from postkeep.storage.lifecycle.rules import MemoryRetention

pytestmark = pytest.mark.unit

ORG, MID = str(uuid.uuid4()), str(uuid.uuid4())
CREATED = datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
LAYOUTS = [message_key(ORG, MID, CREATED),
           *(message_key(ORG, MID, CREATED, content_days=d) for d in CONTENT_CLASSES),
           message_key(ORG, MID, CREATED, content_days=CONTENT_CLASSES[-1] + 1)]


def test_every_layout_a_move_starts_from_is_a_left_original() -> None:
    held = {held_key(k) for k in LAYOUTS}
    assert len(held) == 1  # the class is not in a held key
    assert sorted(left_originals(held.pop())) == sorted(LAYOUTS)
    assert all(left_originals(k) == [] for k in LAYOUTS)


@pytest.mark.parametrize("original", LAYOUTS)
def test_deleting_a_held_copy_deletes_the_original_left_behind(original: str) -> None:
    copy, other = held_key(original), message_key(ORG, str(uuid.uuid4()), CREATED, 7)
    store = MemoryRetention({original: b"o", copy: b"c", other: b"x"})
    assert delete_content(store, [copy, other]) == []
    assert store.objects == {}


def test_a_refused_original_fails_the_held_key_it_belongs_to() -> None:
    original = LAYOUTS[0]
    copy, other = held_key(original), message_key(ORG, str(uuid.uuid4()), CREATED, 7)
    store = MemoryRetention({original: b"o", copy: b"c", other: b"x"})
    store.fail_deletes = {original}
    assert delete_content(store, [other, copy]) == [copy]
    assert store.objects == {original: b"o"}
