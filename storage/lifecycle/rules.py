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
from datetime import UTC, datetime
from typing import Protocol

import urllib3
from minio.commonconfig import ENABLED, CopySource, Filter
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import Expiration, LifecycleConfig, NoncurrentVersionExpiration, Rule

from postkeep.storage.content.layout import CONTENT_CLASSES, MESSAGES, class_prefix
from postkeep.storage.content.probe import MISSING, status_of_error
from postkeep.storage.metadata.db import BackendError

RULE_PREFIX = "postkeep-content-"


@dataclass(frozen=True)
class PlannedRule:
    """One lifecycle rule postkeep wants: id, key prefix, expiry in days."""

    rule_id: str
    prefix: str
    days: int
    # A NoncurrentVersionExpiration rule (versioned buckets), DAYS after an
    # object version stopped being current, not an Expiration.
    noncurrent: bool = False


NONCURRENT_RULE = f"{RULE_PREFIX}noncurrent"


def planned_rules(versioned: bool = False, object_lock: bool = False) -> list[PlannedRule]:
    """The rules for every class: bounded by len(CONTENT_CLASSES), never per org.

    On a versioned bucket a delete (a rule's or the sweeper's) only makes the
    object a noncurrent version: one more rule reclaims those a day later.
    Under Object Lock (always versioned) there are no class rules: an expiry
    by rule would put a delete marker over held content; the sweeper deletes
    each version by id once its retention has passed.
    """
    classes = [] if object_lock else [
        PlannedRule(f"{RULE_PREFIX}{d}d", class_prefix(f"{d}d"), d) for d in CONTENT_CLASSES]
    if versioned or object_lock:
        classes.append(PlannedRule(NONCURRENT_RULE, MESSAGES, 1, noncurrent=True))
    return classes


class RetentionStore(Protocol):
    """What retention needs from object storage beyond ObjectStore."""

    def delete_many(self, keys: list[str]) -> list[str]: ...
    def copy(self, src: str, dst: str) -> None: ...
    def copy_range(self, src: str, offset: int, length: int, dst: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def apply_rules(self, rules: list[PlannedRule]) -> int: ...
    def rules(self) -> list[PlannedRule] | None: ...
    def retained_until(self, key: str) -> datetime | None: ...
    def versioned(self) -> bool: ...
    def set_legal_hold(self, key: str, on: bool) -> bool: ...


_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError)


