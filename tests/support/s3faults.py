"""S3 failing to delete, for real: MinIO stopped, or MinIO denying deletes.

`minio_stopped` stops the stack's MinIO (devstack/stack.sh) and starts it
again afterwards, whatever happens inside.

`DeleteDenier` is a MinIO user of its own whose IAM policy allows every S3
action on the bucket except s3:DeleteObject under the prefixes a test names
(the whole bucket with ""), made through MinIO's admin API with the stack's
root credentials.  MinIO then answers a multi-object delete as S3 does when a
policy forbids it: HTTP 200 with an AccessDenied error per refused key, the
other keys deleted.  `allow()` rewrites the policy without the denial (the
operator fixing it); the same client's next delete goes through.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from minio import Minio, MinioAdmin
from minio.credentials import StaticProvider

from postkeep.config import S3Config
from postkeep.storage.lifecycle.rules import S3Retention
from support.stack import Stack


@contextmanager
def minio_stopped(stack: Stack) -> Iterator[None]:
    """The stack's MinIO stopped for the duration (started again on the way out)."""
    stack.stack_ctl("stop", "minio")
    try:
        yield
    finally:
        stack.stack_ctl("start", "minio")


@dataclass
class DeleteDenier:
    """A MinIO user whose deletes under chosen prefixes are refused (see module doc)."""

    admin: MinioAdmin
    cfg: S3Config
    user: str
    policy: str
    client: Minio

    def store(self) -> S3Retention:
        """What retention, erasure and holds use, acting as this user."""
        return S3Retention(self.client, self.cfg.bucket)

    def deny(self, *prefixes: str) -> None:
        """Refuse s3:DeleteObject on every key starting with one of PREFIXES."""
        assert prefixes, "deny what?"
        self._set([{"Effect": "Deny", "Action": ["s3:DeleteObject"],
                    "Resource": [f"arn:aws:s3:::{self.cfg.bucket}/{p}*" for p in prefixes]}])

    def allow(self) -> None:
        """Every action allowed again (the fault removed)."""
        self._set([])

    def _set(self, extra: list[dict[str, object]]) -> None:
        bucket = self.cfg.bucket
        self.admin.policy_add(self.policy, policy={"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:*"],
             "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
            *extra]})


@contextmanager
def delete_denier(cfg: S3Config) -> Iterator[DeleteDenier]:
    """A fresh MinIO user (allowed everything to start with), removed afterwards."""
    admin = MinioAdmin(endpoint=cfg.endpoint, secure=cfg.secure, region=cfg.region,
                       credentials=StaticProvider(cfg.access_key, cfg.secret_key))
    tag = uuid.uuid4().hex[:12]
    user, secret, policy = f"pk-denier-{tag}", uuid.uuid4().hex, f"pk-denier-{tag}"
    denier = DeleteDenier(admin, cfg, user, policy,
                          Minio(cfg.endpoint, access_key=user, secret_key=secret,
                                secure=cfg.secure, region=cfg.region))
    denier.allow()
    admin.user_add(user, secret)
    try:
        admin.attach_policy([policy], user=user)
        yield denier
    finally:
        admin.user_remove(user)
        admin.policy_remove(policy)
