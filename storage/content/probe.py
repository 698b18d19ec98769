"""The storage conformance probe: what the configured S3 server really does.

postkeep relies on a handful of S3 features (a PUT read back whole and by
byte range, multipart uploads, listing, lifecycle rules, Object Lock when
`[s3] object_lock = "compliance"`).  S3-compatible servers differ in which of
them they implement (versitygw has no lifecycle, MinIO no longer ships
releases), so `run_probe` exercises each one against the bucket, under
`postkeep-probe/`, and reports it as ok, missing (the server says it does not
implement it) or failed (it answered wrongly, or not at all), with the
reason.  Nothing is reported ok that was not seen working: a lifecycle
configuration the server accepts is reported as accepted, not as expiring.

`postkeep storage probe` prints the report; the daemons log its one line at
start-up and refuse to start only on `refusal()`: a required capability the
server answered for and lacks.  An unreachable server is not a refusal (the
daemons already tempfail until it is back).

The decisions are plain functions over `Check`s; the S3 I/O is `ProbeStore`
(storage/content/objects.py S3ProbeStore; a dict-backed one in tests).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

OK = "ok"
MISSING = "missing"
FAILED = "failed"

PREFIX = "postkeep-probe/"

# What postkeep cannot work without, whatever the configuration (object_lock
# joins them when it is configured): ranged GET restores a packed message
# (s3.layout = "packs", the default) and reads old packs under any layout.
# Lifecycle is not here: without it the retention sweeper deletes expired
# content itself.
ALWAYS_REQUIRED = ("put_get", "ranged_get")

# Error codes by which a server says "I do not implement this".
_NOT_IMPLEMENTED = frozenset({"NotImplemented", "MethodNotAllowed", "XNotImplemented",
                              "NotSupported", "UnsupportedOperation"})
# Codes a server gives when Object Lock refuses a delete.
_LOCK_REFUSALS = frozenset({"AccessDenied", "ObjectLocked", "InvalidRequest"})


class ProbeError(Exception):
    """One S3 call of the probe failed: CODE is the server's error code, or
    None when there was no answer (connection refused, timeout)."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProbeStore(Protocol):
    """The S3 calls the probe makes; each raises ProbeError."""

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...
    def put_multipart(self, key: str, parts: list[bytes]) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def lifecycle_rule_ids(self) -> list[str] | None: ...
    def object_lock_enabled(self) -> bool: ...
    def put_retained(self, key: str, data: bytes, until: datetime) -> str: ...
    def delete_version(self, key: str, version_id: str, bypass_governance: bool) -> str | None: ...


@dataclass(frozen=True)
class Check:
    """One capability: its status, why, and whether postkeep needs it."""

    name: str
    status: str
    detail: str = ""
    required: bool = False
    answered: bool = True  # False: no answer from the server (not a refusal)

    def word(self) -> str:
        """`name=status` for the one-line summary."""
        return f"{self.name}={self.status}"


@dataclass(frozen=True)
class ProbeReport:
    """Every check of one probe run, in the order they ran."""

    endpoint: str
    bucket: str
    checks: tuple[Check, ...] = field(default_factory=tuple)

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def has(self, name: str) -> bool:
        """True only if NAME was seen working."""
        check = self.get(name)
        return check is not None and check.status == OK

    def line(self) -> str:
        """One log line: every capability, then the reasons of those not ok."""
        words = " ".join(c.word() for c in self.checks)
        why = "; ".join(f"{c.name}: {c.detail}" for c in self.checks
                        if c.status != OK and c.detail)
        return f"storage probe {self.endpoint}/{self.bucket}: {words}" + (f" ({why})" if why
                                                                            else "")

    def as_dict(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "bucket": self.bucket,
                "checks": [asdict(c) for c in self.checks],
                "refusal": refusal(self)}


# --- pure decisions ---------------------------------------------------------------


def status_of_error(code: str | None) -> str:
    """missing if the server says it does not implement the call, else failed."""
    return MISSING if code in _NOT_IMPLEMENTED else FAILED


def required_checks(object_lock: str) -> tuple[str, ...]:
    """The capabilities postkeep cannot start without under this configuration."""
    return ALWAYS_REQUIRED + (("object_lock",) if object_lock != "off" else ())


def refusal(report: ProbeReport) -> str | None:
    """Why a daemon must not start on this server, naming what is lacking; or None.

    Only what the server answered for: an unreachable server is an outage,
    which the daemons ride out (tempfail, outage spool), not a refusal.
    """
    lacking = [c for c in report.checks if c.required and c.status != OK and c.answered]
    if not lacking:
        return None
    return ("the S3 server lacks what postkeep needs: "
            + "; ".join(f"{c.name} {c.status} ({c.detail})" for c in lacking))


def ranged_check(body: bytes, offset: int, length: int, got: bytes) -> Check:
    """A ranged GET must return exactly BODY[offset:offset+length]."""
    want = body[offset:offset + length]
    if got == want:
        return Check("ranged_get", OK)
    if got == body:
        return Check("ranged_get", FAILED, "the server ignored the Range header"
                                           " (returned the whole object)")
    return Check("ranged_get", FAILED, f"asked for {length} bytes at {offset},"
                                       f" got {len(got)} different bytes")


