"""Object storage for message content, behind a small interface.

postkeep speaks S3 only through the `minio` client, so any S3 server works
(MinIO, Ceph RGW, SeaweedFS, AWS).  `ObjectStore` is what the rest of the code
sees; `S3ObjectStore` is the one implementation that does network I/O, with
short timeouts and almost no retries: the milter would rather tempfail a
message quickly than hold an SMTP session while a dead server is retried.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import BinaryIO, Protocol

import urllib3
from minio import Minio
from minio.commonconfig import COMPLIANCE, GOVERNANCE, SnowballObject
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.retention import Retention

from postkeep.config import S3Config
from postkeep.storage.content.layout import HOLD, class_key, content_class
from postkeep.storage.metadata.db import BackendError


def message_key(org_id: str, message_id: str, created: datetime,
                content_days: int | None = None, held: bool = False) -> str:
    """Where a message's object lives (UTC date of CREATED).

    With CONTENT_DAYS: messages/{class}/{org_id}/{yyyy}/{mm}/{dd}/{id}.eml.zst,
    the class prefix being what an S3 lifecycle rule expires (storage/lifecycle/rules.py);
    HELD (the organisation is under a legal hold) puts it under messages/hold/.
    Without: the unclassed layout messages/{org_id}/..., which only the
    retention sweeper expires.
    """
    if held:
        return class_key(org_id, message_id, created, HOLD)
    if content_days is not None:
        return class_key(org_id, message_id, created, content_class(content_days))
    return f"messages/{org_id}/{created:%Y/%m/%d}/{message_id}.eml.zst"


class ObjectStore(Protocol):
    # RETAIN_UNTIL: an Object Lock retention date (compliance mode), honoured
    # by stores that lock objects (`locks_objects`), ignored by the others.
    def put(self, key: str, data: BinaryIO, length: int,
            retain_until: datetime | None = None) -> None: ...
    def get(self, key: str) -> Iterator[bytes]: ...
    def get_range(self, key: str, offset: int, length: int) -> Iterator[bytes]: ...
    def delete(self, key: str) -> None: ...
    def can_batch(self) -> bool: ...
    def put_many(self, items: list[tuple[str, bytes]]) -> None: ...


log = logging.getLogger("postkeep.storage")


def put_content(store: ObjectStore, key: str, data: BinaryIO, length: int,
                content_expires_at: datetime | None) -> None:
    """Put a message's object; on a locking store retained until its content
    expiry (s3.object_lock), so no one can delete it before, and anyone after."""
    if content_expires_at is not None and getattr(store, "locks_objects", False):
        store.put(key, data, length, retain_until=content_expires_at)
    else:
        store.put(key, data, length)


class S3ObjectStore:
    """ObjectStore on an S3 bucket through the minio client."""

    # minio-py's put_object reads the whole object (or one multipart part of
    # at least 5 MiB) into memory before sending it.  Objects larger than this
    # go up in one streamed PUT instead (`_put_streamed`).
    PART_SIZE = 5 * 1024 * 1024
    STREAM_ABOVE = 1 << 20

    def __init__(self, cfg: S3Config) -> None:
        self.cfg = cfg
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=cfg.timeout_seconds, read=cfg.timeout_seconds),
            maxsize=32,
            # Never Retry-After: MinIO answers 503 with `Retry-After: 60` while it
            # starts, and honouring it held the milter's uploads for a minute.
            retries=urllib3.Retry(total=1, backoff_factor=0.1, status_forcelist=[503],
                                  respect_retry_after_header=False),
        )
        self._http = http
        self.client = Minio(
            cfg.endpoint,
            access_key=cfg.access_key,
            secret_key=cfg.secret_key,
            secure=cfg.secure,
            region=cfg.region,
            http_client=http,
        )
        self.bucket = cfg.bucket
        # Object Lock: every object carries its own retention (a PUT each);
        # MinIO's snowball batches cannot carry one per object.
        self._batch_ok: bool | None = (None if cfg.batch_uploads == "auto"
                                       and cfg.object_lock == "off" else False)
        self._next_probe = 0.0
        self._probe_lock = threading.Lock()

    def ensure_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                # Object Lock can only be had at creation (s3.object_lock).
                self.client.make_bucket(self.bucket,
                                        object_lock=self.cfg.object_lock != "off")
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError("s3", f"bucket {self.bucket!r}: {exc}") from exc

    @property
    def locks_objects(self) -> bool:
        """Whether objects are written with an Object Lock retention (s3.object_lock)."""
        return self.cfg.object_lock == "compliance"

    def put(self, key: str, data: BinaryIO, length: int,
            retain_until: datetime | None = None) -> None:
        retention = (Retention(COMPLIANCE, retain_until)
                     if retain_until is not None and self.locks_objects else None)
        # A retained object goes through put_object (its retention headers are
        # signed there), in 5 MiB parts held in memory: large mail is rare.
        if length > self.STREAM_ABOVE and retention is None:
            self._put_streamed(key, data, length)
            return
        try:
            self.client.put_object(
                self.bucket, key, data, length,
                content_type="application/zstd", part_size=self.PART_SIZE,
                num_parallel_uploads=1, retention=retention,
            )
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise BackendError("s3", f"put {key}: {exc}") from exc

    def _put_streamed(self, key: str, data: BinaryIO, length: int) -> None:
        """One PUT whose body is read from DATA as it is sent, never held whole.

        The URL is presigned by the minio client (SigV4 in the query string,
        unsigned payload: the standard way any S3 server takes a body that is
        not hashed in advance); Content-Length makes a short body fail.  Not
        retried: the stream cannot be rewound.
        """
        try:
            url = self.client.get_presigned_url("PUT", self.bucket, key,
                                                expires=timedelta(minutes=15))
            resp = self._http.urlopen(
                "PUT", url, body=data, retries=False,
                headers={"Content-Length": str(length), "Content-Type": "application/zstd"})
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise BackendError("s3", f"put {key}: {exc}") from exc
        if resp.status != 200:
            text = resp.data[:300].decode("utf-8", "replace")
            raise BackendError("s3", f"put {key}: HTTP {resp.status} {text}")

    def can_batch(self) -> bool:
        """Whether put_many can store many objects in one call on this server.

        Probed once (and again every 30 s while the server cannot be reached):
        MinIO extracts a "snowball" tar into separate objects; other S3
        servers would store the tar itself, so they get one PUT per object.
        """
        if self._batch_ok is not None:
            return self._batch_ok
        with self._probe_lock:
            if self._batch_ok is None and time.monotonic() >= self._next_probe:
                try:
                    self._batch_ok = self._probe_batch()
                    log.info("s3 batch uploads (snowball): %s",
                             "supported" if self._batch_ok else "not supported")
                except (MinioException, urllib3.exceptions.HTTPError, OSError):
                    self._next_probe = time.monotonic() + 30
        return bool(self._batch_ok)

    def _probe_batch(self) -> bool:
        key = f"postkeep-probe/{uuid.uuid4()}"
        try:
            result = self.client.upload_snowball_objects(
                self.bucket, [SnowballObject(key, data=io.BytesIO(b"probe"), length=5)]
            )
        except S3Error:
            return False
        try:
            self.client.stat_object(self.bucket, key)
            supported = True
        except S3Error:
            supported = False
        for name in (key, result.object_name):
            with contextlib.suppress(S3Error):
                self.client.remove_object(self.bucket, name)
        return supported

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store several small objects in one request (see can_batch)."""
        try:
            self.client.upload_snowball_objects(
                self.bucket,
                [SnowballObject(k, data=io.BytesIO(b), length=len(b)) for k, b in items],
            )
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise BackendError("s3", f"batch put of {len(items)} objects: {exc}") from exc

    def get(self, key: str) -> Iterator[bytes]:
        try:
            resp = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            raise BackendError("s3", f"get {key}: {exc.code}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError("s3", f"get {key}: {exc}") from exc
        try:
            yield from resp.stream(256 * 1024)
        finally:
            resp.close()
            resp.release_conn()

    def get_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        """LENGTH bytes of KEY from OFFSET: one ranged GET (a packed message)."""
        try:
            resp = self.client.get_object(self.bucket, key, offset=offset, length=length)
        except S3Error as exc:
            raise BackendError("s3", f"get {key} [{offset}+{length}]: {exc.code}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError("s3", f"get {key} [{offset}+{length}]: {exc}") from exc
        try:
            yield from resp.stream(256 * 1024)
        finally:
            resp.close()
            resp.release_conn()

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendError("s3", f"delete {key}: {exc}") from exc


class MemoryObjectStore:
    """ObjectStore in a dict: for unit tests of code above the store."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: BinaryIO, length: int,
            retain_until: datetime | None = None) -> None:
        body = data.read(length)
        if len(body) != length:
            raise BackendError("s3", f"put {key}: short read {len(body)} of {length}")
        self.objects[key] = body

    def get(self, key: str) -> Iterator[bytes]:
        if key not in self.objects:
            raise BackendError("s3", f"get {key}: NoSuchKey")
        yield self.objects[key]

    def get_range(self, key: str, offset: int, length: int) -> Iterator[bytes]:
        if key not in self.objects:
            raise BackendError("s3", f"get {key}: NoSuchKey")
        yield self.objects[key][offset:offset + length]

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def can_batch(self) -> bool:
        return True

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        self.objects.update(items)


def read_all(store: ObjectStore, key: str) -> bytes:
    buf = io.BytesIO()
    for chunk in store.get(key):
        buf.write(chunk)
    return buf.getvalue()


class S3ProbeStore:
    """storage/content/probe.py's ProbeStore on the bucket of an S3ObjectStore."""

    def __init__(self, store: S3ObjectStore) -> None:
        self.client = store.client
        self.bucket = store.bucket

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        from postkeep.storage.content.probe import ProbeError

        try:
            yield
        except S3Error as exc:
            raise ProbeError(exc.code, f"{what}: {exc.code}: {exc.message}") from exc
        except (ServerError, InvalidResponseError) as exc:
            raise ProbeError(f"HTTP {getattr(exc, 'status_code', '?')}", f"{what}: {exc}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ProbeError(None, f"{what}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        with self._call(f"put {key}"):
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._call(f"get {key}"):
            resp = self.client.get_object(self.bucket, key, offset=offset, length=length or 0)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def put_multipart(self, key: str, parts: list[bytes]) -> None:
        with self._call(f"multipart upload {key}"):
            upload_id = self.client._create_multipart_upload(self.bucket, key, {})
            done = [Part(n, self.client._upload_part(self.bucket, key, data, None, upload_id, n))
                    for n, data in enumerate(parts, 1)]
            self.client._complete_multipart_upload(self.bucket, key, upload_id, done)

    def list_keys(self, prefix: str) -> list[str]:
        with self._call(f"list {prefix}"):
            return [o.object_name or "" for o in
                    self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def delete(self, key: str) -> None:
        with self._call(f"delete {key}"):
            self.client.remove_object(self.bucket, key)

    def lifecycle_rule_ids(self) -> list[str] | None:
        from postkeep.storage.content.probe import MISSING, ProbeError, status_of_error

        try:
            with self._call("get bucket lifecycle"):
                cfg = self.client.get_bucket_lifecycle(self.bucket)
        except ProbeError as exc:
            if status_of_error(exc.code) == MISSING:
                return None
            raise
        return [r.rule_id or "" for r in (cfg.rules if cfg is not None else [])]

    def object_lock_enabled(self) -> bool:
        # Read raw: minio-py's parser wants a DefaultRetention that a bucket
        # locked without one (versitygw) does not have.
        from postkeep.storage.content.probe import ProbeError

        try:
            with self._call("get object lock configuration"):
                resp = self.client._execute("GET", self.bucket,
                                            query_params={"object-lock": ""})
        except ProbeError as exc:
            if exc.code == "ObjectLockConfigurationNotFoundError":
                return False
            raise
        return b"<ObjectLockEnabled>Enabled</ObjectLockEnabled>" in resp.data

    def put_retained(self, key: str, data: bytes, until: datetime) -> str:
        with self._call(f"put {key} with retention"):
            result = self.client.put_object(self.bucket, key, io.BytesIO(data), len(data),
                                            retention=Retention(GOVERNANCE, until))
        return result.version_id or ""

    def delete_version(self, key: str, version_id: str, bypass_governance: bool) -> str | None:
        with self._call(f"delete {key} version {version_id}"):
            for err in self.client.remove_objects(
                    self.bucket, [DeleteObject(key, version_id or None)],
                    bypass_governance_mode=bypass_governance):
                return err.code or "error"
        return None
