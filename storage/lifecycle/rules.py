"""The S3 lifecycle rules that expire message content, one per retention class.

Every message object is written under the prefix of its retention class
(storage/content/layout.py); one rule per class (`postkeep-content-<days>d`)
expires the objects under it, so there are never more rules than classes.
Readers stop offering the content at the stamp itself (it is derived from
`content_expires_at`), whatever S3 still holds.

Objects under no rule (`keep`, `hold`, the layout before classes) are deleted
by the sweeper (storage/lifecycle/retention.py) when their stamp passes, and
so is everything when the server has no lifecycle support.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import urllib3
from minio.commonconfig import ENABLED, CopySource, Filter
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from postkeep.storage.content.layout import CONTENT_CLASSES, class_prefix
from postkeep.storage.metadata.db import BackendError

RULE_PREFIX = "postkeep-content-"


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
    def copy_range(self, src: str, offset: int, length: int, dst: str) -> None: ...
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

    def copy_range(self, src: str, offset: int, length: int, dst: str) -> None:
        """LENGTH bytes of SRC from OFFSET as the object DST (a packed message
        copied out of its pack): a ranged GET and a PUT."""
        import io

        try:
            resp = self.client.get_object(  # type: ignore[attr-defined]
                self.bucket, src, offset=offset, length=length)
            try:
                data = resp.read()
            finally:
                resp.close()
                resp.release_conn()
            if len(data) != length:
                raise BackendError("s3", f"copy {src}[{offset}+{length}] -> {dst}: got"
                                         f" {len(data)} bytes")
            self.client.put_object(  # type: ignore[attr-defined]
                self.bucket, dst, io.BytesIO(data), length, content_type="application/zstd")
        except S3Error as exc:
            raise BackendError("s3", f"copy {src}[{offset}+{length}] -> {dst}: {exc.code}"
                               ) from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"copy {src}[{offset}+{length}] -> {dst}: {exc}") from exc

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

    def copy_range(self, src: str, offset: int, length: int, dst: str) -> None:
        if src not in self.objects:
            raise BackendError("s3", f"copy {src} -> {dst}: NoSuchKey")
        self.objects[dst] = self.objects[src][offset:offset + length]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def rules(self) -> list[PlannedRule] | None:
        return list(self.installed) if self.lifecycle else None

    def apply_rules(self, rules: list[PlannedRule]) -> int:
        if not self.lifecycle:
            raise BackendError("s3", "set lifecycle: NotImplemented")
        self.installed = list(rules)
        return len(rules)
