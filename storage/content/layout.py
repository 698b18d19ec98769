"""Where message objects live: retention classes in the key, and the hold prefix.

S3 allows 1,000 lifecycle rules per bucket, so there is never one rule per
organisation.  Instead every message object is written under the prefix of
its retention class, `messages/<days>d/`, where <days> is the organisation's
content retention rounded UP to the next class in `CONTENT_CLASSES`; one
lifecycle rule per class (storage/lifecycle/rules.py) expires the objects
under it.  Rounding up means S3 never deletes before the stamped
`content_expires_at`: S3 expires an object at the first UTC midnight after
creation + <days>.

Key prefixes, not object tags: small objects are uploaded in MinIO snowball
batches (one tar), where per-object tags are not applied, and a tag would
cost one more request per object on the capture path.

Objects with no rule:
- `messages/keep/` — content kept longer than the largest class;
- `messages/hold/` — moved there while a legal hold covers them;
- `messages/<org_id>/` — the layout before classes existed.

Pure: key names only, no I/O.
"""

from __future__ import annotations

import re
from datetime import datetime

# Content retention classes in days: a fixed, bounded set (15 rules).
CONTENT_CLASSES: tuple[int, ...] = (
    1, 2, 3, 7, 14, 30, 60, 90, 180, 365, 730, 1095, 1825, 2555, 3650,
)
KEEP = "keep"  # longer than the largest class: no lifecycle rule
HOLD = "hold"  # under a legal hold: no lifecycle rule
MESSAGES = "messages/"


def content_class(content_days: int) -> str:
    """The class label for CONTENT_DAYS: the smallest class >= it, e.g. '30d'."""
    if content_days < 1:
        raise ValueError(f"content retention {content_days} days: must be at least 1")
    for days in CONTENT_CLASSES:
        if days >= content_days:
            return f"{days}d"
    return KEEP


def class_prefix(label: str) -> str:
    """The key prefix of a class label: 'messages/30d/'."""
    return f"{MESSAGES}{label}/"


def class_key(org_id: str, message_id: str, created: datetime, label: str) -> str:
    """messages/{class}/{org_id}/{yyyy}/{mm}/{dd}/{message_id}.eml.zst (UTC date)."""
    return f"{class_prefix(label)}{org_id}/{created:%Y/%m/%d}/{message_id}.eml.zst"


_CLASSED = re.compile(r"^messages/(\d+d|keep|hold)/(.+)$")


def key_class(key: str) -> str | None:
    """The class label of KEY ('30d', 'keep', 'hold'), or None for a legacy key."""
    m = _CLASSED.match(key)
    return m.group(1) if m else None


def held_key(key: str) -> str:
    """Where KEY's object lives while a legal hold covers it (messages/hold/...)."""
    m = _CLASSED.match(key)
    rest = m.group(2) if m else key.removeprefix(MESSAGES)
    return class_prefix(HOLD) + rest


def is_held_key(key: str) -> bool:
    """True for objects in the hold prefix (no rule ever deletes them)."""
    return key_class(key) == HOLD


def covered_by_rules(key: str) -> bool:
    """True if a postkeep lifecycle rule expires KEY (a numbered class)."""
    label = key_class(key)
    return label is not None and label[:-1].isdigit() and label.endswith("d")
