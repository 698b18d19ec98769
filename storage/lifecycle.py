"""Content retention classes and the S3 lifecycle rules that expire them.

S3 allows 1,000 lifecycle rules per bucket, so there is never one rule per
organisation.  Instead every message object is written under the prefix of
its retention class, `messages/<days>d/`, where <days> is the organisation's
content retention rounded UP to the next class in `CONTENT_CLASSES`; one
rule per class (`postkeep-content-<days>d`) expires the objects under it.
Rounding up means S3 never deletes before the stamped `content_expires_at`:
S3 expires an object at the first UTC midnight after creation + <days>.
Readers stop offering the content at the stamp itself (it is derived from
`content_expires_at`), whatever S3 still holds.

Key prefixes, not object tags: small objects are uploaded in MinIO snowball
batches (one tar), where per-object tags are not applied, and a tag would
cost one more request per object on the capture path.

Objects with no rule:
- `messages/keep/` — content kept longer than the largest class;
- `messages/hold/` — moved there while a legal hold covers them;
- `messages/<org_id>/` — the layout before classes existed.
The sweeper (storage/retention.py) deletes those when their stamp passes,
and everything when the server has no lifecycle support.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import urllib3
from minio.commonconfig import ENABLED, CopySource, Filter
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from postkeep.storage.db import BackendError

# Content retention classes in days: a fixed, bounded set (15 rules).
CONTENT_CLASSES: tuple[int, ...] = (
    1, 2, 3, 7, 14, 30, 60, 90, 180, 365, 730, 1095, 1825, 2555, 3650,
)
KEEP = "keep"  # longer than the largest class: no lifecycle rule
HOLD = "hold"  # under a legal hold: no lifecycle rule
RULE_PREFIX = "postkeep-content-"
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


@dataclass(frozen=True)
class PlannedRule:
    """One lifecycle rule postkeep wants: id, key prefix, expiry in days."""

    rule_id: str
    prefix: str
    days: int


def planned_rules() -> list[PlannedRule]:
    """The rules for every class: bounded by len(CONTENT_CLASSES), never per org."""
    return [PlannedRule(f"{RULE_PREFIX}{d}d", class_prefix(f"{d}d"), d) for d in CONTENT_CLASSES]


class RetentionStore(Protocol):
    """What retention needs from object storage beyond ObjectStore."""

    def delete_many(self, keys: list[str]) -> list[str]: ...
    def copy(self, src: str, dst: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def apply_rules(self, rules: list[PlannedRule]) -> int: ...
    def rules(self) -> list[PlannedRule] | None: ...


_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


class S3Retention:
    """RetentionStore on the bucket of an S3ObjectStore (its minio client)."""

    def __init__(self, client: object, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def delete_many(self, keys: list[str]) -> list[str]:
        """Delete KEYS (one request per 1,000); return the keys that failed.

        A key that is already gone is not a failure: S3 deletes are idempotent.
        """
        failed: list[str] = []
        try:
            for i in range(0, len(keys), 1000):
                chunk = [DeleteObject(k) for k in keys[i:i + 1000]]
                for err in self.client.remove_objects(self.bucket, chunk):  # type: ignore[attr-defined]
                    if err.code != "NoSuchKey":
                        failed.append(err.name)
        except _ERRORS as exc:
            raise BackendError("s3", f"delete of {len(keys)} objects: {exc}") from exc
        return failed

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy of SRC to DST (same bucket)."""
        try:
            self.client.copy_object(  # type: ignore[attr-defined]
                self.bucket, dst, CopySource(self.bucket, src))
        except S3Error as exc:
            raise BackendError("s3", f"copy {src} -> {dst}: {exc.code}") from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"copy {src} -> {dst}: {exc}") from exc

    def exists(self, key: str) -> bool:
        """Whether an object KEY exists."""
        try:
            self.client.stat_object(self.bucket, key)  # type: ignore[attr-defined]
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise BackendError("s3", f"stat {key}: {exc.code}") from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"stat {key}: {exc}") from exc

    def rules(self) -> list[PlannedRule] | None:
        """postkeep's rules as installed on the bucket; None if the server has
        no lifecycle support."""
        try:
            cfg = self.client.get_bucket_lifecycle(self.bucket)  # type: ignore[attr-defined]
        except S3Error as exc:
            if exc.code in ("NotImplemented", "MethodNotAllowed"):
                return None
            raise BackendError("s3", f"get lifecycle: {exc.code}") from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"get lifecycle: {exc}") from exc
        return list(_ours(cfg.rules if cfg is not None else []))

    def apply_rules(self, rules: list[PlannedRule]) -> int:
        """Install RULES, keeping every rule not made by postkeep; the rule count.

        Raises BackendError('s3') with the server's code if it refuses (for
        example NotImplemented on a server without lifecycle support).
        """
        try:
            cfg = self.client.get_bucket_lifecycle(self.bucket)  # type: ignore[attr-defined]
            others = [r for r in (cfg.rules if cfg else [])
                      if not (r.rule_id or "").startswith(RULE_PREFIX)]
            mine = [Rule(ENABLED, rule_filter=Filter(prefix=r.prefix), rule_id=r.rule_id,
                         expiration=Expiration(days=r.days)) for r in rules]
            total = others + mine
            if len(total) > 1000:
                raise BackendError("s3", f"lifecycle: {len(total)} rules exceed S3's 1,000")
            self.client.set_bucket_lifecycle(  # type: ignore[attr-defined]
                self.bucket, LifecycleConfig(total))
        except S3Error as exc:
            raise BackendError("s3", f"set lifecycle: {exc.code}: {exc.message}") from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"set lifecycle: {exc}") from exc
        return len(total)


def _ours(rules: Iterable[Rule]) -> Iterator[PlannedRule]:
    for r in rules:
        rid = r.rule_id or ""
        if not rid.startswith(RULE_PREFIX):
            continue
        prefix = r.rule_filter.prefix if r.rule_filter is not None else None
        days = r.expiration.days if r.expiration is not None else None
        if prefix is not None and days is not None:
            yield PlannedRule(rid, prefix, int(days))


class MemoryRetention:
    """RetentionStore over a MemoryObjectStore's dict, for unit tests."""

    def __init__(self, objects: dict[str, bytes], lifecycle: bool = True) -> None:
        self.objects = objects
        self.lifecycle = lifecycle
        self.installed: list[PlannedRule] = []
        self.fail_deletes: set[str] = set()

    def delete_many(self, keys: list[str]) -> list[str]:
        failed = [k for k in keys if k in self.fail_deletes]
        for k in keys:
            if k not in self.fail_deletes:
                self.objects.pop(k, None)
        return failed

    def copy(self, src: str, dst: str) -> None:
        if src not in self.objects:
            raise BackendError("s3", f"copy {src} -> {dst}: NoSuchKey")
        self.objects[dst] = self.objects[src]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def rules(self) -> list[PlannedRule] | None:
        return list(self.installed) if self.lifecycle else None

    def apply_rules(self, rules: list[PlannedRule]) -> int:
        if not self.lifecycle:
            raise BackendError("s3", "set lifecycle: NotImplemented")
        self.installed = list(rules)
        return len(rules)