def lifecycle_check(rule_ids: list[str] | None, wanted: list[str]) -> Check:
    """Whether bucket lifecycle rules exist on this server, and postkeep's are there.

    Reported ok when the server keeps a lifecycle configuration; the detail
    says how many of postkeep's rules it holds.  That the server then expires
    objects by them cannot be seen in a probe, and is not claimed.
    """
    if rule_ids is None:
        return Check("lifecycle", MISSING, "the server has no bucket lifecycle; the retention"
                                           " sweeper deletes expired content itself")
    have = sorted(set(wanted) & set(rule_ids))
    if not wanted:
        return Check("lifecycle", OK, "lifecycle configuration supported")
    if len(have) == len(set(wanted)):
        return Check("lifecycle", OK, f"all {len(have)} postkeep rules installed")
    return Check("lifecycle", OK, f"supported; {len(have)} of {len(set(wanted))} postkeep"
                                  " rules installed (the next retention run installs them)")


def lock_check(bucket_locked: bool, refused_code: str | None) -> Check:
    """Object Lock: the bucket has it, and a delete of a retained version was refused.

    REFUSED_CODE is the error the server gave for deleting a version under
    retention, None if it deleted it.
    """
    if not bucket_locked:
        return Check("object_lock", MISSING, "bucket has no Object Lock configuration"
                     " (s3.object_lock = \"compliance\" needs a bucket created with it)",
                     required=True)
    if refused_code is None:
        return Check("object_lock", FAILED, "the server deleted an object version under"
                     " retention: Object Lock is not enforced", required=True)
    if refused_code not in _LOCK_REFUSALS:
        return Check("object_lock", FAILED, f"deleting a retained version failed with"
                     f" {refused_code}, not a lock refusal", required=True)
    return Check("object_lock", OK, "a retained version's delete was refused", required=True)


# --- the run ------------------------------------------------------------------------


def run_probe(store: ProbeStore, endpoint: str, bucket: str, object_lock: str = "off",
              wanted_rules: list[str] | None = None,
              now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> ProbeReport:
    """Exercise every capability once and report them (objects under PREFIX,
    deleted again; a lock probe object is governance-retained and deleted with
    the bypass, so none stays behind)."""
    need = set(required_checks(object_lock))
    run = f"{PREFIX}{uuid.uuid4()}/"
    body = bytes(range(256)) * 16  # 4 KiB, every byte value: a mangled range shows
    checks: list[Check] = []

    def step(name: str, action: Callable[[], Check]) -> None:
        try:
            check = action()
        except ProbeError as exc:
            check = Check(name, status_of_error(exc.code), str(exc),
                          answered=exc.code is not None)
        checks.append(Check(check.name, check.status, check.detail, name in need,
                            check.answered))

    def put_get() -> Check:
        store.put(run + "object", body)
        got = store.get(run + "object")
        if got != body:
            return Check("put_get", FAILED, f"wrote {len(body)} bytes, read back {len(got)}"
                                            " different bytes")
        return Check("put_get", OK)

    step("put_get", put_get)
    if not checks[-1].answered:
        # No server: every other call would wait for its timeout to say the same.
        for name in ("ranged_get", "multipart", "listing", "lifecycle", "object_lock"):
            if name != "object_lock" or object_lock != "off":
                checks.append(Check(name, FAILED, "not checked: no answer from the server",
                                    name in need, answered=False))
        return ProbeReport(endpoint, bucket, tuple(checks))
    step("ranged_get", lambda: ranged_check(body, 1000, 777,
                                            store.get(run + "object", 1000, 777)))

    def multipart() -> Check:
        # One part (a lone, last part may be any size): the API, without
        # writing S3's 5 MiB minimum part at every daemon start.
        store.put_multipart(run + "multipart", [body])
        if store.get(run + "multipart") != body:
            return Check("multipart", FAILED, "the completed upload's bytes differ")
        return Check("multipart", OK)

    step("multipart", multipart)

    def listing() -> Check:
        keys = store.list_keys(run)
        want = {run + "object", run + "multipart"} if checks[-1].status == OK \
            else {run + "object"}
        if not want <= set(keys):
            return Check("listing", FAILED, f"listing {run} showed {sorted(keys)}")
        return Check("listing", OK)

    step("listing", listing)
    for key in (run + "object", run + "multipart"):
        # A leftover probe object is harmless; the report says what failed.
        with contextlib.suppress(ProbeError):
            store.delete(key)
    step("lifecycle", lambda: lifecycle_check(store.lifecycle_rule_ids(), wanted_rules or []))
    if object_lock != "off":
        step("object_lock", lambda: _lock(store, run + "locked", now()))
    return ProbeReport(endpoint, bucket, tuple(checks))


def _lock(store: ProbeStore, key: str, now: datetime) -> Check:
    if not store.object_lock_enabled():
        return lock_check(False, None)
    version = store.put_retained(key, b"postkeep lock probe", now + timedelta(days=1))
    refused = store.delete_version(key, version, bypass_governance=False)
    check = lock_check(True, refused)
    if refused is not None:
        left = store.delete_version(key, version, bypass_governance=True)
        if left is not None:
            return Check(check.name, check.status, f"{check.detail}; the probe object {key}"
                         f" stays until {now + timedelta(days=1):%Y-%m-%d %H:%M} UTC"
                         f" ({left})", check.required)
    return check