class S3Retention:
    """RetentionStore on the bucket of an S3ObjectStore (its minio client)."""

    def __init__(self, client: object, bucket: str, object_lock: bool = False) -> None:
        self.client = client
        self.bucket = bucket
        # s3.object_lock: the bucket is versioned, where a plain DELETE only
        # adds a delete marker and leaves the bytes; delete the versions.
        self.object_lock = object_lock

    def delete_many(self, keys: list[str]) -> list[str]:
        """Delete KEYS (one request per 1,000); return the keys that failed.

        A key that is already gone is not a failure: S3 deletes are idempotent.
        With Object Lock the current version of each key is deleted by id, so
        the server refuses (a failure) while its retention lasts.
        """
        failed: list[str] = []
        try:
            for i in range(0, len(keys), 1000):
                chunk = (self._versions(keys[i:i + 1000]) if self.object_lock
                         else [DeleteObject(k) for k in keys[i:i + 1000]])
                for err in self.client.remove_objects(self.bucket, chunk):  # type: ignore[attr-defined]
                    if err.code != "NoSuchKey":
                        failed.append(err.name)
        except _ERRORS as exc:
            raise BackendError("s3", f"delete of {len(keys)} objects: {exc}") from exc
        return failed

    def _versions(self, keys: list[str]) -> list[DeleteObject]:
        """DeleteObjects naming the current version of each of KEYS that exists."""
        out: list[DeleteObject] = []
        for key in keys:
            try:
                st = self.client.stat_object(self.bucket, key)  # type: ignore[attr-defined]
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchVersion"):
                    continue
                raise
            out.append(DeleteObject(key, st.version_id))
        return out

    def retained_until(self, key: str) -> datetime | None:
        """KEY's Object Lock retention date, None if it has none (or is gone)."""
        if not self.object_lock:
            return None
        try:
            ret = self.client.get_object_retention(self.bucket, key)  # type: ignore[attr-defined]
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchObjectLockConfiguration",
                            "ObjectLockConfigurationNotFoundError", "InvalidRequest"):
                return None
            raise BackendError("s3", f"get retention {key}: {exc.code}") from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"get retention {key}: {exc}") from exc
        return ret.retain_until_date if ret is not None else None

    def set_legal_hold(self, key: str, on: bool) -> bool:
        """Set or clear the Object Lock legal hold of KEY's current version;
        False if there is no such object."""
        try:
            if on:
                self.client.enable_object_legal_hold(self.bucket, key)  # type: ignore[attr-defined]
            else:
                self.client.disable_object_legal_hold(self.bucket, key)  # type: ignore[attr-defined]
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchVersion"):
                return False
            raise BackendError("s3", f"legal hold {key}: {exc.code}: {exc.message}") from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"legal hold {key}: {exc}") from exc
        return True

    def versioned(self) -> bool:
        """Whether the bucket keeps object versions (a delete leaves a noncurrent one)."""
        try:
            cfg = self.client.get_bucket_versioning(self.bucket)  # type: ignore[attr-defined]
        except S3Error as exc:
            # No versioning support; or no bucket, which the next call names.
            if status_of_error(exc.code) == MISSING or exc.code == "NoSuchBucket":
                return False
            raise BackendError("s3", f"get versioning: {exc.code}") from exc
        except _ERRORS as exc:
            raise BackendError("s3", f"get versioning: {exc}") from exc
        return bool(cfg.status == "Enabled")

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
            if status_of_error(exc.code) == MISSING:  # as the storage probe says
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
                         noncurrent_version_expiration=NoncurrentVersionExpiration(r.days))
                    if r.noncurrent else
                    Rule(ENABLED, rule_filter=Filter(prefix=r.prefix), rule_id=r.rule_id,
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
        gone = r.noncurrent_version_expiration
        if prefix is not None and days is not None:
            yield PlannedRule(rid, prefix, int(days))
        elif prefix is not None and gone is not None and gone.noncurrent_days is not None:
            yield PlannedRule(rid, prefix, int(gone.noncurrent_days), noncurrent=True)


class MemoryRetention:
    """RetentionStore over a MemoryObjectStore's dict, for unit tests."""

    def __init__(self, objects: dict[str, bytes], lifecycle: bool = True) -> None:
        self.objects = objects
        self.lifecycle = lifecycle
        self.installed: list[PlannedRule] = []
        self.fail_deletes: set[str] = set()
        self.locked: dict[str, datetime] = {}  # Object Lock: key -> retain until
        self.legal_holds: set[str] = set()  # Object Lock legal-hold flags
        self.now = datetime.now(UTC)

    def delete_many(self, keys: list[str]) -> list[str]:
        refused = self.fail_deletes | self.legal_holds | {
            k for k, until in self.locked.items() if until > self.now and k in self.objects}
        failed = [k for k in keys if k in refused]
        for k in keys:
            if k not in refused:
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

    def retained_until(self, key: str) -> datetime | None:
        return self.locked.get(key) if key in self.objects else None

    def versioned(self) -> bool:
        return False

    def set_legal_hold(self, key: str, on: bool) -> bool:
        if key not in self.objects:
            return False
        (self.legal_holds.add if on else self.legal_holds.discard)(key)
        return True

    def rules(self) -> list[PlannedRule] | None:
        return list(self.installed) if self.lifecycle else None

    def apply_rules(self, rules: list[PlannedRule]) -> int:
        if not self.lifecycle:
            raise BackendError("s3", "set lifecycle: NotImplemented")
        self.installed = list(rules)
        return len(rules)
